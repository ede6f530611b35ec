"""A generated world: images of shapes and signs whose annotations are known exactly.

The world is a yardstick for the engine. Each image is drawn from ``(seed, index)``
by ``engine.world.drawing``: a textured or gradient background, 1 to 10 shapes
(``SHAPES`` x ``COLOURS`` x ``SIZES``) that may overlap or touch, and sometimes signs
with printed words. Because it draws every pixel itself, it knows the truth exactly,
and this module turns that knowledge into engine records:

- **objects**: one region per object with a visible pixel, in draw order, its text
  the category phrase ("red circle", "white sign"). An object drawn but entirely
  covered is not in the truth.
- **boxes** ``[x0, y0, x1, y1]`` are the bounds of the visible mask in pixel-edge
  coordinates (pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``).
- **polygons** are the outlines of the visible mask (marching squares, then
  Douglas-Peucker within ``POLYGON_TOLERANCE`` pixels, keeping the extreme points so
  that their bounds are the box). A part with holes (a ring, or an object with a
  smaller one in front of it) is one polygon whose holes are joined to the outline by
  a two-way cut, which even-odd filling (pycocotools, PIL) renders as a hole.
- **OCR**: one ``ocr`` region per printed line (one word) after the objects, its quad
  the tight bounds of the rendered ink, clockwise from top-left.
- **captions** and **grounded phrases** from ``engine.world.captions``.

``generate_world`` writes the images with two files kept apart: ``ingest.json``, a
COCO file with the images only (what the engine ingests), and ``truth.json``, the full
truth: a COCO file with boxes, polygon segmentations, the visible area in pixels and
one category per colour and shape, plus, in each image entry, the extra keys
``sha256``, ``captions`` (kind -> text), ``phrases`` (caption kind, char
``start``/``end``, text, ``annotation_ids``) and ``ocr`` (text, quad, box).
``load_truth`` reads it back as engine records. Image ``i`` of a seed is the same
whatever ``count`` is.

The engine's stages know nothing of this module: it only produces inputs and answers.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from contourpy import FillType, contour_generator
from PIL import Image

from engine.records import CAPTION_KINDS, Caption, ImageRecord, Phrase, Region, image_id_for
from engine.world.captions import Scene, SceneObject, describe
from engine.world.drawing import (
    COLOURS,
    MAX_SIDE,
    MIN_SIDE,
    SHAPES,
    SIGN_PLATES,
    DrawnObject,
    draw_scene,
    grown,
    overlap,
)

TRUTH_SOURCE = "truth"
POLYGON_TOLERANCE = 1.0
_CATEGORIES = [f"{c} {s}" for s in SHAPES for c in COLOURS] + [f"{c} sign" for c in SIGN_PLATES]
CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(_CATEGORIES)}


@dataclass(frozen=True, slots=True)
class WorldPaths:
    """Where ``generate_world`` wrote a world: ``images`` (folder), ``ingest`` and ``truth``."""

    root: Path
    images: Path
    ingest: Path
    truth: Path
    count: int


@dataclass(slots=True)
class WorldImage:
    """One generated image: its PNG bytes, its truth as a record (``uri`` is the bare
    file name), the visible pixel count of each object region, and all that was drawn."""

    file_name: str
    png: bytes
    record: ImageRecord
    areas: list[int]
    drawn: list[DrawnObject]


# ---------------------------------------------------------------- public API


def generate_world(out_dir: str | Path, count: int, seed: int = 0, workers: int = 1) -> WorldPaths:
    """Draw ``count`` images of world ``seed`` into ``out_dir/images`` and write
    ``out_dir/ingest.json`` (images only) and ``out_dir/truth.json`` (everything).

    ``workers`` > 1 draws in that many processes; the files are the same either way,
    since image ``i`` depends only on ``(seed, i)``.
    """
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    draw = partial(_draw_and_write, seed, images_dir)
    if workers > 1:
        # Fresh interpreters: forking a process that holds threads (Ray's, say) can deadlock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            drawn = list(pool.map(draw, range(count), chunksize=16))
    else:
        drawn = [draw(index) for index in range(count)]
    ingest_images, truth_images, annotations = [], [], []
    for index, (record, areas) in enumerate(drawn):
        entry = {
            "id": index + 1,
            "file_name": f"images/{record.uri}",
            "width": record.width,
            "height": record.height,
        }
        ingest_images.append(entry)
        truth_image, truth_annotations = _truth_entry(record, areas, entry, len(annotations) + 1)
        truth_images.append(truth_image)
        annotations.extend(truth_annotations)
    categories = [
        {"id": i, "name": name, "supercategory": name.split()[-1]}
        for name, i in CATEGORY_IDS.items()
    ]
    paths = WorldPaths(root, images_dir, root / "ingest.json", root / "truth.json", count)
    ingest = {"images": ingest_images, "annotations": [], "categories": []}
    paths.ingest.write_text(json.dumps(ingest))
    truth = {"images": truth_images, "annotations": annotations, "categories": categories}
    paths.truth.write_text(json.dumps(truth))
    return paths


def _draw_and_write(seed: int, images_dir: Path, index: int) -> tuple[ImageRecord, list[int]]:
    item = render_image(seed, index)
    (images_dir / item.file_name).write_bytes(item.png)
    return item.record, item.areas


def load_truth(path: str | Path) -> dict[str, ImageRecord]:
    """The ground truth of ``truth.json`` as engine records (source ``"truth"``), keyed by
    the image's file name without folders (unique within a world). Regions are the
    image's annotations in file order, then its OCR lines; ``uri`` is the image file's
    ``file://`` URL, resolved beside ``path`` as the engine's COCO ingest resolves it."""
    path = Path(path)
    truth = json.loads(path.read_text())
    categories = {c["id"]: c["name"] for c in truth["categories"]}
    by_image: dict[int, list[dict]] = {image["id"]: [] for image in truth["images"]}
    for ann in truth["annotations"]:
        by_image[ann["image_id"]].append(ann)
    records = {}
    for image in truth["images"]:
        anns = sorted(by_image[image["id"]], key=lambda a: a["id"])
        regions = [
            Region(
                (x, y, x + w, y + h),
                categories[ann["category_id"]],
                "object",
                TRUTH_SOURCE,
                polygons=ann["segmentation"],
            )
            for ann in anns
            for x, y, w, h in [ann["bbox"]]
        ]
        regions += [
            Region(tuple(o["box"]), o["text"], "ocr", TRUTH_SOURCE, quad=o["quad"])
            for o in image["ocr"]
        ]
        index_of = {ann["id"]: i for i, ann in enumerate(anns)}
        phrases = [
            Phrase(
                p["caption"],
                p["start"],
                p["end"],
                p["text"],
                [index_of[a] for a in p["annotation_ids"]],
                TRUTH_SOURCE,
            )
            for p in image["phrases"]
        ]
        name = Path(image["file_name"]).name
        records[name] = ImageRecord(
            image_id=image_id_for(image["sha256"]),
            uri=(path.parent / image["file_name"]).resolve().as_uri(),
            source=TRUTH_SOURCE,
            width=image["width"],
            height=image["height"],
            sha256=image["sha256"],
            captions={k: Caption(t, TRUTH_SOURCE) for k, t in image["captions"].items()},
            regions=regions,
            phrases=phrases,
        )
    return records


