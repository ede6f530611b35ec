"""Merge: human labels first, best caption per kind, duplicate regions set aside with reasons."""

from collections import Counter

import pytest

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.layout import round_layout
from engine.records import Caption, ImageRecord, Phrase, Region, records_from_table
from engine.store import Store
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest
from stages.merge import MergeCounts, merge_record, run_merge
from tests.inputs import encode, photo, write_coco

TRIANGLE = [10, 10, 60, 10, 35, 60]


def image(**parts) -> ImageRecord:
    return ImageRecord("img", "u", "coco", 200, 100, "h", **parts)


def test_two_specialists_and_human_labels_give_the_expected_record():
    human_cat = Region((10, 10, 60, 60), "cat", "object", "human:coco")
    human = image(captions={"brief": Caption("A cat.", "human:coco")}, regions=[human_cat])
    detector = image(
        captions={"brief": Caption("An animal.", "det", score=0.9)},
        regions=[
            Region((11, 11, 61, 59), "kitten", "object", "det", score=0.8),  # the human cat
            Region((100, 20, 150, 80), "dog", "object", "det", score=0.7),
            Region((102, 22, 150, 80), "dog", "object", "det", score=0.4),  # its duplicate
            Region((100, 20, 150, 80), "EXIT", "ocr", "det", score=0.3),  # other kind: kept
        ],
    )
    segmenter = image(
        captions={"detailed": Caption("A cat beside a dog.", "seg", score=0.2)},
        regions=[
            Region((10, 10, 60, 60), "cat", "object", "seg", 0.5, polygons=[TRIANGLE]),
            Region((101, 20, 150, 80), "dog", "object", "seg", score=0.6),
        ],
        phrases=[
            Phrase("detailed", 2, 5, "cat", [0], "seg"),
            Phrase("detailed", 15, 18, "dog", [1], "seg"),
        ],
    )  # fmt: skip
    counts = MergeCounts()
    merged = merge_record(human, [detector, segmenter], iou=0.7, counts=counts)

    assert merged.captions["brief"].text == "A cat."  # human kept over a higher score
    assert merged.captions["detailed"].text == "A cat beside a dog."
    assert [(r.text, r.source) for r in merged.regions] == [
        ("cat", "human:coco"),
        ("dog", "det"),
        ("EXIT", "det"),
    ]
    assert merged.regions[0].box == (10, 10, 60, 60)  # the human box itself
    assert merged.regions[0].polygons == [TRIANGLE]
    assert [(p.text, p.regions) for p in merged.phrases] == [("cat", [0]), ("dog", [1])]
    assert counts.dropped == Counter(
        {
            "brief caption: human caption kept": 1,
            "region: duplicate of a human label": 1,
            "region: duplicate of a higher-scored region": 2,
        }
    )
    # Attaching polygons loses nothing: a note, not a drop.
    assert counts.notes == Counter({"region: polygons attached to a matching region": 1})
    # Every specialist region is either kept or counted.
    counted = counts.dropped + counts.notes
    assert (
        len(merged.regions) - 1 + sum(v for k, v in counted.items() if k.startswith("region")) == 6
    )


def test_fusion_moves_a_specialist_box_to_the_weighted_mean_never_a_human_box():
    human = image(regions=[Region((10, 10, 60, 60), "cat", "object", "human:coco")])
    detector = image(
        regions=[
            Region((100, 20, 150, 80), "dog", "object", "det", score=0.6),
            Region((11, 11, 61, 61), "cat", "object", "det", score=0.9),  # the human cat
        ]
    )
    other = image(regions=[Region((104, 24, 154, 84), "dog", "object", "other", score=0.2)])
    plain, fused = MergeCounts(), MergeCounts()
    kept = merge_record(human, [detector, other], iou=0.7, counts=plain)
    moved = merge_record(human, [detector, other], iou=0.7, counts=fused, fuse_boxes=True)

    assert [r.box for r in kept.regions] == [(10, 10, 60, 60), (100, 20, 150, 80)]
    # (0.6 * 100 + 0.2 * 104) / 0.8 = 101, and so on; the score stays the best member's.
    assert moved.regions[0].box == (10, 10, 60, 60)
    assert moved.regions[1].box == pytest.approx((101.0, 21.0, 151.0, 81.0))
    assert moved.regions[1].score == 0.6 and moved.regions[1].source == "det"
    assert fused.dropped == plain.dropped
    assert fused.notes == Counter({"region: box fused with a duplicate": 1})


