"""The Florence-VL recipe on shards made by the engine's own ingest and export.

The images are coloured shapes whose COCO labels name exactly what is drawn ("a red
square"), so the words of every caption and region answer are decided by the image: a
model that learns them must look at the image. One trained run (stage 1 then stage 2)
is shared by the assertions on losses, image reliance, frozen weights and inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageDraw

from engine.config import load_config
from engine.layout import round_layout
from engine.round_state import commit_round
from engine.run import main
from engine.store import Store
from engine.train.checkpoint import MARKER, latest_checkpoint, load_file
from engine.train.config import TrainConfig
from engine.train.inference import answer
from engine.train.recipe import FlorenceVLRecipe
from stages.export import run_export
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode

TINY = "engine/configs/florence_vl_tiny.yaml"
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
}
SHAPES = ("square", "circle", "triangle")
IMAGES_PER_KIND = 4  # 4 colours x 3 shapes x 4 = 48 images


def shape_image(colour: str, shape: str, k: int) -> tuple[Image.Image, list[float]]:
    """A 96 px image: one large shape on grey, its position varied by ``k``."""
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    x0, y0 = 10 + 6 * k, 12 + 5 * k
    box = [x0, y0, x0 + 58, y0 + 58]
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill)
    return image, [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def write_shapes_coco(folder: Path) -> None:
    """Images of every colour and shape with a COCO caption and one labelled box each."""
    folder.mkdir(parents=True)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    categories = [{"id": i + 1, "name": f"{c} {s}"} for i, (c, s) in enumerate(kinds)]
    images, annotations = [], []
    for i, (colour, shape) in enumerate(kinds * IMAGES_PER_KIND):
        image, bbox = shape_image(colour, shape, i // len(kinds))
        name = f"{i:03d}.jpg"
        (folder / name).write_bytes(encode(image))
        images.append({"id": i + 1, "file_name": name, "width": 96, "height": 96})
        category = kinds.index((colour, shape)) + 1
        annotations.append({"image_id": i + 1, "category_id": category, "bbox": bbox})
        caption = f"A {colour} {shape}. The {shape} is {colour}."
        annotations.append({"image_id": i + 1, "caption": caption})
    annotations = [{"id": i + 1, **a} for i, a in enumerate(annotations)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "labels.json").write_text(json.dumps(coco))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_cluster) -> Store:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_coco(root / "coco")
    config = load_config("engine/configs/test.yaml", ["export.shard_max_samples=16"])
    store = Store(str(root / "store"))
    plan = plan_ingest([str(root / "coco" / "labels.json")], store, config.ingest)
    run_ingest(store, config, plan)
    run_export(store, config, 0)
    commit_round(store, 0)  # what the pipeline does at the end of a round
    return store


def shards_of(store: Store) -> list[str]:
    return json.loads(Path(store.path(round_layout(0).shard_index)).read_text())["shards"]


# Stage 2 asks what is in a box: the answer ("red square") is decided by the image. A
# fifth of the images is held out for the image check; lrs high for a short run, but not
# for the vision tower's sake higher than 1e-3 in stage 1: at 3e-3 DaViT's features
# collapse in some runs (the loss then ignores the image exactly, seeds 0 and 1). Runs
# of a few steps cannot pass the image check, so it warns here (tests/
# test_train_image_check.py covers its verdict).
TEST_SETTINGS = {
    "image_check.on_fail": "warn",
    "data.instruction_tasks": "[region]",
    "data.holdout_fraction": 0.2,
    "stage1.lr": 1e-3,
    "stage2.lr": 2e-3,
}


def tiny_config(**train: object) -> TrainConfig:
    overrides = [f"train.{key}={value}" for key, value in {**TEST_SETTINGS, **train}.items()]
    return load_config(TINY, overrides).train


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> tuple[FlorenceVLRecipe, str]:
    output = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(**{"stage1.steps": 80, "stage2.steps": 60, "save_every": 40})
    recipe = FlorenceVLRecipe(config, shards_of(store), output)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe, output


def losses(recipe: FlorenceVLRecipe, stage: str) -> list[float]:
    return [log.loss for log in recipe.history if log.stage == stage]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_loss_falls_clearly_in_both_stages(trained, stage):
    recipe, _ = trained
    curve = losses(recipe, stage)
    assert len(curve) == getattr(recipe.config, stage).steps
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.6 * first, f"{stage}: {first:.3f} -> {last:.3f}"


def test_model_uses_the_images(trained):
    recipe, _ = trained
    assert [c.stage for c in recipe.image_checks] == ["stage1", "stage2"]
    stage1, stage2 = recipe.image_checks
    assert stage2.samples >= 4
    # Rolled images put another colour and shape under most texts. After both stages the
    # loss rises far beyond noise (measured over seeds 0, 1, 2: 0.07 -> 0.66, 0.13 -> 0.51,
    # 0.13 -> 0.55); stage 1 alone has only started to use them (gaps 0.08 to 0.14).
    assert stage2.shuffled_images > 2 * stage2.true_images, stage2
    assert stage2.shuffled_images - stage2.true_images > 0.25, stage2
    assert stage1.shuffled_images - stage1.true_images > 0.03, stage1


def test_stage2_freezes_the_vision_tower_and_trains_projector_and_llm(trained):
    _, output = trained
    base = Path(output) / "checkpoints"
    after_stage1 = load_file(str(base / "stage1-step0000080"), "model.pt")
    after_stage2 = load_file(str(base / "stage2-step0000060"), "model.pt")
    changed = {name for name, w in after_stage1.items() if not torch.equal(w, after_stage2[name])}
    tower = {name for name in after_stage1 if name.startswith("vision_tower.")}
    assert tower and not tower & changed
    assert any(name.startswith("projector.") for name in changed)
    assert any(name.startswith("language_model.") for name in changed)


def test_checkpoints_keep_each_stage_end_and_the_latest(trained):
    _, output = trained
    names = sorted(p.name for p in (Path(output) / "checkpoints").iterdir())
    assert names == ["stage1-step0000080", "stage2-step0000060"]
    assert latest_checkpoint(output).endswith("stage2-step0000060")


def test_inference_answers_in_the_words_it_was_taught(trained, tmp_path):
    _, output = trained
    checkpoint = latest_checkpoint(output)
    image, _ = shape_image("blue", "circle", 1)
    path = tmp_path / "blue.png"
    image.save(path)
    text = answer(checkpoint, str(path), "Describe the image in detail.", max_new_tokens=16)

    # The prompt is laid out as in training, so the answer is a caption of this world.
    # A word is matched where it starts: a short run may glue sub-words onto it
    # ("blue trianglebluegleg" on one machine), which still answers in the taught words.
    def says_one_of(words) -> bool:
        return re.search(rf"\b({'|'.join(words)})", text.lower()) is not None

    assert says_one_of(COLOURS) and says_one_of(SHAPES), text


def test_resume_after_a_stop_gives_the_uninterrupted_losses(store, tmp_path):
    short = {"stage1.steps": 8, "stage2.steps": 8, "save_every": 3}
    shards = shards_of(store)
    reference = FlorenceVLRecipe(tiny_config(**short), shards, str(tmp_path / "straight"))
    reference.setup()
    reference.train()
    reference.cleanup()

    output = str(tmp_path / "stopped")
    # Stopped at stage 2's step 5: the latest checkpoint is stage 2's step 3.
    first = FlorenceVLRecipe(tiny_config(**short), shards, output, stop_after=13)
    first.setup()
    first.train()
    first.cleanup()
    assert latest_checkpoint(output).endswith("stage2-step0000003")
    # A checkpoint that died while being written: no marker, must not be resumed.
    torn = Path(output) / "checkpoints" / "stage2-step0000006"
    torn.mkdir()
    (torn / "model.pt").write_bytes(b"half a file")

    resumed = FlorenceVLRecipe(tiny_config(**short), shards, output)
    resumed.setup()
    resumed.train()
    resumed.cleanup()
    assert [(log.stage, log.step) for log in resumed.history] == [
        ("stage2", step) for step in range(4, 9)
    ]
    expected = {(log.stage, log.step): log.loss for log in reference.history}
    for log in resumed.history:
        assert log.loss == pytest.approx(expected[log.stage, log.step], rel=1e-5, abs=1e-6)
    assert (Path(output) / "checkpoints" / "stage2-step0000008" / MARKER).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world_size: int, port: int, shards: list[str], out: str) -> None:
    # What torchrun sets for each rank it starts.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    config = tiny_config(**{"stage1.steps": 2, "stage2.steps": 1, "stage1.batch_size": 4})
    recipe = FlorenceVLRecipe(config, shards, out)
    recipe.setup()
    recipe.train()
    state = recipe.model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].cpu().numpy().tobytes())
    Path(out, f"rank{rank}.sha256").write_text(digest.hexdigest())
    recipe.cleanup()


def test_ddp_on_two_gloo_ranks_keeps_identical_weights(store, tmp_path):
    out = str(tmp_path / "ddp")
    Path(out).mkdir()
    mp.spawn(_ddp_rank, args=(2, _free_port(), shards_of(store), out), nprocs=2, join=True)
    digests = {Path(out, f"rank{r}.sha256").read_text() for r in range(2)}
    assert len(digests) == 1
    trainer = load_file(latest_checkpoint(out), "trainer.pt")
    assert trainer["world_size"] == 2 and len(trainer["data"]) == 2
    # Each rank read its own half of the stream.
    assert trainer["data"][0]["consumed"] > 0 and trainer["data"][1]["consumed"] > 0


def test_cli_trains_on_a_store_and_resumes(store, capsys):
    args = ["--stage", "train", "--config", TINY, "--store", store.url]
    steps = ["train.stage1.steps=3", "train.stage2.steps=2", "train.log_every=1"]
    steps.append("train.image_check.on_fail=warn")  # 3 steps cannot learn to read images
    assert main([*args, *steps]) == 0
    out = capsys.readouterr().out
    assert "[train] stage1 step 3/3  loss" in out
    assert "[train] stage2 step 2/2  loss" in out
    assert "image check" in out
    assert Path(store.path("florence_vl/checkpoints/stage2-step0000002", MARKER)).exists()
    # Run again: everything is done, nothing is trained twice.
    assert main([*args, *steps]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step 1/" not in out


def test_cli_without_shards_fails_before_any_work(tmp_path, capsys):
    empty = str(tmp_path / "empty")
    assert main(["--stage", "train", "--config", TINY, "--store", empty]) == 2
    err = capsys.readouterr().err.strip()
    assert "no exported shards" in err and len(err.splitlines()) == 1
