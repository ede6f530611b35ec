import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.records import (
    RECORD_SCHEMA,
    Caption,
    ImageRecord,
    Region,
    records_from_table,
    records_to_table,
)
from engine.store import Store, fingerprint, kept_image_ids_by_unit, manifest_view


def table(ids):
    return pa.table({"image_id": ids, "n": list(range(len(ids)))})


def test_part_is_invisible_until_committed(store):
    assert store.read("manifest") is None
    # A part written without its marker, as after a kill mid-commit.
    path = store.part_path("manifest", "u1")
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with store.fs.open(path, "wb") as f:
        f.write(b"half a parquet file")
    assert store.read("manifest") is None
    assert not store.unit_done("u1", ["manifest"])
    store.commit_unit("u1", {"manifest": table(["a", "b"])})
    assert store.read("manifest").column("image_id").to_pylist() == ["a", "b"]


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
    # A run on a new threshold killed after writing its part, before its marker: the
    # unit is still the old one, whole.
    new = fingerprint("threshold", 0.8)
    with store.fs.open(store.part_path("ds", "u1", new), "wb") as f:
        pq.write_table(table(["x", "y"]), f)
    assert store.read("ds").column("image_id").to_pylist() == ["a"]
    assert not store.is_current("ds", "u1", new) and store.is_committed("ds", "u1")

    store.commit_unit("u1", {"ds": table(["b", "c"])}, inputs=new)
    assert store.is_current("ds", "u1", new)
    assert store.read("ds").column("image_id").to_pylist() == ["b", "c"]
    assert not store.fs.exists(store.path("ds", first))  # the replaced part is removed


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


def test_manifest_view_keeps_first_of_each_image():
    records = [ImageRecord(i, f"u{k}", "s", 1, 1, "h") for k, i in enumerate("abab")]
    view = manifest_view(records_to_table(records, images=[b"x"] * 4))
    assert view.column("uri").to_pylist() == ["u0", "u1"]
    assert manifest_view(None).num_rows == 0


def test_manifest_view_prefers_the_copy_with_human_labels():
    bare = ImageRecord("a", "folder/a.jpg", "folder", 9, 9, "h")
    captioned = ImageRecord(
        "a", "coco/a.jpg", "coco", 9, 9, "h", captions={"brief": Caption("x", "human")}
    )
    boxed = ImageRecord(
        "a",
        "coco2/a.jpg",
        "coco",
        9,
        9,
        "h",
        regions=[Region((0, 0, 1, 1), "x", "object", "human")] * 2,
    )
    view = manifest_view(records_to_table([bare, captioned, boxed], images=[b"x"] * 3))
    assert view.column("uri").to_pylist() == ["coco2/a.jpg"]
    view = manifest_view(records_to_table([bare, captioned], images=[b"x"] * 2))
    assert view.column("uri").to_pylist() == ["coco/a.jpg"]


def test_kept_ids_by_unit_follow_the_view(store):
    bare = ImageRecord("a", "folder/a.jpg", "folder", 9, 9, "h")
    labelled = ImageRecord(
        "a", "coco/a.jpg", "coco", 9, 9, "h", captions={"brief": Caption("x", "human")}
    )
    other = ImageRecord("b", "folder/b.jpg", "folder", 9, 9, "h")
    store.commit_unit("u1", {"manifest": records_to_table([bare, other], images=[b"x"] * 2)})
    store.commit_unit("u2", {"manifest": records_to_table([labelled], images=[b"x"])})
    assert kept_image_ids_by_unit(store) == {"u1": ("b",), "u2": ("a",)}


def test_unwritable_store_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Exception, match="not writable"):
        Store(str(blocker / "store")).check_writable()
