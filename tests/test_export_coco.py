"""coco.json keeps the user's file names and COCO ids: COCOeval against the user's own
ground truth works with no remapping (issue #16)."""

import contextlib
import io
import json

import pytest
import webdataset as wds
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.config import load_config
from engine.layout import MANIFEST
from engine.records import ImageRecord, Region, records_to_table
from engine.store import Store
from stages import export_coco
from stages.export import run_export
from stages.export_coco import _file_names, _image_ids, write_coco
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo

CONFIG = load_config("engine/configs/test.yaml")
# COCO val2017's ids: neither the images' nor the categories' are 1, 2, 3...
USER_IMAGES = [
    {"id": 397133, "file_name": "000000397133.jpg", "width": 120, "height": 90},
    {"id": 37777, "file_name": "000000037777.jpg", "width": 100, "height": 80},
    # One file name under two folders: coco.json must tell them apart.
    {"id": 5001, "file_name": "a/0.jpg", "width": 64, "height": 64},
    {"id": 42, "file_name": "b/0.jpg", "width": 64, "height": 64},
]
USER_CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
USER_BOXES = [
    (397133, 18, [10, 12, 50, 40]),
    (397133, 1, [60, 5, 30, 70]),
    (37777, 1, [0, 0, 40.5, 33.25]),
    (5001, 18, [4, 4, 20, 20]),
    (42, 1, [30, 30, 20, 30]),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ray_cluster):
    """The user's COCO file ingested with a folder holding one more ``0.jpg``, exported."""
    root = tmp_path_factory.mktemp("provenance")
    user = root / "user"
    for seed, image in enumerate(USER_IMAGES):
        path = user / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(photo(image["width"], image["height"], seed=seed)))
    annotations = [
        {"id": 900 + k, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3],
         "iscrowd": 0}
        for k, (i, c, box) in enumerate(USER_BOXES)
    ]  # fmt: skip
    truth = {"images": USER_IMAGES, "annotations": annotations, "categories": USER_CATEGORIES}
    (user / "instances.json").write_text(json.dumps(truth))
    (root / "extra").mkdir()
    (root / "extra/0.jpg").write_bytes(encode(photo(50, 40, seed=99)))
    store = Store(str(root / "store"))
    inputs = [str(user / "instances.json"), str(root / "extra")]
    run_ingest(store, CONFIG, plan_ingest(inputs, store, CONFIG.ingest))
    run_export(store, CONFIG, 0)
    shards = json.loads((root / "store/exports/r000/_index.json").read_text())["shards"]
    keys = {s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)}
    return root, json.loads((root / "store/exports/r000/coco.json").read_text()), keys


def test_images_keep_the_users_ids_and_file_names(exported):
    root, coco, keys = exported
    by_name = {image["file_name"]: image for image in coco["images"]}
    assert {name: by_name[name]["id"] for name in by_name} == {
        **{image["file_name"]: image["id"] for image in USER_IMAGES},
        # Not in the user's file: an id above all of theirs, its folder to tell its 0.jpg.
        "extra/0.jpg": 397134,
    }
    assert by_name["extra/0.jpg"]["fld_uri"] == (root / "extra/0.jpg").as_uri()
    assert by_name["a/0.jpg"]["fld_uri"] == (root / "user/a/0.jpg").as_uri()
    # Each image names its shard sample.
    assert {image["fld_image_id"] for image in coco["images"]} == keys


