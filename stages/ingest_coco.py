"""COCO JSON inputs: images resolved beside the file, human boxes, polygons and captions.

Parsing and validation happen once on the driver. The index is built here rather than
by pycocotools, which raises on the first annotation that lacks a field: a bad label
must be refused on its own, never stop the run. What refers to nothing (an unknown
image or category) or cannot be a box (NaN, empty or negative size) is refused here
with a reason. Clipping to the image needs
the decoded size, so it happens in the ingest unit (``labels_to_regions``).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

import fsspec

from engine.geometry import all_finite, box_in_image, clip_points, is_valid_polygon
from engine.records import Caption, QuarantineEntry, Region

HUMAN_SOURCE = "human:coco"


@dataclass(frozen=True, slots=True)
class CocoBox:
    annotation_id: int | str
    category: str
    # COCO's [x, y, width, height], validated finite with positive size.
    bbox: tuple[float, float, float, float]
    polygons: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class HumanLabels:
    boxes: tuple[CocoBox, ...] = ()
    captions: tuple[str, ...] = ()


@dataclass
class CocoInput:
    """One COCO file: its images (uri -> labels) and the annotations it refused."""

    uri: str
    # The folder holding the file: its images are resolved, and must stay, inside it.
    folder: str
    images: dict[str, HumanLabels] = field(default_factory=dict)
    refused: list[QuarantineEntry] = field(default_factory=list)
    # Kept with a caveat, counted for the summary (e.g. captions beyond the first).
    notes: Counter[str] = field(default_factory=Counter)


def read_coco(uri: str, file: IO[bytes] | None = None) -> CocoInput:
    """Read and validate a COCO detection/segmentation or captions file.

    ``uri`` is any fsspec URL. ``file``: the file at ``uri`` already opened by the caller
    (ingest opens it only after checking what it is); None opens ``uri`` here. An image
    whose ``file_name`` leads out of the file's folder (``../``, an absolute path) is kept
    here and refused when read (``outside input root``), with its labels, like a missing
    image.
    """
    if file is None:
        with fsspec.open(uri, "rb") as f:
            dataset = json.load(f)
    else:
        dataset = json.load(file)
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError(f"{uri} is not a COCO file: no 'images' list")
    categories = {
        c.get("id"): str(c.get("name"))
        for c in dataset.get("categories", [])
        if isinstance(c, dict)
    }
    fs, path = fsspec.core.url_to_fs(uri)
    folder = posixpath.dirname(path)
    result = CocoInput(uri, fs.unstrip_protocol(folder))
    image_uris: dict[int, str] = {}
    for position, image in enumerate(dataset["images"]):
        file_name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(file_name, str) or "id" not in image:
            where = f"{uri}#images[{position}]"
            result.refused.append(_refuse(where, "image entry without id or file_name", ""))
            continue
        resolved = posixpath.normpath(posixpath.join(folder, file_name))
        image_uris[image["id"]] = fs.unstrip_protocol(resolved)

    boxes: dict[int, list[CocoBox]] = {i: [] for i in image_uris}
    captions: dict[int, list[str]] = {i: [] for i in image_uris}
    for position, ann in enumerate(dataset.get("annotations", [])):
        if not isinstance(ann, dict):
            result.refused.append(
                _refuse(f"{uri}#annotations[{position}]", "invalid annotation", "")
            )
            continue
        ann_id = ann.get("id", position)
        where = f"{uri}#annotation={ann_id}"
        image_id = ann.get("image_id")
        if image_id not in image_uris:
            result.refused.append(
                _refuse(where, "annotation of unknown image", f"image_id={image_id}")
            )
            continue
        if "caption" in ann:
            captions[image_id].append(str(ann["caption"]).strip())
            continue
        category = categories.get(ann.get("category_id"))
        if category is None:
            detail = f"category_id={ann.get('category_id')}"
            result.refused.append(_refuse(where, "annotation of unknown category", detail))
            continue
        problem = _bbox_problem(ann.get("bbox"))
        if problem:
            result.refused.append(_refuse(where, problem, f"bbox={ann.get('bbox')}"))
            continue
        polygons, polygon_problem = _polygons(ann.get("segmentation"))
        if polygon_problem:
            # The box is still good: keep it, and record that its mask was not taken.
            result.refused.append(_refuse(where, polygon_problem, "box kept without polygons"))
        boxes[image_id].append(CocoBox(ann_id, category, tuple(map(float, ann["bbox"])), polygons))

    for image_id, image_uri in image_uris.items():
        kept_captions = captions[image_id]
        if len(kept_captions) > 1:
            result.notes["captions beyond the first not kept"] += len(kept_captions) - 1
        result.images[image_uri] = HumanLabels(tuple(boxes[image_id]), tuple(kept_captions[:1]))
    return result


def labels_to_regions(
    labels: HumanLabels, width: int, height: int, uri: str
) -> tuple[list[Region], dict[str, Caption], list[QuarantineEntry], Counter[str]]:
    """Human labels of one decoded image as record parts, clipped to the image.

    Returns regions, captions, refused annotations (a box entirely outside the image)
    and counts of what was changed (``box clipped to image``).
    """
    regions: list[Region] = []
    refused: list[QuarantineEntry] = []
    changed: Counter[str] = Counter()
    for box in labels.boxes:
        x, y, w, h = box.bbox
        clipped = box_in_image((x, y, x + w, y + h), width, height)
        if clipped is None:
            where = f"{uri}#annotation={box.annotation_id}"
            refused.append(_refuse(where, "box outside image", f"bbox={list(box.bbox)}"))
            continue
        if clipped != (x, y, x + w, y + h):
            changed["box clipped to image"] += 1
        polygons = [clip_points(p, width, height) for p in box.polygons] or None
        regions.append(Region(clipped, box.category, "object", HUMAN_SOURCE, polygons=polygons))
    captions = {"brief": Caption(labels.captions[0], HUMAN_SOURCE)} if labels.captions else {}
    return regions, captions, refused, changed


def _refuse(where: str, reason: str, detail: str) -> QuarantineEntry:
    return QuarantineEntry(
        uri=where, source=HUMAN_SOURCE, reason=reason, detail=detail, item="annotation"
    )


def _bbox_problem(bbox: object) -> str | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return "invalid box (not 4 numbers)"
    if not all_finite(bbox):
        return "invalid box (not finite)"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "invalid box (empty or negative size)"
    return None


def _polygons(segmentation: object) -> tuple[tuple[tuple[float, ...], ...], str | None]:
    if segmentation is None or segmentation == []:
        return (), None
    if isinstance(segmentation, dict):
        return (), "rle segmentation not converted to polygons"
    if not isinstance(segmentation, list):
        return (), "invalid segmentation"
    polygons = []
    for polygon in segmentation:
        if not (isinstance(polygon, list) and is_valid_polygon(polygon)):
            return (), "invalid segmentation"
        polygons.append(tuple(float(v) for v in polygon))
    return tuple(polygons), None
