"""Box-moving augmentation of the student's box tasks: a random crop that keeps every
object whole, mirrored half the time, with the target written again for the new boxes.

A round of the generated world has about a thousand images; a nightly budget shows each
of them to a small student a few dozen times, and such a student learns its ``<OD>``
targets by heart (its training loss falls while its held-out loss rises). A crop and a
mirror give every pass new coordinates for the same objects. The crop holds every object
and proposal box whole, so no object is cut out of the image while its label stays in
the target, and labels name no side, so the mirror changes none.

Only the image-level box tasks are moved (``AUGMENTED_TASKS``): their prompt holds no
box, and their target is the image's boxes alone. Captions may name where things are,
and region tasks carry a box in their prompt: those examples are left as they are.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageOps

from engine.config import AugmentConfig
from engine.geometry import all_finite
from engine.records import ImageRecord
from refinement.targets import florence2_targets

AUGMENTED_TASKS = frozenset({"<OD>", "<REGION_PROPOSAL>"})
# The regions the augmented targets are made of.
_BOX_KINDS = ("object", "proposal")
# Crops are saved at this JPEG quality: close to the original, never a second blur.
_JPEG_QUALITY = 95


@dataclass(frozen=True, slots=True)
class Moved:
    """An image moved by ``augment``: its JPEG, the task's target for it, and the record
    the target was written from."""

    jpeg: bytes
    target: str
    record: ImageRecord


def augment(
    record: ImageRecord, jpeg: bytes, task: str, config: AugmentConfig, rng: random.Random
) -> Moved | None:
    """The image cropped and mirrored at random (``config``), with ``task``'s target
    written for the moved boxes; None where the task is not moved or the draw says no."""
    if task not in AUGMENTED_TASKS or rng.random() >= config.probability:
        return None
    boxes = [r for r in record.regions if r.kind in _BOX_KINDS]
    # A box the crop cannot hold whole (not finite, or upside down) is left as it is.
    if not boxes or not all(_upright(r.box) for r in boxes):
        return None
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    width, height = image.size
    if (width, height) != (record.width, record.height):
        return None  # boxes are in the record's pixels: no crop of another size holds them
    left, right = _span(
        min(r.box[0] for r in boxes), max(r.box[2] for r in boxes), width, config, rng
    )
    top, bottom = _span(
        min(r.box[1] for r in boxes), max(r.box[3] for r in boxes), height, config, rng
    )
    mirror = config.flip and rng.random() < 0.5
    crop_width = right - left

    def moved(box: tuple[float, ...]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box[0] - left, box[1] - top, box[2] - left, box[3] - top
        return (crop_width - x1, y0, crop_width - x0, y1) if mirror else (x0, y0, x1, y1)

    regions = [replace(r, box=moved(r.box), polygons=None, quad=None) for r in boxes]
    cropped = replace(
        record, width=crop_width, height=bottom - top, regions=regions, captions={}, phrases=[]
    )
    target = next((t for t in florence2_targets(cropped) if t.task == task), None)
    if target is None:
        return None
    picture = image.crop((left, top, right, bottom))
    if mirror:
        picture = ImageOps.mirror(picture)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=_JPEG_QUALITY)
    return Moved(out.getvalue(), target.target, cropped)


def _upright(box: tuple[float, ...]) -> bool:
    x0, y0, x1, y1 = box
    return all_finite(box) and x0 <= x1 and y0 <= y1


def _span(
    low: float, high: float, size: int, config: AugmentConfig, rng: random.Random
) -> tuple[int, int]:
    """A random whole-pixel interval of ``[0, size]`` that holds ``[low, high]``, at least
    ``config.min_scale`` of ``size`` long."""
    low, high = max(0, math.floor(low)), min(size, math.ceil(high))
    shortest = max(high - low, round(config.min_scale * size), 1)
    length = rng.randint(min(shortest, size), size)
    start = rng.randint(max(0, high - length), min(low, size - length))
    return start, start + length
