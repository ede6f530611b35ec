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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import fsspec

from engine.config import IngestConfig
from engine.geometry import all_finite, box_in_image, clip_points, is_valid_polygon
from engine.records import Caption, CocoId, QuarantineEntry, Region

HUMAN_SOURCE = "human:coco"


@dataclass(frozen=True, slots=True)
class CocoBox:
    annotation_id: CocoId
    category: str
    # Kept so that an export names the category by the user's own id (Region.category_id).
    category_id: CocoId
    # COCO's [x, y, width, height], validated finite with positive size.
    bbox: tuple[float, float, float, float]
    polygons: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class HumanLabels:
    boxes: tuple[CocoBox, ...] = ()
    captions: tuple[str, ...] = ()
    # The image's id in the COCO file (ImageRecord.coco_image_id).
    image_id: CocoId | None = None


def unite(labels: list[HumanLabels]) -> HumanLabels:
    """The labels of one image from several COCO files (boxes in ``instances_*.json``,
    captions in ``captions_*.json``): all of them, each once, in file order.

    The image keeps the first file's id. COCO's own files agree on it; files that do not
    cannot all be honoured by one export, and the first is the one ingest resolves the
    image against (``stages.ingest._coco_item``).
    """
    return HumanLabels(
        boxes=tuple(dict.fromkeys(box for found in labels for box in found.boxes)),
        captions=tuple(dict.fromkeys(text for found in labels for text in found.captions)),
        image_id=next((found.image_id for found in labels if found.image_id is not None), None),
    )


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


def read_coco(
    uri: str,
    file: IO[bytes] | None = None,
    *,
    max_labels_per_image: int = IngestConfig().max_labels_per_image,
) -> CocoInput:
    """Read and validate a COCO detection/segmentation or captions file.

    ``uri`` is any fsspec URL. ``file``: the file at ``uri`` already opened by the caller
    (ingest opens it only after checking what it is); None opens ``uri`` here. An image
    whose ``file_name`` leads out of the file's folder (``../``, an absolute path) is kept
    here and refused when read (``outside input root``), with its labels, like a missing
    image. An image named by more than ``max_labels_per_image`` annotations is refused
    here, with all of them, before any of them is validated: its cost stays that of
    counting them.

    Raises ValueError, with a one-line reason, for a file that is not COCO as a whole
    (not JSON, nested too deeply, ``images``, ``annotations`` or ``categories`` not a
    list, a category that is not an object with an id); a bad image or annotation entry
    is refused on its own.
    """
    dataset = _load(uri, file)
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError("no 'images' list")
    categories = _categories(_listed(dataset, "categories"))
    annotations = _listed(dataset, "annotations")
    fs, path = fsspec.core.url_to_fs(uri)
    folder = posixpath.dirname(path)
    result = CocoInput(uri, fs.unstrip_protocol(folder))
    image_uris: dict[int | str, str] = {}
    for position, image in enumerate(dataset["images"]):
        where = f"{uri}#images[{position}]"
        file_name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(file_name, str) or "id" not in image:
            result.refused.append(_refuse(where, "image entry without id or file_name", ""))
            continue
        image_id = image["id"]
        if not _is_id(image_id):
            result.refused.append(
                _refuse(where, "image entry with an invalid id", f"id={image_id!r}")
            )
            continue
        if image_id in image_uris:
            # A second image under one id would take the first one's labels, or its place.
            detail = f"id={image_id!r} is also {image_uris[image_id]}"
            result.refused.append(_refuse(where, "image entry with a duplicate id", detail))
            continue
        resolved = posixpath.normpath(posixpath.join(folder, file_name))
        image_uris[image_id] = fs.unstrip_protocol(resolved)

    # Counted before anything else is done with the labels, so an image with a million of
    # them costs one pass of counting, not a million boxes built and then thrown away.
    label_counts = Counter(
        ann.get("image_id")
        for ann in annotations
        if isinstance(ann, dict) and _is_id(ann.get("image_id"))
    )
    # In file order, so that a rerun quarantines them in the same order.
    over_limit = [i for i in image_uris if label_counts[i] > max_labels_per_image]
    source = f"coco:{posixpath.basename(path)}"
    for image_id in over_limit:
        detail = (
            f"{label_counts[image_id]} labels, over ingest.max_labels_per_image="
            f"{max_labels_per_image}; none of them kept"
        )
        result.refused.append(
            QuarantineEntry(image_uris.pop(image_id), source, "too many labels", detail)
        )
    refused_images = set(over_limit)

    boxes: dict[int | str, list[CocoBox]] = {i: [] for i in image_uris}
    captions: dict[int | str, list[str]] = {i: [] for i in image_uris}
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            result.refused.append(
                _refuse(f"{uri}#annotations[{position}]", "invalid annotation", "")
            )
            continue
        image_id = ann.get("image_id")
        if _is_id(image_id) and image_id in refused_images:
            continue
        ann_id = ann.get("id", position)
        if not _is_id(ann_id):
            where = f"{uri}#annotations[{position}]"
            result.refused.append(_refuse(where, "invalid annotation id", f"id={ann_id!r}"))
            continue
        where = f"{uri}#annotation={ann_id}"
        if not _is_id(image_id) or image_id not in image_uris:
            result.refused.append(
                _refuse(where, "annotation of unknown image", f"image_id={image_id}")
            )
            continue
        if "caption" in ann:
            caption = ann["caption"]
            if isinstance(caption, str):
                captions[image_id].append(caption.strip())
            else:
                result.refused.append(_refuse(where, "invalid caption", f"caption={caption!r}"))
            continue
        category_id = ann.get("category_id")
        category = categories.get(category_id) if _is_id(category_id) else None
        if category is None:
            detail = f"category_id={category_id}"
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
        bbox = tuple(map(float, ann["bbox"]))
        boxes[image_id].append(CocoBox(ann_id, category, category_id, bbox, polygons))

    for image_id, image_uri in image_uris.items():
        kept_captions = captions[image_id]
        if len(kept_captions) > 1:
            result.notes["captions beyond the first not kept"] += len(kept_captions) - 1
        result.images[image_uri] = HumanLabels(
            tuple(boxes[image_id]), tuple(kept_captions[:1]), image_id
        )
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
        regions.append(
            Region(
                clipped,
                box.category,
                "object",
                HUMAN_SOURCE,
                polygons=polygons,
                category_id=box.category_id,
            )
        )
    captions = {"brief": Caption(labels.captions[0], HUMAN_SOURCE)} if labels.captions else {}
    return regions, captions, refused, changed


