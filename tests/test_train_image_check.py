"""The image check decides: a stage whose model does not read the images fails the run.

The shards are the engine's own export of a generated world (tests/world_shards.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.execution import StageError
from engine.run import main
from engine.store import Store
from engine.train.checkpoint import latest_checkpoint, read_marker
from engine.train.config import TrainConfig
from engine.train.inference import answer
from engine.train.recipe import FlorenceVLRecipe
from tests.world_shards import exported_world, shard_urls

TINY = "engine/configs/florence_vl_tiny.yaml"
WORLD_IMAGES = 48
UNIT = 16  # records per manifest unit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_store(tmp_path_factory) -> Store:
    return exported_world(tmp_path_factory.mktemp("world"), WORLD_IMAGES, seed=3, unit=UNIT)


def tiny_config(**train: object) -> TrainConfig:
    # A third held out: a check batch of ~16 images from 48; a couple of steps only.
    settings = {"data.holdout_fraction": 0.33, "stage1.steps": 2, "stage2.steps": 2, **train}
    return load_config(TINY, [f"train.{k}={v}" for k, v in settings.items()]).train


def cut_vision(recipe: FlorenceVLRecipe) -> None:
    """The vision path cut: the tower's features zeroed, whatever the image."""
    recipe.model.vision_tower.register_forward_hook(lambda module, args, out: torch.zeros_like(out))


def test_a_model_cut_from_its_images_fails_the_run(world_store, tmp_path):
    output = str(tmp_path / "cut")
    recipe = FlorenceVLRecipe(tiny_config(), shard_urls(world_store), output)
    recipe.setup()
    cut_vision(recipe)
    with pytest.raises(StageError) as failed:
        recipe.train()
    recipe.cleanup()
    message = str(failed.value)
    assert "stage1 does not use the images" in message and "\n" not in message
    # Exactly the same loss with any image: ratio 1.000, far below 1.1.
    (check,) = recipe.image_checks
    assert check.shuffled_images == pytest.approx(check.true_images, rel=1e-6)
    assert check.samples >= 8 and check.feature_spread == 0 and not check.passed
    # The stage's checkpoint is kept for a look, marked; stage 2 never started.
    checkpoint = latest_checkpoint(output)
    assert checkpoint.endswith("stage1-step0000002")
    assert read_marker(checkpoint)["image_check"]["passed"] is False
    with pytest.warns(UserWarning, match="failed its image check"):
        answer(checkpoint, Image.new("RGB", (64, 64)), "Describe the image.", max_new_tokens=1)

    # Run again: it must not skip the failed stage and go on to stage 2 from it.
    rerun = FlorenceVLRecipe(tiny_config(), shard_urls(world_store), output)
    with pytest.raises(StageError, match="failed its image check"):
        rerun.setup()


def test_warn_mode_goes_on_and_marks_every_blind_stage(world_store, tmp_path, capsys):
    output = str(tmp_path / "warn")
    config = tiny_config(**{"image_check.on_fail": "warn"})
    recipe = FlorenceVLRecipe(config, shard_urls(world_store), output)
    recipe.setup()
    cut_vision(recipe)
    recipe.train()
    recipe.cleanup()
    out = capsys.readouterr().out
    assert out.count("WARNING: stage") == 2 and "is marked image-blind" in out
    base = Path(output) / "checkpoints"
    for stage in ("stage1", "stage2"):
        marker = read_marker(str(base / f"{stage}-step0000002"))
        assert marker["image_check"]["stage"] == stage
        assert marker["image_check"]["passed"] is False


def test_cli_fails_an_image_blind_run_with_one_line(world_store, capsys):
    # Two steps from random weights: the model has not learnt to read the images yet.
    args = ["--stage", "train", "--config", TINY, "--store", world_store.url]
    overrides = ["train.stage1.steps=2", "train.stage2.steps=2", "train.data.holdout_fraction=0.33"]
    assert main([*args, *overrides]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("engine.run: error: stage1 does not use the images")
    assert len(err.splitlines()) == 1
    assert "stage1 image check on" in captured.out and "ratio" in captured.out
    # The threshold is the config's: at 0 the rerun goes on from the marked stage 1.
    assert main([*args, *overrides, "train.image_check.min_ratio=0"]) == 0
    assert "stage2 image check on" in capsys.readouterr().out
