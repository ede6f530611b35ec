"""The one image record of the engine, its parts, and their Arrow schemas.

Every stage reads and writes these classes; Parquet parts hold them in the Arrow
layout defined here. Coordinates are absolute pixels of the EXIF-corrected image.
Each annotation carries its lineage: ``source`` (who produced it: ``human:coco``,
``ocr:rapidocr@3.10.0``, ...) and ``round`` (the refinement round; ``None`` for
labels that came in with the input).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

CAPTION_KINDS: tuple[str, ...] = ("brief", "detailed", "more_detailed")
REGION_KINDS: tuple[str, ...] = ("object", "ocr", "proposal")
# The ``source`` of every label an image came with (``human:coco``, ...).
HUMAN_PREFIX = "human:"

Box = tuple[float, float, float, float]
# A COCO image or category id as the user's file has it: COCO uses integers, some
# COCO-like files strings; either is kept as it came, so an export can give it back.
CocoId = int | str


@dataclass(slots=True)
class TextStats:
    """What a spaCy parse of a caption found; stored beside the caption it judges."""

    objects: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    proper_nouns: list[str] = field(default_factory=list)
    object_complexity: float = 0.0
    action_complexity: float = 0.0


@dataclass(slots=True)
class Caption:
    text: str
    source: str
    score: float | None = None
    round: int | None = None
    stats: TextStats | None = None


@dataclass(slots=True)
class Region:
    """A box with its text: a category phrase, a region description or OCR text."""

    box: Box
    text: str
    kind: str
    source: str
    score: float | None = None
    round: int | None = None
    # Each polygon is a flat [x0, y0, x1, y1, ...] list; several parts for one object.
    polygons: list[list[float]] | None = None
    # OCR quadrilateral, clockwise from top-left: [x1, y1, ..., x4, y4].
    quad: list[float] | None = None
    # The category id of a box that came from a COCO file; None for every other region.
    category_id: CocoId | None = None

    def __post_init__(self) -> None:
        if self.kind not in REGION_KINDS:
            raise ValueError(f"region kind {self.kind!r} is not one of {REGION_KINDS}")
        self.box = tuple(float(v) for v in self.box)  # type: ignore[assignment]
        if len(self.box) != 4:
            raise ValueError(f"a box has 4 coordinates, got {len(self.box)}")


@dataclass(slots=True)
class Phrase:
    """A caption substring ``caption_text[start:end]`` grounded to regions by index."""

    caption: str
    start: int
    end: int
    text: str
    regions: list[int]
    source: str
    score: float | None = None
    round: int | None = None

    def __post_init__(self) -> None:
        if self.caption not in CAPTION_KINDS:
            raise ValueError(f"phrase caption {self.caption!r} is not one of {CAPTION_KINDS}")


@dataclass(slots=True)
class ImageRecord:
    """Everything the engine knows about one unique image."""

    image_id: str
    uri: str
    source: str
    width: int
    height: int
    sha256: str
    captions: dict[str, Caption] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    phrases: list[Phrase] = field(default_factory=list)
    # The image's id in the COCO file that named it (the first one, when several did);
    # None for images that came without COCO labels.
    coco_image_id: CocoId | None = None

    def __post_init__(self) -> None:
        unknown = set(self.captions) - set(CAPTION_KINDS)
        if unknown:
            raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {CAPTION_KINDS}")

    def caption_text(self, kind: str) -> str | None:
        caption = self.captions.get(kind)
        return caption.text if caption else None

    def has_human_labels(self) -> bool:
        return any(
            a.source.startswith(HUMAN_PREFIX)
            for a in (*self.captions.values(), *self.regions, *self.phrases)
        )


@dataclass(slots=True)
class QuarantineEntry:
    """An input, or an input's annotation, that the engine refused, and why."""

    uri: str
    source: str
    reason: str
    detail: str = ""
    # "input" for a refused file or tar member, "annotation" for a refused human label.
    item: str = "input"
    sha256: str | None = None


