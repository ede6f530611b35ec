"""The one image record of the engine, its parts, and their Arrow schemas.

Every stage reads and writes these classes; Parquet parts hold them in the Arrow
layout defined here. Coordinates are absolute pixels of the EXIF-corrected image.
Each annotation carries its lineage: ``source`` (who produced it: ``human:coco``,
``ocr:rapidocr@3.10.0``, ...) and ``round`` (the refinement round; ``None`` for
labels that came in with the input).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

CAPTION_KINDS: tuple[str, ...] = ("brief", "detailed", "more_detailed")
REGION_KINDS: tuple[str, ...] = ("object", "ocr", "proposal")

Box = tuple[float, float, float, float]


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

    def __post_init__(self) -> None:
        unknown = set(self.captions) - set(CAPTION_KINDS)
        if unknown:
            raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {CAPTION_KINDS}")

    def caption_text(self, kind: str) -> str | None:
        caption = self.captions.get(kind)
        return caption.text if caption else None


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
    return row


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
    """One row of a table in any of the record layouts (extra columns are ignored)."""
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
    )


def records_from_table(table: pa.Table) -> list[ImageRecord]:
    columns = [name for name in RECORD_SCHEMA.names if name in table.column_names]
    return [record_from_row(row) for row in table.select(columns).to_pylist()]


def quarantine_to_table(entries: Sequence[QuarantineEntry]) -> pa.Table:
    return pa.Table.from_pylist([dataclasses.asdict(e) for e in entries], schema=QUARANTINE_SCHEMA)


def box_is_finite(box: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in box)
