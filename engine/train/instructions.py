"""Conversations about one image, made from its FLD record: stage-1 captions, stage-2 tasks.

A record is an :class:`engine.records.ImageRecord`, read from the ``<key>.json`` of an
exported sample by ``engine.records.record_from_sample``; the image travels beside it as
the encoded bytes the shard stores. Each function returns
:class:`Conversation` objects whose turns alternate user / assistant, starting with the
user; the image placeholder is not in the text (``encode_conversation`` puts it in front of
the first user turn).

Coordinates. A box is written ``[x0, y0, x1, y1]``: each value the Florence-2 bin of the
pixel coordinate on its axis, ``floor(x / (W / 1000))`` clamped to 0..999
(``refinement.targets.quantise``), so ``[0, 0, 999, 999]`` is the whole image whatever its
size. Plain numbers are in every LLM's vocabulary, unlike Florence-2's ``<loc_N>`` tokens,
and the bins are the ones the engine's Florence-2 targets use. An OCR quadrilateral is
eight such values ``[x1, y1, x2, y2, x3, y3, x4, y4]``, corners clockwise from top-left.
Several boxes are joined by ``", "``.

Answer formats (the question is drawn from a short fixed list per task, e.g.):
- ``caption``: "Describe the image in detail." -> the record's most detailed caption
  (more_detailed, else detailed, else brief), or the kinds ``data.stage1_captions`` asks
  for; a brief caption is asked for briefly ("Describe the image briefly."). The same
  conversation is the stage-2 task ``caption``.
- ``region`` (box -> text): "What is in the region [12, 40, 300, 512]?" -> the object
  region's text, e.g. ``"a brown dog"``.
- ``grounding`` (phrase -> boxes): 'Where is "a brown dog" in the image?' -> every box the
  caption phrase is grounded to, in the record's region order: ``"[12, 40, 300, 512]"`` or
  ``"[12, 40, 300, 512], [500, 40, 700, 600]"``.
- ``referring`` (expression -> box): 'Which region does "the dog on the left" describe?'
  -> ``"[12, 40, 300, 512]"``; expressions are object-region texts that occur once in the
  record, so the answer is one box.
- ``counting``: 'How many "dog" are there in the image?' -> ``"3"``: the number of object
  regions with that text (case and spacing ignored); only category-like texts of up to
  three words are counted, longer texts being descriptions of one region.
- ``ocr``: two turns. "What text is in the image?" -> the OCR texts in reading order
  (lines top to bottom, left to right within a line), one per line; then "Where is each
  piece of text?" -> one line per text, ``"STOP [410, 80, 520, 130]"``: the text, a space,
  its quadrilateral (8 values) when the record has one, else its box (4 values).

``region``, ``grounding``, ``referring`` and ``counting`` ask about up to
``MAX_TURNS`` items of the record (drawn without replacement, in random order), one
question and answer per item. A record lacking what a task needs (no object region with
text, no grounded phrase, no OCR text, ...) gives no conversation for that task. Regions
with a non-finite box are ignored, and so are phrases pointing only at such regions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine.geometry import all_finite
from engine.records import ImageRecord, Region
from refinement.targets import quantise, reading_order

# Questions per conversation for the multi-item tasks: several answers share one image's
# visual tokens (the expensive part of a sample) while the text stays far below a
# typical max_length.
MAX_TURNS = 4
# Object texts of more words than this describe one region rather than name a category,
# and "how many <description>" has no sensible answer.
MAX_CATEGORY_WORDS = 3

CAPTION_PROMPTS = (
    "Describe the image in detail.",
    "Give a detailed description of this image.",
    "What do you see in this picture? Describe it thoroughly.",
    "Write a detailed caption for the image.",
)
# The caption kinds of a record (engine.records), most detailed first.
CAPTION_KINDS = ("more_detailed", "detailed", "brief")
BRIEF_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for the image.",
    "What does this image show, in one sentence?",
)
REGION_PROMPTS = (
    "What is in the region {box}?",
    "Describe the region {box} of the image.",
    "What does the area {box} show?",
)
GROUNDING_PROMPTS = (
    'Where is "{phrase}" in the image?',
    'Give the boxes of "{phrase}".',
    'Locate "{phrase}" in the image.',
)
REFERRING_PROMPTS = (
    'Which region does "{expression}" describe?',
    'Give the box of "{expression}".',
    'Find the region: "{expression}".',
)
COUNTING_PROMPTS = (
    'How many "{category}" are there in the image?',
    'Count the "{category}" in the image.',
)
OCR_READ_PROMPTS = (
    "What text is in the image?",
    "Read all the text in the image.",
)
OCR_LOCATE_PROMPTS = (
    "Where is each piece of text?",
    "Read the text again, with the location of each piece.",
)

# "caption" is stage 1's caption conversation asked again in stage 2 (Florence-VL's
# instruction data holds detailed descriptions too); the others are made by _TASKS.
INSTRUCTION_TASKS = ("caption", "region", "grounding", "ocr", "counting", "referring")


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Conversation:
    """Turns about one image: user first, then alternating with the assistant."""

    image: bytes  # the encoded image as stored (JPEG for the engine's shards)
    turns: tuple[Turn, ...]
    image_id: str
    task: str  # "caption" | "region" | "grounding" | "ocr" | "counting" | "referring" | "llava"


def caption_conversation(
    record: ImageRecord,
    image: bytes,
    rng: random.Random,
    kinds: Sequence[str] = CAPTION_KINDS,
    choice: Literal["first", "random"] = "first",
) -> Conversation | None:
    """Stage 1: a question asking for a description and one of the record's captions.

    ``kinds``: caption kinds in order of preference; ``choice`` "first" takes the first
    kind with a non-blank caption, "random" one of those with a caption, drawn with
    ``rng``. A brief caption is asked for with a brief prompt, the others with a detailed
    one. Returns None when none of ``kinds`` has a non-blank caption.
    """
    unknown = set(kinds) - set(CAPTION_KINDS)
    if unknown:
        raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {CAPTION_KINDS}")
    present = [(k, t) for k in kinds if (t := (record.caption_text(k) or "").strip())]
    if not present:
        return None
    kind, text = present[0] if choice == "first" else rng.choice(present)
    prompts = BRIEF_CAPTION_PROMPTS if kind == "brief" else CAPTION_PROMPTS
    turns = (Turn("user", rng.choice(prompts)), Turn("assistant", text))
    return Conversation(image, turns, record.image_id, "caption")


def instruction_conversations(
    record: ImageRecord,
    image: bytes,
    tasks: Sequence[str],
    rng: random.Random,
    caption_kinds: Sequence[str] = CAPTION_KINDS,
    caption_choice: Literal["first", "random"] = "first",
) -> list[Conversation]:
    """Stage 2: one conversation per task in ``tasks`` that the record has the data for.

    ``tasks`` are names from ``INSTRUCTION_TASKS``; the answer formats are in the module
    docstring. ``caption_kinds`` and ``caption_choice`` pick the ``caption`` task's caption
    as in ``caption_conversation``. The conversations come in the order of ``tasks``.
    """
    unknown = set(tasks) - set(INSTRUCTION_TASKS)
    if unknown:
        raise ValueError(f"unknown instruction tasks {sorted(unknown)}; known: {INSTRUCTION_TASKS}")
    conversations = []
    for task in tasks:
        if task == "caption":
            made = caption_conversation(record, image, rng, caption_kinds, caption_choice)
            conversations += [made] if made else []
            continue
        pairs = _TASKS[task](record, rng)
        if pairs:
            turns = tuple(
                turn for q, a in pairs for turn in (Turn("user", q), Turn("assistant", a))
            )
            conversations.append(Conversation(image, turns, record.image_id, task))
    return conversations


# ---------------------------------------------------------------- coordinates as text


def format_coords(coords: Sequence[float], width: float, height: float) -> str:
    """Flat ``x, y, x, y, ...`` pixel coordinates as ``"[x, y, ...]"`` in 0..999 bins."""
    if not (width > 0 and height > 0):
        raise ValueError(f"an image of {width}x{height} pixels has no coordinates")
    sizes = (width, height)
    return "[" + ", ".join(str(quantise(v, sizes[i % 2])) for i, v in enumerate(coords)) + "]"


# ---------------------------------------------------------------- tasks

Pairs = list[tuple[str, str]]


def _text(value: str | None) -> str:
    """A text with its whitespace collapsed (answers are compared and counted this way)."""
    return " ".join((value or "").split())


def _regions(record: ImageRecord, kind: str) -> list[Region]:
    """The record's regions of ``kind`` with text and a finite box."""
    return [r for r in record.regions if r.kind == kind and _text(r.text) and all_finite(r.box)]


