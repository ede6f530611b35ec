"""Florence-2 training targets made from image records.

Each target is one training example: a task token, its bare input (a caption, a phrase or
the four loc tokens of a region; ``None`` for tasks that take none) and the sequence the
model must learn to write, in the format of FLD_REFERENCE.md §3. The model's prompt is
``task + input``; ``Florence2Processor`` expands it into the natural-language prompt the
checkpoints were trained on (``<REGION_TO_CATEGORY><loc_1>...`` becomes ``What is the
region <loc_1>...?``), so the prompt wording lives in one place, the processor.

Coordinates are quantised against the record's own width and height: 1000 bins per axis,
``bin = floor(x / (W / 1000))`` clamped to 0..999. transformers'
``Florence2Processor.post_process_generation`` is the reference parser; every target here is
written so that it reads back the record's values. Two things it does that a reader of its
output should know:
- it returns ``int((bin + 0.5) * W / 1000)``: the bin centre truncated to a whole pixel, so a
  parsed coordinate lies within half a bin plus one pixel of the original;
- it reads an ``<OD>``, grounding or open-vocabulary label up to the next ``<`` and drops its
  non-ASCII characters. Targets keep the real text (the model should learn it); labels that
  contain ``<`` are not written at all, as the parser would split them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.geometry import all_finite, is_valid_polygon
from engine.records import CAPTION_KINDS, ImageRecord, Phrase, Region

LOC_BINS = 1000

CAPTION_TASKS: dict[str, str] = {
    "brief": "<CAPTION>",
    "detailed": "<DETAILED_CAPTION>",
    "more_detailed": "<MORE_DETAILED_CAPTION>",
}


@dataclass(slots=True)
class Florence2Target:
    """One training example: the model reads ``task + input`` and learns to write ``target``."""

    task: str
    input: str | None
    target: str


# ---------------------------------------------------------------- coordinates


def quantise(value: float, size: float) -> int:
    """The bin of a pixel coordinate on an axis of ``size`` pixels, clamped to 0..999."""
    return min(max(math.floor(value / (size / LOC_BINS)), 0), LOC_BINS - 1)


def dequantise(bin_index: int, size: float) -> float:
    """The centre of a bin, in pixels (the parser truncates it to an int)."""
    return (bin_index + 0.5) * (size / LOC_BINS)


def loc_tokens(coords: Sequence[float], width: float, height: float) -> str:
    """``<loc_N>`` tokens for flat ``x, y, x, y, ...`` pixel coordinates."""
    if len(coords) % 2:
        raise ValueError(f"coordinates come in x, y pairs, got {len(coords)} values")
    sizes = (width, height)
    return "".join(f"<loc_{quantise(v, sizes[i % 2])}>" for i, v in enumerate(coords))


def box_tokens(box: Sequence[float], width: float, height: float) -> str:
    """``<loc_x0><loc_y0><loc_x1><loc_y1>`` for a box ``[x0, y0, x1, y1]``."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates, got {len(box)}")
    return loc_tokens(box, width, height)


def quad_tokens(quad: Sequence[float], width: float, height: float) -> str:
    """8 loc tokens for a quadrilateral, corners clockwise from top-left."""
    if len(quad) != 8:
        raise ValueError(f"a quad has 8 coordinates, got {len(quad)}")
    return loc_tokens(quad, width, height)


