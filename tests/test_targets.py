"""Florence-2 targets read back by the real processor's parser.

The parser returns ``int((bin + 0.5) * W / 1000)``: the bin centre truncated to a whole
pixel. A parsed coordinate is therefore within half a bin plus one pixel of the record's
value, which is within one bin wherever a bin is 2 pixels or more (images of 2000 pixels and
up); on smaller images the truncation alone can exceed a bin.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.records import Caption, ImageRecord, Phrase, Region
from refinement.targets import (
    Florence2Target,
    box_to_quad,
    box_tokens,
    dequantise,
    florence2_targets,
    loc_tokens,
    polygon_tokens,
    quad_tokens,
    quantise,
)
from tests.tiny_florence2 import build_florence2_processor

SIZES = [(640, 480), (333, 517), (4000, 3000), (2049, 1537), (7, 5)]

BRIEF = "A dog chases a red ball."
DETAILED = "The big dog and a small dog play near a red ball."
MORE_DETAILED = "Two dogs play on the grass. A street sign on the right reads STOP."


def _scaled(fractions: list[float], width: int, height: int) -> list[float]:
    return [f * (width if i % 2 == 0 else height) for i, f in enumerate(fractions)]


def _phrase(kind: str, caption: str, text: str, regions: list[int]) -> Phrase:
    start = caption.index(text)
    return Phrase(kind, start, start + len(text), text, regions, source="test")


def _record(width: int, height: int) -> ImageRecord:
    """Every kind of annotation, placed by fractions of the image so any size works."""

    def region(text, kind, box, polygons=None, quad=None) -> Region:
        return Region(
            tuple(_scaled(box, width, height)),
            text,
            kind,
            source="test",
            polygons=[_scaled(p, width, height) for p in polygons] if polygons else None,
            quad=_scaled(quad, width, height) if quad else None,
        )

    regions = [
        # 0: a dog segmented in two parts
        region(
            "dog",
            "object",
            [0.10, 0.20, 0.45, 0.80],
            polygons=[[0.10, 0.20, 0.45, 0.20, 0.30, 0.50], [0.12, 0.55, 0.40, 0.60, 0.25, 0.80]],
        ),
        # 1: a ball with one polygon
        region(
            "ball",
            "object",
            [0.50, 0.60, 0.62, 0.75],
            polygons=[[0.56, 0.60, 0.62, 0.66, 0.60, 0.75, 0.52, 0.74, 0.50, 0.66]],
        ),
        # 2: a second dog, no mask
        region("dog", "object", [0.60, 0.10, 0.95, 0.50]),
        # 3: a proposal over the whole image: x = W and y = H are clamped into bin 999
        region("", "proposal", [0.0, 0.0, 1.0, 1.0]),
        # 4: an object without text: a proposal, but no label for <OD>
        region("", "object", [0.30, 0.30, 0.40, 0.40]),
        # 5: a text the <OD> parser would cut at "<"
        region("a <b> tag", "object", [0.05, 0.05, 0.15, 0.15]),
        # 6..8: OCR listed out of reading order; "STOP" has a tilted quad
        region("5th Ave", "ocr", [0.10, 0.85, 0.30, 0.90]),
        region(
            "STOP",
            "ocr",
            [0.70, 0.60, 0.91, 0.72],
            quad=[0.70, 0.62, 0.90, 0.60, 0.91, 0.70, 0.71, 0.72],
        ),
        region("CORNER", "ocr", [0.40, 0.61, 0.60, 0.71]),
    ]
    phrases = [
        _phrase("brief", BRIEF, "A dog", [0, 2]),
        _phrase("brief", BRIEF, "a red ball", [1]),
        _phrase("detailed", DETAILED, "a red ball", [1]),
        _phrase("detailed", DETAILED, "The big dog", [0]),
        _phrase("detailed", DETAILED, "a small dog", [2]),
        # points at a region that does not exist: left out, not fatal
        _phrase("more_detailed", MORE_DETAILED, "Two dogs", [99]),
    ]
    return ImageRecord(
        image_id="id",
        uri="memory://x.jpg",
        source="test",
        width=width,
        height=height,
        sha256="0" * 64,
        captions={
            "brief": Caption(BRIEF, source="test"),
            "detailed": Caption(DETAILED, source="test"),
            "more_detailed": Caption(MORE_DETAILED, source="test"),
        },
        regions=regions,
        phrases=phrases,
    )


def _parse(target: Florence2Target, width: int, height: int):
    processor = build_florence2_processor()
    parsed = processor.post_process_generation(
        target.target, task=target.task, image_size=(width, height)
    )
    return parsed[target.task]


def _of(targets: list[Florence2Target], task: str) -> list[Florence2Target]:
    return [t for t in targets if t.task == task]


def assert_close(parsed: list[float], expected: list[float], width: int, height: int) -> None:
    """Coordinates within half a bin plus the parser's one-pixel truncation."""
    assert len(parsed) == len(expected)
    for i, (p, e) in enumerate(zip(parsed, expected, strict=True)):
        size = width if i % 2 == 0 else height
        assert abs(p - e) <= size / 2000 + 1 + 1e-9, f"coordinate {i}: {p} vs {e} ({size} px)"


