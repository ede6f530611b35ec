"""Region texts: each object region's text chosen among its category phrase, a brief
caption of its crop and that caption's noun chunks (FLD-5B's region-text rule).

For every ``object`` region of a record (the boxes of the specialists producing
``objects``, and the human boxes), this specialist

1. crops the image around the box, grown by ``context`` of the box's width on the left
   and on the right and of its height above and below, clipped to the image: a tight
   crop cuts off what the box misses and leaves the captioner no clue of scale, a wide
   one lets neighbours into the caption; 0.1 (a 1.2x crop) sits between;
2. captions the crop briefly with an image-to-text model, loaded and decoded as
   ``CaptionerSpecialist`` does (same model classes, prompt handling and scores);
3. lists the candidates, in this order: the category phrase (the region's text), the
   crop caption, then each noun chunk of the crop caption from spaCy, without leading
   determiners or possessives ("a brown dog" -> "brown dog") and without chunks headed
   by a pronoun ("it"); repeats (ignoring case) and empty texts are left out;
4. chooses one:

   - **with a similarity model** (CLIP, SigLIP): the candidate whose text embedding has
     the highest cosine similarity to the crop's image embedding; a tie goes to the
     earlier candidate, so to the category phrase first. Score: the chosen text's
     softmax probability over the region's candidates at the model's own temperature
     (``logit_scale``). It says how clearly the text wins, in (0, 1] like every other
     score of the engine, where raw cosines have a range of their own per model (CLIP's
     matching pairs sit near 0.3). Its floor is 1 / number of candidates.
   - **without one**, by rule: the first noun chunk of the crop caption that names
     what the category names: its head noun has the lemma of the category phrase's
     head (the phrase's syntactic root) and its lemmas include every other word of the
     category. "two black dogs" for "dog", "a traffic light on a pole" gives "traffic
     light" for "traffic light", but "red light" does not replace "traffic light". Such
     a chunk adds what the caption saw of the object (colour, number, material).
     Otherwise the category phrase: a caption that talks of something else is more
     likely wrong about the box than the detector. Score: the region's own score (the
     detector's confidence), since nothing new was measured.

Output: one region per input object region that has an area inside the image and a
non-empty candidate: the input's box unchanged (merge finds its region by that box),
kind ``object``, the chosen text and the score above. Merge writes the text onto the
matching merged region and leaves its box, score and source alone (stages/merge.py).
The candidates themselves are not kept: the record schema has no place for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import SpecialistConfig
from engine.geometry import box_in_image
from engine.records import Box, Region
from specialists.base import (
    Annotations,
    Specialist,
    SpecialistInput,
    load_pretrained,
    revision_label,
)
from specialists.captioner import CaptionerSpecialist

if TYPE_CHECKING:
    from PIL import Image
    from spacy.tokens import Doc, Span

# Leading tokens a region text does without: articles and demonstratives ("a", "the",
# "this"), and possessives ("his", "its"), which point outside the crop.
_DROPPED_LEADING_DEPS = frozenset({"det", "poss"})


def crop_box(box: Box, width: int, height: int, context: float) -> tuple[int, int, int, int] | None:
    """The pixel rectangle to crop for ``box``: grown by ``context`` of its width and
    height on each side, clipped to the image, rounded outwards to whole pixels. None
    when the box has no area inside the image."""
    inside = box_in_image(box, width, height)
    if inside is None:
        return None
    x0, y0, x1, y1 = inside
    dx, dy = context * (x1 - x0), context * (y1 - y0)
    return (
        max(0, math.floor(x0 - dx)),
        max(0, math.floor(y0 - dy)),
        min(width, math.ceil(x1 + dx)),
        min(height, math.ceil(y1 + dy)),
    )


def chunk_text(chunk: Span) -> str:
    """A noun chunk as a region text: leading determiners and possessives dropped;
    "" for a chunk headed by a pronoun, which names nothing."""
    if chunk.root.pos_ == "PRON":
        return ""
    tokens = list(chunk)
    while tokens and tokens[0].dep_ in _DROPPED_LEADING_DEPS and tokens[0] != chunk.root:
        tokens.pop(0)
    return "".join(t.text_with_ws for t in tokens).strip()


def region_candidates(category: str, caption: str, caption_doc: Doc) -> list[str]:
    """The texts a region chooses from, in order: category phrase, crop caption, the
    caption's noun chunks (``chunk_text``); repeats (ignoring case) and empties left out."""
    candidates: list[str] = []
    seen: set[str] = set()
    for text in (category, caption, *(chunk_text(c) for c in caption_doc.noun_chunks)):
        text = text.strip()
        if text and text.casefold() not in seen:
            seen.add(text.casefold())
            candidates.append(text)
    return candidates


