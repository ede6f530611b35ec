"""The refinement student: Florence-2 fine-tuned on a round's shards through Ray Train."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import Florence2ForConditionalGeneration, Florence2Processor

from engine.config import AugmentConfig, StudentConfig, TowerConfig, load_config
from engine.layout import MANIFEST, round_layout
from engine.records import records_from_table
from engine.round_state import commit_round
from engine.train.config import TinyModelConfig
from refinement.student import (
    MODEL_UNIT,
    ImageCheck,
    StudentTraining,
    init_source,
    train_student,
    verdict,
)
from refinement.student_data import ExampleStream, held_out_examples, is_validation
from tests.world_shards import exported_world, shard_urls

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TinyModelConfig(hidden_size=32, layers=1, heads=2, image_size=64)


def student_config(**fields: object) -> StudentConfig:
    values = {"tiny": TINY, "steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1}
    # A world of a few dozen images needs a large share held out for the image check.
    values["holdout_fraction"] = 0.3
    return StudentConfig(**{**values, **fields})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return exported_world(tmp_path_factory.mktemp("student"), images=24, seed=5, unit=8)


def test_the_policy_s_validation_images_are_never_trained_on(tmp_path):
    store = exported_world(tmp_path, images=12, seed=7, unit=12, human=6)
    urls = shard_urls(store)

    def trained_ids(validation_fraction: float) -> set[str]:
        stream = ExampleStream(urls, ["<OD>"], 0.01, 0, validation_fraction=validation_fraction)
        return {example.image_id for example in stream.take(48)}

    everything = trained_ids(0.0)
    held = trained_ids(1.0)
    assert len(everything) == 12
    # Exactly the six human-labelled images are held out; unlabelled ones never are.
    assert len(everything - held) == 6 and len(held) == 6
    records = records_from_table(store.read(MANIFEST))
    humans = {r.image_id for r in records if is_validation(r, 1.0)}
    assert humans == everything - held


def test_a_new_tiny_student_pretrains_its_tower_first_and_a_resumed_one_does_not(world):
    tower = TowerConfig(steps=3, batch_size=4, output_stride=16, eval_images=2, log_every=1)
    config = student_config(steps=2, tower=tower)
    training = StudentTraining(config, shard_urls(world), "tiny")
    before = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    training.pretrain_tower(echo=None)
    assert training.tower["steps"] == 3 and training.tower["heldout_images"] >= 1
    changed = {n for n, p in training.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.vision_tower.") for n in changed)

    training.train_step()
    resumed = StudentTraining(config, shard_urls(world), "tiny")
    resumed.load_state_dict(training.state_dict())
    weights = {n: p.detach().clone() for n, p in resumed.model.named_parameters()}
    resumed.pretrain_tower(echo=None)  # past step 0: the tower is the checkpoint's
    assert resumed.tower == training.tower
    assert all(torch.equal(p, weights[n]) for n, p in resumed.model.named_parameters())


@pytest.mark.parametrize("augment", [None, AugmentConfig(probability=1.0)])
def test_a_resumed_training_continues_with_the_same_losses_and_weights(world, augment):
    config = student_config(steps=6, augment=augment)
    straight = StudentTraining(config, shard_urls(world), "tiny")
    for _ in range(6):
        straight.train_step()

    first = StudentTraining(config, shard_urls(world), "tiny")
    for _ in range(3):
        first.train_step()
    saved = first.state_dict()
    resumed = StudentTraining(config, shard_urls(world), "tiny")
    resumed.load_state_dict(saved)
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()

    assert resumed.losses == straight.losses
    for name, weight in straight.model.state_dict().items():
        assert torch.equal(weight, resumed.model.state_dict()[name]), name


def test_the_image_check_refuses_a_student_that_cannot_see(world):
    training = StudentTraining(student_config(), shard_urls(world), "tiny")
    examples = held_out_examples(shard_urls(world), training.config.tasks, 0.3, 8)
    assert len({e.image_id for e in examples}) == len(examples) >= 2
    with torch.no_grad():  # the vision path cut: every image gives the same features
        for parameter in training.model.model.multi_modal_projector.parameters():
            parameter.zero_()
    check = training.image_check(examples)
    assert check.feature_variation == 0.0
    accepted, reason = verdict(check, training.config)
    assert not accepted and "image-blind" in reason
    seeing = ImageCheck(8, true_loss=1.0, shuffled_loss=1.5, feature_variation=0.3)
    assert verdict(seeing, training.config) == (
        True,
        "uses the images: shuffled/true held-out loss 1.500x",
    )


def test_a_student_trained_on_mismatched_images_is_refused(tmp_path):
    mismatched = exported_world(tmp_path / "m", images=24, seed=5, unit=8, mismatched=True)
    true_pairs = exported_world(tmp_path / "t", images=24, seed=5, unit=8)
    config = student_config(steps=30)
    training = StudentTraining(config, shard_urls(mismatched), "tiny")
    for _ in range(config.steps):
        training.train_step()
    assert training.losses[-1] < training.losses[0]  # it learnt the targets' language
    examples = held_out_examples(shard_urls(true_pairs), config.tasks, 0.3, 8)
    check = training.image_check(examples)
    accepted, reason = verdict(check, config)
    assert not accepted and "image-blind" in reason, check


def test_ray_train_writes_a_loadable_student_and_a_rerun_resumes(world, ray_cluster):
    config = load_config(None, [])
    student = student_config(steps=4, checkpoint_every=2, cpus_per_worker=0.5)
    config = config.model_copy(
        update={"refine": config.refine.model_copy(update={"student": student})}
    )

    report = train_student(world, config, 1)

    layout = round_layout(1)
    assert world.is_committed(layout.model, MODEL_UNIT)
    assert report.steps == 4 and report.init == "tiny" and report.image_check is not None
    folder = world.path(layout.model)
    model = Florence2ForConditionalGeneration.from_pretrained(folder)
    processor = Florence2Processor.from_pretrained(folder)
    image = Image.new("RGB", (96, 64), (40, 120, 200))
    inputs = processor(text="<OD>", images=image, return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = processor.batch_decode(tokens, skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task="<OD>", image_size=image.size)
    assert set(parsed["<OD>"]) == {"bboxes", "labels"}
    saved = json.loads(world.fs.cat_file(world.path(layout.student_report)))
    assert saved["steps"] == 4 and saved["accepted"] == report.accepted

    # The run is complete: started again, Ray Train resumes from its last checkpoint and
    # the same student comes back without training again.
    again = train_student(world, config, 1)
    assert again == report


def test_a_later_round_starts_from_the_last_committed_model(world, tmp_path):
    config = student_config()
    assert init_source(world, 1, config) == "tiny"
    assert (
        init_source(world, 1, config.model_copy(update={"tiny": None, "checkpoint": "x/y"}))
        == "x/y"
    )
    layout = round_layout(1)
    world.write_marker(layout.model, MODEL_UNIT, {})
    assert init_source(world, 2, config) == "tiny"  # round 1 is not committed yet
    commit_round(world, 1)
    assert init_source(world, 2, config).endswith(layout.model)