def assert_boxes_close(parsed, expected, width: int, height: int) -> None:
    assert len(parsed) == len(expected)
    for p, e in zip(parsed, expected, strict=True):
        assert_close(p, list(e), width, height)


# ---------------------------------------------------------------- what is written


def test_tasks_inputs_and_order():
    record = _record(640, 480)
    r = record.regions
    box = [box_tokens(region.box, 640, 480) for region in r]
    got = [(t.task, t.input) for t in florence2_targets(record)]
    assert got == [
        ("<CAPTION>", None),
        ("<DETAILED_CAPTION>", None),
        ("<MORE_DETAILED_CAPTION>", None),
        ("<OD>", None),
        ("<REGION_PROPOSAL>", None),
        ("<REGION_TO_CATEGORY>", box[0]),
        ("<REGION_TO_CATEGORY>", box[1]),
        ("<REGION_TO_CATEGORY>", box[2]),
        ("<REGION_TO_CATEGORY>", box[5]),
        ("<REGION_TO_SEGMENTATION>", box[0]),
        ("<REGION_TO_SEGMENTATION>", box[1]),
        ("<OPEN_VOCABULARY_DETECTION>", "dog"),
        ("<OPEN_VOCABULARY_DETECTION>", "ball"),
        ("<OCR>", None),
        ("<OCR_WITH_REGION>", None),
        ("<REGION_TO_OCR>", box[8]),
        ("<REGION_TO_OCR>", box[7]),
        ("<REGION_TO_OCR>", box[6]),
        ("<CAPTION_TO_PHRASE_GROUNDING>", BRIEF),
        ("<CAPTION_TO_PHRASE_GROUNDING>", DETAILED),
        ("<REFERRING_EXPRESSION_SEGMENTATION>", "a red ball"),
        ("<REFERRING_EXPRESSION_SEGMENTATION>", "The big dog"),
    ]


