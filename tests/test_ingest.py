import json
import subprocess
import sys

import pytest

from engine.config import load_config
from engine.layout import MANIFEST, QUARANTINE
from engine.manifest import kept_image_ids_by_unit, manifest_view, unit_image_ids
from engine.records import Caption, ImageRecord, records_from_table, records_to_table
from engine.store import Store
from stages.ingest import InputError, plan_ingest, remove_duplicates, run_ingest
from stages.ingest_coco import HumanLabels, labels_to_regions, read_coco, unite
from tests.inputs import encode, messy_input_folder, photo, write_coco
from tests.processes import REPO

CONFIG = load_config("engine/configs/test.yaml")


def ingest(store: Store, *inputs: str):
    return run_ingest(store, CONFIG, plan_ingest(list(inputs), store, CONFIG.ingest))


def test_messy_folder_keeps_every_good_image_once_and_quarantines_the_rest(tmp_path, ray_cluster):
    truth = messy_input_folder(tmp_path / "in", CONFIG.ingest.max_image_pixels)
    store = Store(str(tmp_path / "store"))
    summary = ingest(store, str(tmp_path / "in"))

    manifest = manifest_view(store.read("manifest"))
    assert manifest.num_rows == truth["unique_good"]
    assert summary.outputs == truth["unique_good"]
    assert len(set(manifest.column("image_id").to_pylist())) == manifest.num_rows

    quarantine = store.read("quarantine").to_pylist()
    reasons = {row["uri"].split(str(tmp_path / "in") + "/")[1]: row["reason"] for row in quarantine}
    for name, reason in truth["reasons"].items():
        assert reasons[name] == reason, name
    for pair in truth["duplicate_pairs"]:
        assert sorted(str(reasons.get(name)) for name in pair) == ["None", "duplicate image"]
    # Every input is accounted for: kept, or in quarantine with a reason.
    assert summary.inputs == manifest.num_rows + len(quarantine)
    # Nothing was written outside the store (the tar's ../ member in particular).
    assert not (tmp_path / "escape.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "store"]


def test_rotated_image_is_stored_upright(tmp_path, ray_cluster):
    truth_dir = tmp_path / "in"
    messy_input_folder(truth_dir, CONFIG.ingest.max_image_pixels)
    store = Store(str(tmp_path / "store"))
    ingest(store, str(truth_dir / "rotated.jpg"))
    (record,) = records_from_table(store.read("manifest"))
    assert (record.width, record.height) == (48, 64)


def test_rerun_skips_committed_units_and_adds_nothing(tmp_path, ray_cluster):
    messy_input_folder(tmp_path / "in", CONFIG.ingest.max_image_pixels)
    store = Store(str(tmp_path / "store"))
    ingest(store, str(tmp_path / "in"))
    first = (store.read("manifest").num_rows, store.read("quarantine").num_rows)
    again = ingest(store, str(tmp_path / "in"))
    assert again.units_run == 0 and again.units_skipped > 0
    # Duplicates listed by the first run are not counted against this one's output.
    assert again.outputs == 0 and not again.quarantined
    # It says what the store holds instead of "in 0 out 0".
    assert again.held == first[0] and f"the store holds {first[0]} rows" in again.format()
    assert (store.read("manifest").num_rows, store.read("quarantine").num_rows) == first


def ids_by_unit(store: Store) -> dict[str, tuple[str, ...]]:
    """Each manifest unit's images. Ingest left the manifest checked (each image once), so
    planners are told "all of the unit" without reading it."""
    kept = kept_image_ids_by_unit(store)
    assert set(kept.values()) == {None}
    return {unit: unit_image_ids(store, unit, None) for unit in kept}


def test_a_grown_folder_adds_exactly_its_new_images(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(9):  # three units of four, the last of one
        (folder / f"{k:02d}.jpg").write_bytes(encode(photo(40, 30, seed=k)))
    store = Store(str(tmp_path / "store"))
    ingest(store, str(folder))
    units_before = ids_by_unit(store)

    # A new image that sorts first would shift every chunk of the sorted listing.
    (folder / "00-new.jpg").write_bytes(encode(photo(40, 30, seed=99)))
    again = ingest(store, str(folder))

    assert (again.inputs, again.outputs, again.units_run) == (1, 1, 1)
    assert again.notes["files read by an earlier run, not read again"] == 9
    manifest = store.read("manifest")
    assert manifest.num_rows == 10 and len(set(manifest.column("uri").to_pylist())) == 10
    assert store.read("quarantine") is None or store.read("quarantine").num_rows == 0
    units_after = ids_by_unit(store)
    assert {u: ids for u, ids in units_after.items() if u in units_before} == units_before
    assert len(units_after) == len(units_before) + 1


def test_a_unit_cut_between_its_markers_is_redone_whole(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(6):
        (folder / f"{k:02d}.jpg").write_bytes(encode(photo(40, 30, seed=k)))
    (folder / "broken.jpg").write_bytes(b"not an image")
    store = Store(str(tmp_path / "store"))
    ingest(store, str(folder))
    clean = sorted(map(str, store.read("manifest").column("uri").to_pylist()))
    # A kill between the manifest marker and the quarantine marker of the unit holding
    # the broken file: its manifest rows are visible, its refusal is not.
    (unit,) = [
        u for u in store.committed_units("quarantine") if store.read_unit("quarantine", u).num_rows
    ]
    store.fs.rm(store.marker_path("quarantine", unit))

    again = ingest(store, str(folder))
    assert again.units_run == 1
    assert sorted(map(str, store.read("manifest").column("uri").to_pylist())) == clean
    assert [row["reason"] for row in store.read("quarantine").to_pylist()] == ["not an image"]


def test_a_unit_killed_before_its_part_was_moved_is_read_again(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(6):
        (folder / f"{k:02d}.jpg").write_bytes(encode(photo(40, 30, seed=k)))
    store = Store(str(tmp_path / "store"))
    ingest(store, str(folder))
    clean = sorted(map(str, store.read("manifest").column("uri").to_pylist()))
    # Killed after the unit's markers, before its manifest part left _staging/: the
    # marker lists the unit's files, but the unit is not committed.
    unit = store.committed_units("manifest")[0]
    store.fs.rm(store.path("manifest", store.read_marker("manifest", unit)["part"]))

    again = ingest(store, str(folder))
    assert again.units_run == 1
    assert sorted(map(str, store.read("manifest").column("uri").to_pylist())) == clean


def test_coco_labels_enter_as_human_annotations(tmp_path, ray_cluster):
    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(photo(100, 80, seed=1)))
    (folder / "b.jpg").write_bytes(encode(photo(60, 60, seed=2)))
    write_coco(
        folder / "labels.json",
        {"a.jpg": (100, 80), "b.jpg": (60, 60), "missing.jpg": (10, 10)},
        [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20],
             "segmentation": [[10, 10, 40, 10, 40, 30]]},
            {"image_id": 1, "category_id": 2, "bbox": [90, 70, 30, 30]},  # clipped
            {"image_id": 1, "category_id": 2, "bbox": [200, 200, 5, 5]},  # outside
            {"image_id": 1, "category_id": 1, "bbox": [float("nan"), 0, 5, 5]},
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 4]},
            {"image_id": 1, "category_id": 9, "bbox": [5, 5, 3, 4]},
            {"image_id": 7, "category_id": 1, "bbox": [5, 5, 3, 4]},
            {"image_id": 1, "caption": "A cat and a dog."},
            {"image_id": 1, "caption": "Two animals."},
        ],
    )  # fmt: skip
    store = Store(str(tmp_path / "store"))
    summary = ingest(store, str(folder / "labels.json"))

    records = {r.uri.rsplit("/", 1)[1]: r for r in records_from_table(store.read("manifest"))}
    assert set(records) == {"a.jpg", "b.jpg"}
    a = records["a.jpg"]
    assert [(r.text, r.box, r.source) for r in a.regions] == [
        ("cat", (10.0, 10.0, 40.0, 30.0), "human:coco"),
        ("dog", (90.0, 70.0, 100.0, 80.0), "human:coco"),
    ]
    assert a.regions[0].polygons == [[10.0, 10.0, 40.0, 10.0, 40.0, 30.0]]
    # The user's ids, for an export that COCOeval can score against their file.
    assert (a.coco_image_id, [r.category_id for r in a.regions]) == (1, [1, 2])
    assert a.captions["brief"].text == "A cat and a dog."
    assert records["b.jpg"].regions == []

    reasons = sorted(row["reason"] for row in store.read("quarantine").to_pylist())
    assert reasons == sorted(
        [
            "annotation of unknown category",
            "annotation of unknown image",
            "box outside image",
            "invalid box (empty or negative size)",
            "invalid box (not finite)",
            "unreadable file",
        ]
    )
    assert summary.notes["box clipped to image"] == 1
    assert summary.dropped["captions beyond the first not kept"] == 1


