"""The grounding decision and its banned-phrase list."""

from engine.config import GroundingFilterConfig
from engine.records import ImageRecord, Phrase, Region
from filters.grounding import (
    BANNED_GROUNDING_TOKENS,
    BANNED_PHRASE,
    LOW_GROUNDING_SCORE,
    NO_GROUNDED_BOX,
    decide_grounding,
    is_banned,
)
from filters.regions import SUPPRESSED


def test_banned_list_is_florence2s():
    for phrase in ["it", "I", "the image", "images", "a group", "other objects", "lots", "a set"]:
        assert phrase in BANNED_GROUNDING_TOKENS
    assert is_banned(" The  Image ")
    assert is_banned("an image")
    assert is_banned("these images")
    assert is_banned("i")
    assert not is_banned("a group of people")
    assert not is_banned("this dog")


# ---------------------------------------------------------------- the decision


def region(box, score, text="thing", source="ground:gdino@1"):
    return Region(box=box, text=text, kind="object", source=source, score=score)


def phrase(caption, text, regions):
    return Phrase(caption=caption, start=0, end=len(text), text=text, regions=regions, source="g")


def record(regions, phrases):
    return ImageRecord(
        image_id="img",
        uri="memory://img.jpg",
        source="test",
        width=100,
        height=100,
        sha256="0" * 64,
        regions=regions,
        phrases=phrases,
    )


def decide(record, **changes):
    """``decide_grounding`` with the configured defaults, ``changes`` (config fields) over them."""
    config = GroundingFilterConfig(**changes)
    return decide_grounding(
        record,
        min_score=config.min_score,
        nms_iou=config.nms_iou,
        drop_image_without_grounding=config.drop_image_without_grounding,
    )


def test_grounding_decision():
    regions = [
        region((0, 0, 50, 50), 0.9),  # 0 "a man"
        region((0, 0, 50, 48), 0.8),  # 1 overlaps 0: suppressed in the brief caption only
        region((60, 0, 90, 30), 0.4),  # 2 under the default 0.5
        region((60, 40, 90, 70), 0.9),  # 3 linked by a banned phrase only
        region((60, 0, 90, 30), 0.85),  # 4
        region((0, 60, 10, 70), 0.1, source="det:dino"),  # 5 no phrase links it: not judged
    ]
    phrases = [
        phrase("brief", "a man", [0]),
        phrase("brief", "a person", [1]),
        phrase("brief", "a hat", [2]),
        phrase("brief", "the image", [3]),
        phrase("detailed", "a tall man", [1]),
        phrase("detailed", "a red hat", [4, 2]),
    ]
    decision = decide(record(regions, phrases))
    assert decision.keep
    assert decision.regions == [regions[0], regions[1], regions[4], regions[5]]
    assert [(p.caption, p.text, p.regions) for p in decision.phrases] == [
        ("brief", "a man", [0]),
        ("detailed", "a tall man", [1]),
        ("detailed", "a red hat", [2]),
    ]
    assert {p.text: reason for p, reason in decision.dropped_phrases} == {
        "the image": BANNED_PHRASE,
        "a person": SUPPRESSED,
        "a hat": LOW_GROUNDING_SCORE,
    }
    assert decision.dropped_regions == [
        (regions[2], LOW_GROUNDING_SCORE),
        (regions[3], BANNED_PHRASE),
    ]


def test_nms_reason_and_no_nms():
    regions = [region((0, 0, 50, 50), 0.9), region((0, 0, 50, 48), 0.8)]
    phrases = [phrase("brief", "a man", [0]), phrase("brief", "a person", [1])]
    decision = decide(record(regions, phrases))
    assert decision.dropped_regions == [(regions[1], SUPPRESSED)]
    assert [p.text for p in decision.phrases] == ["a man"]
    without_nms = decide(record(regions, phrases), nms_iou=None)
    assert [p.regions for p in without_nms.phrases] == [[0], [1]]
    assert without_nms.dropped_regions == []


def test_image_without_grounded_box():
    regions = [region((0, 0, 50, 50), 0.45), region((60, 60, 70, 70), 0.2, source="det:dino")]
    phrases = [phrase("brief", "a man", [0]), phrase("brief", "a ghost", [])]
    decision = decide(record(regions, phrases))
    assert decision.image_reason == NO_GROUNDED_BOX
    assert {p.text: reason for p, reason in decision.dropped_phrases} == {
        "a man": LOW_GROUNDING_SCORE,
        "a ghost": NO_GROUNDED_BOX,
    }
    kept = decide(record(regions, phrases), drop_image_without_grounding=False)
    assert kept.keep
    assert kept.regions == [regions[1]]
    assert kept.phrases == []
    # A lower threshold keeps the man.
    assert decide(record(regions, phrases), min_score=0.4).keep
    # A record with no phrases at all has nothing grounded either.
    assert decide(record(regions, [])).image_reason == NO_GROUNDED_BOX


def test_human_boxes_are_not_judged_by_score():
    regions = [region((0, 0, 50, 50), None, source="human:flickr30k"), region((0, 0, 50, 49), 0.99)]
    phrases = [phrase("brief", "a man", [0]), phrase("brief", "a person", [1])]
    decision = decide(record(regions, phrases))
    assert [(p.text, p.regions) for p in decision.phrases] == [("a man", [0])]
    assert decision.dropped_regions == [(regions[1], SUPPRESSED)]
