"""Florence-VL: Florence-2 depth and breadth features, fused, projected into a causal LM.

Data flow for a batch of B images and their conversations (FLD_REFERENCE.md §4):

1. ``FlorenceVisionTower``: DaViT + Florence-2's image projection give the **depth**
   feature ``[B, N, d]`` (N = 577 at Florence-2's 768 pixels); Florence-2's encoder, run
   on ``[image features ; task prompt]`` once per breadth task, gives the **breadth**
   features: its last hidden state at the N image positions. Stacked: ``[B, 1 + k, N, d]``.
2. ``DBFusionProjector``: channel or token concatenation, then an MLP or OmniFusion's
   transformer adapter into the LM's width, optionally between trainable image start/end
   embeddings: ``[B, num_visual_tokens, d_llm]``.
3. ``FlorenceVL``: the LM's token embeddings with the visual tokens written at the
   ``IMAGE_TOKEN`` positions the data layer laid out, then the LM as usual.

Only the parts of Florence-2 that make features are kept (DaViT, its projection, the
encoder with its token embeddings): the decoder would hold parameters that never get a
gradient, which data-parallel training rejects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast

from engine.train.config import (
    IMAGE_TOKEN,
    FusionConfig,
    LanguageModelConfig,
    TrainConfig,
    VisionTowerConfig,
)
from engine.train.tiny import build_tiny_florence2, build_tiny_language_model

# OmniFusion's transformer adapter: one encoder layer with four heads.
OMNIFUSION_HEADS = 4


class FlorenceVisionTower(nn.Module):
    """Depth and breadth features of Florence-2 for a batch of images.

    ``forward(pixel_values [B, 3, H, W]) -> [B, 1 + k, N, d]``: index 0 is the depth feature
    (``get_image_features``: DaViT then Florence-2's image projection, what Florence-2 feeds
    its encoder), index 1 + i the encoder's last hidden state at the N image positions when
    the encoder reads the image followed by the prompt of ``breadth_tasks[i]``. DaViT runs
    once; the encoder runs once on all B x k (image, prompt) pairs. The prompts are made by
    ``Florence2Processor`` (``<OCR>`` -> "What is the text in the image?") at build time
    and kept as buffers, right-padded with an attention mask, so the image positions see
    exactly what they would for each prompt alone.

    While no parameter needs a gradient (stage 2) the features are computed without
    autograd, which saves the tower's activations.
    """

    def __init__(
        self,
        florence2: Florence2ForConditionalGeneration,
        processor: Florence2Processor,
        breadth_tasks: Sequence[str],
    ) -> None:
        super().__init__()
        self.davit = florence2.model.vision_tower
        self.image_projection = florence2.model.multi_modal_projector
        self.encoder = florence2.model.language_model.get_encoder()
        self.breadth_tasks = tuple(breadth_tasks)
        self.num_tokens: int = processor.num_image_tokens
        self.hidden_size: int = florence2.config.text_config.d_model
        ids, mask = _prompt_ids(processor, self.breadth_tasks)
        # Made from the config at every build, so not part of checkpoints.
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("prompt_mask", mask, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            depth = self.image_projection(self.davit(pixel_values).last_hidden_state)
            if not self.breadth_tasks:
                return depth[:, None]
            batch, n, d = depth.shape
            k, length = self.prompt_ids.shape
            prompts = self.encoder.embed_tokens(self.prompt_ids).to(depth.dtype)
            embeds = torch.cat(
                [depth[:, None].expand(batch, k, n, d), prompts[None].expand(batch, k, length, d)],
                dim=2,
            ).reshape(batch * k, n + length, d)
            image_mask = self.prompt_mask.new_ones(k, n)
            mask = torch.cat([image_mask, self.prompt_mask], dim=1)
            mask = mask[None].expand(batch, k, n + length).reshape(batch * k, n + length)
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            breadth = hidden[:, :n].reshape(batch, k, n, d)
            return torch.cat([depth[:, None], breadth], dim=1)


def _prompt_ids(
    processor: Florence2Processor, tasks: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[k, L]`` and attention mask of the task prompts, image tokens removed.

    Built with the processor itself (on a blank image) so the wording, ``<s>``/``</s>`` and
    padding are exactly what Florence-2 sees for these tasks.
    """
    if not tasks:
        return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
    blank = Image.new("RGB", (32, 32))  # the text does not depend on the image
    inputs = processor(
        text=list(tasks), images=[blank] * len(tasks), padding=True, return_tensors="pt"
    )
    n = processor.num_image_tokens
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not bool((ids[:, :n] == processor.image_token_id).all()):
        raise ValueError("the Florence-2 processor does not put the image tokens first")
    return ids[:, n:].contiguous(), mask[:, n:].contiguous()