def image_id_for(sha256_hex: str) -> str:
    """Stable image id: the leading 24 hex digits (96 bits) of the content hash."""
    return sha256_hex[:24]


# ---------------------------------------------------------------- Arrow schemas

# COCO ids are stored as their JSON text (``397133``, ``"a7"``): one column holds
# integers and strings alike, each read back as the type it had, at any size.
COCO_ID_TYPE = pa.string()
_LINEAGE = [
    pa.field("source", pa.string(), nullable=False),
    pa.field("score", pa.float64()),
    pa.field("round", pa.int32()),
]
TEXT_STATS_TYPE = pa.struct(
    [
        pa.field("objects", pa.list_(pa.string())),
        pa.field("attributes", pa.list_(pa.string())),
        pa.field("actions", pa.list_(pa.string())),
        pa.field("proper_nouns", pa.list_(pa.string())),
        pa.field("object_complexity", pa.float64()),
        pa.field("action_complexity", pa.float64()),
    ]
)
CAPTION_TYPE = pa.struct(
    [pa.field("text", pa.string(), nullable=False), *_LINEAGE, pa.field("stats", TEXT_STATS_TYPE)]
)
REGION_TYPE = pa.struct(
    [
        pa.field("box", pa.list_(pa.float64(), 4), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        *_LINEAGE,
        pa.field("polygons", pa.list_(pa.list_(pa.float64()))),
        pa.field("quad", pa.list_(pa.float64(), 8)),
        pa.field("category_id", COCO_ID_TYPE),
    ]
)
PHRASE_TYPE = pa.struct(
    [
        pa.field("caption", pa.string(), nullable=False),
        pa.field("start", pa.int32(), nullable=False),
        pa.field("end", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("regions", pa.list_(pa.int32()), nullable=False),
        *_LINEAGE,
    ]
)
RECORD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("captions", pa.struct([pa.field(k, CAPTION_TYPE) for k in CAPTION_KINDS])),
        pa.field("regions", pa.list_(REGION_TYPE)),
        pa.field("phrases", pa.list_(PHRASE_TYPE)),
        pa.field("coco_image_id", COCO_ID_TYPE),
    ]
)
# The manifest also holds the image itself: RGB JPEG bytes, EXIF orientation applied.
IMAGE_COLUMN = "image"
MANIFEST_SCHEMA = RECORD_SCHEMA.append(pa.field(IMAGE_COLUMN, pa.binary(), nullable=False))
# A specialist's output for one image; ``error`` says why an image has no annotations
# when the model failed on it (the rest of its batch goes on).
ANNOTATION_SCHEMA = RECORD_SCHEMA.append(pa.field("error", pa.string()))
# Records a filter dropped keep their content and say why.
DROPPED_SCHEMA = RECORD_SCHEMA.append(pa.field("reason", pa.string(), nullable=False))
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
    ]
)


# ---------------------------------------------------------------- converters


def _record_row(record: ImageRecord) -> dict[str, Any]:
    row = dataclasses.asdict(record)
    row["captions"] = {kind: row["captions"].get(kind) for kind in CAPTION_KINDS}
    row["coco_image_id"] = _coco_id_text(record.coco_image_id)
    for region in row["regions"]:
        region["category_id"] = _coco_id_text(region["category_id"])
    return row


def _coco_id_text(value: CocoId | None) -> str | None:
    return None if value is None else json.dumps(value)


def _coco_id(text: str | None) -> CocoId | None:
    return None if text is None else json.loads(text)


