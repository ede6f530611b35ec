"""Image geometry shared by specialists, ingest and filters: clipping to the image."""

from __future__ import annotations

import math
from collections.abc import Sequence

from engine.records import Box


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
    if not all(math.isfinite(float(v)) for v in box):
        return None
    x0, y0, x1, y1 = clip_box(box, width, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