def test_exact_sequences():
    """The literal format of FLD_REFERENCE §3 on a 1000 x 1000 image, where bin = pixel."""
    record = ImageRecord(
        "id",
        "memory://x.jpg",
        "test",
        1000,
        1000,
        "0" * 64,
        captions={"brief": Caption("A cat.", source="test")},
        regions=[
            Region(
                (1, 2, 3, 4.9),
                "cat",
                "object",
                "test",
                polygons=[[1, 2, 3, 2, 3, 4], [5, 5, 6, 5, 6, 6]],
            ),
            Region((10, 20, 30, 40), "EXIT", "ocr", "test"),
        ],
        phrases=[Phrase("brief", 2, 5, "cat", [0], "test")],
    )
    targets = {(t.task, t.input): t.target for t in florence2_targets(record)}
    cat = "<loc_1><loc_2><loc_3><loc_4>"
    exit_box = "<loc_10><loc_20><loc_30><loc_40>"
    poly = (
        "<poly><loc_1><loc_2><loc_3><loc_2><loc_3><loc_4>"
        "<sep><loc_5><loc_5><loc_6><loc_5><loc_6><loc_6></poly>"
    )
    assert targets == {
        ("<CAPTION>", None): "A cat.",
        ("<OD>", None): "cat" + cat,
        ("<REGION_PROPOSAL>", None): cat,
        ("<REGION_TO_CATEGORY>", cat): "cat",
        ("<REGION_TO_SEGMENTATION>", cat): poly,
        ("<OPEN_VOCABULARY_DETECTION>", "cat"): "cat" + cat,
        ("<OCR>", None): "EXIT",
        (
            "<OCR_WITH_REGION>",
            None,
        ): "EXIT<loc_10><loc_20><loc_30><loc_20><loc_30><loc_40><loc_10><loc_40>",
        ("<REGION_TO_OCR>", exit_box): "EXIT",
        ("<CAPTION_TO_PHRASE_GROUNDING>", "A cat."): "cat" + cat,
        ("<REFERRING_EXPRESSION_SEGMENTATION>", "cat"): poly,
    }


