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
from dataclasses import replace
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from engine.config import AugmentConfig
from refinement.targets import florence2_targets

if TYPE_CHECKING:
    from refinement.student_data import Example

AUGMENTED_TASKS = frozenset({"<OD>", "<REGION_PROPOSAL>"})
# The regions the augmented targets are made of.
_BOX_KINDS = ("object", "proposal")
# Crops are saved at this JPEG quality: close to the original, never a second blur.
_JPEG_QUALITY = 95


def augment(example: Example, config: AugmentConfig, rng: random.Random) -> Example:
    """``example`` cropped and mirrored at random (``config``), its target written for the
    moved boxes; the example itself when its task is not moved or the draw says no."""
    if example.task not in AUGMENTED_TASKS or example.record is None:
        return example
    if rng.random() >= config.probability:
        return example
    record = example.record
    boxes = [r for r in record.regions if r.kind in _BOX_KINDS]
    if not boxes:
        return example
    image = Image.open(io.BytesIO(example.jpeg)).convert("RGB")
    # Boxes are in the record's pixels; the shard's JPEG is the same image.
    width, height = image.size
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
    target = next((t for t in florence2_targets(cropped) if t.task == example.task), None)
    if target is None:
        return example
    picture = image.crop((left, top, right, bottom))
    if mirror:
        picture = ImageOps.mirror(picture)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=_JPEG_QUALITY)
    return replace(example, jpeg=out.getvalue(), target=target.target, record=cropped)


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
