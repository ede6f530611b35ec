"""The Florence-VL training recipe: stage 1 (whole model) then stage 2 (vision tower frozen).

Reads top to bottom, like a torchtune recipe: ``setup`` (ranks, model, resume point),
``train`` (per stage: optimiser, schedule, data stream, loop, image-reliance check),
``save_checkpoint`` and ``cleanup``. One code path serves one process on a CPU or GPU
and data-parallel ranks under ``torchrun`` (nanoGPT's rule: ``RANK`` in the environment
means DDP; gloo on CPU, nccl on GPU; rank 0 logs and saves). The shards and output are
resolved beforehand (``engine.train.inputs``); each rank's resumable stream of
conversations and the held-out images are in ``engine.train.stream``.

- Optimiser: AdamW over the trainable parameters of the stage, fresh for each stage (the
  trainable set changes). Schedule: linear warmup over ``warmup_steps``, then cosine
  decay to zero at the stage's last step (LLaVA's and Florence-VL's schedule).
- Loss: the model's mean over answer tokens per micro-batch, divided by ``grad_accum``,
  so a step's gradient is the mean of its micro-batches' means.
- Precision: ``auto`` = bf16 autocast on a GPU that supports it, fp32 otherwise; weights
  and optimiser state stay fp32 either way.
- Checkpoints (every ``save_every`` steps and at each stage's end, engine/train/
  checkpoint.py) hold the model, optimiser, scheduler, step, stage, every rank's data
  position (epoch + conversations consumed) and RNG states, committed by a marker
  written last. A run started again resumes from the latest committed checkpoint: each
  rank re-creates its data stream for (seed, epoch), skips what it had consumed and
  restores its RNG, so the losses are those of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import posixpath
import random
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engine.execution import StageError
from engine.summary import StageSummary
from engine.train.checkpoint import (
    CHECKPOINTS,
    STAGE_ORDER,
    checkpoint_name,
    latest_checkpoint,
    load_file,
    parse_checkpoint_name,
    prune_checkpoints,
    read_marker,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from engine.train.config import TrainConfig, TrainStageConfig
from engine.train.data import (
    IGNORE_INDEX,
    Conversation,
    EncodedSample,
    collate,
    encode_conversation,
)
from engine.train.image_check import ImageCheck, score_image_reliance

# Re-exported: engine/run.py resolves the inputs, then trains, with names from here.
from engine.train.inputs import TrainInputError as TrainInputError
from engine.train.inputs import training_inputs as training_inputs
from engine.train.model import build_florence_vl
from engine.train.stream import ConversationStream, DataPosition, held_out_batch


def train(config: TrainConfig, shards: list[str], output: str) -> StageSummary:
    """Run the configured stages, resuming from the latest checkpoint under ``output``."""
    recipe = FlorenceVLRecipe(config, shards, output)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


# ---------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_ranks() -> Ranks:
    """Join the process group when started by torchrun; else one process, GPU if any."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", -1)) == -1:
        return Ranks(0, 0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), local_rank, dist.get_world_size(), device)


# ---------------------------------------------------------------------------- schedule


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 1/warmup to 1, then cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- the recipe


@dataclass
class StepLog:
    stage: str
    step: int  # optimiser steps done in the stage, this one included
    loss: float  # mean of the step's micro-batch losses on this rank
    lr: float


@dataclass
class _Resume:
    stage: str
    step: int
    url: str
    trainer: dict = field(default_factory=dict)


