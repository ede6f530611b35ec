"""Trainer checkpoints: one folder per (stage, step), committed by a marker written last.

Layout under the run's output (a path or fsspec URL)::

    checkpoints/<stage>-step<NNNNNNN>/
        model.pt        the model's state dict
        optimizer.pt    the stage's AdamW state
        trainer.pt      stage, step, world size, scheduler state, every rank's data
                        position (epoch, conversations consumed) and RNG states
        config.json     the ``train`` section, to rebuild the model (inference.py)
        COMMITTED       written after the files above: JSON of stage, step and, on a
                        stage's last checkpoint, its image check (``image_check``:
                        the losses, ratio threshold and ``passed``)

A folder without ``COMMITTED`` is half-written (the run died while saving) and is never
resumed or loaded; the rule holds on object stores, which have no atomic rename, as it
does on local disk. Every file is loaded with ``weights_only=True``: tensors, numbers,
strings, lists and dicts only.
"""

from __future__ import annotations

import json
import posixpath
import random

import fsspec
import torch

from engine.train.config import TrainConfig

# Stages in the order a model goes through them, whatever a config runs.
STAGE_ORDER = ("stage1", "stage2")
CHECKPOINTS = "checkpoints"
MARKER = "COMMITTED"


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step{step:07d}"


def parse_checkpoint_name(name: str) -> tuple[str, int] | None:
    """(stage, step) of a checkpoint folder's name, None for anything else."""
    stage, sep, step = name.partition("-step")
    if not sep or stage not in STAGE_ORDER or not step.isdigit():
        return None
    return stage, int(step)


def _checkpoint_dirs(output: str) -> list[tuple[str, int, str, bool]]:
    """(stage, step, path, committed) of every checkpoint folder, oldest first."""
    fs, root = fsspec.core.url_to_fs(output)
    base = posixpath.join(root, CHECKPOINTS)
    if not fs.exists(base):
        return []
    found = []
    for path in fs.ls(base, detail=False):
        path = path.rstrip("/")
        parsed = parse_checkpoint_name(posixpath.basename(path))
        if parsed:
            found.append((*parsed, path, fs.exists(posixpath.join(path, MARKER))))
    return sorted(found, key=lambda c: (STAGE_ORDER.index(c[0]), c[1]))


def latest_checkpoint(output: str) -> str | None:
    """The URL of the latest committed checkpoint under ``output``, or None."""
    committed = [c for c in _checkpoint_dirs(output) if c[3]]
    if not committed:
        return None
    fs, _ = fsspec.core.url_to_fs(output)
    return fs.unstrip_protocol(committed[-1][2])


def write_checkpoint(
    output: str,
    stage: str,
    step: int,
    files: dict[str, object],
    config: TrainConfig,
    marker: dict | None = None,
) -> str:
    """Write ``files`` (name -> object for ``torch.save``) and the config, then commit.

    ``marker``: more JSON fields for the ``COMMITTED`` marker (``read_marker``).
    """
    url = posixpath.join(output.rstrip("/"), CHECKPOINTS, checkpoint_name(stage, step))
    for name, obj in files.items():
        with fsspec.open(posixpath.join(url, name), "wb") as f:
            torch.save(obj, f)
    with fsspec.open(posixpath.join(url, "config.json"), "w") as f:
        f.write(config.model_dump_json(indent=1))
    with fsspec.open(posixpath.join(url, MARKER), "w") as f:
        f.write(json.dumps({"stage": stage, "step": step, **(marker or {})}))
    return url


def read_marker(checkpoint: str) -> dict:
    """The ``COMMITTED`` marker of a committed checkpoint: stage, step, and image_check on a
    stage's last checkpoint (absent from checkpoints written before it existed)."""
    with fsspec.open(posixpath.join(checkpoint, MARKER), "r") as f:
        return json.loads(f.read() or "{}")


def prune_checkpoints(output: str, stage: str, step: int, stage_steps: int) -> None:
    """Remove the stage's folders older than ``step``, committed or not, but its last one.

    Called once the checkpoint at ``step`` is committed: a resume never needs the older
    ones, and each stage's final checkpoint is a model worth keeping.
    """
    fs, _ = fsspec.core.url_to_fs(output)
    for found_stage, found_step, path, _ in _checkpoint_dirs(output):
        if found_stage == stage and found_step < step and found_step != stage_steps:
            fs.rm(path, recursive=True)


def load_file(checkpoint: str, name: str) -> dict:
    with fsspec.open(posixpath.join(checkpoint, name), "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load_config(checkpoint: str) -> TrainConfig:
    """The ``train`` section a checkpoint was trained with."""
    with fsspec.open(posixpath.join(checkpoint, "config.json"), "r") as f:
        return TrainConfig.model_validate_json(f.read())


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch (CPU and the device's CUDA) and Python."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
