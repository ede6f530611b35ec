"""Box-moving augmentation: the moved target still says where the objects are in the
moved image, and a resumed stream moves its examples as one that never stopped."""

from __future__ import annotations

import dataclasses
import io
import random
import re

import numpy as np
import pytest
from PIL import Image

from engine.config import AugmentConfig
from engine.records import Caption, ImageRecord, Region
from refinement.augment import Moved, augment
from refinement.student_data import Example, ExampleStream
from refinement.targets import dequantise, florence2_targets
from tests.world_shards import exported_world, shard_urls

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}
BOXES = {"red": (30, 20, 70, 50), "blue": (100, 60, 150, 110)}


def painted_example(task: str) -> Example:
    """A grey 200x140 image with a red and a blue rectangle, and its ``task`` target."""
    pixels = np.full((140, 200, 3), 128, np.uint8)
    for name, (x0, y0, x1, y1) in BOXES.items():
        pixels[y0:y1, x0:x1] = COLOURS[name]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")  # lossless: colours found exactly
    regions = [Region(box, name, "object", "world") for name, box in BOXES.items()]
    captions = {"brief": Caption("a red box left of a blue box", "world")}
    record = ImageRecord("i", "mem://i", "folder", 200, 140, "0" * 64, captions, regions)
    target = next(t for t in florence2_targets(record) if t.task == task)
    return Example("i", out.getvalue(), task, task, target.target, record=record)


def moved_example(example: Example, config: AugmentConfig, seed: int) -> Moved:
    moved = augment(example.record, example.jpeg, example.task, config, random.Random(seed))
    assert moved is not None
    return moved


def parsed_boxes(target: str, width: int, height: int) -> dict[str, list[float]]:
    found = re.findall(r"([a-z]+)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>", target)
    sizes = (width, height, width, height)
    return {
        label: [dequantise(int(v), size) for v, size in zip(bins, sizes, strict=True)]
        for label, *bins in found
    }


def painted_box(image: Image.Image, colour: tuple[int, int, int]) -> list[int]:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - colour).sum(-1) < 60)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_moved_boxes_are_where_the_objects_are_in_the_moved_image(seed):
    example = painted_example("<OD>")
    config = AugmentConfig(probability=1.0, min_scale=0.3)
    moved = moved_example(example, config, seed)
    image = Image.open(io.BytesIO(moved.jpeg))
    assert image.size == (moved.record.width, moved.record.height)
    assert image.size != (200, 140) or moved.target != example.target
    boxes = parsed_boxes(moved.target, *image.size)
    assert sorted(boxes) == ["blue", "red"]  # every object kept whole, none cut out
    for name, box in boxes.items():
        # Within a bin and the JPEG's blur at the edges.
        tolerance = max(image.size) / 1000 + 2
        assert np.allclose(box, painted_box(image, COLOURS[name]), atol=tolerance), name


def test_mirrors_and_crops_both_happen_and_other_tasks_are_left_alone():
    example = painted_example("<OD>")
    config = AugmentConfig(probability=1.0, min_scale=0.3)
    moved = [moved_example(example, config, seed) for seed in range(20)]
    red_left_of_blue = [
        (b := parsed_boxes(m.target, m.record.width, m.record.height))["red"][0] < b["blue"][0]
        for m in moved
    ]
    assert any(red_left_of_blue) and not all(red_left_of_blue)
    assert len({(m.record.width, m.record.height) for m in moved}) > 1
    caption = painted_example("<CAPTION>")
    assert augment(caption.record, caption.jpeg, caption.task, config, random.Random(0)) is None
    never = AugmentConfig(probability=0.0)
    assert augment(example.record, example.jpeg, example.task, never, random.Random(0)) is None


@pytest.mark.parametrize(
    "change",
    [
        {"regions": [Region((30, 20, float("nan"), 50), "red", "object", "world")]},
        {"regions": [Region((70, 20, 30, 50), "red", "object", "world")]},  # upside down
        {"width": 100, "height": 70},  # not the JPEG's size
    ],
)
def test_an_example_the_crop_cannot_hold_whole_is_left_as_it_is(change):
    example = painted_example("<OD>")
    record = dataclasses.replace(example.record, **change)
    config = AugmentConfig(probability=1.0)
    assert augment(record, example.jpeg, "<OD>", config, random.Random(0)) is None


def test_a_resumed_stream_moves_its_examples_alike(tmp_path):
    urls = shard_urls(exported_world(tmp_path, images=12, seed=7, unit=12))
    config = AugmentConfig(probability=1.0)

    def stream(consumed: int = 0, augment: AugmentConfig | None = config) -> ExampleStream:
        return ExampleStream(urls, ["<OD>"], 0.01, 0, consumed=consumed, augment=augment)

    straight = stream().take(20)
    resumed = stream(consumed=8).take(12)
    assert [(e.image_id, e.target, e.jpeg) for e in straight[8:]] == [
        (e.image_id, e.target, e.jpeg) for e in resumed
    ]
    plain = stream(augment=None).take(20)
    assert [e.image_id for e in plain] == [e.image_id for e in straight]
    assert sum(a.target != b.target for a, b in zip(plain, straight, strict=True)) > 10
