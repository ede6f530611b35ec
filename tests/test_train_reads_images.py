"""The tiny recipe, trained on the engine's own export of a generated world, reads the images.

A falling loss proves nothing here: the world's captions are template text that a
language model alone predicts to ~0.4 nats per token. What only the image can decide
(the background's colour, the large shape's colour and kind) is a small share of the
tokens, so these tests ask for the image check's verdict itself, at the end of each
stage: on 64+ held-out images, the loss with every text paired with another image's
pixels must be at least 1.1x the loss with its own. A model whose images stop reaching it
(a cut feature path, a tower collapsed to a constant, a data bug pairing texts with the
wrong images) scores 1.00. One run of the shipped recipe, both stages, serves every test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.config import load_config
from engine.train.image_check import ImageCheck
from engine.train.recipe import FlorenceVLRecipe
from tests.world_shards import exported_world, shard_urls

TINY = "engine/configs/florence_vl_tiny.yaml"
# The demo's order of size: ~225 training images and ~75 held out (holdout_fraction 0.25).
WORLD_IMAGES = 300


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> Iterator[dict[str, ImageCheck]]:
    """The image checks of the shipped tiny recipe, both stages, on a world's shards."""
    # conftest's one_torch_thread is per test; this run is shared by the module's tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reads_images")
    store = exported_world(root / "world", WORLD_IMAGES, seed=11)
    config = load_config(TINY, []).train
    recipe = FlorenceVLRecipe(config, shard_urls(store), str(root / "out"))
    recipe.setup()
    try:
        # A failed check raises StageError (on_fail: fail): every test here fails with it.
        recipe.train()
    finally:
        recipe.cleanup()
        torch.set_num_threads(threads)
    yield {check.stage: check for check in recipe.image_checks}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_tiny_recipe_loses_10pc_more_with_shuffled_images(checks, stage):
    check = checks[stage]
    assert check.samples >= 64
    assert check.shuffled_images >= 1.1 * check.true_images, check.line()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_projected_visual_tokens_still_differ_between_images(checks, stage):
    # 0 = collapsed; stage 2 at stage 1's lr pulled it from 0.26 to 0.11-0.15.
    assert checks[stage].feature_spread > 0.15, checks[stage].line()