def render_image(seed: int, index: int) -> WorldImage:
    """Image ``index`` of world ``seed``, with its exact truth; the same for the same
    arguments on any machine with the same Pillow (PNG bytes included)."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    pixels, style, colour, drawn = draw_scene(rng, width, height)
    buffer = io.BytesIO()
    # Lossless and fast: the visible masks must be exactly the pixels that show a colour.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    png = buffer.getvalue()

    visible = [o for o in drawn if o.visible.any()]
    regions = [
        Region(
            _mask_box(o),
            f"{o.colour} {o.noun}",
            "object",
            TRUTH_SOURCE,
            polygons=_polygons(o),
        )
        for o in visible
    ]
    areas = [int(o.visible.sum()) for o in visible]
    regions += [
        Region((qx0, qy0, qx1, qy1), line.word, "ocr", TRUTH_SOURCE, quad=_quad(qx0, qy0, qx1, qy1))
        for o in visible
        for line in o.lines
        for qx0, qy0, qx1, qy1 in [line.box(o.x, o.y)]
    ]
    scene = Scene(width, height, style, colour, tuple(_scene_objects(visible, regions)))
    captions, spans = describe(scene, rng)
    sha256 = hashlib.sha256(png).hexdigest()
    record = ImageRecord(
        image_id=image_id_for(sha256),
        uri=f"world-{seed}-{index:05d}.png",
        source=TRUTH_SOURCE,
        width=width,
        height=height,
        sha256=sha256,
        captions={k: Caption(captions[k], TRUTH_SOURCE) for k in CAPTION_KINDS},
        regions=regions,
        phrases=[
            Phrase(s.caption, s.start, s.end, s.text, list(s.regions), TRUTH_SOURCE) for s in spans
        ],
    )
    return WorldImage(record.uri, png, record, areas, drawn)


def _truth_entry(
    record: ImageRecord, areas: list[int], entry: dict, first_id: int
) -> tuple[dict, list[dict]]:
    objects = [r for r in record.regions if r.kind == "object"]
    annotations = [
        {
            "id": first_id + i,
            "image_id": entry["id"],
            "category_id": CATEGORY_IDS[r.text],
            "bbox": [r.box[0], r.box[1], r.box[2] - r.box[0], r.box[3] - r.box[1]],
            "area": area,
            "segmentation": r.polygons,
            "iscrowd": 0,
        }
        for i, (r, area) in enumerate(zip(objects, areas, strict=True))
    ]
    image = {
        **entry,
        "sha256": record.sha256,
        "captions": {k: c.text for k, c in record.captions.items()},
        "phrases": [
            {
                "caption": p.caption,
                "start": p.start,
                "end": p.end,
                "text": p.text,
                "annotation_ids": [first_id + i for i in p.regions],
            }
            for p in record.phrases
        ],
        "ocr": [
            {"text": r.text, "quad": r.quad, "box": list(r.box)}
            for r in record.regions
            if r.kind == "ocr"
        ],
    }
    return image, annotations


def _scene_objects(visible: list[DrawnObject], regions: list[Region]) -> list[SceneObject]:
    """What the captions may say about each visible object, with its relations."""
    hidden_by: list[list[tuple[int, int]]] = [[] for _ in visible]
    touching: list[list[int]] = [[] for _ in visible]
    for i, a in enumerate(visible):
        for j in range(i + 1, len(visible)):
            b = visible[j]
            common = overlap(a, b)
            covered = np.count_nonzero(a.mask[common[0]] & b.visible[common[1]]) if common else 0
            if covered:
                hidden_by[i].append((covered, j))
                continue
            near = overlap(b, a, grow=1)
            if near is not None and (b.visible[near[0]] & grown(a.visible)[near[1]]).any():
                touching[i].append(j)
                touching[j].append(i)
    return [
        SceneObject(
            region=i,
            noun=o.noun,
            colour=o.colour,
            size=o.size,
            box=regions[i].box,
            hidden_by=tuple(j for _, j in sorted(hidden_by[i], key=lambda c: -c[0])),
            touching=tuple(touching[i]),
            words=tuple(line.word for line in o.lines),
        )
        for i, o in enumerate(visible)
    ]


# ---------------------------------------------------------------- masks to geometry


def _mask_box(obj: DrawnObject) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(obj.visible.any(1)), np.flatnonzero(obj.visible.any(0))
    return (
        float(obj.x + cols[0]),
        float(obj.y + rows[0]),
        float(obj.x + cols[-1] + 1),
        float(obj.y + rows[-1] + 1),
    )


def _polygons(obj: DrawnObject) -> list[list[float]]:
    """The outline of the visible mask: one flat polygon per connected part, holes
    joined in, vertices on pixel edges, bounds equal to the mask's bounds."""
    padded = np.pad(obj.visible, 1).astype(np.float32)
    generator = contour_generator(z=padded, fill_type=FillType.OuterOffset)
    points, offsets = generator.filled(0.5, 2.0)
    # Array index i of the padded canvas is pixel centre i - 1 + 0.5 of the canvas.
    shift = np.array([obj.x - 0.5, obj.y - 0.5])
    polygons = []
    for part, bounds in zip(points, offsets, strict=True):
        rings = [_simplify(part[s:e] + shift) for s, e in itertools.pairwise(bounds)]
        outline = rings[0]
        for hole in rings[1:]:
            outline = _join_hole(outline, hole)
        polygons.append(outline.ravel().tolist())
    return polygons


