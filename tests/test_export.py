"""Export: shards readable by plain webdataset, DESIGN.md's sample format, COCO for pycocotools."""

import json
import os

import datasets
import pytest
import webdataset as wds
from pycocotools.coco import COCO

from engine.config import load_config
from engine.layout import MANIFEST
from engine.records import ImageRecord, records_to_table
from engine.store import Store
from stages.export import run_export
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo, write_coco
from tests.tiny_florence2 import build_florence2_processor

CONFIG = load_config("engine/configs/test.yaml")
SAMPLE_KEYS = {
    "image_id",
    "uri",
    "width",
    "height",
    "source",
    "captions",
    "regions",
    "phrases",
    "florence2",
}
REGION_KEYS = {"box", "text", "kind", "score", "source", "polygons", "quad"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("export")
    folder = root / "coco"
    folder.mkdir()
    sizes = {f"{k}.jpg": (120 + 7 * k, 90 + 5 * k) for k in range(7)}
    annotations = []
    for k, (name, (w, h)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(w, h, seed=k)))
        annotations.append({"image_id": k + 1, "category_id": 1, "bbox": [3.5, 4.25, 50, 40]})
        annotations.append(
            {"image_id": k + 1, "category_id": 2, "bbox": [60, 30, 40.5, 33],
             "segmentation": [[60, 30, 100, 30, 100, 63]]}
        )  # fmt: skip
        annotations.append({"image_id": k + 1, "caption": f"A cat and a dog, photo {k}."})
    write_coco(folder / "labels.json", sizes, annotations)
    store = Store(str(root / "store"))
    run_ingest(store, CONFIG, plan_ingest([str(folder / "labels.json")], store, CONFIG.ingest))
    summary = run_export(store, CONFIG, 0)
    index = json.loads((root / "store/exports/r000/_index.json").read_text())
    return store, summary, index, root


def test_the_shards_folder_is_read_as_it_is_by_hugging_face_datasets(exported, tmp_path):
    """The folder holds the shards and nothing else (index, COCO file and markers live
    elsewhere), so ``load_dataset`` on it reads every exported sample."""
    _, _, index, root = exported
    folder = str(root / "store/shards/r000")
    assert sorted(os.listdir(folder)) == sorted(d["name"] for d in index["detail"])
    cache = str(tmp_path / "hf")
    by_format = datasets.load_dataset("webdataset", data_dir=folder, split="train", cache_dir=cache)
    by_folder = datasets.load_dataset(folder, split="train", cache_dir=cache)
    for loaded in (by_format, by_folder):
        assert len(loaded) == index["samples"] == 7
        assert all(s["json"]["image_id"] == s["__key__"] for s in loaded)


def test_shards_are_size_bounded_and_read_by_plain_webdataset(exported):
    _, summary, index, _ = exported
    samples = list(wds.WebDataset(index["shards"], shardshuffle=False).decode("pil"))
    assert len(samples) == summary.outputs == 7
    assert all(s["jpg"].mode == "RGB" for s in samples)
    assert all(d["samples"] <= CONFIG.export.shard_max_samples for d in index["detail"])
    assert len(index["shards"]) >= 2


def test_sample_json_is_the_design_format(exported):
    _, _, index, _ = exported
    for sample in wds.WebDataset(index["shards"], shardshuffle=False).decode():
        record = sample["json"]
        assert set(record) == SAMPLE_KEYS
        assert record["image_id"] == sample["__key__"]
        assert record["uri"].startswith("file:///") and record["uri"].endswith(".jpg")
        assert record["source"] == "coco:labels.json"
        assert set(record["captions"]) == {"brief", "detailed", "more_detailed"}
        assert all(set(region) == REGION_KEYS for region in record["regions"])
        assert {t["task"] for t in record["florence2"]} >= {
            "<OD>",
            "<CAPTION>",
            "<REGION_PROPOSAL>",
        }


