"""Box-prompted segmentation with SAM: one mask per object box, written as polygons.

For every ``object`` region of a record, SAM's mask decoder is prompted with the box;
the mask becomes COCO-style polygons (flat ``[x0, y0, x1, y1, ...]`` lists in absolute
pixels, several parts for one object) and SAM's predicted IoU becomes the region score.
All boxes of one image go through the mask decoder in one pass; the image encoder, the
expensive part, runs once per batch of images.

Polygons are made by ``mask_to_polygons`` (marching squares, then Douglas-Peucker) and
kept only when the area pycocotools rasterises from them agrees with the mask's pixel
count: a region whose mask could not be expressed faithfully keeps its box and score
with ``polygons=None``, so the filter stage can still judge it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import measure

from engine.config import SpecialistConfig
from engine.geometry import box_in_image
from engine.records import Region
from specialists.base import Annotations, Specialist, SpecialistInput, load_pretrained

if TYPE_CHECKING:
    import torch

# Full-size masks upsampled at once: bounds memory for images with hundreds of boxes.
_MASKS_PER_UPSAMPLE = 16
# 8-connected foreground, so diagonal pixels belong to one part; marching squares is told
# the same (fully_connected="high"), and holes are then 4-connected background.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def mask_to_polygons(
    mask: np.ndarray, tolerance: float = 1.0, min_area_fraction: float = 0.01
) -> list[list[float]]:
    """Polygons of a binary mask, in the pixel-edge coordinates COCO uses.

    Pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``. Contours are traced by
    marching squares at half height, so a polygon's area matches its pixel count to a
    fraction of a pixel per corner, then simplified by Douglas-Peucker with ``tolerance``
    pixels (0 keeps every contour vertex).

    Holes: COCO reads the polygons of one object as a union and Florence-2's ``<sep>``
    parts mean the same, so neither can say "minus this hole". Holes of at least
    ``min_area_fraction`` of the mask are kept by cutting their part along a pixel column
    through each such hole: every piece is then hole-free, and the union of the pieces is
    the mask, holes included. Smaller holes are filled and smaller separate parts
    dropped: for SAM they are mostly speckle, and together they stay within the area
    tolerance that ``SAMSpecialist`` checks.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return []
    # Work on the mask's bounding box only: images are large, masks are often small.
    top, left = int(rows.min()), int(cols.min())
    crop = mask[top : rows.max() + 1, left : cols.max() + 1]
    min_area = min_area_fraction * rows.size
    labels, _ = ndimage.label(crop, structure=_EIGHT_CONNECTED)
    height, width = mask.shape
    polygons = []
    for index, where in enumerate(ndimage.find_objects(labels), start=1):
        part = labels[where] == index
        if part.sum() < min_area:
            continue
        for strip, strip_left in _hole_free_strips(part, min_area):
            filled = np.pad(ndimage.binary_fill_holes(strip), 1).astype(np.uint8)
            for contour in measure.find_contours(filled, 0.5, fully_connected="high"):
                # A closed contour repeats its first vertex at the end.
                vertices = measure.approximate_polygon(contour, tolerance)[:-1]
                if len(vertices) < 3:
                    continue
                # -1 undoes the padding, +0.5 moves from pixel centres to pixel edges.
                ys = np.clip(vertices[:, 0] - 0.5 + top + where[0].start, 0, height)
                xs = np.clip(vertices[:, 1] - 0.5 + left + where[1].start + strip_left, 0, width)
                polygons.append([float(v) for pair in zip(xs, ys, strict=True) for v in pair])
    return polygons


def _hole_free_strips(part: np.ndarray, min_area: float) -> list[tuple[np.ndarray, int]]:
    """``part`` cut into column strips so that no strip encloses a hole of ``min_area``.

    A cut at a column the hole occupies opens the hole on both sides: every piece of the
    (4-connected) hole on either side of the cut reaches the cut column.
    """
    holes, _ = ndimage.label(ndimage.binary_fill_holes(part) & ~part)
    cuts = set()
    for index, where in enumerate(ndimage.find_objects(holes), start=1):
        hole_rows, hole_cols = np.nonzero(holes[where] == index)
        if hole_rows.size >= min_area:
            # A 4-connected set occupies every column between its extremes, so the median
            # column holds hole pixels.
            cuts.add(int(np.median(hole_cols)) + where[1].start)
    edges = [0, *sorted(cuts), part.shape[1]]
    return [(part[:, a:b], a) for a, b in itertools.pairwise(edges)]


def polygons_area(polygons: list[list[float]], height: int, width: int) -> float:
    """Pixels covered by the union of ``polygons``, as pycocotools rasterises them."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return float(mask_utils.area(mask_utils.merge(rles)))


def checked_polygons(
    mask: np.ndarray, tolerance: float, min_area_fraction: float, area_tolerance: float
) -> list[list[float]] | None:
    """``mask_to_polygons``, or None when the mask is empty or the polygons' rasterised
    area is not within ``area_tolerance`` (a fraction) of the mask's pixel count."""
    polygons = mask_to_polygons(mask, tolerance, min_area_fraction)
    if not polygons:
        return None
    mask_area = int(np.count_nonzero(mask))
    drawn = polygons_area(polygons, *mask.shape)
    return polygons if abs(drawn - mask_area) <= area_tolerance * mask_area else None