class DBFusionProjector(nn.Module):
    """Fuse the depth and breadth features and project them into the LM's width.

    ``forward(features [B, F, N, d]) -> [B, num_tokens, d_llm]`` with F = 1 + breadth tasks.

    - ``concat="channel"`` (Florence-VL's DBFusion): N tokens of width F * d; the LM's
      sequence stays short and each token carries every view of its patch.
    - ``concat="token"``: F * N tokens of width d; F times the LM's sequence, and so its
      cost, for the projector's smaller input.
    - ``projector="mlp"``: ``Linear(in -> d_llm)`` then ``mlp_depth - 1`` pairs of
      (GELU, ``Linear(d_llm -> d_llm)``) applied per token (LLaVA's mlp2x_gelu at depth 2).
    - ``projector="omnifusion"``: one transformer encoder layer (4 heads) over the visual
      tokens, then ``Linear(in -> d_llm)``; tokens can exchange information before the LM,
      at the cost of attention over N tokens of width ``in``.
    - ``image_boundary_tokens``: trainable start and end embeddings around the visual
      tokens (two more tokens).
    """

    def __init__(
        self, fusion: FusionConfig, num_features: int, vision_dim: int, llm_dim: int
    ) -> None:
        super().__init__()
        self.concat = fusion.concat
        self.num_features = num_features
        width = num_features * vision_dim if fusion.concat == "channel" else vision_dim
        if fusion.projector == "mlp":
            layers: list[nn.Module] = [nn.Linear(width, llm_dim)]
            for _ in range(fusion.mlp_depth - 1):
                layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
            self.net: nn.Module = nn.Sequential(*layers)
        else:
            if width % OMNIFUSION_HEADS:
                raise ValueError(
                    f"the omnifusion adapter splits its width ({width}) into "
                    f"{OMNIFUSION_HEADS} heads: it must be a multiple of {OMNIFUSION_HEADS}"
                )
            self.net = nn.Sequential(
                # Dropout off: the LMs this feeds train without it, and a step's result
                # then depends only on the weights and the batch.
                nn.TransformerEncoderLayer(
                    d_model=width, nhead=OMNIFUSION_HEADS, dropout=0.0, batch_first=True
                ),
                nn.Linear(width, llm_dim),
            )
        self.boundary: nn.Parameter | None = None
        if fusion.image_boundary_tokens:
            # At the scale of word embeddings (Llama/Phi initialise those with std 0.02).
            self.boundary = nn.Parameter(torch.randn(2, llm_dim) * 0.02)

    def num_tokens(self, num_image_tokens: int) -> int:
        """LM positions one image takes when the tower gives ``num_image_tokens`` per view."""
        fused = num_image_tokens * (self.num_features if self.concat == "token" else 1)
        return fused + (2 if self.boundary is not None else 0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, f, n, d = features.shape
        if self.concat == "channel":
            fused = features.permute(0, 2, 1, 3).reshape(batch, n, f * d)
        else:
            fused = features.reshape(batch, f * n, d)
        visual = self.net(fused)
        if self.boundary is None:
            return visual
        start, end = self.boundary.to(visual.dtype)[:, None].expand(2, batch, -1)
        return torch.cat([start[:, None], visual, end[:, None]], dim=1)


class FlorenceVL(nn.Module):
    """Vision tower, DBFusion projector and causal LM, trained as one model.

    Each sample has one image; its ``input_ids`` hold ``num_visual_tokens`` ``IMAGE_TOKEN``
    ids (``image_token_id``) where the image goes, boundary positions included when
    ``image_boundary_tokens`` is on: the model writes [start, visual tokens..., end] there.
    """

    def __init__(
        self,
        vision_tower: FlorenceVisionTower,
        projector: DBFusionProjector,
        language_model: PreTrainedModel,
        image_token_id: int,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.num_visual_tokens: int = projector.num_tokens(vision_tower.num_tokens)
        self._vision_tower_frozen = False

    def set_stage(self, train_vision_tower: bool) -> None:
        """Stage 1 (True): every parameter trains. Stage 2 (False): projector and LM train;
        the vision tower is frozen and stays in eval mode even under ``train()``.

        Call before wrapping the model for data-parallel training and before building the
        optimiser, which should take only parameters with ``requires_grad``.
        """
        self.requires_grad_(True)
        self.vision_tower.requires_grad_(train_vision_tower)
        self._vision_tower_frozen = not train_vision_tower
        self.train(self.training)

    def train(self, mode: bool = True) -> FlorenceVL:
        super().train(mode)
        if self._vision_tower_frozen:
            # A frozen tower must give the features it was trained to give: no dropout.
            self.vision_tower.eval()
        return self

    def embed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """LM input embeddings ``[B, T, d_llm]`` with the visual tokens at the image positions.

        Raises ``ValueError`` when a sample does not hold exactly ``num_visual_tokens`` image
        tokens or the batch sizes of images and texts differ.
        """
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} images for {input_ids.shape[0]} texts: "
                "each sample has exactly one image"
            )
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        wrong = (counts != self.num_visual_tokens).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(
                f"each sample must hold exactly {self.num_visual_tokens} {IMAGE_TOKEN!r} tokens "
                f"(id {self.image_token_id}) for its image; sample(s) {wrong} hold "
                f"{counts[wrong].tolist()} (was the sample truncated, or built for another "
                "fusion setting?)"
            )
        embeds = self.language_model.get_input_embeddings()(input_ids)
        visual = self.projector(self.vision_tower(pixel_values)).to(embeds.dtype)
        # masked_scatter fills positions in row-major order: sample b's image positions get
        # sample b's visual tokens, in order, since every row holds the same count.
        return embeds.masked_scatter(is_image[..., None], visual)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """The LM's output; ``loss`` is the mean cross-entropy over tokens whose label is not
        -100 (labels aligned with ``input_ids``; the LM shifts them)."""
        embeds = self.embed(pixel_values, input_ids)
        # No key/value cache in training: it is only needed to generate.
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """New tokens ``[B, new]`` after each prompt (the prompt is not repeated).

        Prompts of a batch must be left-padded, so that every row's last position is its
        last prompt token. ``generate_kwargs`` go to the LM's ``generate``
        (``max_new_tokens``, ``do_sample``, ...); generation stops at the LM's eos token.
        """
        embeds = self.embed(pixel_values, input_ids)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )


