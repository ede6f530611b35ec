"""Florence-2 as a specialist: one task per instance, on transformers' native Florence-2.

A specialist runs one Florence-2 task over its images; configure several specialists to
run several tasks. Tasks and what each one returns:
- ``<CAPTION>``, ``<DETAILED_CAPTION>``, ``<MORE_DETAILED_CAPTION>``: the brief, detailed
  or more_detailed caption;
- ``<OD>``: ``object`` regions with their category; ``<DENSE_REGION_CAPTION>``: ``object``
  regions with a description; ``<REGION_PROPOSAL>``: ``proposal`` regions, no text;
- ``<OCR_WITH_REGION>``: ``ocr`` regions with the text, the quad, and the quad's bounds
  as box;
- ``<CAPTION_TO_PHRASE_GROUNDING>``, given each caption of a record: ``object`` regions
  named by their phrase, and the phrases with their character span in the caption;
- ``<REGION_TO_SEGMENTATION>``, given each ``object`` box of a record: that region (box,
  text and kind unchanged) with the polygon parts of its mask.

Grounding and segmentation generate once per input (caption, box); the inputs of a batch
are generated together, ``batch_size`` at a time. Outputs are read by the processor's
``post_process_generation``, the reference parser of the sequence format; coordinates
are clipped to the image, and a box written with its corners swapped is read as the box
they span. An output that parses to nothing gives no annotations.

Scores. Florence-2 writes no confidence, so one is computed from the log-probabilities
of the generated tokens, taken from the model's raw logits (log-softmax before any of
generation's logits processors, so a token's log-probability does not depend on the
decoding settings). ``<s>`` and padding carry no text and are left out.
- a caption and a polygon: exp of the mean log-probability of the generated tokens, the
  closing ``</s>`` included (the geometric mean of the token probabilities);
- a box or quad: exp of the mean log-probability of its own 4 (8) ``<loc_N>`` tokens and
  of the text tokens written just before them (its label). A label followed by several
  boxes counts for each of them. Where a parsed box cannot be traced back to its tokens
  it gets the score of the whole sequence;
- a grounded phrase: the mean of its boxes' scores.
All scores lie in (0, 1]; they rank outputs of one model, they are not calibrated.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from engine.config import SpecialistConfig
from engine.geometry import all_finite, clip_points, is_valid_polygon
from engine.records import CAPTION_KINDS, Box, Caption, Phrase, Region
from refinement.targets import CAPTION_TASKS, LOC_BINS, box_tokens, dequantise
from specialists.base import Annotations, Specialist, SpecialistInput, load_pretrained

if TYPE_CHECKING:
    from PIL import Image

GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"
SEGMENTATION = "<REGION_TO_SEGMENTATION>"
OCR = "<OCR_WITH_REGION>"
CAPTION_KIND_OF_TASK = {task: kind for kind, task in CAPTION_TASKS.items()}
REGION_KIND_OF_TASK = {
    "<OD>": "object",
    "<DENSE_REGION_CAPTION>": "object",
    "<REGION_PROPOSAL>": "proposal",
}
# What each task produces and needs, in the terms of specialists.base.PRODUCTS.
TASKS: dict[str, tuple[str, frozenset[str]]] = {
    **{task: ("captions", frozenset()) for task in CAPTION_KIND_OF_TASK},
    **{task: ("objects", frozenset()) for task in REGION_KIND_OF_TASK},
    OCR: ("ocr", frozenset()),
    GROUNDING: ("grounding", frozenset({"captions"})),
    SEGMENTATION: ("polygons", frozenset({"objects"})),
}


@dataclass(slots=True)
class Generation:
    """One generated sequence: the tokens after the start token ``<s>``, up to and
    including the closing ``</s>`` (absent when ``max_new_tokens`` cut the text), padding
    left out; and the log-probability of each of those tokens."""

    token_ids: list[int]
    log_probs: list[float]

    @property
    def score(self) -> float | None:
        if not self.log_probs:
            return None
        return math.exp(sum(self.log_probs) / len(self.log_probs))


@dataclass(slots=True)
class Prompt:
    """One input to generate from: the processor's prompt (task token + input) and what
    the output is read against."""

    text: str
    # Grounding: the kind and the text of the caption whose phrases are grounded.
    caption_kind: str | None = None
    caption_text: str | None = None
    # Region-to-segmentation: the region whose box was the input.
    region: Region | None = None


class Florence2Specialist(Specialist):
    """Runs one Florence-2 task; see the module docstring for tasks, outputs and scores."""

    requires_model = True

    def __init__(
        self,
        config: SpecialistConfig,
        task: str,
        max_new_tokens: int = 1024,
        num_beams: int = 1,
        grounding_captions: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        """Options:

        - ``task``: the Florence-2 task token this specialist runs (table above).
        - ``max_new_tokens``: the most tokens one output may have. 1024 is what the
          released examples use and fits the densest detection outputs; a model stops at
          ``</s>`` long before that on real images, so it bounds time only on degenerate
          output. A text cut by it is still parsed as far as it goes.
        - ``num_beams``: 1 is greedy decoding, the fastest. Florence-2's own examples use
          3, which finds likelier sequences at about three times the decoding cost and
          memory.

        Scoring keeps the logits of every generated step until the batch is done:
        ``batch_size * num_beams * steps * vocabulary`` floats, 1.7 GB for 8 outputs of
        1024 tokens over Florence-2's 51289 tokens. ``batch_size`` is the lever; the
        annotate stage halves it on an out-of-memory error.
        - ``grounding_captions``: for ``<CAPTION_TO_PHRASE_GROUNDING>``, which caption
          kinds to ground; ``None`` grounds every caption a record has.
        """
        super().__init__(config)
        if task not in TASKS:
            raise ValueError(f"unsupported Florence-2 task {task!r}; supported: {sorted(TASKS)}")
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        kinds = tuple(grounding_captions) if grounding_captions is not None else CAPTION_KINDS
        unknown = set(kinds) - set(CAPTION_KINDS)
        if unknown:
            raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {CAPTION_KINDS}")
        product, needs = TASKS[task]
        self.produces = frozenset({product})
        self.needs = needs
        self.task = task
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.grounding_captions = kinds
        self._model = None
        self._processor = None
        self._loc_bins: dict[int, int] = {}

    def setup(self) -> None:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        loaded = load_pretrained(self.config, Florence2ForConditionalGeneration, AutoProcessor)
        self._model, self._processor = loaded.model, loaded.processor
        self._loaded_revision = loaded.model_revision
        tokenizer = self._processor.tokenizer
        self._loc_bins = {tokenizer.convert_tokens_to_ids(f"<loc_{i}>"): i for i in range(LOC_BINS)}

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        jobs = [(i, prompt) for i, item in enumerate(batch) for prompt in self.prompts(item)]
        results = [Annotations() for _ in batch]
        for start in range(0, len(jobs), self.config.batch_size):
            chunk = jobs[start : start + self.config.batch_size]
            images = [batch[i].image for i, _ in chunk]
            generations = self.generate(images, [prompt.text for _, prompt in chunk])
            for (i, prompt), generation in zip(chunk, generations, strict=True):
                _extend(results[i], self.read(generation, batch[i].image.size, prompt))
        return results

    def prompts(self, item: SpecialistInput) -> list[Prompt]:
        """What to generate for one image: one prompt, or one per caption or box."""
        if self.task == GROUNDING:
            return [
                Prompt(GROUNDING + text, caption_kind=kind, caption_text=text)
                for kind in self.grounding_captions
                if (text := item.record.caption_text(kind)) and text.strip()
            ]
        if self.task == SEGMENTATION:
            width, height = item.image.size
            return [
                Prompt(SEGMENTATION + box_tokens(region.box, width, height), region=region)
                for region in item.record.regions
                if region.kind == "object" and all_finite(region.box)
            ]
        return [Prompt(self.task)]

    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[Generation]:
        """Generate for a batch of (image, prompt) pairs; prompts are padded to one length."""
        import torch

        inputs = self._processor(text=prompts, images=images, padding=True, return_tensors="pt")
        # BatchFeature.to casts floating tensors (pixels) only; token ids stay integers.
        inputs = inputs.to(self.device, dtype=self._model.dtype)
        with torch.inference_mode():
            generated, log_probs = self.generate_scored(
                self._model, inputs, self.max_new_tokens, self.num_beams
            )
        tokens = generated.tolist()
        tokenizer = self._processor.tokenizer
        skipped = {tokenizer.bos_token_id, tokenizer.pad_token_id}
        generations = []
        for row_tokens, row_log_probs in zip(tokens, log_probs.float().tolist(), strict=True):
            kept = Generation([], [])
            for token, log_prob in zip(row_tokens, row_log_probs, strict=True):
                if token in skipped:
                    continue
                kept.token_ids.append(token)
                kept.log_probs.append(log_prob)
                if token == tokenizer.eos_token_id:
                    break
            generations.append(kept)
        return generations

    def read(
        self, generation: Generation, image_size: tuple[int, int], prompt: Prompt
    ) -> Annotations:
        """The annotations in one generated sequence, for an image of ``(width, height)``."""
        text = self._processor.tokenizer.decode(
            generation.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        try:
            parsed = self._processor.post_process_generation(
                text, task=self.task, image_size=image_size
            )[self.task]
        except ValueError:
            # The parser's patterns accept any number in "<loc_N>" spelt out as plain text,
            # and torch cannot hold one of 20 digits: such an output is unreadable.
            return Annotations()
        width, height = image_size
        if self.task in CAPTION_KIND_OF_TASK:
            if not parsed:
                return Annotations()
            caption = Caption(parsed, source="", score=generation.score)
            return Annotations(captions={CAPTION_KIND_OF_TASK[self.task]: caption})
        if self.task == SEGMENTATION:
            return self._segmentation(parsed, generation, image_size, prompt.region)
        if self.task == OCR:
            quads = [clip_points(q, width, height) for q in parsed["quad_boxes"]]
            scores = self._box_scores(generation, quads, image_size)
            return Annotations(
                regions=[
                    Region(_bounds(quad), text, "ocr", source="", score=score, quad=quad)
                    for quad, text, score in zip(quads, parsed["labels"], scores, strict=True)
                ]
            )
        boxes = [_clip_box(box, width, height) for box in parsed["bboxes"]]
        scores = self._box_scores(generation, boxes, image_size)
        if self.task == GROUNDING:
            return _grounding(parsed["labels"], boxes, scores, prompt)
        kind = REGION_KIND_OF_TASK[self.task]
        return Annotations(
            regions=[
                Region(box, text, kind, source="", score=score)
                for box, text, score in zip(boxes, parsed["labels"], scores, strict=True)
            ]
        )

    def _segmentation(
        self,
        parsed: dict[str, Any],
        generation: Generation,
        image_size: tuple[int, int],
        region: Region | None,
    ) -> Annotations:
        """The input region with the polygon parts of every instance in the output."""
        width, height = image_size
        parts = [
            clip_points(part, width, height)
            for instance in parsed["polygons"]
            for part in instance
            if is_valid_polygon(part)
        ]
        if region is None or not parts:
            return Annotations()
        return Annotations(
            regions=[replace(region, source="", score=generation.score, round=None, polygons=parts)]
        )

    def _box_scores(
        self,
        generation: Generation,
        shapes: list[list[float]] | list[Box],
        image_size: tuple[int, int],
    ) -> list[float | None]:
        """The score of each parsed box (4 coordinates) or quad (8), in parse order.

        The parser returns what it read in the order it was written, leaving some out
        (a box with no label, a banned grounding phrase). So each shape is matched to the
        next run of loc tokens, at or after the previous match, that dequantises to it;
        the parser truncates to whole pixels and clipping moves nothing further than
        that, hence the one-pixel tolerance.
        """
        if not shapes:
            return []
        located = self._located(generation, len(shapes[0]), image_size)
        scores: list[float | None] = []
        position = 0
        for shape in shapes:
            match = next(
                (
                    k
                    for k in range(position, len(located))
                    if all(abs(a - b) <= 1 for a, b in zip(located[k][0], shape, strict=True))
                ),
                None,
            )
            if match is None:
                scores.append(generation.score)
            else:
                scores.append(located[match][1])
                position = match + 1
        return scores

    def _located(
        self, generation: Generation, group: int, image_size: tuple[int, int]
    ) -> list[tuple[list[float], float]]:
        """Each run of ``group`` loc tokens as pixel coordinates, with its score: exp of the
        mean log-probability of those tokens and of the label text just before them.
        Longer runs split into groups from their start, as the parser reads them."""
        located = []
        label: list[float] = []
        run: list[tuple[int, float]] = []
        after_loc = False
        for token, log_prob in zip(generation.token_ids, generation.log_probs, strict=True):
            loc_bin = self._loc_bins.get(token)
            if loc_bin is None:
                if after_loc:
                    label, run, after_loc = [], [], False
                label.append(log_prob)
                continue
            after_loc = True
            run.append((loc_bin, log_prob))
            if len(run) == group:
                coords = [dequantise(b, image_size[i % 2]) for i, (b, _) in enumerate(run)]
                log_probs = label + [lp for _, lp in run]
                located.append((coords, math.exp(sum(log_probs) / len(log_probs))))
                run = []
        return located


def _grounding(
    labels: list[str], boxes: list[Box], scores: list[float | None], prompt: Prompt
) -> Annotations:
    """Regions and phrases from a grounding output. The parser gives one label per box;
    consecutive boxes with the same label belong to one phrase. A phrase is placed at its
    next occurrence in the caption (phrases are written in caption order), else at its
    first; a phrase that is not in the caption is left out with its boxes."""
    caption = prompt.caption_text or ""
    result = Annotations()
    cursor = 0
    for label, members in itertools.groupby(
        zip(labels, boxes, scores, strict=True), lambda m: m[0]
    ):
        if not label:
            continue
        start = caption.find(label, cursor)
        if start < 0:
            start = caption.find(label)
        if start < 0:
            continue
        cursor = start + len(label)
        indices = []
        member_scores = []
        for _, box, score in members:
            indices.append(len(result.regions))
            result.regions.append(Region(box, label, "object", source="", score=score))
            if score is not None:
                member_scores.append(score)
        phrase_score = sum(member_scores) / len(member_scores) if member_scores else None
        result.phrases.append(
            Phrase(
                prompt.caption_kind, start, cursor, label, indices, source="", score=phrase_score
            )
        )
    return result


def _extend(target: Annotations, part: Annotations) -> None:
    """Add ``part`` to ``target``; its phrases' region indices shift past target's regions."""
    offset = len(target.regions)
    target.captions.update(part.captions)
    target.regions.extend(part.regions)
    for phrase in part.phrases:
        phrase.regions = [offset + index for index in phrase.regions]
        target.phrases.append(phrase)


def _clip_box(box: list[float], width: int, height: int) -> Box:
    # Florence-2 can write a box's corners in either order: read it as the box they span.
    x0, y0, x1, y1 = clip_points(box, width, height)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _bounds(quad: list[float]) -> Box:
    xs, ys = quad[0::2], quad[1::2]
    return (min(xs), min(ys), max(xs), max(ys))
