"""The report's gallery: a deterministic sample of images with their annotations drawn on.

Boxes, polygons (filled, translucent), OCR quadrilaterals and region labels are drawn
with PIL; each region gets the colour ``region_colour(index)``, which the page reuses
for the grounded phrases listed under the image, so a phrase and its box match.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import duckdb
from PIL import Image, ImageColor, ImageDraw, ImageFont

from engine.geometry import all_finite, is_valid_polygon
from engine.layout import MANIFEST
from engine.records import IMAGE_COLUMN, ImageRecord, records_from_table
from engine.store import Store

# Distinct on photographs and on each other (Sasha Trubetskoy's list of 20, first 12).
PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
    "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#000075",
)  # fmt: skip
# Longest side of a drawn image: large enough to read labels, small enough for a page of many.
# Small images are enlarged to it too, so that labels keep one size across the gallery.
SIDE = 640
LABEL_CHARS = 32
POLYGON_ALPHA = 80


def region_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def records_for(con: duckdb.DuckDBPyConnection, image_ids: Sequence[str]) -> list[ImageRecord]:
    """The records of ``image_ids`` (of the connection's ``records``), in that order."""
    listed = ", ".join("'" + i.replace("'", "''") + "'" for i in image_ids) or "NULL"
    chosen = con.sql(f"SELECT * FROM records WHERE image_id IN ({listed})").to_arrow_table()
    by_id = {r.image_id: r for r in records_from_table(chosen)}
    return [by_id[i] for i in image_ids if i in by_id]


def dropped_examples(
    store: Store, dataset: str, wanted: Mapping[str, int]
) -> list[tuple[str, ImageRecord]]:
    """Up to ``wanted[reason]`` rows of the dropped ``dataset`` per reason, as
    ``(reason, record)`` in the order of ``wanted``, the first rows in unit order.

    Reads each unit's reason column, and the rest of a unit only when it holds a wanted
    row; stops once every reason has its rows. Memory stays bounded by one part.
    """
    left = dict(wanted)
    found: dict[str, list[ImageRecord]] = {reason: [] for reason in wanted}
    for unit in store.committed_units(dataset):
        if not any(n > 0 for n in left.values()):
            break
        reasons = store.read_unit(dataset, unit, columns=["reason"]).column("reason")
        rows = []
        for row, reason in enumerate(reasons.to_pylist()):
            if left.get(reason, 0) > 0:
                left[reason] -= 1
                rows.append(row)
        if rows:
            part = store.read_unit(dataset, unit).take(rows)
            records = records_from_table(part)
            for reason, record in zip(part.column("reason").to_pylist(), records, strict=True):
                found[reason].append(record)
    return [(reason, record) for reason, records in found.items() for record in records]


def manifest_images(store: Store, image_ids: Sequence[str]) -> dict[str, bytes]:
    """JPEG bytes of ``image_ids`` from the manifest, the first copy in unit order.

    Reads one unit at a time, and its image column only when the unit holds a wanted
    image, so memory stays bounded by one part whatever the size of the manifest.
    """
    wanted = set(image_ids)
    images: dict[str, bytes] = {}
    for unit in store.committed_units(MANIFEST):
        if not wanted - images.keys():
            break
        ids = store.read_unit(MANIFEST, unit, columns=["image_id"]).column("image_id")
        if not any(i in wanted and i not in images for i in ids.to_pylist()):
            continue
        part = store.read_unit(MANIFEST, unit, columns=["image_id", IMAGE_COLUMN])
        for image_id, data in zip(
            part.column("image_id").to_pylist(), part.column(IMAGE_COLUMN).to_pylist(), strict=True
        ):
            if image_id in wanted and image_id not in images:
                images[image_id] = data
    return images


def draw(record: ImageRecord, jpeg: bytes, side: int = SIDE) -> bytes:
    """The image with the record's regions drawn on, as JPEG, ``side`` pixels on its long side."""
    with Image.open(io.BytesIO(jpeg)) as opened:
        image = opened.convert("RGB")
    scale = side / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    sx, sy = image.width / max(record.width, 1), image.height / max(record.height, 1)

    def scaled(flat: Sequence[float]) -> list[tuple[float, float]]:
        return [(x * sx, y * sy) for x, y in zip(flat[0::2], flat[1::2], strict=True)]

    # Polygons go on a separate layer so that their fill is translucent.
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer_draw = ImageDraw.Draw(layer)
    for index, region in enumerate(record.regions):
        rgb = ImageColor.getrgb(region_colour(index))
        for polygon in region.polygons or []:
            if is_valid_polygon(polygon):
                layer_draw.polygon(scaled(polygon), fill=(*rgb, POLYGON_ALPHA), outline=(*rgb, 255))
    image = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")

    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    for index, region in enumerate(record.regions):
        if not all_finite(region.box):
            continue
        colour = region_colour(index)
        x0, y0, x1, y1 = region.box
        left, top = min(x0, x1) * sx, min(y0, y1) * sy
        right, bottom = max(x0, x1) * sx, max(y0, y1) * sy
        if region.quad is not None and is_valid_polygon(region.quad):
            # The quadrilateral follows slanted text; the box around it would hide that.
            pen.polygon(scaled(region.quad), outline=colour, width=3)
        else:
            pen.rectangle((left, top, right, bottom), outline=colour, width=3)
        label = f"{index} {region.text}"[:LABEL_CHARS]
        # Above the box where there is room, so the label hides none of what it names.
        height = font.getbbox(label)[3] + 2
        anchor = (left, top - height if top >= height else top)
        pen.rectangle(pen.textbbox(anchor, label, font=font), fill=colour)
        pen.text(anchor, label, fill="white", font=font)

    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