def _load(uri: str, file: IO[bytes] | None) -> object:
    """The parsed JSON; ValueError for what is not JSON or is nested too deeply."""
    try:
        if file is None:
            with fsspec.open(uri, "rb") as f:
                return json.load(f)
        return json.load(file)
    except RecursionError:
        # The parser recurses once per level: [[[[...]]]] deeper than Python's recursion
        # limit is no COCO file, and would otherwise end the run with a traceback.
        raise ValueError("JSON nested too deeply") from None


def _listed(dataset: dict, key: str) -> list:
    """``dataset[key]``, a list; [] when absent; ValueError when it is something else."""
    value = dataset.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key!r} is not a list but {type(value).__name__}")
    return value


def _categories(entries: list) -> dict[int | str, str]:
    """Category id -> name. A category that cannot be told apart by its id makes every
    annotation's category doubtful, so it is an error of the file, not of one entry."""
    categories = {}
    for position, category in enumerate(entries):
        if not isinstance(category, dict) or not _is_id(category.get("id")):
            raise ValueError(
                f"categories[{position}] is not an object with an integer or string id"
            )
        categories[category["id"]] = str(category.get("name"))
    return categories


def _is_id(value: object) -> bool:
    """Whether ``value`` can be a COCO id: an int (not a bool, which equals 0 or 1, nor a
    float, which would equal an int id) or a string, as some COCO-like files use."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def _refuse(where: str, reason: str, detail: str) -> QuarantineEntry:
    return QuarantineEntry(
        uri=where, source=HUMAN_SOURCE, reason=reason, detail=detail, item="annotation"
    )


def _bbox_problem(bbox: object) -> str | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return "invalid box (not 4 numbers)"
    if not _no_overflow(all_finite, bbox):
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
        if not (isinstance(polygon, list) and _no_overflow(is_valid_polygon, polygon)):
            return (), "invalid segmentation"
        polygons.append(tuple(float(v) for v in polygon))
    return tuple(polygons), None


def _no_overflow(check: Callable[[list], bool], values: list) -> bool:
    """``check(values)``, False for an int too large for a float: JSON allows any number
    of digits, and ``math.isfinite`` raises OverflowError on such an int."""
    try:
        return check(values)
    except OverflowError:
        return False