@dataclass
class FlorenceVLProcessor:
    """What the data layer needs to turn images and conversations into model inputs.

    ``tokenizer`` is the LM's, with ``IMAGE_TOKEN`` added as a special token
    (``image_token_id``); a sample's text holds ``num_visual_tokens`` of them per image.
    """

    image_processor: BaseImageProcessor
    tokenizer: PreTrainedTokenizerBase
    num_visual_tokens: int
    image_token_id: int

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """``[B, 3, H, W]`` float32, resized and normalised as Florence-2 expects."""
        rgb = [image.convert("RGB") for image in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


def _vision_source(
    cfg: VisionTowerConfig,
) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    if cfg.tiny is not None:
        return build_tiny_florence2(cfg.tiny)
    # fp32 master weights: bf16 comes from autocast in the recipe.
    model = Florence2ForConditionalGeneration.from_pretrained(
        cfg.checkpoint, revision=cfg.revision, dtype=torch.float32
    )
    return model, Florence2Processor.from_pretrained(cfg.checkpoint, revision=cfg.revision)


def _language_source(
    cfg: LanguageModelConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.tiny is not None:
        return build_tiny_language_model(cfg.tiny)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.checkpoint, revision=cfg.revision, dtype=torch.float32
    )
    return model, AutoTokenizer.from_pretrained(cfg.checkpoint, revision=cfg.revision)


def build_florence_vl(cfg: TrainConfig) -> tuple[FlorenceVL, FlorenceVLProcessor]:
    """The model and processor ``cfg`` describes, in fp32 and train mode, stage 1 set.

    Tiny sources are built offline (``engine/train/tiny.py``); checkpoints are loaded with
    ``from_pretrained`` at their pinned revision. ``IMAGE_TOKEN`` is added to the LM's
    tokenizer; the embedding tables grow (to a multiple of 64) only when the token does not
    fit in the rows a checkpoint already has. The new projector's initialisation is seeded
    with ``cfg.seed`` and leaves the global random state as it was.
    """
    florence2, florence2_processor = _vision_source(cfg.vision)
    language_model, tokenizer = _language_source(cfg.language_model)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
            # The image row is never looked up (its positions carry visual features), so a
            # small random row will do; a multiple of 64 keeps GPU matmuls aligned.
            language_model.resize_token_embeddings(
                len(tokenizer), pad_to_multiple_of=64, mean_resizing=False
            )
        tower = FlorenceVisionTower(florence2, florence2_processor, cfg.vision.breadth_tasks)
        projector = DBFusionProjector(
            cfg.fusion,
            num_features=1 + len(tower.breadth_tasks),
            vision_dim=tower.hidden_size,
            llm_dim=language_model.get_input_embeddings().embedding_dim,
        )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = FlorenceVL(tower, projector, language_model, image_token_id)
    model.set_stage(train_vision_tower=True)
    processor = FlorenceVLProcessor(
        image_processor=florence2_processor.image_processor,
        tokenizer=tokenizer,
        num_visual_tokens=model.num_visual_tokens,
        image_token_id=image_token_id,
    )
    return model.train(), processor