def _simplify(ring: np.ndarray) -> np.ndarray:
    """Douglas-Peucker on a closed ring (first point repeated last), keeping the extreme
    points in x and y so that the bounds do not move."""
    points = ring[:-1]
    # Straight runs of the pixel outline first lose their middle points: a cheap cut that
    # leaves Douglas-Peucker far fewer points (the run's ends, which it keeps, remain).
    into, out = points - np.roll(points, 1, 0), np.roll(points, -1, 0) - points
    points = points[into[:, 0] * out[:, 1] != into[:, 1] * out[:, 0]]
    points = np.roll(points, -int(points[:, 0].argmin()), 0)
    closed = np.concatenate([points, points[:1]])
    n = len(points)
    anchors = sorted(
        {0, n, int(points[:, 0].argmax()), *(points[:, 1].argmin(), points[:, 1].argmax())}
    )
    keep = np.zeros(n + 1, bool)
    keep[anchors] = True
    stack = list(itertools.pairwise(anchors))
    while stack:
        lo, hi = stack.pop()
        if hi - lo < 2:
            continue
        a, d = closed[lo], closed[hi] - closed[lo]
        middle = closed[lo + 1 : hi] - a
        norm = np.hypot(d[0], d[1])
        if norm == 0:
            dist = np.hypot(middle[:, 0], middle[:, 1])
        else:
            dist = np.abs(d[0] * middle[:, 1] - d[1] * middle[:, 0]) / norm
        worst = int(dist.argmax())
        if dist[worst] > POLYGON_TOLERANCE:
            split = lo + 1 + worst
            keep[split] = True
            stack += [(lo, split), (split, hi)]
    return closed[:-1][keep[:-1]]


def _join_hole(outline: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One ring that walks the outline, goes to the hole along its shortest cut, walks
    the hole and comes back: under even-odd filling the cut, walked twice, adds nothing."""
    distances = ((outline[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    k, m = np.unravel_index(int(distances.argmin()), distances.shape)
    walked = np.roll(hole, -m, axis=0)
    return np.concatenate([outline[: k + 1], walked, walked[:1], outline[k:]])


def _quad(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]