def box_to_quad(box: Sequence[float]) -> list[float]:
    """The corners of a box, clockwise from top-left (y grows downwards)."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def polygon_tokens(polygons: Sequence[Sequence[float]], width: float, height: float) -> str:
    """The polygon parts of one object: ``<poly>`` part ``<sep>`` part ... ``</poly>``.

    The parser reads all parts between ``<poly>`` and ``</poly>`` as one instance with
    several polygons; a second ``<poly>...</poly>`` group would be a second instance.
    """
    if not polygons:
        raise ValueError("an object needs at least one polygon part")
    return "<poly>" + "<sep>".join(loc_tokens(p, width, height) for p in polygons) + "</poly>"


# ---------------------------------------------------------------- texts and shapes


def _plain_text(text: str) -> str | None:
    """A region text as a whole target (``<REGION_TO_*>``, ``<OCR>``); ``None`` when empty."""
    cleaned = " ".join(text.split())
    return cleaned or None


def _label(text: str) -> str | None:
    """A text written in front of loc tokens, or ``None`` when it cannot be.

    Whitespace is collapsed because the ``<OCR_WITH_REGION>`` parser's ``.`` does not cross a
    newline. An empty label cannot be parsed; the ``<OD>``, grounding and open-vocabulary
    parsers end a label at its first ``<``, so such texts are left out of every labelled
    sequence (``<OCR_WITH_REGION>`` included, to keep one rule).
    """
    cleaned = _plain_text(text)
    return cleaned if cleaned and "<" not in cleaned else None


def _polygon_parts(region: Region) -> list[list[float]]:
    """The parts that are polygons (3 or more finite vertices); malformed parts are left out."""
    return [part for part in region.polygons or [] if is_valid_polygon(part)]


def _quad(region: Region) -> list[float]:
    """The region's quad, or its box's corners when it has no usable quad."""
    quad = region.quad
    if quad is not None and len(quad) == 8 and all_finite(quad):
        return list(quad)
    return box_to_quad(region.box)


def reading_order(regions: list[Region]) -> list[Region]:
    """Text lines top to bottom, each read left to right.

    A region joins the current line when its vertical centre lies inside the line's first
    region; this groups words of a slightly uneven line without a tuned threshold.
    """
    lines: list[list[Region]] = []
    for region in sorted(regions, key=lambda r: r.box[1] + r.box[3]):
        centre = (region.box[1] + region.box[3]) / 2
        if lines and lines[-1][0].box[1] <= centre <= lines[-1][0].box[3]:
            lines[-1].append(region)
        else:
            lines.append([region])
    return [region for line in lines for region in sorted(line, key=lambda r: r.box[0])]


# ---------------------------------------------------------------- tasks


def florence2_targets(record: ImageRecord) -> list[Florence2Target]:
    """Every Florence-2 task the record supports, in a fixed order.

    Image-level tasks give one entry each; region-level tasks (``<REGION_TO_*>``) one per
    region; phrase grounding one per caption with phrases; referring-expression
    segmentation one per distinct expression; open-vocabulary detection one per category.
    Regions with a non-finite box, texts that cannot be written and phrases whose regions
    are missing are left out of the tasks that need them, so one bad annotation never costs
    the rest of the record.
    """
    if record.width <= 0 or record.height <= 0:
        raise ValueError(f"record {record.image_id} has no size ({record.width}x{record.height})")
    # Phrases point at regions by index, so unusable regions are dropped from the map, not
    # from a renumbered list.
    regions = {i: r for i, r in enumerate(record.regions) if all_finite(r.box)}
    return [
        *_caption_targets(record),
        *_object_targets(record, list(regions.values())),
        *_ocr_targets(record, list(regions.values())),
        *_grounding_targets(record, regions),
        *_referring_targets(record, regions),
    ]


def _caption_targets(record: ImageRecord) -> list[Florence2Target]:
    targets = []
    for kind, task in CAPTION_TASKS.items():
        text = (record.caption_text(kind) or "").strip()
        if text:
            targets.append(Florence2Target(task, None, text))
    return targets


def _object_targets(record: ImageRecord, regions: list[Region]) -> list[Florence2Target]:
    """``<OD>``, ``<REGION_PROPOSAL>``, ``<REGION_TO_CATEGORY>``, ``<REGION_TO_SEGMENTATION>``
    and ``<OPEN_VOCABULARY_DETECTION>``."""
    w, h = record.width, record.height
    objects = [r for r in regions if r.kind == "object"]
    labelled = [(label, r) for r in objects if (label := _label(r.text))]
    targets = []
    if labelled:
        od = "".join(label + box_tokens(r.box, w, h) for label, r in labelled)
        targets.append(Florence2Target("<OD>", None, od))
    # Proposals are class-agnostic: every object box counts, labelled or not.
    proposals = [r for r in regions if r.kind in ("object", "proposal")]
    if proposals:
        boxes = "".join(box_tokens(r.box, w, h) for r in proposals)
        targets.append(Florence2Target("<REGION_PROPOSAL>", None, boxes))
    for region in objects:
        text = _plain_text(region.text)
        if text:
            targets.append(
                Florence2Target("<REGION_TO_CATEGORY>", box_tokens(region.box, w, h), text)
            )
    for region in regions:
        parts = _polygon_parts(region)
        if parts:
            polygon = polygon_tokens(parts, w, h)
            targets.append(
                Florence2Target("<REGION_TO_SEGMENTATION>", box_tokens(region.box, w, h), polygon)
            )
    # One entry per category, all its boxes after one label (the parser gives each box the
    # label in front of it), categories in order of first appearance.
    categories: dict[str, list[Region]] = {}
    for label, region in labelled:
        categories.setdefault(label, []).append(region)
    for label, members in categories.items():
        boxes = "".join(box_tokens(r.box, w, h) for r in members)
        targets.append(Florence2Target("<OPEN_VOCABULARY_DETECTION>", label, label + boxes))
    return targets


def _ocr_targets(record: ImageRecord, regions: list[Region]) -> list[Florence2Target]:
    """``<OCR>`` (lines joined by newlines), ``<OCR_WITH_REGION>`` and ``<REGION_TO_OCR>``."""
    w, h = record.width, record.height
    ocr = reading_order([r for r in regions if r.kind == "ocr"])
    texts = [(text, r) for r in ocr if (text := _plain_text(r.text))]
    if not texts:
        return []
    targets = [Florence2Target("<OCR>", None, "\n".join(text for text, _ in texts))]
    labelled = [(label, r) for r in ocr if (label := _label(r.text))]
    if labelled:
        target = "".join(label + quad_tokens(_quad(r), w, h) for label, r in labelled)
        targets.append(Florence2Target("<OCR_WITH_REGION>", None, target))
    for text, region in texts:
        targets.append(Florence2Target("<REGION_TO_OCR>", box_tokens(region.box, w, h), text))
    return targets


def _phrases_by_caption(record: ImageRecord) -> list[tuple[str, list[Phrase]]]:
    """Each non-empty caption with its phrases in the order they occur in it."""
    captions = []
    for kind in CAPTION_KINDS:
        text = record.caption_text(kind)
        phrases = sorted(
            (p for p in record.phrases if p.caption == kind), key=lambda p: (p.start, p.end)
        )
        if text and text.strip() and phrases:
            captions.append((text, phrases))
    return captions


def _grounding_targets(record: ImageRecord, regions: dict[int, Region]) -> list[Florence2Target]:
    """``<CAPTION_TO_PHRASE_GROUNDING>``: each phrase followed by the boxes of its regions."""
    w, h = record.width, record.height
    targets = []
    for caption, phrases in _phrases_by_caption(record):
        parts = []
        for phrase in phrases:
            label = _label(phrase.text)
            boxes = [regions[i].box for i in phrase.regions if i in regions]
            if label and boxes:
                parts.append(label + "".join(box_tokens(b, w, h) for b in boxes))
        if parts:
            targets.append(
                Florence2Target("<CAPTION_TO_PHRASE_GROUNDING>", caption, "".join(parts))
            )
    return targets


def _referring_targets(record: ImageRecord, regions: dict[int, Region]) -> list[Florence2Target]:
    """``<REFERRING_EXPRESSION_SEGMENTATION>`` for each phrase grounded to exactly one region
    with polygons; an expression naming several regions has no single mask. A phrase that
    recurs in several captions with the same mask gives one entry."""
    w, h = record.width, record.height
    targets: dict[tuple[str, str], Florence2Target] = {}
    for _, phrases in _phrases_by_caption(record):
        for phrase in phrases:
            label = _label(phrase.text)
            region = regions.get(phrase.regions[0]) if len(phrase.regions) == 1 else None
            parts = _polygon_parts(region) if region else []
            if label and parts:
                polygon = polygon_tokens(parts, w, h)
                targets.setdefault(
                    (label, polygon),
                    Florence2Target("<REFERRING_EXPRESSION_SEGMENTATION>", label, polygon),
                )
    return list(targets.values())