def test_human_boxes_keep_the_users_category_ids(exported):
    _, coco, _ = exported
    by_id = sorted(coco["categories"], key=lambda c: c["id"])
    assert by_id == sorted(USER_CATEGORIES, key=lambda c: c["id"])
    got = sorted((a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"])
    assert got == sorted(USER_BOXES)


def test_cocoeval_against_the_users_own_file_needs_no_remapping(exported):
    root, coco, _ = exported
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(root / "user/instances.json"))
        detections = truth.loadRes([{**a, "score": 1.0} for a in coco["annotations"]])
        evaluation = COCOeval(truth, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # AP at IoU .50:.95, all areas


def test_machine_regions_share_the_users_categories_by_name_and_never_their_ids(tmp_path):
    store = Store(str(tmp_path / "store"))

    def human(box, text, category_id):
        return Region(box, text, "object", "human:coco", category_id=category_id)

    records = [
        ImageRecord("i0", "file:///in/x/0.jpg", "coco:a.json", 64, 64, "0" * 64,
                    coco_image_id=7,
                    regions=[human((0, 0, 9, 9), "dog", 18),
                             Region((1, 1, 9, 9), "dog", "object", "owl", 0.9),
                             Region((2, 2, 9, 9), "cat", "object", "owl", 0.8),
                             Region((3, 3, 9, 9), "STOP", "ocr", "ocr:rapidocr", 0.7)]),
        # A second COCO file that gave id 7 to another image, and 18 to another name.
        ImageRecord("i1", "file:///in/y/0.jpg", "coco:b.json", 64, 64, "1" * 64,
                    coco_image_id=7, regions=[human((0, 0, 5, 5), "hound", 18)]),
        ImageRecord("i2", "file:///in/s.tar#0.jpg", "tar", 64, 64, "2" * 64,
                    regions=[Region((0, 0, 4, 4), "cat", "object", "owl", 0.5)]),
    ]  # fmt: skip
    # write_coco reads the records alone: any bytes stand in for the images.
    manifest = records_to_table(records, images=[b"\xff\xd8"] * len(records))
    store.commit_unit("u0", {MANIFEST: manifest})
    write_coco(store, MANIFEST, [("u0", ("i0", "i1", "i2"))], "coco.json", [])

    coco = COCO(store.path("coco.json"))
    assert [(i["id"], i["file_name"]) for i in coco.dataset["images"]] == [
        (7, "x/0.jpg"),
        (8, "y/0.jpg"),
        (9, "s.tar#0.jpg"),
    ]
    assert coco.dataset["categories"] == [
        {"id": 18, "name": "dog"},
        {"id": 19, "name": "cat"},
        {"id": 20, "name": "hound"},
    ]
    assert [(a["image_id"], a["category_id"]) for a in coco.dataset["annotations"]] == [
        (7, 18),
        (7, 18),
        (7, 19),
        (8, 20),
        (9, 19),
    ]


@pytest.mark.parametrize(
    ("originals", "ids"),
    [
        ([None, 3, None, 3], [4, 3, 5, 6]),
        # All strings: fresh ids are strings too, so COCOeval can sort them.
        (["a", None, "1"], ["a", "2", "1"]),
        ([None, None], [1, 2]),
    ],
)
def test_fresh_image_ids_never_take_an_original_one(originals, ids):
    assert _image_ids(originals) == ids


def test_file_names_are_the_shortest_tails_that_tell_images_apart():
    uris = ["file:///d/a/x/0.jpg", "file:///d/b/x/0.jpg", "s3://bucket/c/1.jpg", "/d/0.jpg"]
    assert _file_names(uris) == ["a/x/0.jpg", "b/x/0.jpg", "1.jpg", "d/0.jpg"]


def test_a_part_written_before_coco_ids_were_kept_still_exports(tmp_path):
    store = Store(str(tmp_path / "store"))
    records = [
        ImageRecord("i0", "file:///in/a.jpg", "folder", 64, 64, "0" * 64,
                    regions=[Region((0, 0, 4, 4), "cat", "object", "owl", 0.5)]),
    ]  # fmt: skip
    old = records_to_table(records, images=[b"\xff\xd8"]).drop_columns(["coco_image_id"])
    store.commit_unit("u0", {MANIFEST: old})
    write_coco(store, MANIFEST, [("u0", None)], "coco.json", [])
    coco = COCO(store.path("coco.json"))
    assert [(i["id"], i["file_name"]) for i in coco.dataset["images"]] == [(1, "a.jpg")]
    assert [a["bbox"] for a in coco.dataset["annotations"]] == [[0, 0, 4, 4]]


def test_images_inserted_a_few_at_a_time_get_the_same_names_and_ids(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    for unit, (folder, first_id) in enumerate([("a", 7), ("b", 7), ("c", None)]):
        records = [
            ImageRecord(f"{folder}{n}", f"file:///in/{folder}/{n}.jpg", "coco", 64, 64,
                        "0" * 64, coco_image_id=None if first_id is None else first_id + n)
            for n in range(3)
        ]  # fmt: skip
        store.commit_unit(f"u{unit}", {MANIFEST: records_to_table(records, [b"\xff\xd8"] * 3)})
    units = [(f"u{n}", None) for n in range(3)]
    write_coco(store, MANIFEST, units, "whole.json", [])
    monkeypatch.setattr(export_coco, "_INSERT_ROWS", 2)
    write_coco(store, MANIFEST, units, "batched.json", [])
    whole, batched = (
        json.loads(store.fs.cat(store.path(name))) for name in ("whole.json", "batched.json")
    )
    assert batched == whole
    assert [(i["id"], i["file_name"]) for i in whole["images"]][2:5] == [
        (9, "a/2.jpg"), (10, "b/0.jpg"), (11, "b/1.jpg")
    ]  # fmt: skip