def names_category(chunk: Span, category_doc: Doc) -> bool:
    """Whether a noun chunk names what a category phrase names: the chunk's head has the
    lemma of the category's syntactic root, and every other word of the category
    (articles and punctuation aside) is among the chunk's lemmas."""
    words = [t for t in category_doc if not (t.is_punct or t.is_space or t.pos_ == "DET")]
    if not words:
        return False
    head = next(category_doc.sents).root.lemma_.lower()
    lemmas = {t.lemma_.lower() for t in chunk}
    return chunk.root.lemma_.lower() == head and all(t.lemma_.lower() in lemmas for t in words)


def choose_by_rule(category: str, category_doc: Doc, caption_doc: Doc) -> str:
    """The rule without a similarity model: the first noun chunk of the crop caption
    that ``names_category``, as ``chunk_text`` writes it; else the category phrase."""
    for chunk in caption_doc.noun_chunks:
        text = chunk_text(chunk)
        if text and names_category(chunk, category_doc):
            return text
    return category.strip()


def choose_by_similarity(
    image_embedding: np.ndarray, text_embeddings: np.ndarray, logit_scale: float
) -> tuple[int, float]:
    """``(index, probability)`` of the text most similar to the image.

    Similarity is the cosine of the embeddings (normalised here); the index is the
    argmax, the first one on a tie; the probability is the softmax of
    ``logit_scale * cosine`` over all texts at that index.
    """
    image = np.asarray(image_embedding, dtype=np.float64)
    texts = np.asarray(text_embeddings, dtype=np.float64)
    image = image / np.linalg.norm(image)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    cosine = texts @ image
    best = int(np.argmax(cosine))
    logits = logit_scale * (cosine - cosine[best])  # shifted: exp never overflows
    return best, float(1.0 / np.exp(logits).sum())


@dataclass(slots=True)
class _Job:
    """One region being given a text."""

    item: int  # index of its image in the batch
    region: Region
    crop: Image.Image
    caption: str = ""
    candidates: tuple[str, ...] = ()


