"""Open-set detection and phrase grounding with Grounding DINO
(``GroundingDinoForObjectDetection``).

Grounding DINO reads one text prompt with the image and scores each of its detection
slots against every token of the prompt. Two modes, usable together:

- ``vocabulary``: prompts of the form ``"cat. dog. traffic light."``, as the model was
  trained on, split into several prompts when the vocabulary does not fit the model's
  256 text tokens. A box's score for an entry is the highest probability among the
  entry's tokens; the box takes its best entry and becomes an ``object`` region.
- ``ground_captions``: each caption of the record is the prompt (with a final ``.``, as
  in the model's training). The processor's grounded post-processing labels each box
  with the decoded tokens that pass ``text_threshold``; ``label_span`` finds that label
  in the caption. A label that is not a contiguous piece of the caption (tokens picked
  from two places, or text the uncased tokenizer changed, such as stripped accents) is
  skipped with its box. Boxes whose labels land on the same span form one ``Phrase``.

A box's score is the model's: its highest token probability (within the entry, in
vocabulary mode). Thresholds belong to the filter stage; ``min_score`` only keeps the
900 detection slots per prompt that match nothing out of the store.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.config import SpecialistConfig
from engine.geometry import box_in_image
from engine.records import Box, Phrase, Region
from specialists.base import (
    Annotations,
    OpenVocabularyDetector,
    SpecialistInput,
    load_pretrained,
)

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True, slots=True)
class VocabularyPrompt:
    """One prompt of the vocabulary: its text and, per entry, the token positions it has."""

    text: str
    # (index into the vocabulary, token positions of that entry in the encoded prompt);
    # the positions hold in a batch because BERT tokenizers pad on the right.
    entries: tuple[tuple[int, tuple[int, ...]], ...]


class GroundingDINOSpecialist(OpenVocabularyDetector):
    """Grounding DINO boxes for a category vocabulary and/or the phrases of captions."""

    def __init__(
        self,
        config: SpecialistConfig,
        vocabulary: Sequence[str] = (),
        ground_captions: bool = False,
        min_score: float = 0.05,
        text_threshold: float = 0.25,
    ) -> None:
        """
        ``vocabulary``: category names to detect (they become the regions' texts).
        ``ground_captions``: also ground every caption the record has. ``min_score``:
        boxes scoring at or below it are not returned. ``text_threshold``: the token
        probability that makes a token part of a box's phrase when grounding captions;
        0.25 is the released models' default. Lower gives longer phrases, higher
        shorter ones and more boxes with no phrase at all.
        """
        super().__init__(config, vocabulary, ground_captions)
        self.min_score = min_score
        self.text_threshold = text_threshold
        self._model: Any = None
        self._processor: Any = None
        self._prompts: list[VocabularyPrompt] = []

    def setup(self) -> None:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        loaded = load_pretrained(
            self.config, GroundingDinoForObjectDetection, GroundingDinoProcessor
        )
        self._model, self._processor = loaded.model, loaded.processor
        self._loaded_revision = loaded.model_revision
        if self.vocabulary:
            self._prompts = vocabulary_prompts(
                self.vocabulary, self._processor.tokenizer, self._model.config.max_text_len
            )

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        import torch

        results = [Annotations() for _ in batch]
        vocabulary_jobs = [
            (index, prompt) for index in range(len(batch)) for prompt in self._prompts
        ]
        caption_jobs = (
            [
                (index, kind, caption.text)
                for index, item in enumerate(batch)
                for kind, caption in item.record.captions.items()
            ]
            if self.ground_captions
            else []
        )
        with torch.inference_mode():
            for jobs in _chunks(vocabulary_jobs, self.config.batch_size):
                images = [batch[index].image for index, _ in jobs]
                _, outputs = self._forward(images, [prompt.text for _, prompt in jobs])
                for row, (index, prompt) in enumerate(jobs):
                    results[index].regions.extend(
                        self._vocabulary_regions(outputs, row, prompt, images[row])
                    )
            for jobs in _chunks(caption_jobs, self.config.batch_size):
                images = [batch[index].image for index, _, _ in jobs]
                inputs, outputs = self._forward(images, [_prompt(text) for _, _, text in jobs])
                processed = self._processor.post_process_grounded_object_detection(
                    outputs,
                    input_ids=inputs["input_ids"],
                    threshold=self.min_score,
                    text_threshold=self.text_threshold,
                    target_sizes=[(image.height, image.width) for image in images],
                )
                for (index, kind, caption), found, image in zip(
                    jobs, processed, images, strict=True
                ):
                    self._add_phrases(results[index], kind, caption, found, image)
        return results

    def _forward(self, images: list[Image.Image], texts: list[str]) -> tuple[Any, Any]:
        """The model's raw output for image-prompt pairs; logits and boxes in float32, as
        bf16 probabilities near the floor round to a few distinct values."""
        from transformers.models.grounding_dino.modeling_grounding_dino import (
            GroundingDinoObjectDetectionOutput,
        )

        # Images are resized (shorter side 800 for the released models) and padded to the
        # largest of the batch with a pixel mask; boxes come back relative to each image.
        inputs = self._processor(
            images=images,
            text=texts,
            padding="longest",
            truncation=True,
            max_length=self._model.config.max_text_len,
            return_tensors="pt",
        ).to(self._model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        outputs = self._model(**inputs)
        return inputs, GroundingDinoObjectDetectionOutput(
            logits=outputs.logits.float(), pred_boxes=outputs.pred_boxes.float()
        )

    def _vocabulary_regions(
        self, outputs: Any, row: int, prompt: VocabularyPrompt, image: Image.Image
    ) -> list[Region]:
        import torch
        from transformers.image_transforms import center_to_corners_format

        probabilities = outputs.logits[row].sigmoid()  # (slots, text tokens)
        entry_scores = torch.stack(
            [probabilities[:, list(tokens)].amax(dim=-1) for _, tokens in prompt.entries], dim=-1
        )
        scores, best = entry_scores.max(dim=-1)
        scale = torch.tensor([image.width, image.height] * 2, device=scores.device)
        boxes = center_to_corners_format(outputs.pred_boxes[row]) * scale
        regions = []
        for box, score, entry in zip(boxes.tolist(), scores.tolist(), best.tolist(), strict=True):
            pixel_box = box_in_image(box, image.width, image.height)
            if score > self.min_score and pixel_box is not None:
                text = self.vocabulary[prompt.entries[entry][0]]
                regions.append(Region(pixel_box, text, "object", source="", score=score))
        return regions

    def _add_phrases(
        self,
        annotations: Annotations,
        kind: str,
        caption: str,
        found: dict[str, Any],
        image: Image.Image,
    ) -> None:
        """Boxes of one caption, grouped by the caption span their label names."""
        # With no box kept the processor still decodes one empty label: nothing to add.
        if len(found["scores"]) == 0:
            return
        special = set(self._processor.tokenizer.all_special_tokens)
        by_span: dict[tuple[int, int], list[tuple[Box, float]]] = {}
        for box, score, label in zip(
            found["boxes"].tolist(), found["scores"].tolist(), found["text_labels"], strict=True
        ):
            span = label_span(caption, label, ignore=special)
            pixel_box = box_in_image(box, image.width, image.height)
            if span is not None and pixel_box is not None:
                by_span.setdefault(span, []).append((pixel_box, score))
        for (start, end), boxes in sorted(by_span.items()):
            text = caption[start:end]
            first = len(annotations.regions)
            annotations.regions.extend(
                Region(box, text, "object", source="", score=score) for box, score in boxes
            )
            annotations.phrases.append(
                Phrase(
                    caption=kind,
                    start=start,
                    end=end,
                    text=text,
                    regions=list(range(first, len(annotations.regions))),
                    source="",
                    score=max(score for _, score in boxes),
                )
            )


def vocabulary_prompts(
    vocabulary: Sequence[str], tokenizer: Any, max_text_len: int
) -> list[VocabularyPrompt]:
    """``vocabulary`` as ``"a. b. c."`` prompts, each within ``max_text_len`` tokens."""
    budget = max_text_len - 2  # [CLS] and [SEP]
    groups: list[list[int]] = [[]]
    used = 0
    for index, entry in enumerate(vocabulary):
        length = len(tokenizer.tokenize(entry)) + 1  # the entry and its "."
        if groups[-1] and used + length > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return [_vocabulary_prompt(vocabulary, group, tokenizer, max_text_len) for group in groups]


def _vocabulary_prompt(
    vocabulary: Sequence[str], group: list[int], tokenizer: Any, max_text_len: int
) -> VocabularyPrompt:
    text = ""
    spans = []
    for index in group:
        start = len(text)
        text += vocabulary[index]
        spans.append((index, start, len(text)))
        text += ". "
    text = text.rstrip()
    encoding = tokenizer(
        text, truncation=True, max_length=max_text_len, return_offsets_mapping=True
    )
    offsets = encoding["offset_mapping"]
    entries = []
    for index, start, end in spans:
        tokens = tuple(i for i, (s, e) in enumerate(offsets) if e > s and start <= s < end)
        # An entry alone longer than the model's text is cut off: what is left of it counts.
        if tokens:
            entries.append((index, tokens))
    return VocabularyPrompt(text, tuple(entries))


def label_span(caption: str, label: str, ignore: Collection[str] = ()) -> tuple[int, int] | None:
    """Where a decoded phrase label occurs in ``caption``: (start, end), or None.

    Decoded labels are lower-cased and spaced by token ("man ' s hat" for "Man's hat"),
    so the match ignores case and allows any whitespace between the label's words and
    punctuation; it must start and end on word boundaries. Words in ``ignore`` (the
    tokenizer's special tokens, such as a selected ``[SEP]``) and punctuation around the
    label (the prompt's final ".") are not part of it. The first occurrence wins.
    """
    words = " ".join(word for word in label.split() if word not in ignore)
    pieces = re.findall(r"\w+|[^\w\s]", words)
    while pieces and not re.match(r"\w", pieces[0]):
        pieces.pop(0)
    while pieces and not re.match(r"\w", pieces[-1]):
        pieces.pop()
    if not pieces:
        return None
    pattern = r"(?<!\w)" + r"\s*".join(re.escape(p) for p in pieces) + r"(?!\w)"
    match = re.search(pattern, caption, flags=re.IGNORECASE)
    return match.span() if match else None


def _prompt(caption: str) -> str:
    """A caption as Grounding DINO was trained to read it: ending with a "."."""
    caption = caption.rstrip()
    return caption if caption.endswith(".") else caption + "."


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