# ---------------------------------------------------------------- read back by the parser


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_text_tasks_read_back(width, height):
    targets = florence2_targets(_record(width, height))
    for task, text in [
        ("<CAPTION>", BRIEF),
        ("<DETAILED_CAPTION>", DETAILED),
        ("<MORE_DETAILED_CAPTION>", MORE_DETAILED),
        ("<OCR>", "CORNER\nSTOP\n5th Ave"),
    ]:
        [target] = _of(targets, task)
        assert _parse(target, width, height) == text
    categories = [_parse(t, width, height) for t in _of(targets, "<REGION_TO_CATEGORY>")]
    assert categories == ["dog", "ball", "dog", "a <b> tag"]
    ocr_texts = [_parse(t, width, height) for t in _of(targets, "<REGION_TO_OCR>")]
    assert ocr_texts == ["CORNER", "STOP", "5th Ave"]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_boxes_read_back(width, height):
    record = _record(width, height)
    r = record.regions
    targets = florence2_targets(record)

    [od] = _of(targets, "<OD>")
    parsed = _parse(od, width, height)
    assert parsed["labels"] == ["dog", "ball", "dog"]
    assert_boxes_close(parsed["bboxes"], [r[0].box, r[1].box, r[2].box], width, height)

    [proposals] = _of(targets, "<REGION_PROPOSAL>")
    parsed = _parse(proposals, width, height)
    assert_boxes_close(parsed["bboxes"], [r[i].box for i in (0, 1, 2, 3, 4, 5)], width, height)

    ovd = _of(targets, "<OPEN_VOCABULARY_DETECTION>")
    dogs, balls = (_parse(t, width, height) for t in ovd)
    assert dogs["bboxes_labels"] == ["dog", "dog"]
    assert_boxes_close(dogs["bboxes"], [r[0].box, r[2].box], width, height)
    assert balls["bboxes_labels"] == ["ball"]
    assert_boxes_close(balls["bboxes"], [r[1].box], width, height)
    assert dogs["polygons"] == balls["polygons"] == []

    # Region inputs are the region's own box: the processor's prompt carries them.
    for target in _of(targets, "<REGION_TO_CATEGORY>") + _of(targets, "<REGION_TO_OCR>"):
        assert target.input.count("<loc_") == 4


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_quads_read_back(width, height):
    record = _record(width, height)
    r = record.regions
    [target] = _of(florence2_targets(record), "<OCR_WITH_REGION>")
    parsed = _parse(target, width, height)
    assert parsed["labels"] == ["CORNER", "STOP", "5th Ave"]
    expected = [box_to_quad(r[8].box), r[7].quad, box_to_quad(r[6].box)]
    assert_boxes_close(parsed["quad_boxes"], expected, width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_polygons_read_back(width, height):
    record = _record(width, height)
    r = record.regions
    targets = florence2_targets(record)
    segmentations = _of(targets, "<REGION_TO_SEGMENTATION>")
    referring = _of(targets, "<REFERRING_EXPRESSION_SEGMENTATION>")
    # The dog's two parts are one instance with two polygons; the ball's one part, one.
    for target, region in [
        (segmentations[0], r[0]),
        (segmentations[1], r[1]),
        (referring[0], r[1]),
        (referring[1], r[0]),
    ]:
        parsed = _parse(target, width, height)
        assert parsed["labels"] == [""]
        [instance] = parsed["polygons"]
        assert_boxes_close(instance, region.polygons, width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_phrase_grounding_reads_back(width, height):
    record = _record(width, height)
    r = record.regions
    brief, detailed = _of(florence2_targets(record), "<CAPTION_TO_PHRASE_GROUNDING>")
    parsed = _parse(brief, width, height)
    assert parsed["labels"] == ["A dog", "A dog", "a red ball"]
    assert_boxes_close(parsed["bboxes"], [r[0].box, r[2].box, r[1].box], width, height)
    parsed = _parse(detailed, width, height)
    assert parsed["labels"] == ["The big dog", "a small dog", "a red ball"]
    assert_boxes_close(parsed["bboxes"], [r[0].box, r[2].box, r[1].box], width, height)


def test_targets_survive_tokenization():
    """What the model generates is token ids: they must decode into the same parse."""
    processor = build_florence2_processor()
    width, height = 333, 517
    for target in florence2_targets(_record(width, height)):
        ids = processor.tokenizer(target.target, add_special_tokens=False)["input_ids"]
        from_ids = processor.post_process_generation(
            sequence=ids, task=target.task, image_size=(width, height)
        )
        assert from_ids == processor.post_process_generation(
            target.target, task=target.task, image_size=(width, height)
        )


def test_processor_expands_task_and_input():
    processor = build_florence2_processor()
    image = Image.new("RGB", (333, 517))
    for target in florence2_targets(_record(333, 517)):
        prompt = target.task + (target.input or "")
        ids = processor(text=prompt, images=image, return_tensors="pt")["input_ids"][0]
        text = processor.tokenizer.decode(ids)
        assert target.task not in text
        assert (target.input or "") in text


# ---------------------------------------------------------------- quantisation


@pytest.mark.parametrize("size", [1, 7, 333, 517, 1000, 2049, 4000])
def test_quantise_ends_and_clamping(size):
    assert quantise(0, size) == 0
    assert quantise(-3.5, size) == 0
    assert quantise(size, size) == 999
    assert quantise(size * 1.5, size) == 999
    assert dequantise(0, size) == pytest.approx(0.5 * size / 1000)
    assert dequantise(999, size) == pytest.approx(size - 0.5 * size / 1000)


@pytest.mark.parametrize(
    ("value", "size", "bin_index"),
    [
        # 2000 px: bins are exactly 2 px wide, [2k, 2k + 2)
        (8.0, 2000, 4),
        (math.nextafter(8.0, 0.0), 2000, 3),
        (7.999, 2000, 3),
        (1999.999, 2000, 999),
        # 1000 px: bin = pixel
        (500.0, 1000, 500),
        (math.nextafter(500.0, 0.0), 1000, 499),
        # 500 px: bins are 0.5 px wide
        (0.5, 500, 1),
        (math.nextafter(0.5, 0.0), 500, 0),
        # 333 px: x / 0.333
        (1.0, 333, 3),
        (0.998, 333, 2),
        (166.5, 333, 500),
    ],
)
def test_quantise_bin_edges(value, size, bin_index):
    assert quantise(value, size) == bin_index == math.floor(value / (size / 1000))


@pytest.mark.parametrize("size", [7, 333, 517, 2049])
def test_bin_centres_agree_with_the_processor(size):
    """Every bin's centre maps back to that bin, here and in the processor's own quantiser."""
    centres = [dequantise(b, size) for b in range(1000)]
    assert [quantise(c, size) for c in centres] == list(range(1000))
    points = torch.tensor([[c, c] for c in centres], dtype=torch.float64)
    reference = build_florence2_processor().post_processor.quantize(points, (size, size))
    assert reference[:, 0].tolist() == list(range(1000))


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 10_000),
    fraction=st.floats(0, 1),
)
def test_quantise_is_within_half_a_bin(size, fraction):
    value = fraction * size
    bin_index = quantise(value, size)
    assert 0 <= bin_index <= 999
    assert abs(dequantise(bin_index, size) - value) <= size / 2000 * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 8000),
    height=st.integers(1, 8000),
    corners=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_random_boxes_read_back(width, height, corners):
    x0, x1 = sorted(corners[0::2])
    y0, y1 = sorted(corners[1::2])
    box = (x0 * width, y0 * height, x1 * width, y1 * height)
    record = ImageRecord(
        "id",
        "memory://x.jpg",
        "test",
        width,
        height,
        "0" * 64,
        regions=[Region(box, "thing", "object", "test")],
    )
    targets = florence2_targets(record)
    [od] = _of(targets, "<OD>")
    parsed = _parse(od, width, height)
    assert parsed["labels"] == ["thing"]
    assert_boxes_close(parsed["bboxes"], [box], width, height)
    [region_to_category] = _of(targets, "<REGION_TO_CATEGORY>")
    [input_box] = _parse(
        Florence2Target("<REGION_PROPOSAL>", None, region_to_category.input), width, height
    )["bboxes"]
    assert_close(input_box, list(box), width, height)