def test_every_od_target_parses_back_to_the_record_boxes(exported):
    processor = build_florence2_processor()
    _, _, index, _ = exported
    for sample in wds.WebDataset(index["shards"], shardshuffle=False).decode():
        record = sample["json"]
        width, height = record["width"], record["height"]
        (od,) = [t for t in record["florence2"] if t["task"] == "<OD>"]
        parsed = processor.post_process_generation(
            od["target"], task="<OD>", image_size=(width, height)
        )
        boxes = parsed["<OD>"]["bboxes"]
        assert parsed["<OD>"]["labels"] == [r["text"] for r in record["regions"]]
        for got, region in zip(boxes, record["regions"], strict=True):
            # The parser truncates the bin centre to a whole pixel: half a bin plus a pixel.
            tolerance = [width / 1000 / 2 + 1, height / 1000 / 2 + 1] * 2
            assert all(
                abs(g - w) <= t for g, w, t in zip(got, region["box"], tolerance, strict=True)
            )


def test_coco_export_loads_in_pycocotools(exported):
    _, _, _, root = exported
    coco = COCO(str(root / "store/exports/r000/coco.json"))
    assert len(coco.getImgIds()) == 7
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"cat", "dog"}
    dogs = coco.loadAnns(coco.getAnnIds(catIds=coco.getCatIds(catNms=["dog"])))
    assert len(dogs) == 7 and all(a["segmentation"] for a in dogs)
    # Area of a polygon-backed annotation is its mask's area, not the box's.
    assert all(a["area"] < a["bbox"][2] * a["bbox"][3] for a in dogs)


def test_rerun_skips_exported_units_and_writes_the_same_shards(exported):
    store, _, index, root = exported
    before = {
        name: (root / "store/shards/r000" / name.rsplit("/", 1)[1]).read_bytes()
        for name in index["shards"]
    }
    again = run_export(store, CONFIG, 0)
    assert again.units_run == 0 and again.units_skipped > 0
    after = {
        name: (root / "store/shards/r000" / name.rsplit("/", 1)[1]).read_bytes()
        for name in index["shards"]
    }
    assert before == after


def test_shards_span_units_up_to_their_size_and_follow_a_new_size(tmp_path):
    """Shards are sized by the export settings, not by the ingest unit: five units of
    three images fill shards of six, and a new size replaces every shard without
    leaving the old ones for readers of the folder."""
    store = Store(str(tmp_path / "store"))
    for unit in range(5):
        records = [
            ImageRecord(f"i{unit}{k}", f"file:///{unit}/{k}.jpg", "test", 24, 16, "h" * 64)
            for k in range(3)
        ]
        jpgs = [encode(photo(24, 16, seed=unit * 3 + k)) for k in range(3)]
        store.commit_unit(f"u{unit}", {MANIFEST: records_to_table(records, jpgs)})

    def export(samples: int) -> dict:
        config = load_config("engine/configs/test.yaml", [f"export.shard_max_samples={samples}"])
        run_export(store, config, 0)
        return json.loads((tmp_path / "store/exports/r000/_index.json").read_text())

    index = export(7)
    assert [d["samples"] for d in index["detail"]] == [6, 6, 3]
    assert len(list(wds.WebDataset(index["shards"], shardshuffle=False))) == 15
    index = export(4)
    assert [d["samples"] for d in index["detail"]] == [3, 3, 3, 3, 3]
    folder = tmp_path / "store/shards/r000"
    assert sorted(os.listdir(folder)) == sorted(d["name"] for d in index["detail"])
    assert sorted(store.committed_units("shards/r000")) == [f"u{unit}" for unit in range(5)]
    # An export that changes nothing writes nothing, coco.json included.
    coco = tmp_path / "store/exports/r000/coco.json"
    written = coco.stat().st_mtime_ns
    assert export(4) == index
    assert coco.stat().st_mtime_ns == written