def test_boxes_and_captions_from_two_coco_files_are_united(tmp_path, ray_cluster):
    folder = tmp_path / "coco"
    folder.mkdir()
    sizes = {"a.jpg": (100, 80), "b.jpg": (60, 60)}
    for k, (name, (w, h)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(w, h, seed=k)))
    box = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20]}
    write_coco(folder / "instances.json", sizes, [box, {**box, "bbox": [0, 0, 5, 5.5]}])
    # The captions file repeats one box (annotation id 1 again): it is kept once.
    write_coco(
        folder / "captions.json",
        sizes,
        [box, {"image_id": 1, "caption": "A cat."}, {"image_id": 2, "caption": "Noise."}],
    )
    store = Store(str(tmp_path / "store"))
    summary = ingest(store, str(folder / "instances.json"), str(folder / "captions.json"))

    records = {r.uri.rsplit("/", 1)[1]: r for r in records_from_table(store.read("manifest"))}
    assert set(records) == {"a.jpg", "b.jpg"} and summary.outputs == 2
    a, b = records["a.jpg"], records["b.jpg"]
    assert [r.box for r in a.regions] == [(10.0, 10.0, 40.0, 30.0), (0.0, 0.0, 5.0, 5.5)]
    assert a.captions["brief"].text == "A cat." and b.captions["brief"].text == "Noise."
    assert a.source == "coco:captions.json+instances.json"
    assert (a.coco_image_id, b.coco_image_id) == (1, 2)
    assert store.read("quarantine").num_rows == 0  # no copy set aside as a duplicate