def records_to_table(
    records: Sequence[ImageRecord], images: Sequence[bytes] | None = None
) -> pa.Table:
    """Records as an Arrow table; with ``images`` (one per record) in the manifest layout."""
    rows = [_record_row(r) for r in records]
    if images is None:
        return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    if len(images) != len(rows):
        raise ValueError(f"{len(rows)} records but {len(images)} images")
    for row, image in zip(rows, images, strict=True):
        row[IMAGE_COLUMN] = image
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _floats(values: Iterable[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _caption_from_row(row: dict[str, Any] | None) -> Caption | None:
    if row is None:
        return None
    stats = row.get("stats")
    return Caption(
        text=row["text"],
        source=row["source"],
        score=row["score"],
        round=row["round"],
        stats=TextStats(**stats) if stats is not None else None,
    )


def record_from_row(row: dict[str, Any]) -> ImageRecord:
    """One row of a table in any of the record layouts. Extra columns are ignored; the
    COCO ids, absent from parts written before they were kept, are read as None."""
    captions = {}
    for kind in CAPTION_KINDS:
        caption = _caption_from_row((row.get("captions") or {}).get(kind))
        if caption is not None:
            captions[kind] = caption
    regions = [
        Region(
            box=tuple(r["box"]),
            text=r["text"],
            kind=r["kind"],
            source=r["source"],
            score=r["score"],
            round=r["round"],
            polygons=[_floats(p) for p in r["polygons"]] if r["polygons"] is not None else None,
            quad=_floats(r["quad"]),
            # Absent from parts written before COCO ids were kept.
            category_id=_coco_id(r.get("category_id")),
        )
        for r in row.get("regions") or []
    ]
    phrases = [Phrase(**p) for p in row.get("phrases") or []]
    return ImageRecord(
        image_id=row["image_id"],
        uri=row["uri"],
        source=row["source"],
        width=row["width"],
        height=row["height"],
        sha256=row["sha256"],
        captions=captions,
        regions=regions,
        phrases=phrases,
        coco_image_id=_coco_id(row.get("coco_image_id")),
    )


def records_from_table(table: pa.Table) -> list[ImageRecord]:
    columns = [name for name in RECORD_SCHEMA.names if name in table.column_names]
    return [record_from_row(row) for row in table.select(columns).to_pylist()]


def quarantine_to_table(entries: Sequence[QuarantineEntry]) -> pa.Table:
    return pa.Table.from_pylist([dataclasses.asdict(e) for e in entries], schema=QUARANTINE_SCHEMA)


# ---------------------------------------------------------------- exported samples
#
# The ``<key>.json`` of a WebDataset sample (DESIGN.md, export format). It carries the
# image's provenance (``uri``, ``source``) and the regions' lineage, but not the
# captions' or phrases', nor ``sha256`` and the COCO ids: a trainer needs none of them,
# the image's bytes travel beside the JSON, and the COCO ids are in ``coco.json``.


def record_to_sample(record: ImageRecord) -> dict[str, Any]:
    """The sample JSON of a record, less ``florence2`` (stages/export.py adds the targets).

    Every caption kind is present, ``None`` when the record lacks it. The dict shares no
    list with the record.
    """
    return {
        "image_id": record.image_id,
        "uri": record.uri,
        "width": record.width,
        "height": record.height,
        "source": record.source,
        "captions": {kind: record.caption_text(kind) for kind in CAPTION_KINDS},
        "regions": [
            {
                "box": list(region.box),
                "text": region.text,
                "kind": region.kind,
                "score": region.score,
                "source": region.source,
                "polygons": None if region.polygons is None else [list(p) for p in region.polygons],
                "quad": None if region.quad is None else list(region.quad),
            }
            for region in record.regions
        ],
        "phrases": [
            {
                "caption": phrase.caption,
                "start": phrase.start,
                "end": phrase.end,
                "text": phrase.text,
                "regions": list(phrase.regions),
            }
            for phrase in record.phrases
        ],
    }


def record_from_sample(sample: Any) -> ImageRecord:
    """The record of a sample JSON (parsed); ValueError saying where it is not the format.

    The inverse of :func:`record_to_sample`: every field of the format must be present
    with its type (``null`` only where the format allows it), and keys outside the format
    (``florence2``) are ignored. ``uri`` may be absent, as in shards exported before it
    was added, and comes back ``""`` then. What the format does not carry comes back
    empty: ``sha256`` ``""``, the captions' and phrases' ``source`` ``""`` with ``score``
    and ``round`` None, the regions' ``round`` and ``category_id`` None, the record's
    ``coco_image_id`` None. Values are checked, not cross-checked:
    a non-finite box or a phrase pointing past the regions is left for the reader to
    ignore, as the engine's own stages do.
    """
    if not isinstance(sample, dict):
        raise ValueError(f"a sample is a JSON object, not {_kind(sample)}")
    image_id = _get(sample, "image_id", "sample", str)
    uri = _get(sample, "uri", "sample", str) if "uri" in sample else ""
    source = _get(sample, "source", "sample", str)
    width, height = (_get(sample, key, "sample", int) for key in ("width", "height"))
    if width <= 0 or height <= 0:
        raise ValueError(f"sample: an image of {width}x{height} pixels")
    captions_in = _get(sample, "captions", "sample", dict)
    unknown = set(captions_in) - set(CAPTION_KINDS)
    if unknown:
        raise ValueError(f"sample: unknown caption kinds {sorted(unknown)}")
    captions = {}
    for kind in CAPTION_KINDS:
        text = _get(captions_in, kind, "captions", str, nullable=True)
        if text is not None:
            captions[kind] = Caption(text, source="")
    regions = []
    for i, region in enumerate(_get(sample, "regions", "sample", list)):
        where = f"regions[{i}]"
        if not isinstance(region, dict):
            raise ValueError(f"{where} is {_kind(region)}, not an object")
        polygons = _get(region, "polygons", where, list, nullable=True)
        quad = _get(region, "quad", where, list, nullable=True)
        score = _get(region, "score", where, (int, float), nullable=True)
        regions.append(
            Region(
                box=tuple(_numbers(_get(region, "box", where, list), f"{where}.box", 4)),
                text=_get(region, "text", where, str),
                kind=_get(region, "kind", where, str, choices=REGION_KINDS),
                source=_get(region, "source", where, str),
                score=None if score is None else float(score),
                polygons=None
                if polygons is None
                else [_numbers(p, f"{where}.polygons[{k}]") for k, p in enumerate(polygons)],
                quad=None if quad is None else _numbers(quad, f"{where}.quad", 8),
            )
        )
    phrases = []
    for i, phrase in enumerate(_get(sample, "phrases", "sample", list)):
        where = f"phrases[{i}]"
        if not isinstance(phrase, dict):
            raise ValueError(f"{where} is {_kind(phrase)}, not an object")
        indices = _get(phrase, "regions", where, list)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in indices):
            raise ValueError(f"{where}: region indices are integers")
        phrases.append(
            Phrase(
                caption=_get(phrase, "caption", where, str, choices=CAPTION_KINDS),
                start=_get(phrase, "start", where, int),
                end=_get(phrase, "end", where, int),
                text=_get(phrase, "text", where, str),
                regions=list(indices),
                source="",
            )
        )
    return ImageRecord(
        image_id=image_id,
        uri=uri,
        source=source,
        width=width,
        height=height,
        sha256="",
        captions=captions,
        regions=regions,
        phrases=phrases,
    )


def _kind(value: Any) -> str:
    """A JSON value's kind, for messages: ``a list``, ``null``..."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _get(
    obj: dict[str, Any],
    key: str,
    where: str,
    types: type | tuple[type, ...],
    *,
    nullable: bool = False,
    choices: Sequence[str] | None = None,
) -> Any:
    """``obj[key]``, checked to be of ``types`` (a JSON ``true`` is never a number)."""
    if key not in obj:
        raise ValueError(f"{where} has no {key!r}")
    value = obj[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{where}: {key!r} is {_kind(value)}")
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: {key!r} is {value!r}, not one of {tuple(choices)}")
    return value


def _numbers(values: Any, where: str, count: int | None = None) -> list[float]:
    """A JSON list of numbers as floats; NaN and infinities pass (readers skip them)."""
    if not isinstance(values, list):
        raise ValueError(f"{where} is {_kind(values)}, not a list of numbers")
    if count is not None and len(values) != count:
        raise ValueError(f"{where} has {len(values)} values, not {count}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where} holds something other than numbers")
    return [float(v) for v in values]
