"""Configuration of the Florence-VL trainer: the ``train:`` section of an engine config.

One YAML file names the vision tower, the language model, how their features are fused,
where the data comes from and the two training stages (FLD_REFERENCE.md §4). Models are
either checkpoints (a Hugging Face id or a local path) or ``tiny``: randomly initialised
models of the same architectures built from their configs, with tokenizers made
locally, for tests and smoke runs with no download.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The placeholder for an image in a conversation's text. The data layer repeats it once
# per visual token; the model puts the projected visual features at those positions.
IMAGE_TOKEN = "<image>"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(_Section):
    """A random-initialised model of the real architecture (no download)."""

    hidden_size: int = Field(default=64, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    # Vision tower only: the square input side. DaViT downsamples by ``vision_stride``
    # (32 as released), so 64 px gives a 2x2 grid plus Florence-2's pooled token: 5
    # visual tokens. A stride of 16 or 8 (the last stages' patch strides set to 1) gives
    # a small image a finer grid to point boxes with, at the cost of more tokens.
    image_size: int = Field(default=64, ge=32)
    vision_stride: Literal[8, 16, 32] = 32
    seed: int = 0


class _ModelSource(_Section):
    checkpoint: str | None = None
    # Pin the checkpoint's commit for lineage; None = the hub's current main.
    revision: str | None = None
    tiny: TinyModelConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> _ModelSource:
        if (self.checkpoint is None) == (self.tiny is None):
            raise ValueError("set exactly one of 'checkpoint' and 'tiny'")
        return self


class VisionTowerConfig(_ModelSource):
    # The checkpoint in transformers' native Florence-2 format (microsoft/Florence-2-* are
    # remote-code checkpoints that Florence2ForConditionalGeneration does not load).
    checkpoint: str | None = "florence-community/Florence-2-large"
    # Breadth features: the Florence-2 encoder's last hidden state over the image tokens
    # under each of these task prompts (Florence-VL: detailed caption, OCR, dense region
    # caption). The depth feature (DaViT's projected image features) always comes first.
    breadth_tasks: tuple[str, ...] = (
        "<MORE_DETAILED_CAPTION>",
        "<OCR>",
        "<DENSE_REGION_CAPTION>",
    )


class LanguageModelConfig(_ModelSource):
    checkpoint: str | None = "microsoft/Phi-3.5-mini-instruct"


class FusionConfig(_Section):
    # channel: the depth and breadth features concatenated per visual token (N tokens of
    # width (1 + breadth) * d) -- Florence-VL's DBFusion, best in its ablation;
    # token: the feature sequences one after another ((1 + breadth) * N tokens of width d).
    concat: Literal["channel", "token"] = "channel"
    # mlp: Linear(in -> d_llm) then (GELU, Linear(d_llm -> d_llm)) pairs, mlp_depth
    # linears in all (LLaVA's mlp2x_gelu is depth 2); omnifusion: OmniFusion's adapter,
    # one transformer encoder layer over the visual tokens then a linear.
    projector: Literal["mlp", "omnifusion"] = "mlp"
    mlp_depth: int = Field(default=2, ge=1)
    # Trainable embeddings placed just before and after the visual tokens (OmniFusion's
    # image start/end tokens), so the LLM sees where the image begins and ends.
    image_boundary_tokens: bool = False


class TrainDataConfig(_Section):
    # WebDataset shards (paths, globs or URLs); empty = the export of a committed round
    # of the store (--round, else the latest), engine/train/inputs.py.
    shards: tuple[str, ...] = ()
    # LLaVA-style instruction JSON plus its image folder, read alongside the shards in
    # stage 2 (for existing instruction sets).
    llava_json: str | None = None
    llava_images: str | None = None
    # Stage-2 instruction samples made from each FLD record (engine/train/data.py).
    # "caption" is stage 1's caption (stage1_captions) asked again among the instructions.
    instruction_tasks: tuple[
        Literal["caption", "region", "grounding", "ocr", "counting", "referring"], ...
    ] = ("region", "grounding", "ocr", "counting", "referring")
    # Stage 1's caption of each record: the first of these kinds the record has (the
    # default: the most detailed, Florence-VL's pre-training data), or with
    # stage1_caption_choice "random" one of those it has, drawn per record and epoch.
    # Brief captions suit a model with few visual tokens: their uncertain words (what,
    # how many, the background) are whole-image properties, so the image decides a far
    # larger share of the loss than in a long caption of mostly template text.
    stage1_captions: tuple[Literal["more_detailed", "detailed", "brief"], ...] = Field(
        default=("more_detailed", "detailed", "brief"), min_length=1
    )
    stage1_caption_choice: Literal["first", "random"] = "first"
    # Token budget of one sample, visual tokens included; longer samples are cut at the end.
    max_length: int = Field(default=2048, ge=16)
    # Samples kept in memory for shuffling; 0 reads in shard order.
    shuffle_buffer: int = Field(default=1000, ge=0)
    # Share of images (chosen by a hash of image_id, so the same ones on every rank and
    # every run) kept out of training, for the image check (ImageCheckConfig). It must
    # leave at least image_check.samples images: a store of N images holds out ~N x this.
    # 0 = no check.
    holdout_fraction: float = Field(default=0.01, ge=0, lt=1)


class ImageCheckConfig(_Section):
    """The end-of-stage check that the model reads the images (engine/train/image_check.py).

    Held-out samples are scored with their own images and with the images shuffled across
    the batch; a model that learnt only the texts' language scores the same on both.
    """

    # Held-out samples scored (one per image). 8 cannot tell a 1% gap from the noise of
    # which images happened to be drawn; 64 can, and costs seconds even at full size.
    samples: int = Field(default=64, ge=2)
    # The stage passes when its shuffled-image loss is at least this times its true-image
    # loss. 1.1: on template-like captions most tokens are predictable from the text alone,
    # so even a model that reads the images well gains only on the words the image decides
    # (colours, counts, places); a tenth of the loss is clearly more than noise, and an
    # image-blind model scores 1.00. 0 = never fail (the check is still logged).
    min_ratio: float = Field(default=1.1, ge=0)
    # fail: the run stops with one line (exit 1) after writing the stage's checkpoint,
    # marked as failed, and a rerun refuses to go on from it; warn: a loud log line and the
    # same mark, and training goes on (for experiments that expect a blind model).
    on_fail: Literal["fail", "warn"] = "fail"


class TrainStageConfig(_Section):
    # Optimiser steps; one step = batch_size x grad_accum x ranks samples.
    steps: int = Field(ge=1)
    batch_size: int = Field(default=8, ge=1)  # per rank, per micro-step
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    # Stage 1 trains everything; stage 2 freezes the vision tower (Florence-VL).
    train_vision_tower: bool


class TrainConfig(_Section):
    # Where checkpoints and logs go (a path or fsspec URL); None = <store>/florence_vl.
    output: str | None = None
    vision: VisionTowerConfig = VisionTowerConfig()
    language_model: LanguageModelConfig = LanguageModelConfig()
    fusion: FusionConfig = FusionConfig()
    data: TrainDataConfig = TrainDataConfig()
    image_check: ImageCheckConfig = ImageCheckConfig()
    # Florence-VL: stage 1 pre-trains end to end on detailed captions (lr 1e-5, one
    # epoch); stage 2 fine-tunes projector + LLM on instruction data.
    stage1: TrainStageConfig = TrainStageConfig(steps=1000, train_vision_tower=True)
    stage2: TrainStageConfig = TrainStageConfig(steps=1000, lr=2e-5, train_vision_tower=False)
    stages: tuple[Literal["stage1", "stage2"], ...] = ("stage1", "stage2")
    # auto = bf16 autocast on a GPU that supports it, fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    log_every: int = Field(default=10, ge=1)  # optimiser steps between loss lines
    save_every: int = Field(default=500, ge=1)  # optimiser steps between checkpoints
