"""A damaged store: markers record what they commit, a damaged part or marker is named in
one line, and the stage that writes it sees its unit as not committed and redoes it."""

import json

import pyarrow as pa
import pytest

from engine.config import load_config
from engine.layout import MANIFEST, round_layout
from engine.records import ImageRecord, Region, records_to_table
from engine.store import Store, StoreError
from stages.export import run_export
from stages.filter import run_filter
from tests.inputs import encode, photo

CONFIG = load_config("engine/configs/test.yaml")


def table(ids):
    return pa.table({"image_id": ids, "n": list(range(len(ids)))})


def write(store: Store, path: str, data: bytes) -> None:
    with store.fs.open(path, "wb") as f:
        f.write(data)


def one_line_naming(exc: pytest.ExceptionInfo, name: str) -> str:
    message = str(exc.value)
    assert name in message and len(message.splitlines()) == 1, message
    return message


def test_a_marker_records_the_rows_and_bytes_it_commits(store):
    # ``info`` describes a unit but cannot overwrite what the marker commits.
    store.commit_unit("u1", {"ds": table(["a", "b"])}, info={"rows": 99, "thresholds": "t"})
    marker = store.read_marker("ds", "u1")
    assert marker["rows"] == 2 and marker["thresholds"] == "t"
    assert marker["bytes"] == store.fs.size(store.part_path("ds", "u1"))


@pytest.mark.parametrize("content", [b"", b'{"part": "part-u1.parq', b"[]", b"\xff\xfe"])
def test_an_empty_or_cut_marker_is_not_committed_and_is_named(store, content):
    store.commit_unit("u1", {"ds": table(["a"])})
    store.commit_unit("u2", {"ds": table(["b"])})
    write(store, store.marker_path("ds", "u1"), content)  # a kill or a full disk mid-write
    assert not store.is_committed("ds", "u1") and store.is_committed("ds", "u2")
    assert not store.unit_done("u1", ["ds"])
    # A reader names the marker instead of losing the unit's rows.
    with pytest.raises(StoreError) as exc:
        store.read("ds")
    one_line_naming(exc, "_committed/ds/u1.json")
    # Counted as any reader of the dataset's folder counts it: not there.
    assert store.committed_rows("ds") == 1
    # The rerun of the stage that writes it commits it again.
    store.commit_unit("u1", {"ds": table(["a"])})
    assert store.read("ds").column("image_id").to_pylist() == ["a", "b"]


def test_a_truncated_or_missing_part_is_not_committed_and_is_named(store):
    store.commit_unit("u1", {"ds": table(["a", "b", "c"])})
    path = store.part_path("ds", "u1")
    whole = store.fs.cat_file(path)
    write(store, path, whole[: len(whole) // 2])
    assert not store.is_committed("ds", "u1")
    with pytest.raises(StoreError) as exc:
        store.read_unit("ds", "u1")
    assert "bytes" in one_line_naming(exc, "ds/part-u1.parquet")
    store.fs.rm(path)
    assert not store.is_committed("ds", "u1")
    with pytest.raises(StoreError) as exc:
        store.read("ds")
    assert "missing" in one_line_naming(exc, "ds/part-u1.parquet")


def test_a_unit_read_without_a_marker_is_named(store):
    with pytest.raises(StoreError) as exc:
        store.read_unit("ds", "u9")
    assert "not committed" in one_line_naming(exc, "_committed/ds/u9.json")


def test_markers_written_before_sizes_were_recorded_still_read(store):
    store.commit_unit("u1", {"ds": table(["a", "b"])})
    old = {"part": "part-u1.parquet", "rows": 2}  # what commit_unit wrote before sizes
    write(store, store.marker_path("ds", "u1"), json.dumps(old).encode())
    assert store.is_committed("ds", "u1")
    assert store.read("ds").num_rows == store.committed_rows("ds") == 2
    # Without a size, a truncated part is caught by Parquet, and named all the same.
    whole = store.fs.cat_file(store.part_path("ds", "u1"))
    write(store, store.part_path("ds", "u1"), whole[:-10])
    with pytest.raises(StoreError) as exc:
        store.read_unit("ds", "u1")
    assert "cannot be read" in one_line_naming(exc, "ds/part-u1.parquet")


def test_a_part_whose_rows_differ_from_its_marker_is_named(store):
    store.commit_unit("u1", {"ds": table(["a", "b"])})
    marker = store.read_marker("ds", "u1") | {"rows": 3}
    write(store, store.marker_path("ds", "u1"), json.dumps(marker).encode())
    with pytest.raises(StoreError) as exc:
        store.read_unit("ds", "u1", columns=["n"])
    assert "2 rows" in one_line_naming(exc, "ds/part-u1.parquet")


def test_markers_of_other_files_name_no_part(store):
    store.write_marker("shards", "u1", {"shards": []})
    assert store.is_committed("shards", "u1")
    write(store, store.marker_path("shards", "u1"), b"")
    assert not store.is_committed("shards", "u1")
    with pytest.raises(StoreError) as exc:
        store.read_marker("shards", "u1")
    one_line_naming(exc, "_committed/shards/u1.json")


# ---------------------------------------------------------------- stages on a damaged store


def records(unit: int) -> list[ImageRecord]:
    """Two images per unit, each with a confident box and one under the filter's threshold."""
    boxes = [
        Region((1, 1, 20, 20), "cat", "object", "det", score=0.9),
        Region((5, 5, 30, 30), "dog", "object", "det", score=0.1),
    ]
    return [
        ImageRecord(f"i{unit}{k}", f"mem://{unit}{k}", "test", 40, 30, "0" * 64, regions=boxes)
        for k in range(2)
    ]


@pytest.fixture
def merged_store(tmp_path, ray_cluster):
    """A store with two manifest units and round 0's merged records of both."""
    store = Store(str(tmp_path / "store"))
    for unit in range(2):
        chunk = records(unit)
        images = [encode(photo(40, 30, seed=k)) for k in range(len(chunk))]
        store.commit_unit(f"u{unit}", {MANIFEST: records_to_table(chunk, images)})
        store.commit_unit(f"u{unit}", {round_layout(0).merged: records_to_table(chunk)})
    return store


def test_export_redoes_a_unit_whose_marker_was_left_empty(merged_store):
    store, layout = merged_store, round_layout(0)
    # A shard per unit of two images, so each unit is an export unit of its own.
    config = load_config("engine/configs/test.yaml", ["export.shard_max_samples=2"])
    assert run_export(store, config, 0).units_run == 2
    index = store.read_json(layout.shard_index)
    write(store, store.marker_path(layout.shards, "u1"), b"")
    again = run_export(store, config, 0)
    assert (again.units_run, again.units_skipped) == (1, 1)
    assert store.read_json(layout.shard_index) == index


def test_filter_redoes_a_unit_whose_marker_was_left_empty(merged_store):
    store, layout = merged_store, round_layout(0)
    first = run_filter(store, CONFIG, 0)
    kept = store.read(layout.filtered)
    write(store, store.marker_path(layout.filtered, "u0"), b"")
    again = run_filter(store, CONFIG, 0)
    assert (again.units_run, again.units_skipped) == (1, 1)
    assert again.outputs == first.outputs // 2 and store.read(layout.filtered).equals(kept)