def test_an_image_named_by_several_coco_files_keeps_the_first_files_id():
    # In file order, as ingest passes them: the file the image is resolved against first.
    assert unite([HumanLabels(image_id=5), HumanLabels(image_id=9)]).image_id == 5
    assert unite([HumanLabels(), HumanLabels(image_id="b7")]).image_id == "b7"
    assert unite([HumanLabels(), HumanLabels()]).image_id is None


def test_coco_boxes_and_polygons_are_checked_one_by_one(tmp_path):
    # Driver-side only: what JSON can hold besides numbers is refused, never raised.
    write_coco(
        tmp_path / "labels.json",
        {"a.jpg": (100, 80)},
        [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20],
             "segmentation": [[10, 10, 40, 10, 40, 30], [10, 10, 20, 10, 20, 20, 10, 20]]},
            {"image_id": 1, "category_id": 1, "bbox": [90, 70, 30, 30],
             "segmentation": [[10, 10, 40, 10, 40]]},  # odd count: the box stays
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5],
             "segmentation": [[10, 10, 40, 10, 40, "30"]]},
            {"image_id": 1, "category_id": 1, "bbox": [0, "0", 5, 5]},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, None]},
            {"image_id": 1, "category_id": 1, "bbox": [200, 0, 5, 5]},  # outside the image
        ],
    )  # fmt: skip
    coco = read_coco(str(tmp_path / "labels.json"))
    refused = {e.uri.rsplit("=", 1)[1]: e.reason for e in coco.refused}
    assert refused == {
        "2": "invalid segmentation",
        "3": "invalid segmentation",
        "4": "invalid box (not finite)",
        "5": "invalid box (not finite)",
    }
    [(uri, labels)] = coco.images.items()
    assert [(b.annotation_id, len(b.polygons)) for b in labels.boxes] == [
        (1, 2),
        (2, 0),
        (3, 0),
        (6, 0),
    ]

    regions, _, outside, changed = labels_to_regions(labels, 100, 80, uri)
    assert [r.box for r in regions] == [(10, 10, 40, 30), (90, 70, 100, 80), (0, 0, 5, 5)]
    assert [e.uri.rsplit("=", 1)[1] for e in outside] == ["6"]
    assert changed["box clipped to image"] == 1


