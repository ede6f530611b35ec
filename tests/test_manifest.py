"""The manifest as stages see it: one copy of each image, and what planners hold of it."""

from engine.manifest import (
    kept_image_ids_by_unit,
    manifest_view,
    record_manifest_checked,
    unit_image_ids,
)
from engine.records import Caption, ImageRecord, Region, records_to_table


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


def test_a_checked_manifest_is_planned_from_its_markers_alone(store):
    records = [ImageRecord(i, f"folder/{i}.jpg", "folder", 9, 9, "h") for i in "abc"]
    store.commit_unit("u1", {"manifest": records_to_table(records[:2], images=[b"x"] * 2)})
    store.commit_unit("u2", {"manifest": records_to_table(records[2:], images=[b"x"])})
    assert kept_image_ids_by_unit(store) == {"u1": ("a", "b"), "u2": ("c",)}
    record_manifest_checked(store)  # what ingest's last step does

    def refuse(*args, **kwargs):
        raise AssertionError("a part was read to plan a checked manifest")

    read_unit, store.read_unit = store.read_unit, refuse
    assert kept_image_ids_by_unit(store) == {"u1": None, "u2": None}
    store.read_unit = read_unit
    # What a stage's fingerprint names is the same either way.
    assert unit_image_ids(store, "u1", None) == ("a", "b")
    # A unit committed since the check (a run killed before ingest's last step) sends
    # planning back to the ids, and to the labels where an id repeats.
    labelled = ImageRecord("a", "coco/a.jpg", "coco", 9, 9, "h", captions={
        "brief": Caption("x", "human")
    })  # fmt: skip
    store.commit_unit("u3", {"manifest": records_to_table([labelled], images=[b"x"])})
    assert kept_image_ids_by_unit(store) == {"u1": ("b",), "u2": ("c",), "u3": ("a",)}