def _some(items: list[Any], rng: random.Random) -> list[Any]:
    return rng.sample(items, min(len(items), MAX_TURNS))


def _region_pairs(record: ImageRecord, rng: random.Random) -> Pairs:
    w, h = record.width, record.height
    return [
        (rng.choice(REGION_PROMPTS).format(box=format_coords(r.box, w, h)), _text(r.text))
        for r in _some(_regions(record, "object"), rng)
    ]


def _grounding_pairs(record: ImageRecord, rng: random.Random) -> Pairs:
    w, h = record.width, record.height
    regions = record.regions
    # A phrase that recurs (in several captions) keeps its first grounding.
    grounded: dict[str, str] = {}
    for phrase in record.phrases:
        text = _text(phrase.text)
        boxes = [
            format_coords(regions[i].box, w, h)
            for i in sorted(set(phrase.regions))
            if 0 <= i < len(regions) and all_finite(regions[i].box)
        ]
        if text and boxes:
            grounded.setdefault(text, ", ".join(boxes))
    return [
        (rng.choice(GROUNDING_PROMPTS).format(phrase=text), boxes)
        for text, boxes in _some(list(grounded.items()), rng)
    ]


def _referring_pairs(record: ImageRecord, rng: random.Random) -> Pairs:
    w, h = record.width, record.height
    by_text: dict[str, list[Region]] = {}
    for region in _regions(record, "object"):
        by_text.setdefault(_text(region.text).lower(), []).append(region)
    unique = [regions[0] for regions in by_text.values() if len(regions) == 1]
    return [
        (
            rng.choice(REFERRING_PROMPTS).format(expression=_text(r.text)),
            format_coords(r.box, w, h),
        )
        for r in _some(unique, rng)
    ]


