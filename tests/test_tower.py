"""Dense pretraining of the student's vision tower on a round's object boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import StudentConfig, TowerConfig
from engine.layout import MANIFEST
from engine.records import records_from_table
from engine.train.config import TinyModelConfig
from engine.train.data import ReadStats
from refinement.student import load_student
from refinement.tower import _targets, _training_stream, decode, pretrain_tower
from tests.world_shards import exported_world, shard_urls

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 128 pixels give the tower a 4x4 last map; at 64 (2x2) a world of 96 images teaches it
# too little in the time a test has.
TINY = TinyModelConfig(hidden_size=32, layers=1, heads=2, image_size=128)
# Stride 8 halves the step time of stride 4 at this size for a little less AP; a
# quarter of the images held out gives a score over twenty-odd images.
CONFIG = TowerConfig(
    steps=200, batch_size=16, output_stride=8, holdout_fraction=0.25, log_every=50, seed=1
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return exported_world(tmp_path_factory.mktemp("tower"), images=96, seed=3, unit=16)


def student() -> tuple[object, object]:
    return load_student("tiny", StudentConfig(tiny=TINY))


def test_decoding_the_targets_gives_back_the_boxes():
    boxes = np.array([[1.2, 2.5, 6.7, 5.1], [8.0, 0.4, 11.3, 3.9]], np.float32)
    targets = _targets([boxes], (8, 16))
    size = torch.zeros(1, 2, 8, 16)
    offset = torch.zeros(1, 2, 8, 16)
    for j, cell in enumerate(targets.index[0]):
        size[0, :, cell // 16, cell % 16] = targets.size[0, j]
        offset[0, :, cell // 16, cell % 16] = targets.offset[0, j]
    # The Gaussian peaks as logits: each centre (exactly 1) is a local maximum.
    heatmap = torch.logit(targets.heatmap.clamp(1e-6, 1 - 1e-6))
    decoded, scores = decode((heatmap, size, offset), top_k=2)[0]
    assert scores.min() > 0.99
    np.testing.assert_allclose(sorted(decoded.tolist()), sorted(boxes.tolist()), atol=1e-5)


def test_pretraining_teaches_the_tower_to_find_held_out_objects(world):
    model, processor = student()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lines: list[str] = []

    report = pretrain_tower(model, processor, shard_urls(world), CONFIG, echo=lines.append)

    assert report.steps == 200 and len(lines) == 4 and lines[-1].startswith("tower step 200/200")
    assert report.heldout_images >= 15
    # An untrained head scores about nothing; a tower that learnt where objects are
    # lets the head find a clear share of them on images it never saw.
    assert report.untrained_ap50 is not None and report.untrained_ap50 < 0.02
    assert report.ap50 is not None and report.ap50 > report.untrained_ap50 + 0.08
    assert report.final_loss < report.first_loss / 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    tower = {n for n in before if n.startswith("model.vision_tower.")}
    assert changed == tower  # every tower weight, nothing of the projector or the language model
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_pretraining_is_a_function_of_the_seed(world):
    config = TowerConfig(
        steps=3, batch_size=4, output_stride=8, holdout_fraction=0.25, eval_images=4
    )
    runs = []
    for seed in (config.seed, config.seed, config.seed + 1):
        model, processor = student()
        state = torch.get_rng_state()
        seeded = config.model_copy(update={"seed": seed})
        report = pretrain_tower(model, processor, shard_urls(world), seeded, echo=None)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((report.final_loss, model.model.vision_tower.state_dict()))
    (loss_a, tower_a), (loss_b, tower_b), (loss_c, _) = runs
    assert loss_a == loss_b and loss_a != loss_c
    assert all(torch.equal(tower_a[name], tower_b[name]) for name in tower_a)


def test_the_policy_s_validation_images_never_reach_the_tower(tmp_path):
    store = exported_world(tmp_path, images=12, seed=7, unit=12, human=6)
    config = TowerConfig(holdout_fraction=0.01)
    stream = _training_stream(shard_urls(store), config, ReadStats(), validation_fraction=1.0)
    seen = {next(stream)[1].image_id for _ in range(60)}
    records = records_from_table(store.read(MANIFEST))
    assert seen == {r.image_id for r in records if not r.has_human_labels()}
    assert len(seen) == 6
