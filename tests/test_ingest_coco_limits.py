"""COCO files that are not COCO fail with one line; an image with too many labels is
quarantined whole, cheaply."""

import json
import time

import pytest

from engine.run import main
from stages.ingest_coco import read_coco
from tests.inputs import write_coco

CONFIG = "engine/configs/test.yaml"
GOOD = {
    "images": [{"id": 1, "file_name": "a.jpg"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}],
    "categories": [{"id": 1, "name": "cat"}],
}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ('{"images": [], "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
        (json.dumps({**GOOD, "annotations": {"1": {}}}), "'annotations' is not a list"),
        (json.dumps({**GOOD, "categories": "cat"}), "'categories' is not a list"),
        (json.dumps({**GOOD, "images": {"id": 1}}), "no 'images' list"),
        (json.dumps({**GOOD, "categories": [["cat"]]}), "categories[0] is not an object"),
        (json.dumps({**GOOD, "categories": [{"id": [1], "name": "cat"}]}), "categories[0]"),
        (json.dumps({**GOOD, "categories": [{"id": {"a": 1}, "name": "cat"}]}), "categories[0]"),
        (json.dumps({**GOOD, "categories": [{"id": True, "name": "cat"}]}), "categories[0]"),
        (json.dumps({**GOOD, "categories": [{"id": 1.0, "name": "cat"}]}), "categories[0]"),
    ],
)
def test_a_file_that_is_not_coco_fails_with_one_line(tmp_path, capsys, text, message):
    (tmp_path / "labels.json").write_text(text)
    store = tmp_path / "store"
    args = ["--stage", "ingest", "--config", CONFIG, "--store", str(store)]
    assert main([*args, "--input", str(tmp_path / "labels.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is not a readable COCO file" in err and message in err
    assert not (store / "manifest").exists()


def test_ids_of_the_wrong_type_refuse_their_entry_never_the_run(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg"},
        {"id": [2], "file_name": "b.jpg"},
        {"id": {"x": 3}, "file_name": "c.jpg"},
        {"id": True, "file_name": "d.jpg"},  # would equal the id 1
        {"id": 1.0, "file_name": "e.jpg"},
        {"id": 1, "file_name": "f.jpg"},  # would take a.jpg's labels
        {"id": "g", "file_name": "g.jpg"},  # string ids are kept, as some files use them
    ]
    box = {"category_id": 1, "bbox": [0, 0, 5, 5]}
    annotations = [
        {"id": 1, "image_id": 1, **box},
        {"id": 2, "image_id": [1], **box},
        {"id": 3, "image_id": {"a": 1}, **box},
        {"id": 4, "image_id": True, **box},
        {"id": 5, "image_id": 1, "category_id": [1], "bbox": [0, 0, 5, 5]},
        {"id": 6, "image_id": 1, "category_id": True, "bbox": [0, 0, 5, 5]},
        {"id": [7], "image_id": 1, **box},
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10**400, 5]},
        {"id": 9, "image_id": 1, **box, "segmentation": [[0, 0, 10**400, 0, 5, 5]]},
        {"id": 10, "image_id": 1, "caption": ["not", "text"]},
        {"id": 11, "image_id": "g", **box},
    ]
    coco = {"images": images, "annotations": annotations, "categories": GOOD["categories"]}
    # json.dumps writes 10**400 as its 401 digits, which JSON allows.
    (tmp_path / "labels.json").write_text(json.dumps(coco))

    result = read_coco(str(tmp_path / "labels.json"))
    refused = sorted((e.uri.rsplit("#", 1)[1], e.reason) for e in result.refused)
    assert refused == sorted(
        [
            ("images[1]", "image entry with an invalid id"),
            ("images[2]", "image entry with an invalid id"),
            ("images[3]", "image entry with an invalid id"),
            ("images[4]", "image entry with an invalid id"),
            ("images[5]", "image entry with a duplicate id"),
            ("annotation=2", "annotation of unknown image"),
            ("annotation=3", "annotation of unknown image"),
            ("annotation=4", "annotation of unknown image"),
            ("annotation=5", "annotation of unknown category"),
            ("annotation=6", "annotation of unknown category"),
            ("annotations[6]", "invalid annotation id"),
            ("annotation=8", "invalid box (not finite)"),
            ("annotation=9", "invalid segmentation"),
            ("annotation=10", "invalid caption"),
        ]
    )
    boxes = {
        u.rsplit("/", 1)[1]: [b.annotation_id for b in v.boxes] for u, v in result.images.items()
    }
    assert boxes == {"a.jpg": [1, 9], "g.jpg": [11]}


def test_an_image_over_the_label_limit_is_quarantined_whole_and_cheaply(tmp_path):
    many = 200_000
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}] * many
    annotations += [{"image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}] * 3
    write_coco(tmp_path / "labels.json", {"a.jpg": (10, 10), "b.jpg": (10, 10)}, annotations)

    started = time.perf_counter()
    result = read_coco(str(tmp_path / "labels.json"), max_labels_per_image=2000)
    # Building 200,000 boxes, then merging them, is what the limit avoids: the bound is
    # loose, for a shared machine; about a second is usual.
    assert time.perf_counter() - started < 30

    (entry,) = result.refused
    assert entry.uri.endswith("/a.jpg") and entry.reason == "too many labels"
    assert entry.item == "input"
    assert "200000 labels" in entry.detail and "ingest.max_labels_per_image=2000" in entry.detail
    [(uri, labels)] = result.images.items()
    assert uri.endswith("/b.jpg") and len(labels.boxes) == 3
    # At the limit is within it.
    assert len(read_coco(str(tmp_path / "labels.json"), max_labels_per_image=many).images) == 2
