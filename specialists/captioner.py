"""Captions from image-to-text models: BLIP, BLIP-2, and any image-text-to-text model.

The model is loaded with ``AutoModelForImageTextToText``, whose mapping covers BLIP
(``BlipForConditionalGeneration``), BLIP-2 and the chat-style vision-language models
(LLaVA, Qwen2-VL, Idefics, PaliGemma, Florence-2, ...). How a prompt reaches the model
follows from the processor: one with a chat template gets the prompt as a user turn
holding the image; one without (BLIP, BLIP-2, Florence-2) gets the prompt text as is;
a kind with no prompt is generated unconditionally, as BLIP captions by default.

Decoding is greedy or beam search, never sampling, so a rerun writes the same captions.
The caption is the generated continuation only: a prompt such as BLIP's "a picture of"
is not part of it.

Score: exp of the mean log-probability of the generated tokens, the end token included
(the geometric mean of the token probabilities), in (0, 1]. Log-probabilities come from
the model's raw logits, before generation's logits processors, so the score is the
model's own confidence whatever the decoding settings; the mean makes captions of
different lengths comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import SpecialistConfig
from engine.records import CAPTION_KINDS, Caption
from specialists.base import Annotations, Specialist, SpecialistInput, load_pretrained

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature

# Room for FLD-5B's average caption lengths (7.95 / 31.65 / 70.53 tokens) with a long tail.
DEFAULT_MAX_NEW_TOKENS = {"brief": 32, "detailed": 96, "more_detailed": 192}


class CaptionerSpecialist(Specialist):
    """Captions of the requested kinds; one ``generate`` call per kind over the batch."""

    produces = frozenset({"captions"})
    requires_model = True

    def __init__(
        self,
        config: SpecialistConfig,
        kinds: tuple[str, ...] | list[str] = ("brief",),
        prompts: dict[str, str] | None = None,
        max_new_tokens: dict[str, int] | None = None,
        num_beams: int = 1,
    ) -> None:
        """Options:

        - ``kinds``: which of brief / detailed / more_detailed to produce.
        - ``prompts``: kind -> prompt. An instruction for chat models ("Describe this
          image in detail."), a task token for Florence-2 ("<DETAILED_CAPTION>"), a
          caption prefix for BLIP. Kinds without one are generated unconditionally,
          which only captioning models such as BLIP support.
        - ``max_new_tokens``: kind -> token budget, over ``DEFAULT_MAX_NEW_TOKENS``.
          A caption cut by the budget is kept; its score says nothing of the cut.
        - ``num_beams``: 1 is greedy decoding; more beams find likelier captions at a
          proportional cost in compute.
        """
        super().__init__(config)
        kinds = tuple(kinds)
        prompts = dict(prompts or {})
        budgets = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
        unknown = (set(kinds) | set(prompts) | set(budgets)) - set(CAPTION_KINDS)
        if unknown:
            raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {CAPTION_KINDS}")
        if not kinds:
            raise ValueError("kinds must name at least one caption kind")
        if min(budgets.values()) < 1 or num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        self.kinds = kinds
        self.prompts = prompts
        self.max_new_tokens = budgets
        self.num_beams = num_beams
        self._model = None
        self._processor = None
        self._stop_ids: set[int] = set()

    def setup(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        loaded = load_pretrained(self.config, AutoModelForImageTextToText, AutoProcessor)
        self._model, self._processor = loaded.model, loaded.processor
        self._loaded_revision = loaded.model_revision
        tokenizer = self._processor.tokenizer
        # Decoder-only models continue the prompt: pad on the left so every row of a batch
        # ends where generation starts.
        tokenizer.padding_side = "left"
        # Where a caption ends: any of the ids generation stops at (BLIP stops at [SEP]).
        eos = self._model.generation_config.eos_token_id
        ids = list(eos) if isinstance(eos, list) else [eos]
        ids += [tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
        self._stop_ids = {i for i in ids if i is not None}

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        import torch

        results = [Annotations() for _ in batch]
        if not batch:
            return results
        images = [item.image for item in batch]
        with torch.inference_mode():
            for kind in self.kinds:
                for result, (text, score) in zip(results, self.caption(images, kind), strict=True):
                    # An empty generation (the model ended at once) is no caption.
                    if text:
                        result.captions[kind] = Caption(text, source="", score=score)
        return results

    def _inputs(self, images: list[Image.Image], kind: str) -> BatchFeature:
        prompt = self.prompts.get(kind)
        if prompt is None:
            inputs = self._processor(images=images, return_tensors="pt")
        else:
            if getattr(self._processor, "chat_template", None):
                turn = [{"type": "image"}, {"type": "text", "text": prompt}]
                prompt = self._processor.apply_chat_template(
                    [{"role": "user", "content": turn}], add_generation_prompt=True
                )
            texts = [prompt] * len(images)
            inputs = self._processor(images=images, text=texts, padding=True, return_tensors="pt")
        # BatchFeature.to casts floating tensors (pixels) only; token ids stay integers.
        return inputs.to(self.device, dtype=self._model.dtype)

    def caption(self, images: list[Image.Image], kind: str) -> list[tuple[str, float]]:
        """(caption, score) per image, for a ``kind`` this captioner was configured with;
        the caption is "" when nothing was generated. Call under ``torch.inference_mode``
        after ``setup()``; ``images`` is one generation batch."""
        import torch

        generated, log_probs = self.generate_scored(
            self._model, self._inputs(images, kind), self.max_new_tokens[kind], self.num_beams
        )
        generated, log_probs = generated.cpu(), log_probs.float()
        stops = torch.isin(generated, torch.tensor(sorted(self._stop_ids)))
        captions = []
        for tokens, stop, row in zip(generated, stops, log_probs.cpu(), strict=True):
            end = int(stop.nonzero()[0]) if stop.any() else len(tokens)
            text = self._processor.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            # Average up to and including the end token: deciding to stop is part of the
            # caption's likelihood.
            score = float(row[: end + 1].mean().exp())
            captions.append((text.strip(), score))
        return captions