class FlorenceVLRecipe:
    """Two-stage Florence-VL training on one device or as one of many DDP ranks.

    ``setup()`` joins the ranks, builds the model and finds the resume point;
    ``train()`` runs the configured stages; ``cleanup()`` leaves the process group.
    ``stop_after`` ends ``train()`` after that many optimiser steps in this process
    (a job with a time limit), without a checkpoint: the next run resumes from the
    last one saved. ``history`` holds every step's loss; ``image_checks`` the
    end-of-stage image-reliance checks.
    """

    def __init__(
        self, config: TrainConfig, shards: list[str], output: str, *, stop_after: int | None = None
    ) -> None:
        self.config, self.shards, self.output = config, shards, output
        self.stop_after = stop_after
        self.history: list[StepLog] = []
        self.image_checks: list[ImageCheck] = []

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        self.ranks = setup_ranks()
        cfg = self.config
        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrapping).
        torch.manual_seed(cfg.seed)
        self.model, self.processor = build_florence_vl(cfg)
        self.model.to(self.ranks.device)
        self.autocast = self._autocast()

        self.resume: _Resume | None = None
        url = latest_checkpoint(self.output)
        if url is not None:
            stage, step = parse_checkpoint_name(posixpath.basename(url))
            trainer = load_file(url, "trainer.pt")
            if trainer["world_size"] != self.ranks.world_size:
                raise RuntimeError(
                    f"checkpoint {url} was written by {trainer['world_size']} rank(s); "
                    f"resume it with the same number (now {self.ranks.world_size})"
                )
            self.refuse_image_blind(url)
            self.model.load_state_dict(load_file(url, "model.pt"))
            self.resume = _Resume(stage, step, url, trainer)
            self.log(f"[train] resuming from {url}")
        # Dropout and any sampling differ per rank, as each rank sees different data. Python's
        # global generator too: libraries draw from it, and a run must not depend on what
        # ran before it in the process.
        torch.manual_seed(cfg.seed + self.ranks.rank)
        random.seed(cfg.seed + self.ranks.rank)

    def refuse_image_blind(self, url: str) -> None:
        """A rerun must not go on from a stage that failed its image check: it would skip
        the finished stage, and so its check, and train the next on an image-blind model."""
        check = read_marker(url).get("image_check")
        settings = self.config.image_check
        if check is None or settings.on_fail != "fail":
            return
        if check["shuffled_images"] < settings.min_ratio * check["true_images"]:
            raise StageError(
                f"checkpoint {url} failed its image check (shuffled/true loss "
                f"{check['shuffled_images'] / check['true_images']:.3f} < "
                f"train.image_check.min_ratio {settings.min_ratio:g}); delete it to retrain, "
                "or set train.image_check.on_fail=warn to go on from it"
            )

    def _autocast(self):
        precision = self.config.precision
        device = self.ranks.device
        if precision == "auto":
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            precision = "bf16" if cuda_bf16 else "fp32"
        if precision == "fp32":
            return nullcontext
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------ train

    def train(self) -> StageSummary:
        started = time.perf_counter()
        self.steps_run = self.samples_run = 0
        for stage in self.config.stages:
            settings: TrainStageConfig = getattr(self.config, stage)
            start_step, position = 0, DataPosition()
            if self.resume is not None:
                order = STAGE_ORDER.index(stage) - STAGE_ORDER.index(self.resume.stage)
                if order < 0 or (order == 0 and self.resume.step >= settings.steps):
                    continue  # this stage was finished by an earlier run
                if order == 0:
                    start_step = self.resume.step
                    position = DataPosition(**self.resume.trainer["data"][self.ranks.rank])
            if not self.train_stage(stage, settings, start_step, position):
                break
        summary = StageSummary("train", inputs=self.samples_run, outputs=self.steps_run)
        summary.seconds = time.perf_counter() - started
        summary.location = self.output
        return summary

    def train_stage(
        self, stage: str, settings: TrainStageConfig, start_step: int, position: DataPosition
    ) -> bool:
        """Train one stage from ``start_step``; False when ``stop_after`` ended it early."""
        cfg, ranks = self.config, self.ranks
        self.model.set_stage(train_vision_tower=settings.train_vision_tower)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # DDP is wrapped per stage: it registers gradient hooks on the trainable set only.
        model = (
            DistributedDataParallel(
                self.model, device_ids=[ranks.local_rank] if ranks.device.type == "cuda" else None
            )
            if ranks.ddp
            else self.model
        )
        optimizer = torch.optim.AdamW(
            trainable,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            fused=ranks.device.type == "cuda",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.steps)
        )
        if start_step > 0:
            trainer = self.resume.trainer
            optimizer.load_state_dict(load_file(self.resume.url, "optimizer.pt"))
            scheduler.load_state_dict(trainer["scheduler"])
        if self.resume is not None:
            # Where the interrupted run was: mid-stage, or at the end of an earlier stage.
            set_rng_state(self.resume.trainer["rng"][ranks.rank], ranks.device)
            self.resume = None
        stream = ConversationStream(
            self.shards,
            stage,
            cfg.data,
            cfg.seed,
            position,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
        self.log(
            f"[train] {stage}: {settings.steps} steps of {settings.batch_size} x "
            f"{settings.grad_accum} x {ranks.world_size} rank(s), "
            f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters"
        )

        model.train()
        window = torch.zeros(3, device=ranks.device)  # loss sum, samples, tokens since last log
        window_start = time.perf_counter()
        for step in range(start_step, settings.steps):
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                batch = self.encode(stream, settings.batch_size)
                if ranks.ddp:
                    # Gradients are averaged across ranks on the last micro-step only.
                    model.require_backward_grad_sync = micro == settings.grad_accum - 1
                with self.autocast():
                    loss = model(**batch).loss / settings.grad_accum
                loss.backward()
                # One host sync per micro-step: the per-step loss is the run's record.
                step_loss += loss.item()
                window[1] += len(batch["input_ids"])
                window[2] += batch["attention_mask"].sum()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            self.history.append(StepLog(stage, step + 1, step_loss, lr))
            window[0] += step_loss
            self.steps_run += 1
            self.samples_run += settings.batch_size * settings.grad_accum * ranks.world_size

            done = step + 1
            if done % cfg.log_every == 0 or done == settings.steps:
                if ranks.ddp:
                    dist.all_reduce(window)
                steps = (done - 1) % cfg.log_every + 1
                seconds = time.perf_counter() - window_start
                loss_sum, samples, tokens = window.tolist()
                self.log(
                    f"[train] {stage} step {done}/{settings.steps}  "
                    f"loss {loss_sum / steps / ranks.world_size:.4f}  lr {lr:.2e}  "
                    f"{samples / seconds:.1f} samples/s  {tokens / seconds:.0f} tokens/s"
                )
                window.zero_()
                window_start = time.perf_counter()
            last = done == settings.steps
            # The stage's verdict goes into its last checkpoint's marker, so it is checked
            # before that checkpoint is written.
            check = self.check_image_reliance(stage, settings.batch_size) if last else None
            if done % cfg.save_every == 0 or last:
                url = self.save_checkpoint(
                    stage, done, optimizer, scheduler, stream.position, check
                )
            if last:
                self.judge(check, url)
            if self.stop_after is not None and self.steps_run >= self.stop_after:
                return False
        return True

    def encode(self, conversations: Iterable[Conversation], size: int) -> dict[str, torch.Tensor]:
        """The next ``size`` usable conversations as model inputs on this rank's device.

        A conversation cut by ``max_length`` before its first answer has nothing to learn
        from and is passed over (its loss would be 0/0).
        """
        tokenizer = self.processor.tokenizer
        samples: list[EncodedSample] = []
        for conversation in conversations:
            sample = encode_conversation(
                conversation,
                tokenizer,
                self.processor.num_visual_tokens,
                self.config.data.max_length,
            )
            if any(label != IGNORE_INDEX for label in sample.labels):
                samples.append(sample)
            if len(samples) == size:
                break
        batch = collate(samples, tokenizer.pad_token_id, self.processor.pixel_values)
        return {k: v.to(self.ranks.device, non_blocking=True) for k, v in batch.items()}

    def check_image_reliance(self, stage: str, size: int) -> ImageCheck | None:
        """The image check of ``stage`` (engine/train/image_check.py), the same on every rank.

        Rank 0 scores up to ``image_check.samples`` held-out conversations, each of a
        different image, in batches of ``size``, and logs the result; under DDP the others
        receive it, so that every rank reaches the same verdict. None when fewer than 2
        held-out images exist (no verdict).
        """
        cfg = self.config
        check = None
        if self.ranks.main:
            wanted = cfg.image_check.samples
            conversations = held_out_batch(self.shards, stage, cfg.data, cfg.seed, wanted)
            if len(conversations) < 2:
                self.log(f"[train] {stage} image check: fewer than 2 held-out images, skipped")
            else:
                check = score_image_reliance(
                    self.model,
                    self.encode,
                    conversations,
                    stage,
                    size,
                    cfg.image_check.min_ratio,
                    self.autocast,
                )
                self.image_checks.append(check)
                self.log(f"[train] {check.line()}")
                if len(conversations) < wanted:
                    self.log(
                        f"[train] {stage} image check: only {len(conversations)} held-out "
                        f"images of the {wanted} asked for (raise data.holdout_fraction)"
                    )
        if self.ranks.ddp:
            box = [check]
            dist.broadcast_object_list(box, src=0)
            check = box[0]
        return check

    def judge(self, check: ImageCheck | None, checkpoint: str) -> None:
        """Stop the run on a failed image check, or warn loudly (``image_check.on_fail``)."""
        if check is None or check.passed:
            return
        reason = (
            f"{check.stage} does not use the images: held-out loss with shuffled images is "
            f"{check.ratio:.3f}x the loss with their own, below train.image_check.min_ratio "
            f"{check.min_ratio:g}; checkpoint {checkpoint} is marked image-blind"
        )
        if self.config.image_check.on_fail == "fail":
            raise StageError(f"{reason} (train longer, or set train.image_check.on_fail=warn)")
        self.log(f"[train] WARNING: {reason}; going on (image_check.on_fail=warn)")

    # ------------------------------------------------------------------------ save

    def save_checkpoint(
        self,
        stage: str,
        step: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        position: DataPosition,
        image_check: ImageCheck | None = None,
    ) -> str:
        """Rank 0 writes and commits a checkpoint; every rank must call this (gather).

        ``image_check`` (a stage's last checkpoint) is recorded in the marker. Returns the
        checkpoint's URL (the same on every rank).
        """
        url = posixpath.join(self.output.rstrip("/"), CHECKPOINTS, checkpoint_name(stage, step))
        mine = {"data": vars(position).copy(), "rng": rng_state(self.ranks.device)}
        everyone = [mine]
        if self.ranks.ddp:
            everyone = [None] * self.ranks.world_size
            dist.all_gather_object(everyone, mine)
        if not self.ranks.main:
            return url
        trainer = {
            "stage": stage,
            "step": step,
            "world_size": self.ranks.world_size,
            "scheduler": scheduler.state_dict(),
            "data": [r["data"] for r in everyone],
            "rng": [r["rng"] for r in everyone],
        }
        files = {
            "model.pt": self.model.state_dict(),
            "optimizer.pt": optimizer.state_dict(),
            "trainer.pt": trainer,
        }
        marker = {"image_check": asdict(image_check)} if image_check is not None else {}
        url = write_checkpoint(self.output, stage, step, files, self.config, marker)
        prune_checkpoints(self.output, stage, step, getattr(self.config, stage).steps)
        self.log(f"[train] saved {url}")
        return url

    # ------------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        if self.ranks.ddp:
            dist.barrier()  # rank 0 may still be writing the last checkpoint
            dist.destroy_process_group()

    def log(self, line: str) -> None:
        if self.ranks.main:
            print(line, flush=True)
