"""The Florence-2 student of a refinement round, fine-tuned on a round's shards with Ray Train.

``train_student(store, config, round_number)`` trains the student of round N+1 on round
N's exported shards (refinement/student_data.py) and writes it, in ``save_pretrained``
layout with its processor, to ``rounds/r(N+1)/model/`` with ``student.json`` beside it.

- **Start**: the previous round's model (warm start, so nightly rounds accumulate), else
  the configured checkpoint (a pinned Florence-2 release), else a tiny random model of
  the same architecture (tests, demo).
- **Training**: Ray Train's ``TorchTrainer`` runs ``_worker`` on ``refine.student.num_workers``
  workers (CPU in tests, GPUs on a cluster, DDP between them; bf16 autocast on GPU).
  AdamW, linear warmup then cosine decay, gradient clipping at 1.
- **Resume**: a checkpoint (weights, optimizer, schedule, data position, random state)
  is reported every ``checkpoint_every`` steps under ``rounds/r(N+1)/student_run/``;
  Ray Train restarts dead workers (``max_failures``), and a killed run started again
  with the same store continues from the last checkpoint at the same step.
- **Does it see?** After training, rank 0 compares the held-out loss with the true
  images and with the images rolled by one across the batch, and measures how much the
  image features vary across images (near 0 when a small Florence-2 has gone image-blind).
  A student whose shuffled-image loss is not ``min_image_gain`` times its true-image loss
  is refused: ``student.json`` says so and why, and the round keeps the specialists'
  annotations.

The loop itself (``StudentTraining``) holds no Ray: tests drive it in-process.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, StudentConfig
from engine.execution import require_ray
from engine.layout import STUDENT_REPORT, round_layout
from engine.round_state import committed_rounds
from engine.store import Store
from refinement.student_data import (
    Example,
    ExampleStream,
    encode,
    held_out_examples,
    to_device,
)

STATE_FILE = "training_state.pt"
# The model folder is committed like a dataset's unit: a marker written after the copy.
MODEL_UNIT = "model"


@dataclass
class ImageCheck:
    samples: int
    true_loss: float
    shuffled_loss: float
    # Std across images of the image features, averaged over positions and channels.
    feature_variation: float

    @property
    def gain(self) -> float:
        return self.shuffled_loss / self.true_loss if self.true_loss > 0 else math.inf


@dataclass
class StudentReport:
    """What ``student.json`` records about a trained student."""

    round: int
    init: str
    steps: int
    first_loss: float
    last_loss: float
    samples_per_s: float
    image_check: dict[str, float] | None
    accepted: bool
    reason: str
    # What the tower's dense pretraining found (refinement/tower.py), when it ran.
    tower: dict[str, float] | None = None


def init_source(store: Store, round_number: int, config: StudentConfig) -> str:
    """Where round ``round_number``'s student starts: the model of the latest committed
    round before it that has one, else the configured checkpoint, else ``tiny``."""
    for earlier in reversed([n for n in committed_rounds(store) if n < round_number]):
        model = round_layout(earlier).model
        if store.is_committed(model, MODEL_UNIT):
            return store.fs.unstrip_protocol(store.path(model))
    return config.checkpoint or "tiny"


def load_student(source: str, config: StudentConfig) -> tuple[Any, Any]:
    """The model (fp32 master weights, train mode) and processor of ``source``."""
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    if source == "tiny":
        from engine.train.tiny import build_tiny_florence2

        model, processor = build_tiny_florence2(config.tiny)
        return model.train(), processor
    from specialists.base import local_model_folder

    folder = local_model_folder(source)
    revision = config.revision if source == config.checkpoint else None
    model = Florence2ForConditionalGeneration.from_pretrained(
        folder, revision=revision, dtype=torch.float32
    )
    processor = Florence2Processor.from_pretrained(folder, revision=revision)
    return model.train(), processor


class StudentTraining:
    """The student's training loop, free of Ray: one instance per worker."""

    def __init__(
        self,
        config: StudentConfig,
        shards: list[str],
        source: str,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prepare: Any = None,
        validation_fraction: float = 0.0,
    ) -> None:
        """``validation_fraction``: of the human-labelled images, those the merge policy
        validates on (``refine.policy.validation_fraction``), never trained on."""
        self.config, self.shards, self.device = config, shards, torch.device(device)
        self.source, self.validation_fraction = source, validation_fraction
        # The tower pretraining's report, once it ran (``pretrain_tower``).
        self.tower: dict[str, float] | None = None
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(config.seed + rank)
        self.model, self.processor = load_student(source, config)
        if config.freeze_vision:
            for parameter in self.model.model.vision_tower.parameters():
                parameter.requires_grad = False
        self.model.to(self.device)
        # Under Ray Train this wraps the model in DDP; in-process it is the model itself.
        self.trained = prepare(self.model) if prepare is not None else self.model
        text = self.model.config.text_config
        self.max_target_tokens = text.max_position_embeddings
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            parameters, lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.stream = self._stream(epoch=0, consumed=0)
        self.losses: list[float] = []

    def _stream(self, epoch: int, consumed: int) -> ExampleStream:
        c = self.config
        return ExampleStream(
            self.shards, c.tasks, c.holdout_fraction, c.seed, self.rank, self.world_size,
            epoch, consumed, self.validation_fraction, c.augment,
        )  # fmt: skip

    def _lr_factor(self, step: int) -> float:
        warmup, total = self.config.warmup_steps, self.config.steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _autocast(self) -> Any:
        # bf16 where the hardware has it; CPU training stays fp32.
        enabled = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def pretrain_tower(self, echo: Callable[[str], None] | None = print) -> None:
        """Before the first step of a new tiny student with ``tower`` configured, its
        vision tower learns where the round's objects are (refinement/tower.py), on the
        images the student trains on. Every rank pretrains alike (same shards, same seed),
        so data-parallel replicas stay equal."""
        c = self.config
        if c.tower is None or self.source != "tiny" or self.step > 0:
            return
        from refinement.tower import pretrain_tower

        tower = c.tower.model_copy(update={"holdout_fraction": c.holdout_fraction})
        report = pretrain_tower(
            self.model, self.processor, self.shards, tower, echo, self.validation_fraction
        )
        self.tower = asdict(report)

    def train_step(self) -> float:
        batch = encode(
            self.processor, self.stream.take(self.config.batch_size), self.max_target_tokens
        )
        with self._autocast():
            loss = self.trained(**to_device(batch, self.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data": {"epoch": self.stream.epoch, "consumed": self.stream.consumed},
            "losses": self.losses,
            "rng": torch.get_rng_state(),
            "tower": self.tower,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses = state["step"], list(state["losses"])
        self.stream = self._stream(**state["data"])
        torch.set_rng_state(state["rng"])
        self.tower = state["tower"]

    @torch.no_grad()
    def image_check(self, examples: list[Example]) -> ImageCheck:
        """Held-out loss with the true images and with the images rolled by one."""
        self.model.eval()
        batch = to_device(encode(self.processor, examples, self.max_target_tokens), self.device)
        with self._autocast():
            true_loss = self.model(**batch).loss.item()
            batch["pixel_values"] = batch["pixel_values"].roll(1, dims=0)
            shuffled_loss = self.model(**batch).loss.item()
        self.model.train()
        return ImageCheck(len(examples), true_loss, shuffled_loss, self.feature_spread(examples))

    @torch.no_grad()
    def feature_spread(self, examples: list[Example]) -> float:
        """The image pathway's health figure: the spread across images of the projected
        image tokens the encoder receives (std over images, averaged over positions and
        channels). It falls towards 0 as a small Florence-2 goes image-blind."""
        self.model.eval()
        batch = to_device(encode(self.processor, examples, self.max_target_tokens), self.device)
        with self._autocast():
            features = self.model.get_image_features(batch["pixel_values"]).pooler_output
        self.model.train()
        return features.float().std(dim=0).mean().item()

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def verdict(check: ImageCheck | None, config: StudentConfig) -> tuple[bool, str]:
    """Whether the student may annotate, and why."""
    if check is None:
        return False, "too few held-out images for the image check"
    if check.gain < config.min_image_gain:
        return False, (
            f"image-blind: held-out loss {check.shuffled_loss:.4f} with shuffled images is "
            f"{check.gain:.3f}x its {check.true_loss:.4f} with the true ones "
            f"(needs {config.min_image_gain}x)"
        )
    return True, f"uses the images: shuffled/true held-out loss {check.gain:.3f}x"


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train, check, save."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = StudentConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    training = StudentTraining(
        config,
        loop_config["shards"],
        loop_config["source"],
        rank,
        world,
        ray.train.torch.get_device(),
        prepare=ray.train.torch.prepare_model if world > 1 else None,
        validation_fraction=loop_config["validation_fraction"],
    )
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            if (Path(folder) / STUDENT_REPORT).exists():
                return  # the previous run finished; the driver reads its result
            training.load_state_dict(torch.load(Path(folder) / STATE_FILE, weights_only=False))
    else:
        training.pretrain_tower()
    # Held-out examples for the image check, and for the health figure at checkpoints.
    examples = []
    if rank == 0:
        examples = held_out_examples(
            loop_config["shards"], config.tasks, config.holdout_fraction,
            config.image_check_samples,
        )  # fmt: skip
    started, first_step = time.perf_counter(), training.step
    while training.step < config.steps:
        loss = training.train_step()
        if training.step % config.checkpoint_every == 0 and training.step < config.steps:
            metrics: dict[str, float] = {"step": training.step, "loss": loss}
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if rank == 0:
                    torch.save(training.state_dict(), Path(folder) / STATE_FILE)
                    checkpoint = Checkpoint.from_directory(folder)
                    if len(examples) >= 2:
                        metrics["feature_spread"] = training.feature_spread(examples)
                    print(
                        f"student step {training.step}/{config.steps}: loss {loss:.4f}, "
                        f"image feature spread {metrics.get('feature_spread', '-')}",
                        flush=True,
                    )
                ray.train.report(metrics, checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            check = training.image_check(examples) if len(examples) >= 2 else None
            accepted, reason = verdict(check, config)
            samples = (training.step - first_step) * config.batch_size * world
            report = StudentReport(
                round=loop_config["round"],
                init=loop_config["source"],
                steps=training.step,
                first_loss=training.losses[0],
                last_loss=training.losses[-1],
                samples_per_s=samples / seconds if seconds > 0 else 0.0,
                image_check=None if check is None else {**asdict(check), "gain": check.gain},
                accepted=accepted,
                reason=reason,
                tower=training.tower,
            )
            training.save_pretrained(folder)
            (Path(folder) / STUDENT_REPORT).write_text(json.dumps(asdict(report), indent=1))
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report({"step": training.step, "final": 1}, checkpoint=checkpoint)


def train_student(store: Store, config: EngineConfig, round_number: int) -> StudentReport:
    """Train round ``round_number``'s student on the previous committed round's shards and
    write it to ``rounds/rNNN/model/``; returns what ``student.json`` says."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    student = config.refine.student
    layout = round_layout(round_number)
    parents = [n for n in committed_rounds(store) if n < round_number]
    if not parents:
        raise ValueError(f"round {round_number} has no committed round before it to learn from")
    index = store.read_json(round_layout(parents[-1]).shard_index)
    if index is None:
        raise ValueError(f"round {parents[-1]} has no export to train the student on")
    shards = index["shards"]
    source = init_source(store, round_number, student)
    require_ray()  # Ray Train would otherwise start a Ray of its own, not on loopback
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": student.model_dump(),
            "shards": shards,
            "source": source,
            "round": round_number,
            "validation_fraction": config.refine.policy.validation_fraction,
        },
        scaling_config=ScalingConfig(
            num_workers=student.num_workers,
            use_gpu=student.use_gpu,
            resources_per_worker={"CPU": student.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="student_run",
            # Checkpoints live in the round: a rerun of the round resumes from them.
            storage_path=store.fs.unstrip_protocol(store.path(layout.root)),
            failure_config=FailureConfig(max_failures=student.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train sends a worker's print to a logger and to stdout both: each progress
            # line twice, and pycocotools' steps past the evaluation's redirect_stdout.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    result = trainer.fit()
    target = store.path(layout.model)
    if store.fs.exists(target):
        store.fs.rm(target, recursive=True)  # a copy a killed run left half done
    with result.checkpoint.as_directory() as folder:
        report = json.loads((Path(folder) / STUDENT_REPORT).read_text())
        store.fs.put(os.path.join(folder, ""), target + "/", recursive=True)
    store.write_marker(layout.model, MODEL_UNIT, report)
    return StudentReport(**report)