@pytest.mark.parametrize("spec", ["nothing-here", "nothing-here/*.jpg"])
def test_missing_input_fails_before_any_work(tmp_path, spec):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(InputError):
        plan_ingest([str(tmp_path / spec)], store, CONFIG.ingest)


def test_invalid_coco_file_fails_before_any_work(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"not": "coco"}))
    with pytest.raises(InputError, match="COCO"):
        plan_ingest([str(tmp_path / "labels.json")], Store(str(tmp_path / "s")), CONFIG.ingest)


def test_the_duplicate_check_reads_no_part_into_the_driver_and_keeps_the_labelled_copy(
    tmp_path, monkeypatch
):
    store = Store(str(tmp_path / "store"))
    bare = ImageRecord("a", "folder/a.jpg", "folder", 9, 9, "h")
    labelled = ImageRecord(
        "a", "coco/a.jpg", "coco", 9, 9, "h", captions={"brief": Caption("x", "human")}
    )
    others = [ImageRecord(i, f"folder/{i}.jpg", "folder", 9, 9, "h") for i in "bcd"]
    store.commit_unit("u1", {MANIFEST: records_to_table([bare, others[0]], [b"x"] * 2)})
    store.commit_unit("u2", {MANIFEST: records_to_table([others[1], labelled], [b"x"] * 2)})
    store.commit_unit("u3", {MANIFEST: records_to_table(others[2:], [b"x"])})
    read_unit = Store.read_unit
    reads = []

    def spy(self, dataset, unit, columns=None):
        reads.append((dataset, unit))
        return read_unit(self, dataset, unit, columns)

    monkeypatch.setattr(Store, "read_unit", spy)
    assert remove_duplicates(store) == 1
    # DuckDB found the copies; the driver read the units holding them (for the copies'
    # rows), then committed again the one that loses its copy. u3 was never read.
    assert reads == [(MANIFEST, "u1"), (MANIFEST, "u2"), (MANIFEST, "u1")]
    manifest = store.read(MANIFEST, columns=["uri"]).column("uri").to_pylist()
    assert sorted(manifest) == ["coco/a.jpg", "folder/b.jpg", "folder/c.jpg", "folder/d.jpg"]
    [listed] = store.read(QUARANTINE, columns=["uri", "detail"]).to_pylist()
    assert listed == {"uri": "folder/a.jpg", "detail": "same content as coco/a.jpg"}
    # Idempotent, and a checked manifest is not read again.
    reads.clear()
    assert remove_duplicates(store) == 0
    assert reads == []


def test_a_manifest_without_copies_is_checked_without_pandas(tmp_path):
    """pyarrow imports pandas, where it is installed, for the first Arrow array built from
    Python values: a quarter of a second of every small ingest's driver. The usual
    answer, no copies, builds none."""
    pytest.importorskip("pandas")
    store = Store(str(tmp_path / "store"))
    for unit, ids in (("u1", "ab"), ("u2", "cd")):
        records = [ImageRecord(i, f"folder/{i}.jpg", "folder", 9, 9, "h") for i in ids]
        store.commit_unit(unit, {MANIFEST: records_to_table(records, [b"x"] * 2)})
    check = (
        "import sys; from engine.store import Store; from stages.ingest import remove_duplicates;"
        f"print(remove_duplicates(Store({store.url!r})), 'pandas' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["0", "False"]
