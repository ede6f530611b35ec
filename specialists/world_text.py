"""Captions and grounding for the generated world, written from ``ShapeDetector``'s
detections (``specialists.world``): no model, so every detection error shows.

- ``TemplateCaptioner``: captions from a template over the detections (counts,
  colours, sizes, positions on a 3x3 grid, the background's named colour); none for
  an image the world does not explain (``specialists.world.world_fit``), where "a
  plain sand background" would be a confident description of a photo it cannot see.
- ``PhraseGrounder``: "<colour> <shape>" mentions in the captions (with a size word,
  or plural), grounded to the detections of that colour and shape.

Size, position, number and colour words are the world's own (``engine.world_*``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from engine.config import SpecialistConfig
from engine.geometry import box_in_image
from engine.records import CAPTION_KINDS, Caption, Phrase, Region
from engine.world.captions import NUMBER_WORDS, POSITIONS
from engine.world.drawing import BACKGROUND_COLOURS, COLOURS, SHAPES, SIGN_PLATES, SIZES
from specialists.base import Annotations, Specialist, SpecialistInput
from specialists.world import (
    COLOUR_TOLERANCE,
    FULL_FIT,
    MIN_FIT,
    SIGN,
    fit_factor,
    quantise,
    world_fit,
)


@dataclass(frozen=True, slots=True)
class _Seen:
    """A detection as the captions see it."""

    colour: str
    noun: str
    size: str
    position: str
    area: float


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith("s") else "s")


def _count(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _size_word(box: tuple[float, ...], short_side: float) -> str:
    """The world's size class whose extent range is nearest the box's longer side."""
    extent = max(box[2] - box[0], box[3] - box[1]) / short_side
    return min(SIZES, key=lambda s: abs(extent - sum(SIZES[s]) / 2))


def _background_word(pixels: np.ndarray, objects: np.ndarray) -> str:
    """The named background colour nearest the median of the pixels outside the boxes."""
    rest = pixels[~objects] if (~objects).any() else pixels.reshape(-1, 3)
    median = np.median(rest.reshape(-1, 3), axis=0)
    return min(
        BACKGROUND_COLOURS,
        key=lambda n: float(np.linalg.norm(median - np.array(BACKGROUND_COLOURS[n]))),
    )


class TemplateCaptioner(Specialist):
    """Brief, detailed and more detailed captions written from the detections."""

    needs = frozenset({"objects"})
    produces = frozenset({"captions"})

    def __init__(
        self,
        config: SpecialistConfig,
        max_described: int = 4,
        min_fit: float = MIN_FIT,
        full_fit: float = FULL_FIT,
    ) -> None:
        """``max_described``: objects the detailed caption describes one by one, largest
        first (the more detailed caption describes twice as many); the rest are
        counted. More gives longer captions and more chances to repeat a detector error.
        ``min_fit`` / ``full_fit``: as ``ShapeDetector``'s; at or below ``min_fit`` the
        image gets no captions."""
        super().__init__(config)
        self.max_described = max_described
        self.min_fit = min_fit
        self.full_fit = full_fit

    @property
    def model_revision(self) -> str:
        return "world-captions@2"

    def setup(self) -> None:
        """Nothing to load."""

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        return [self._caption(item) for item in batch]

    def _caption(self, item: SpecialistInput) -> Annotations:
        pixels = np.asarray(item.image.convert("RGB"))
        fit = world_fit(pixels, quantise(pixels, COLOUR_TOLERANCE))
        factor = fit_factor(fit, self.min_fit, self.full_fit)
        if factor == 0.0:
            return Annotations()
        height, width = pixels.shape[:2]
        covered = np.zeros((height, width), bool)
        seen, scores = [], []
        for region in item.record.regions:
            words = region.text.split()
            box = box_in_image(region.box, width, height)
            if region.kind != "object" or len(words) < 2 or box is None:
                continue
            x0, y0, x1, y1 = (round(v) for v in box)
            covered[y0:y1, x0:x1] = True
            column = min(int(3 * (box[0] + box[2]) / 2 / width), 2)
            row = min(int(3 * (box[1] + box[3]) / 2 / height), 2)
            area = (box[2] - box[0]) * (box[3] - box[1])
            size = _size_word(box, min(width, height))
            seen.append(_Seen(words[-2], words[-1], size, POSITIONS[(column, row)], area))
            scores.append(1.0 if region.score is None else region.score)
        background = _background_word(pixels, covered)
        # The background word and the count are claims of the captioner's own, so its
        # fit scales the score even when the boxes' scores already carry one.
        score = float(np.mean(scores)) * factor if scores else 0.0
        texts = {
            "brief": self._brief(seen, background),
            "detailed": self._detailed(seen, background, self.max_described),
            "more_detailed": self._detailed(seen, background, 2 * self.max_described, more=True),
        }
        return Annotations(
            captions={kind: Caption(texts[kind], source="", score=score) for kind in CAPTION_KINDS}
        )

    @staticmethod
    def _brief(seen: list[_Seen], background: str) -> str:
        if not seen:
            return f"A plain {background} background."
        if len(seen) == 1:
            phrase = f"{seen[0].size} {seen[0].colour} {seen[0].noun}"
            return f"{_article(phrase).capitalize()} {phrase} on a {background} background."
        if len(seen) == 2:
            a, b = (f"{o.colour} {o.noun}" for o in sorted(seen, key=lambda o: -o.area))
            return f"{_article(a).capitalize()} {a} and {_article(b)} {b}."
        return f"{_count(len(seen)).capitalize()} colorful shapes on a {background} background."

    @staticmethod
    def _detailed(seen: list[_Seen], background: str, limit: int, more: bool = False) -> str:
        opening = "This image shows" if more else "The image shows"
        if not seen:
            return f"{opening} an empty {background} background with no shapes."
        n = len(seen)
        shapes = f"{_article(_count(n))} shape" if n == 1 else f"{_count(n)} shapes"
        sentences = [f"{opening} {shapes} on a {background} background."]
        ordered = sorted(seen, key=lambda o: -o.area)
        for o in ordered[:limit]:
            phrase = f"{o.size} {o.colour} {o.noun}"
            sentences.append(f"{_article(phrase).capitalize()} {phrase} is {o.position}.")
        rest = ordered[limit:]
        if rest:
            kinds = Counter((o.colour, o.noun) for o in rest)
            listed = [
                f"{_article(c) if k == 1 else _count(k)} {c} {_plural(s, k)}"
                for (c, s), k in kinds.items()
            ]
            sentences.append(f"There are also {', '.join(listed)}.")
        if more:
            colours = Counter(o.colour for o in seen)
            counted = [f"{_count(k)} {c}" for c, k in colours.most_common()]
            sentences.append(f"By color there are {', '.join(counted)}.")
        return " ".join(sentences)


# ---------------------------------------------------------------- grounding

_NOUNS = (*SHAPES, SIGN)
_MENTION = re.compile(
    r"\b(?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<noun>{nouns})(?P<plural>e?s)?\b".format(
        sizes="|".join(SIZES),
        colours="|".join(sorted({*COLOURS, *SIGN_PLATES}, key=len, reverse=True)),
        nouns="|".join(_NOUNS),
    ),
    re.IGNORECASE,
)


class PhraseGrounder(Specialist):
    """Grounds "<colour> <shape>" mentions (with a size word, or plural) in the captions
    to the detections of that colour and shape."""

    needs = frozenset({"captions", "objects"})
    produces = frozenset({"grounding"})

    def __init__(self, config: SpecialistConfig, use_size: bool = True) -> None:
        """``use_size``: a singular mention with a size word ("large red circle") picks,
        among several matching detections, those of that size class; without it every
        matching detection is grounded, which is right for repeats and wrong for pairs."""
        super().__init__(config)
        self.use_size = use_size

    @property
    def model_revision(self) -> str:
        return "world-grounding@1"

    def setup(self) -> None:
        """Nothing to load."""

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        return [self._ground(item) for item in batch]

    def _ground(self, item: SpecialistInput) -> Annotations:
        record = item.record
        short_side = min(item.image.size)
        objects = [r for r in record.regions if r.kind == "object" and len(r.text.split()) >= 2]
        out = Annotations()
        index_of: dict[int, int] = {}
        for kind, caption in record.captions.items():
            for match in _MENTION.finditer(caption.text):
                colour, noun = match["colour"].lower(), match["noun"].lower()
                chosen = [
                    i
                    for i, r in enumerate(objects)
                    if r.text.lower().split()[-2:] == [colour, noun]
                ]
                size = (match["size"] or "").lower()
                if self.use_size and size and not match["plural"]:
                    sized = [i for i in chosen if _size_word(objects[i].box, short_side) == size]
                    chosen = sized or chosen
                if not chosen:
                    continue
                for i in chosen:
                    if i not in index_of:
                        index_of[i] = len(out.regions)
                        r = objects[i]
                        out.regions.append(Region(r.box, r.text, "object", "", score=r.score))
                scores = [1.0 if objects[i].score is None else objects[i].score for i in chosen]
                start, end = match.span()
                out.phrases.append(
                    Phrase(
                        kind,
                        start,
                        end,
                        caption.text[start:end],
                        [index_of[i] for i in chosen],
                        source="",
                        score=float(np.mean(scores)),
                    )
                )
        return out
