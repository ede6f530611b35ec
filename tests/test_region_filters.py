"""Region filters against brute-force pure-Python references and hand-made records."""

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import RegionFilterConfig
from engine.geometry import iou
from engine.records import ImageRecord, Phrase, Region
from filters.regions import (
    INVERTED,
    LOW_SCORE,
    NON_FINITE,
    OUTSIDE_IMAGE,
    REGIONS_DROPPED,
    SUPPRESSED,
    TOO_MANY_OBJECTS,
    TOO_SMALL,
    ZERO_AREA,
    box_problem,
    decide_regions,
    match_regions,
    nms,
    region_nms,
    remap_phrases,
)

# ---------------------------------------------------------------- pure-Python references


def nms_reference(boxes, scores, threshold, classes):
    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(classes[k] != classes[i] or iou(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


def greedy_match_reference(a, b, threshold):
    pairs = sorted(
        (-iou(x, y), i, j)
        for i, x in enumerate(a)
        for j, y in enumerate(b)
        if iou(x, y) >= threshold
    )
    used_a, used_b, matched = set(), set(), []
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched.append((i, j))
    return sorted(matched)


# ---------------------------------------------------------------- strategies

# Integer coordinates: the IoU of two boxes is then computed the same way, bit for bit,
# by torchvision and by the reference, even when it equals the threshold.
box_strategy = st.builds(
    lambda x, y, w, h: (float(x), float(y), float(x + w), float(y + h)),
    st.integers(0, 60),
    st.integers(0, 60),
    st.integers(1, 40),
    st.integers(1, 40),
)


@st.composite
def scored_boxes(draw, max_size=40):
    """Boxes, distinct scores (NMS order is then unambiguous) and one class per box."""
    n = draw(st.integers(0, max_size))
    boxes = draw(st.lists(box_strategy, min_size=n, max_size=n))
    ints = draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    classes = draw(st.lists(st.sampled_from("abc"), min_size=n, max_size=n))
    return boxes, [v / 10**6 for v in ints], classes


thresholds = st.sampled_from([0.0, 0.3, 0.5, 0.55, 0.7, 1.0])


# ---------------------------------------------------------------- NMS


@given(scored_boxes(), thresholds)
@settings(deadline=None)
def test_class_aware_nms_equals_the_reference(data, threshold):
    boxes, scores, classes = data
    kept = nms(np.array(boxes), np.array(scores), threshold, classes=classes)
    assert kept.tolist() == nms_reference(boxes, scores, threshold, classes)


@given(scored_boxes(), thresholds)
@settings(deadline=None)
def test_class_agnostic_nms_equals_the_reference(data, threshold):
    boxes, scores, _ = data
    kept = nms(np.array(boxes), np.array(scores), threshold)
    assert kept.tolist() == nms_reference(boxes, scores, threshold, [0] * len(boxes))


@given(scored_boxes(), thresholds)
@settings(deadline=None)
def test_nms_properties(data, threshold):
    boxes, scores, classes = data
    kept = nms(np.array(boxes), np.array(scores), threshold, classes=classes).tolist()
    # Kept boxes of one class overlap each other by at most the threshold.
    for a in kept:
        for b in kept:
            if a != b and classes[a] == classes[b]:
                assert iou(boxes[a], boxes[b]) <= threshold
    # Every suppressed box overlaps a kept, higher-scored box of its class.
    for s in set(range(len(boxes))) - set(kept):
        assert any(
            classes[k] == classes[s]
            and scores[k] > scores[s]
            and iou(boxes[k], boxes[s]) > threshold
            for k in kept
        )


def test_nms_of_nothing_and_mismatched_inputs():
    assert nms(np.empty((0, 4)), np.empty(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        nms(np.zeros((2, 4)), np.zeros(1), 0.5)


def region(box, score=0.9, text="dog", kind="object", source="det:a"):
    return Region(box=box, text=text, kind=kind, source=source, score=score)


def test_region_nms_groups_by_kind_and_text():
    regions = [
        region((0, 0, 10, 10), 0.9, "dog"),
        region((0, 0, 10, 10), 0.8, " Dog"),  # the same class, written differently
        region((0, 0, 10, 10), 0.7, "cat"),  # another class
        region((0, 0, 10, 10), 0.6, "dog", kind="ocr"),  # another kind
    ]
    assert region_nms(regions, 0.5) == [0, 2, 3]
    assert region_nms(regions, 0.5, class_aware=False) == [0, 3]


def test_region_nms_within_each_source():
    regions = [region((0, 0, 10, 10), 0.9, source="a"), region((0, 0, 10, 10), 0.8, source="b")]
    assert region_nms(regions, 0.5) == [0]
    assert region_nms(regions, 0.5, across_sources=False) == [0, 1]


def test_unscored_human_labels_are_never_suppressed():
    regions = [
        region((0, 0, 10, 10), None, source="human:coco"),
        region((1, 0, 10, 10), None, source="human:coco"),  # a crowd: both labels stay
        region((0, 0, 10, 11), 0.99),  # overlaps a human label: suppressed
        region((30, 30, 40, 40), 0.2),
    ]
    assert region_nms(regions, 0.5) == [0, 1, 3]


def test_a_box_suppressed_by_a_human_label_suppresses_nothing():
    # Greedy order with the label first: box 1 goes, so box 2 (which only box 1
    # overlaps) stays.
    regions = [
        region((0, 0, 10, 10), None, source="human:coco"),
        region((2, 0, 12, 10), 0.9),
        region((4, 0, 14, 10), 0.8),
    ]
    assert iou(regions[0].box, regions[2].box) < 0.5 < iou(regions[1].box, regions[2].box)
    assert region_nms(regions, 0.5) == [0, 2]


# ---------------------------------------------------------------- matching


@given(scored_boxes(max_size=15), scored_boxes(max_size=15), st.sampled_from([0.1, 0.5, 0.9]))
@settings(deadline=None)
def test_match_regions_equals_the_greedy_reference(a, b, threshold):
    regions_a = [region(box) for box in a[0]]
    regions_b = [region(box) for box in b[0]]
    assert match_regions(regions_a, regions_b, threshold) == greedy_match_reference(
        a[0], b[0], threshold
    )


def test_match_regions_pairs_one_to_one_within_kind():
    a = [region((0, 0, 10, 10)), region((0, 0, 10, 10), kind="ocr")]
    b = [region((0, 0, 10, 9)), region((0, 0, 10, 10)), region((0, 0, 10, 10), kind="ocr")]
    # a[0] takes its best match b[1]; the OCR box only matches the OCR box.
    assert match_regions(a, b, 0.5) == [(0, 1), (1, 2)]
    assert match_regions(a, b, 0.5, same_kind=False) == [(0, 1), (1, 2)]
    assert match_regions(a[:1], b[2:], 0.5) == []
    assert match_regions(a[:1], b[2:], 0.5, same_kind=False) == [(0, 0)]


# ---------------------------------------------------------------- validity


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ((10, 10, 20, 20), None),
        ((math.nan, 0, 10, 10), NON_FINITE),
        ((0, 0, math.inf, 10), NON_FINITE),
        ((20, 10, 10, 20), INVERTED),
        ((10, 20, 20, 10), INVERTED),
        ((10, 10, 10, 20), ZERO_AREA),
        ((120, 10, 130, 20), OUTSIDE_IMAGE),
        ((-20, -20, -5, 30), OUTSIDE_IMAGE),
        ((10, 10, 10.5, 20), TOO_SMALL),
        ((95, 10, 105, 20), None),  # partly outside: clipped, 5 px wide
        ((99.5, 10, 120, 20), TOO_SMALL),  # 0.5 px inside the image
    ],
)
def test_box_problem_reasons(box, reason):
    assert box_problem(box, 100, 50, min_side=1, min_area=0) == reason


def test_box_problem_thresholds():
    assert box_problem((0, 0, 4, 4), 100, 100, min_side=5, min_area=0) == TOO_SMALL
    assert box_problem((0, 0, 4, 4), 100, 100, min_side=1, min_area=17) == TOO_SMALL
    assert box_problem((0, 0, 4, 4), 100, 100, min_side=1, min_area=16) is None


# ---------------------------------------------------------------- the record decision


def decide(record, **changes):
    """``decide_regions`` with the configured defaults, ``changes`` (config fields) over them."""
    config = RegionFilterConfig(**changes)
    return decide_regions(
        record,
        min_score_by_kind=config.min_score_by_kind,
        min_score_by_source=config.min_score_by_source,
        nms_iou=config.nms_iou,
        max_objects=config.max_objects,
        min_side=config.min_side,
        min_area=config.min_area,
    )


def make_record(regions, phrases=()):
    return ImageRecord(
        image_id="img",
        uri="memory://img.jpg",
        source="test",
        width=100,
        height=80,
        sha256="0" * 64,
        regions=list(regions),
        phrases=list(phrases),
    )


def phrase(regions, text="a dog"):
    return Phrase(caption="brief", start=0, end=len(text), text=text, regions=regions, source="g")


def test_decide_regions_drops_with_reasons_and_remaps_phrases():
    regions = [
        region((0, 0, 50, 50), 0.9),  # 0 kept -> 0
        region((0, 0, 50, 49), 0.8, source="det:b"),  # 1 duplicate of 0 from another source
        region((60, 0, 40, 10), 0.9),  # 2 inverted
        region((60, 60, 90, 120), 0.2),  # 3 under the object threshold
        region((60, 60, 90, 120), 0.2, kind="proposal"),  # 4 kept (proposals: 0.0), clipped -> 1
        region((10, 10, 20, 20), None, "cat", source="human:coco"),  # 5 kept -> 2
    ]
    phrases = [
        phrase([1, 0]),  # keeps its link to region 0
        phrase([2, 3], "a bird"),  # every region dropped
        phrase([5, 4], "a cat"),
    ]
    decision = decide(make_record(regions, phrases))
    assert decision.keep
    assert [r.box for r in decision.regions] == [(0, 0, 50, 50), (60, 60, 90, 80), (10, 10, 20, 20)]
    assert [(r.box, reason) for r, reason in decision.dropped_regions] == [
        (regions[2].box, INVERTED),
        (regions[3].box, LOW_SCORE),
        (regions[1].box, SUPPRESSED),
    ]
    assert [(p.text, p.regions) for p in decision.phrases] == [("a dog", [0]), ("a cat", [2, 1])]
    assert [(p.text, reason) for p, reason in decision.dropped_phrases] == [
        ("a bird", REGIONS_DROPPED)
    ]
    record = decision.applied_to(make_record(regions, phrases))
    assert record.regions == decision.regions
    assert record.image_id == "img"


def test_min_score_per_source_overrides_the_kind():
    regions = [
        region((0, 0, 10, 10), 0.5, source="det:dino@1.0"),
        region((20, 0, 30, 10), 0.5, source="det:yolo"),
        region((40, 0, 50, 10), math.nan, source="det:yolo"),
    ]
    decision = decide(make_record(regions), min_score_by_source={"det:dino": 0.6})
    assert [r.source for r in decision.regions] == ["det:yolo"]
    assert [(r.source, reason) for r, reason in decision.dropped_regions] == [
        ("det:dino@1.0", LOW_SCORE),
        ("det:yolo", LOW_SCORE),  # a NaN score
    ]


def test_too_many_objects_drops_the_image_counted_after_nms():
    # Three objects, two of them duplicates, plus OCR boxes that do not count.
    regions = [
        region((0, 0, 10, 10), 0.9),
        region((0, 0, 10, 10), 0.8),
        region((20, 20, 30, 30), 0.9),
        *[region((40 + i, 0, 45 + i, 5), 0.9, kind="ocr", text=f"t{i}") for i in range(5)],
    ]
    assert decide(make_record(regions), max_objects=2).keep
    decision = decide(make_record(regions), max_objects=1)
    assert decision.image_reason == TOO_MANY_OBJECTS
    # Without NMS the duplicate counts.
    assert (
        decide(make_record(regions), max_objects=2, nms_iou=None).image_reason == TOO_MANY_OBJECTS
    )
    assert decide(make_record(regions), max_objects=None, nms_iou=None).keep


@given(st.lists(st.lists(st.integers(0, 9), max_size=4), max_size=8), st.sets(st.integers(0, 9)))
def test_remap_phrases_points_at_the_same_regions(links, kept_set):
    kept = sorted(kept_set)
    random.Random(len(links)).shuffle(kept)  # any new order of the kept regions
    phrases = [phrase(r) for r in links]
    remaining, dropped = remap_phrases(phrases, kept, REGIONS_DROPPED)
    assert len(remaining) + len(dropped) == len(phrases)
    survivors = iter(remaining)
    for original in phrases:
        old = [i for i in original.regions if i in kept_set]
        if old:
            assert [kept[i] for i in next(survivors).regions] == old
        else:
            assert (original, REGIONS_DROPPED) in dropped
