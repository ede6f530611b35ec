import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from engine.records import (
    RECORD_SCHEMA,
    ImageRecord,
    records_from_table,
    records_to_table,
)
from engine.store import Store, fingerprint


def table(ids):
    return pa.table({"image_id": ids, "n": list(range(len(ids)))})


def test_part_is_invisible_until_committed(store):
    assert store.read("manifest") is None
    # A part staged without its marker, as after a kill mid-commit.
    path = store.staging_path("manifest", "part-u1.parquet")
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with store.fs.open(path, "wb") as f:
        f.write(b"half a parquet file")
    assert store.read("manifest") is None
    assert not store.unit_done("u1", ["manifest"])
    assert store.fs.glob(store.path("manifest", "*")) == []
    store.commit_unit("u1", {"manifest": table(["a", "b"])})
    assert store.read("manifest").column("image_id").to_pylist() == ["a", "b"]
    # The dataset's folder holds its parts and nothing else.
    assert store.fs.glob(store.path("manifest", "*")) == [store.part_path("manifest", "u1")]
    store.clear_staging()
    assert not store.fs.exists(store.path("_staging"))


def test_unit_is_done_only_when_every_dataset_is_committed(store):
    store.commit_unit("u1", {"manifest": table(["a"])})
    assert store.unit_done("u1", ["manifest"])
    assert not store.unit_done("u1", ["manifest", "quarantine"])
    store.commit_unit("u1", {"manifest": table(["a"]), "quarantine": table([])})
    assert store.unit_done("u1", ["manifest", "quarantine"])
    # Recommitting rewrites the same part: no duplicate rows.
    assert store.read("manifest").num_rows == 1


def test_a_unit_computed_from_new_inputs_never_overwrites_its_committed_part(store):
    store.commit_unit("u1", {"ds": table(["a"])}, inputs=fingerprint("threshold", 0.5))
    first = store.read_marker("ds", "u1")["part"]
    assert store.is_current("ds", "u1", fingerprint("threshold", 0.5))
    new = fingerprint("threshold", 0.8)
    assert not store.is_current("ds", "u1", new) and store.is_committed("ds", "u1")

    store.commit_unit("u1", {"ds": table(["b", "c"])}, inputs=new)
    assert store.is_current("ds", "u1", new)
    assert store.read("ds").column("image_id").to_pylist() == ["b", "c"]
    assert not store.fs.exists(store.path("ds", first))  # the replaced part is removed


class Killed(Exception):
    """The process died here."""


class DiesAfter:
    """A filesystem that dies at its ``writes``-th change (a file opened for writing, a
    move, a removal), as a run killed at that point of a commit would."""

    def __init__(self, fs, writes: int) -> None:
        self._fs, self._left = fs, writes

    def _change(self) -> None:
        if self._left == 0:
            raise Killed
        self._left -= 1

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self._change()
        return self._fs.open(path, mode, **kwargs)

    def mv(self, *args, **kwargs):
        self._change()
        return self._fs.mv(*args, **kwargs)

    def rm(self, *args, **kwargs):
        self._change()
        return self._fs.rm(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def outside_count(store: Store, dataset: str) -> int:
    """Rows a reader that knows nothing of markers sees: DuckDB over the folder's parts."""
    glob = store.path(dataset, "*.parquet")
    if not store.fs.glob(glob):
        return 0
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0]


def engine_rows(store: Store, dataset: str) -> list[str]:
    units = [u for u in store.committed_units(dataset) if store.is_committed(dataset, u)]
    return [i for u in units for i in store.read_unit(dataset, u).column("image_id").to_pylist()]


@pytest.mark.parametrize("inputs", [None, "new"])
def test_a_commit_killed_at_any_step_shows_readers_what_the_engine_sees(tmp_path, inputs):
    """Killed at each change a commit makes (two datasets, one of them replacing a part
    computed from other inputs): DuckDB over a dataset's folder counts exactly the rows
    the engine reads, those are the old unit's or the new one's, never both, and the
    rerun commits the new unit whole."""
    old = {"a": table(["a1", "a2"]), "b": table(["b1"])}
    new = {"a": table(["x1", "x2", "x3"]), "b": table(["y1", "y2"])}
    for writes in range(14):
        store = Store(str(tmp_path / f"s{inputs}{writes}"))
        store.commit_unit("u0", {"a": table(["other"]), "b": table(["other"])})
        store.commit_unit("u1", old, inputs=None if inputs is None else "old")
        real = store.fs
        store.fs = DiesAfter(real, writes)
        try:
            store.commit_unit("u1", new, inputs=inputs)
            finished = True
        except Killed:
            finished = False
        store.fs = real
        for dataset in ("a", "b"):
            rows = engine_rows(store, dataset)
            assert outside_count(store, dataset) == len(rows), (writes, dataset)
            unit = rows[1:]  # past u0's rows
            expected = [new[dataset], old[dataset], table([])]
            assert unit in [t.column("image_id").to_pylist() for t in expected], (writes, unit)
        if finished:
            break
        store.clear_staging()
        assert not store.unit_current("u1", ["a", "b"], inputs) or inputs is None
        store.commit_unit("u1", new, inputs=inputs)
        for dataset in ("a", "b"):
            ids = new[dataset].column("image_id").to_pylist()
            assert engine_rows(store, dataset)[1:] == ids
            assert outside_count(store, dataset) == 1 + len(ids)
    assert finished, "the commit should finish within the steps tried"


def test_fingerprints_are_the_same_in_every_process():
    script = (
        "from engine.store import fingerprint; "
        "print(fingerprint({'students': frozenset({'od', 'cap', 'ocr'})}, 0.5))"
    )
    runs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout
        for _ in range(2)
    }
    assert runs == {fingerprint({"students": frozenset({"od", "cap", "ocr"})}, 0.5) + "\n"}


def test_a_part_written_before_a_column_was_added_still_reads(store):
    record = ImageRecord("a", "file:///a.jpg", "folder", 4, 3, "h", coco_image_id=7)
    old = records_to_table([record]).drop_columns(["coco_image_id"])
    store.commit_unit("u1", {"merged": old})
    (back,) = records_from_table(store.read_unit("merged", "u1", columns=RECORD_SCHEMA.names))
    assert back.image_id == "a" and back.coco_image_id is None


def test_parts_read_in_unit_order(store):
    store.commit_unit("b", {"ds": table(["3"])})
    store.commit_unit("a", {"ds": table(["1", "2"])})
    assert store.committed_units("ds") == ["a", "b"]
    assert store.read("ds").column("image_id").to_pylist() == ["1", "2", "3"]
    assert store.read("ds", columns=["n"]).column_names == ["n"]


def test_unwritable_store_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Exception, match="not writable"):
        Store(str(blocker / "store")).check_writable()


def test_a_small_file_killed_mid_write_leaves_the_old_one_whole(store, monkeypatch):
    store.write_bytes("rounds/r000/state.json", b'{"round": 0}')
    open_file = store.fs.open

    def dies_mid_write(path, mode="rb", **kwargs):
        handle = open_file(path, mode, **kwargs)
        if "w" in mode:
            handle.write(b'{"rou')
            raise KeyboardInterrupt  # the run is killed with half the bytes written
        return handle

    monkeypatch.setattr(store.fs, "open", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        store.write_bytes("rounds/r000/state.json", b'{"round": 1}')
    monkeypatch.undo()
    assert store.read_json("rounds/r000/state.json") == {"round": 0}
