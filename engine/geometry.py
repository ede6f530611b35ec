"""Image geometry, in one place: finite values, polygons, box areas and IoU, clipping.

The lowest layer of the engine: it imports nothing of the project but ``engine.records``,
so that records, specialists, filters, stages and evaluation can all use it.

Conventions shared by every function:
- a box is ``[x0, y0, x1, y1]`` in absolute pixels; an inverted box (``x1 < x0`` or
  ``y1 < y0``) has area 0, so it overlaps nothing;
- a polygon or quadrilateral is flat ``x, y, x, y, ...`` coordinates;
- IoU is ``intersection / (area_a + area_b - intersection)``, torchvision's formula for
  valid boxes, and 0 when the union is empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from engine.records import Box, Region

# ---------------------------------------------------------------- validity


def all_finite(values: Iterable[object]) -> bool:
    """Whether every value is a number other than NaN and +-infinity (True when empty).

    A number is anything ``math.isfinite`` takes: int, float, bool, NumPy and 0-d tensor
    scalars. Anything else (a string, ``None``, a list: what a JSON file can hold) counts
    as not finite rather than raising, so untrusted input is checked with the same call.
    """
    try:
        return all(math.isfinite(v) for v in values)  # type: ignore[arg-type]
    except TypeError:
        return False


def is_valid_polygon(coords: Sequence[object]) -> bool:
    """Whether flat ``coords`` make a polygon: at least 3 vertices (6 values), an even
    count, and every value finite (``all_finite``). What COCO, pycocotools and PIL's
    ``polygon`` need; self-intersection is not checked."""
    return len(coords) >= 6 and len(coords) % 2 == 0 and all_finite(coords)


# ---------------------------------------------------------------- areas and overlap


def box_area(box: Sequence[float]) -> float:
    """Area of ``box``; 0 for an empty or inverted one."""
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of the overlap of boxes ``a`` and ``b``; 0 when they do not overlap."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes; 0 when both are empty.

    For one pair in plain Python (evaluation loops, matching one box); ``pairwise_iou``
    gives the same values for many boxes at once.
    """
    inter = intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def boxes_array(regions: Sequence[Region]) -> np.ndarray:
    """The regions' boxes as a float64 array of shape ``(n, 4)`` (``(0, 4)`` for none)."""
    return np.asarray([r.box for r in regions], dtype=np.float64).reshape(-1, 4)


def pairwise_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4): an (n, m) array.

    A single box of shape (4,) counts as (1, 4). The same formula, and the same float64
    values, as ``iou``, computed in NumPy: for NMS, matching and merging many boxes.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0.0, None) * np.clip(a[:, 3] - a[:, 1], 0.0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    # Where the union is empty the division is 0 / 0: silenced, then replaced by 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


# ---------------------------------------------------------------- clipping to the image


def clip_points(coords: Sequence[float], width: float, height: float) -> list[float]:
    """Flat ``x, y, x, y, ...`` coordinates (polygons, quads) moved inside the image."""
    limits = (float(width), float(height))
    return [min(max(float(v), 0.0), limits[i % 2]) for i, v in enumerate(coords)]


def clip_box(box: Sequence[float], width: float, height: float) -> Box:
    """``box`` clipped to the image ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = clip_points(box, width, height)
    return (x0, y0, x1, y1)


def box_in_image(box: Sequence[float], width: float, height: float) -> Box | None:
    """``box`` clipped to the image; None when it is not finite or nothing of positive
    area is left inside (detectors also predict boxes in the padding around an image)."""
    if not all_finite(box):
        return None
    x0, y0, x1, y1 = clip_box(box, width, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