class SAMSpecialist(Specialist):
    """Polygons for the object boxes other specialists (or human labels) produced.

    Output: one region per input ``object`` region, in input order, with the input's text
    and its box clipped to the image (boxes with no area inside the image are skipped).
    ``score`` is SAM's predicted IoU of the chosen mask, clipped to [0, 1]; ``polygons``
    is None when the mask is empty or its polygons fail the area check.
    """

    produces = frozenset({"polygons"})
    needs = frozenset({"objects"})
    requires_model = True

    def __init__(
        self,
        config: SpecialistConfig,
        multimask_output: bool = False,
        mask_threshold: float = 0.0,
        simplify_tolerance: float = 1.0,
        min_area_fraction: float = 0.01,
        area_tolerance: float = 0.1,
    ) -> None:
        """Options:

        - ``multimask_output``: False uses SAM's single-mask output, which SAM trains for
          unambiguous prompts such as a box; True asks for its three masks (whole, part,
          subpart) and keeps the one with the highest predicted IoU, which can rescue
          loose boxes at the cost of sometimes choosing a part of the object.
        - ``mask_threshold``: logit above which a pixel is in the mask (SAM's own is 0).
        - ``simplify_tolerance``: Douglas-Peucker tolerance in pixels.
        - ``min_area_fraction``: holes and separate parts smaller than this fraction of
          the mask are filled or dropped (see ``mask_to_polygons``).
        - ``area_tolerance``: polygons are kept when their rasterised area is within this
          fraction of the mask's pixel count.
        """
        super().__init__(config)
        if simplify_tolerance < 0:
            raise ValueError(f"simplify_tolerance must be >= 0, got {simplify_tolerance}")
        if not 0 <= min_area_fraction < 1:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")
        if area_tolerance < 0:
            raise ValueError(f"area_tolerance must be >= 0, got {area_tolerance}")
        self.multimask_output = multimask_output
        self.mask_threshold = mask_threshold
        self.simplify_tolerance = simplify_tolerance
        self.min_area_fraction = min_area_fraction
        self.area_tolerance = area_tolerance
        self._model = None
        self._processor = None

    def setup(self) -> None:
        from transformers import SamModel, SamProcessor

        loaded = load_pretrained(self.config, SamModel, SamProcessor)
        self._model, self._processor = loaded.model, loaded.processor
        self._loaded_revision = loaded.model_revision

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        import torch

        results = []
        prompted = []  # (image, its regions), for images with at least one box
        for item in batch:
            width, height = item.image.size
            regions = []
            for region in item.record.regions:
                box = box_in_image(region.box, width, height) if region.kind == "object" else None
                if box is not None:
                    regions.append(Region(box, region.text, "object", source=""))
            results.append(Annotations(regions=regions))
            if regions:
                prompted.append((item.image, regions))
        if not prompted:
            return results
        with torch.inference_mode():
            self._segment(prompted)
        return results

    def _segment(self, prompted: list[tuple[Image.Image, list[Region]]]) -> None:
        """Fill in the polygons and scores of ``prompted`` regions, in place."""
        encoding = self._processor(images=[image for image, _ in prompted], return_tensors="pt")
        pixel_values = encoding["pixel_values"].to(self.device, self._model.dtype)
        embeddings = self._model.get_image_embeddings(pixel_values)
        sizes = encoding["original_sizes"].tolist()
        reshaped = encoding["reshaped_input_sizes"].tolist()
        for k, (_, regions) in enumerate(prompted):
            self._segment_image(embeddings[k : k + 1], sizes[k], reshaped[k], regions)

    def _segment_image(
        self, embedding: torch.Tensor, size: list[int], reshaped: list[int], regions: list[Region]
    ) -> None:
        """All boxes of one image through the mask decoder in one pass."""
        import torch

        (height, width), (new_height, new_width) = size, reshaped
        # The processor's own box normalisation: coordinates of the resized image.
        scale = torch.tensor([new_width / width, new_height / height] * 2)
        boxes = torch.tensor([region.box for region in regions], dtype=torch.float32) * scale
        output = self._model(
            image_embeddings=embedding,
            input_boxes=boxes[None].to(self.device),
            multimask_output=self.multimask_output,
        )
        iou, best = output.iou_scores[0].float().max(dim=-1)
        # The chosen mask of each box, as (boxes, 1, height, width) for the post-processor.
        rows = torch.arange(len(regions), device=best.device)
        low_res = output.pred_masks[0, rows, best][:, None].float()
        for start in range(0, len(regions), _MASKS_PER_UPSAMPLE):
            chunk = low_res[start : start + _MASKS_PER_UPSAMPLE]
            (masks,) = self._processor.post_process_masks(
                [chunk], [size], [reshaped], mask_threshold=self.mask_threshold
            )
            for offset, mask in enumerate(masks[:, 0].cpu().numpy()):
                region = regions[start + offset]
                region.score = min(max(float(iou[start + offset]), 0.0), 1.0)
                region.polygons = checked_polygons(
                    mask, self.simplify_tolerance, self.min_area_fraction, self.area_tolerance
                )