def test_merge_stage_after_annotate(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {f"{k}.jpg": (50 + k, 40) for k in range(5)}
    for k, name in enumerate(sizes):
        (folder / name).write_bytes(encode(photo(*sizes[name], seed=k)))
    write_coco(
        folder / "labels.json", sizes, [{"image_id": 2, "category_id": 1, "bbox": [1, 1, 20, 20]}]
    )
    base = load_config("engine/configs/test.yaml")
    specs = (
        SpecialistConfig(
            name="cap", kind="tests.specialists_for_tests:SizeCaptioner", num_cpus=0.25
        ),
        SpecialistConfig(
            name="ground", kind="tests.specialists_for_tests:FirstWordGrounder", num_cpus=0.25
        ),
    )
    config = base.model_copy(update={"annotate": AnnotateConfig(specialists=specs)})
    store = Store(str(tmp_path / "store"))
    run_ingest(store, config, plan_ingest([str(folder / "labels.json")], store, config.ingest))
    run_annotate(store, config, 0)
    summary = run_merge(store, config, 0)

    merged = {r.width: r for r in records_from_table(store.read(round_layout(0).merged))}
    assert summary.outputs == len(merged) == 5
    for width, record in merged.items():
        assert record.captions["detailed"].text == f"an image of {width} by 40 pixels"
        assert [p.text for p in record.phrases] == ["an"]
        # The grounder's whole-image box is kept and the phrase points at it.
        assert record.regions[record.phrases[0].regions[0]].box == (0, 0, width, 40)
    sources = [r.source for r in merged[51].regions]
    assert sources[0] == "human:coco" and sources[1].startswith("ground:")

    # A later round merges onto another base with its own policy.
    run_annotate(store, config, 1)
    summary = run_merge(store, config, 1, base=round_layout(0).merged, policy=keep_base)
    again = {r.width: r for r in records_from_table(store.read(round_layout(1).merged))}
    assert again == merged
    assert summary.dropped == Counter({"new output not used": 10})


def keep_base(base, outputs, region_texts, counts):
    """A merge policy that keeps the base record and sets every new output aside."""
    counts.dropped["new output not used"] += len(outputs)
    return base


def test_region_texts_replace_specialist_texts_never_human_labels():
    human = image(regions=[Region((10, 10, 60, 60), "cat", "object", "human:coco")])
    detector = image(
        regions=[
            Region((100, 20, 150, 80), "dog", "object", "det", score=0.7),
            Region((101, 21, 150, 80), "dog", "object", "det", score=0.4),  # its duplicate
            Region((20, 70, 40, 90), "ball", "object", "det", score=0.6),
            Region((100, 20, 150, 80), "EXIT", "ocr", "det", score=0.9),
        ]
    )
    # One text per object box the region-text specialists saw, on that very box.
    first = image(
        regions=[
            Region((10, 10, 60, 60), "tabby cat", "object", "rt", score=0.9),
            Region((100, 20, 150, 80), "brown dog", "object", "rt", score=0.7),
            Region((101, 21, 150, 80), "small dog", "object", "rt", score=0.4),
            Region((170, 0, 200, 10), "kite", "object", "rt", score=0.5),  # no such box
        ]
    )
    second = image(
        regions=[
            Region((100, 20, 150, 80), "puppy", "object", "rt2", score=0.8),
            Region((20, 70, 40, 90), "red ball", "object", "rt2", score=0.6),
        ]
    )
    counts = MergeCounts()
    merged = merge_record(
        human, [detector], iou=0.7, counts=counts, region_texts=[("rt", first), ("rt2", second)]
    )
    assert [(r.text, r.kind, r.source, r.score) for r in merged.regions] == [
        ("cat", "object", "human:coco", None),  # a human label's text is never replaced
        ("EXIT", "ocr", "det", 0.9),  # not an object: no region text matches it
        ("brown dog", "object", "det", 0.7),  # the text on its own box; box lineage kept
        ("red ball", "object", "det", 0.6),  # the only specialist with a text for it
    ]
    assert merged.regions[2].box == (100, 20, 150, 80)
    assert counts.notes == Counter({"region: text from rt": 1, "region: text from rt2": 1})
    assert counts.dropped == Counter(
        {
            "region: duplicate of a higher-scored region": 1,
            "region text: human label kept": 1,
            "region text: a closer box's text kept": 1,
            "region text: no matching region": 1,
            "region text: an earlier specialist's text kept": 1,
        }
    )
    # Every region text is either written onto a region or counted.
    counted = counts.dropped + counts.notes
    texts = sum(v for k, v in counted.items() if k.startswith(("region text:", "region: text")))
    assert texts == len(first.regions) + len(second.regions)