class RegionTextSpecialist(Specialist):
    """A text for every object region, chosen among its category phrase, its crop's
    brief caption and that caption's noun chunks (see the module docstring).

    ``config.model`` is the captioner (any model ``CaptionerSpecialist`` loads); the
    similarity model is an option. Lineage names both.
    """

    produces = frozenset({"region_text"})
    needs = frozenset({"objects"})
    requires_model = True

    def __init__(
        self,
        config: SpecialistConfig,
        similarity_model: str | None = None,
        similarity_revision: str | None = None,
        spacy_model: str = "en_core_web_sm",
        context: float = 0.1,
        prompt: str | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        crops_per_batch: int = 32,
    ) -> None:
        """Options:

        - ``similarity_model``: a CLIP or SigLIP checkpoint (hub id, local folder or store
          URL) that ``AutoModel`` loads with ``get_image_features`` /
          ``get_text_features``; None chooses by the rule. ``similarity_revision`` pins
          it as ``revision`` pins the captioner.
        - ``spacy_model``: the spaCy pipeline for noun chunks and lemmas.
        - ``context``: the crop's margin, a fraction of the box's width and height added
          on each side (0 crops the box exactly).
        - ``prompt``, ``max_new_tokens``, ``num_beams``: the crop caption's, as for
          ``CaptionerSpecialist``'s brief kind. The default budget holds a short
          sentence; FLD-5B's region descriptions average 2.55 tokens.
        - ``crops_per_batch``: crops per caption generation and per embedding pass;
          an image may hold a hundred boxes, so this bounds memory, not ``batch_size``.
        """
        super().__init__(config)
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        if crops_per_batch < 1:
            raise ValueError(f"crops_per_batch must be at least 1, got {crops_per_batch}")
        self._captioner = CaptionerSpecialist(
            config,
            kinds=("brief",),
            prompts={"brief": prompt} if prompt is not None else None,
            max_new_tokens={"brief": max_new_tokens},
            num_beams=num_beams,
        )
        self.similarity_model = similarity_model
        self.similarity_revision = similarity_revision
        self.spacy_model = spacy_model
        self.context = context
        self.crops_per_batch = crops_per_batch
        self._similarity: Any = None
        self._similarity_processor: Any = None
        self._similarity_loaded_revision: str | None = None
        self._nlp: Any = None

    @property
    def model_revision(self) -> str:
        """The captioner's revision, and the similarity model's after ``+`` when set."""
        captioner = self._captioner.model_revision
        if self.similarity_model is None:
            return captioner
        similarity = self._similarity_loaded_revision or revision_label(
            self.similarity_model, self.similarity_revision
        )
        return f"{captioner}+{similarity}"

    def setup(self) -> None:
        from filters.text import load_pipeline

        self._captioner.setup()
        self._nlp = load_pipeline(self.spacy_model, lemmas=True)
        if self.similarity_model is not None:
            from transformers import AutoModel, AutoProcessor

            loaded = load_pretrained(
                self.config,
                AutoModel,
                AutoProcessor,
                model_id=self.similarity_model,
                revision=self.similarity_revision,
            )
            self._similarity, self._similarity_processor = loaded.model, loaded.processor
            self._similarity_loaded_revision = loaded.model_revision

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        import torch

        jobs = []
        for index, item in enumerate(batch):
            width, height = item.image.size
            for region in item.record.regions:
                if region.kind != "object":
                    continue
                rect = crop_box(region.box, width, height, self.context)
                if rect is not None:
                    jobs.append(_Job(index, region, item.image.crop(rect)))
        results = [Annotations() for _ in batch]
        if not jobs:
            return results
        with torch.inference_mode():
            for chunk in _chunks(jobs, self.crops_per_batch):
                captions = self._captioner.caption([job.crop for job in chunk], "brief")
                for job, (caption, _) in zip(chunk, captions, strict=True):
                    job.caption = caption
            chosen = self._choose(jobs)
        for job, (text, score) in zip(jobs, chosen, strict=True):
            if text:
                region = Region(job.region.box, text, "object", source="", score=score)
                results[job.item].regions.append(region)
        return results

    def _choose(self, jobs: list[_Job]) -> list[tuple[str, float | None]]:
        """(text, score) per job; the text is "" when a region has no candidate."""
        categories = list(self._nlp.pipe(job.region.text for job in jobs))
        captions = list(self._nlp.pipe(job.caption for job in jobs))
        for job, caption_doc in zip(jobs, captions, strict=True):
            job.candidates = tuple(region_candidates(job.region.text, job.caption, caption_doc))
        if self._similarity is None:
            return [
                (choose_by_rule(job.region.text, category, caption), job.region.score)
                for job, category, caption in zip(jobs, categories, captions, strict=True)
            ]
        return self._choose_by_similarity(jobs)

    def _choose_by_similarity(self, jobs: list[_Job]) -> list[tuple[str, float | None]]:
        chosen: list[tuple[str, float | None]] = [("", None)] * len(jobs)
        scored = [k for k, job in enumerate(jobs) if job.candidates]
        if not scored:
            return chosen
        # Each distinct text is embedded once: a category recurs on every box of it.
        texts = sorted({text for k in scored for text in jobs[k].candidates})
        text_row = {text: row for row, text in enumerate(texts)}
        text_embeddings = np.concatenate(
            [self._embed(texts=chunk) for chunk in _chunks(texts, self.crops_per_batch)]
        )
        image_embeddings = np.concatenate(
            [
                self._embed(images=[jobs[k].crop for k in chunk])
                for chunk in _chunks(scored, self.crops_per_batch)
            ]
        )
        logit_scale = float(self._similarity.logit_scale.exp())
        for k, image_embedding in zip(scored, image_embeddings, strict=True):
            candidates = jobs[k].candidates
            rows = [text_row[text] for text in candidates]
            best, probability = choose_by_similarity(
                image_embedding, text_embeddings[rows], logit_scale
            )
            chosen[k] = (candidates[best], probability)
        return chosen

    def _embed(
        self, *, texts: Sequence[str] | None = None, images: Sequence[Image.Image] | None = None
    ) -> np.ndarray:
        """Projected embeddings of ``texts`` or of ``images``, one row each."""
        model, processor = self._similarity, self._similarity_processor
        if texts is not None:
            # SigLIP was trained on texts padded to the full length, and CLIP pools at
            # its end token whatever the padding: max_length suits both.
            inputs = processor(
                text=list(texts), padding="max_length", truncation=True, return_tensors="pt"
            )
            output = model.get_text_features(**inputs.to(self.device))
        else:
            inputs = processor(images=list(images), return_tensors="pt")
            output = model.get_image_features(**inputs.to(self.device, dtype=model.dtype))
        # Recent transformers return a model output holding the projection; older, a tensor.
        features = getattr(output, "pooler_output", output)
        return features.float().cpu().numpy()


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]