# ---------------------------------------------------------------- what cannot be written


def test_unwritable_annotations_are_left_out():
    record = ImageRecord(
        "id",
        "memory://x.jpg",
        "test",
        100,
        50,
        "0" * 64,
        captions={
            "brief": Caption("   ", source="test"),
            "detailed": Caption("A thing.", source="test"),
        },
        regions=[
            Region((0, 0, 10, 10), "  ", "object", "test", polygons=[[1, 2, 3, 4]]),
            Region((0, 0, float("nan"), 10), "ghost", "object", "test"),
            Region((5, 5, 20, 20), "", "ocr", "test"),
            Region((5, 5, 20, 20), "x<y", "ocr", "test", quad=[1.0, 2.0]),
        ],
        phrases=[
            Phrase("detailed", 2, 7, "thing", [1], "test"),
            Phrase("brief", 0, 1, "x", [0], "test"),
        ],
    )
    targets = florence2_targets(record)
    assert [(t.task, t.target) for t in targets] == [
        ("<DETAILED_CAPTION>", "A thing."),
        ("<REGION_PROPOSAL>", "<loc_0><loc_0><loc_100><loc_200>"),
        ("<OCR>", "x<y"),
        ("<REGION_TO_OCR>", "x<y"),
    ]


def test_empty_record_has_no_targets():
    record = ImageRecord("id", "memory://x.jpg", "test", 10, 10, "0" * 64)
    assert florence2_targets(record) == []


def test_record_without_size_is_refused():
    record = ImageRecord("id", "memory://x.jpg", "test", 0, 10, "0" * 64)
    with pytest.raises(ValueError, match="no size"):
        florence2_targets(record)


def test_token_writers_check_their_shapes():
    assert loc_tokens([0, 0], 10, 10) == "<loc_0><loc_0>"
    with pytest.raises(ValueError):
        loc_tokens([1, 2, 3], 10, 10)
    with pytest.raises(ValueError):
        box_tokens([1, 2, 3, 4, 5, 6], 10, 10)
    with pytest.raises(ValueError):
        quad_tokens([1, 2, 3, 4], 10, 10)
    with pytest.raises(ValueError):
        polygon_tokens([], 10, 10)