def _counting_pairs(record: ImageRecord, rng: random.Random) -> Pairs:
    counts: dict[str, int] = {}
    for region in _regions(record, "object"):
        category = _text(region.text).lower()
        if len(category.split()) <= MAX_CATEGORY_WORDS:
            counts[category] = counts.get(category, 0) + 1
    return [
        (rng.choice(COUNTING_PROMPTS).format(category=category), str(count))
        for category, count in _some(list(counts.items()), rng)
    ]


def _ocr_pairs(record: ImageRecord, rng: random.Random) -> Pairs:
    w, h = record.width, record.height
    # The Florence-2 OCR targets' reading order, so both models learn one.
    texts = reading_order(_regions(record, "ocr"))
    if not texts:
        return []
    read = "\n".join(_text(r.text) for r in texts)
    located = "\n".join(f"{_text(r.text)} {format_coords(_ocr_shape(r), w, h)}" for r in texts)
    return [(rng.choice(OCR_READ_PROMPTS), read), (rng.choice(OCR_LOCATE_PROMPTS), located)]


def _ocr_shape(region: Region) -> Sequence[float]:
    """The region's quadrilateral when it has a usable one, else its box."""
    quad = region.quad
    return quad if quad is not None and len(quad) == 8 and all_finite(quad) else region.box


_TASKS: dict[str, Callable[[ImageRecord, random.Random], Pairs]] = {
    "region": _region_pairs,
    "grounding": _grounding_pairs,
    "ocr": _ocr_pairs,
    "counting": _counting_pairs,
    "referring": _referring_pairs,
}
