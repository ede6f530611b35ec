"""``coco.json``: the exported object regions as a COCO detection file, loadable by
pycocotools, written beside a round's shards by the export stage.

It keeps the user's names and ids, so ``COCOeval`` against the user's own ground truth
needs no remapping:

- ``file_name``: the image's original file name, the last part of its uri; where
  exported images share one, each takes as many of its folders as tell it apart
  (``a/0.jpg``, ``b/0.jpg``; a tar member counts its shard as a folder). A COCO file's
  own ``file_name`` folders are kept only that way. ``fld_image_id`` (the key of the
  image's shard sample) and ``fld_uri`` say which record each image is.
- ``id``: an image ingested from a COCO file keeps its id there; any other image, and
  any that finds its id taken (two COCO files can give two images one id; the first in
  export order keeps it), gets one that no original id takes.
- categories: a human box keeps its COCO category id and name; any other object region
  takes the id of the user's category of the same name, else one that no original id
  takes. Only categories that label some exported human box are known here: a COCO
  file's categories without boxes are not kept by ingest.

OCR regions and proposals are not COCO categories and are left to the shards' JSON.

Names and ids depend on every exported image at once (which names clash, which ids
repeat), so they are worked out by DuckDB over a table of the images' uris and original
ids in a database file on local disk (``engine.duck.bounded_connection``): the driver
holds one unit's records at a time whatever the number of images.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from engine.duck import bounded_connection
from engine.records import CocoId, ImageRecord, Region, records_from_table
from engine.store import Store

# The file's marker, under its folder's markers: its size and what it was made from.
COCO_UNIT = "coco"
# A unit of the export: its key, and the image ids it exports (None: all of its rows).
CocoUnit = tuple[str, tuple[str, ...] | None]
# What coco.json needs of a record: no captions or phrases.
_COCO_COLUMNS = [
    "image_id", "uri", "source", "width", "height", "sha256", "regions", "coco_image_id",
]  # fmt: skip
# Where a uri's tail is cut to name an image in coco.json: folders, and tar members.
_SEPARATOR = re.compile("[/#]")
# DuckDB's memory for the names: the joins and nested groupings of millions of clashing
# paths need more room pinned at once than a plain grouping (3M paths sharing 1,000 file
# names failed in 64 MB); the driver's peak stays near 310 MB from 1M images up.
NAMING_MEMORY = "128MB"
# Rows fetched from DuckDB at a time while the file is written, and images inserted
# into it at a time (one insert per unit costs more than the unit when units are small).
_FETCH_ROWS = 10_000
_INSERT_ROWS = 10_000


def write_coco(
    store: Store,
    dataset: str,
    units: list[CocoUnit],
    relpath: str,
    shards: list[dict[str, Any]],
    inputs: str | None = None,
) -> None:
    """Write ``relpath`` for the object regions of ``units`` of ``dataset``, in export
    order. Three passes over the units, one unit read at a time: the images' uris and
    original ids (into DuckDB) and the distinct categories; the images; the annotations.
    The file is written under ``_staging/`` and moved into place, so a reader never
    meets it half-written.

    ``inputs``: what the file is made from (a fingerprint of the export units). It is
    recorded in a marker after the move, and a file already made from the same is not
    written again: a rerun of an export that changed nothing reads nothing."""
    folder, name = posixpath.split(relpath)
    if inputs is not None and store.is_current(folder, COCO_UNIT, inputs):
        return
    # (category id as stored, text) of every object region, in order of first appearance.
    stored: dict[tuple[str | None, str], None] = {}
    first_pass = ["image_id", "uri", "coco_image_id", "regions"]
    with _image_table() as images:
        for table in _unit_tables(store, dataset, units, first_pass):
            images.add(table.column("uri").to_pylist(), _values(table, "coco_image_id"))
            regions = pc.list_flatten(table.column("regions"))
            objects = regions.filter(pc.equal(pc.struct_field(regions, "kind"), "object"))
            ids = _values(objects, "category_id")
            texts = pc.struct_field(objects, "text").to_pylist()
            stored.update(dict.fromkeys(zip(ids, texts, strict=True)))
        labels = [(None if i is None else json.loads(i), text) for i, text in stored]
        category_ids, categories = _categories(labels)
        staged = store.staging_path(folder, name)
        store.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        with store.fs.open(staged, "w") as out:
            info = {
                "description": f"FLD export of {dataset}",
                "shards": [shard["name"] for shard in shards],
            }
            out.write(f'{{"info": {json.dumps(info)}, "images": [')
            columns = ["image_id", "uri", "width", "height"]
            rows = (
                row
                for table in _unit_tables(store, dataset, units, columns)
                for row in zip(*(table.column(c).to_pylist() for c in columns), strict=True)
            )
            for index, ((fld_id, uri, width, height), (file_name, image_id)) in enumerate(
                zip(rows, images.names_and_ids(), strict=True)
            ):
                image = {
                    "id": image_id,
                    "file_name": file_name,
                    "width": width,
                    "height": height,
                    "fld_image_id": fld_id,
                    "fld_uri": uri,
                }
                out.write(("," if index else "") + json.dumps(image))
            out.write('], "annotations": [')
            annotations = 0
            records = itertools.chain.from_iterable(_object_records(store, dataset, units))
            for record, (_, image_id) in zip(records, images.names_and_ids(), strict=True):
                for region in record.regions:
                    annotation = _annotation(record, region, image_id, category_ids)
                    annotations += 1
                    annotation["id"] = annotations
                    out.write(("," if annotations > 1 else "") + json.dumps(annotation))
            listed = [{"id": i, "name": label} for i, label in categories.items()]
            out.write(f'], "categories": {json.dumps(listed)}}}')
        size = store.fs.size(staged)
    store.publish(folder, [name])
    if inputs is not None:
        store.write_marker(folder, COCO_UNIT, {"part": name, "bytes": size, "inputs": inputs})


def _values(data: pa.Table | pa.StructArray, name: str) -> list[Any]:
    """A column (or struct field) as a list; all None where a part written before it
    was added lacks it, as ``records_from_table`` reads it."""
    if isinstance(data, pa.Table):
        return data.column(name).to_pylist() if name in data.column_names else [None] * len(data)
    names = [data.type.field(i).name for i in range(data.type.num_fields)]
    return pc.struct_field(data, name).to_pylist() if name in names else [None] * len(data)


def _unit_tables(
    store: Store, dataset: str, units: list[CocoUnit], columns: list[str]
) -> Iterator[pa.Table]:
    """``columns`` of each unit's exported rows, in export order (``columns`` names
    ``image_id``)."""
    for key, image_ids in units:
        table = store.read_unit(dataset, key, columns=columns)
        if image_ids is not None:
            wanted = pa.array(image_ids, pa.string())
            table = table.filter(pc.is_in(table.column("image_id"), value_set=wanted))
        yield table


def _object_records(
    store: Store, dataset: str, units: list[CocoUnit]
) -> Iterator[list[ImageRecord]]:
    """Each unit's exported records in export order, with their object regions only."""
    for table in _unit_tables(store, dataset, units, _COCO_COLUMNS):
        yield [
            replace(record, regions=[r for r in record.regions if r.kind == "object"])
            for record in records_from_table(table)
        ]


def _annotation(
    record: ImageRecord,
    region: Region,
    image_id: CocoId,
    category_ids: dict[tuple[CocoId | None, str], CocoId],
) -> dict[str, Any]:
    x0, y0, x1, y1 = region.box
    annotation = {
        "image_id": image_id,
        "category_id": category_ids[region.category_id, region.text],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": (x1 - x0) * (y1 - y0),
        "iscrowd": 0,
        "score": region.score,
        "source": region.source,
    }
    if region.polygons:
        annotation["segmentation"] = region.polygons
        rles = mask_utils.frPyObjects(region.polygons, record.height, record.width)
        annotation["area"] = float(mask_utils.area(mask_utils.merge(rles)))
    return annotation


class _ImageTable:
    """The exported images' uris and original ids, in export order, in a DuckDB table."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.rows = 0
        self._uris: list[str] = []
        self._originals: list[str | None] = []
        # Set once by ``_settle``, for both passes that read the names and ids.
        self.fresh_after: tuple[int | None, int | None, bool] = (None, None, False)
        self.repeated: set[str] | None = None
        # path: the uri without its scheme; starts: where each of its tails begins (after
        # each separator), so the tail of ``depth`` folders is path[starts[-depth]:].
        con.execute(
            "CREATE TABLE images (ord BIGINT, path VARCHAR, starts INTEGER[], original VARCHAR)"
        )

    def add(self, uris: list[str], originals: list[str | None]) -> None:
        """The next images in export order: their uris, and their original COCO ids as
        the records store them (JSON, so the integer 3 and the string "3" stay two)."""
        self._uris.extend(uris)
        self._originals.extend(originals)
        if len(self._uris) >= _INSERT_ROWS:
            self._insert()

    def _insert(self) -> None:
        uris, originals = self._uris, self._originals
        self._uris, self._originals = [], []
        paths = [uri.split("://", 1)[-1] for uri in uris]
        batch = pa.table(
            {
                "ord": pa.array(range(self.rows, self.rows + len(uris)), pa.int64()),
                "path": paths,
                "starts": [[m.end() for m in _SEPARATOR.finditer(path)] for path in paths],
                "original": pa.array(originals, pa.string()),
            }
        )
        self.con.register("batch", batch)
        self.con.execute("INSERT INTO images SELECT * FROM batch")
        self.con.unregister("batch")
        self.rows += len(uris)

    def _settle(self) -> None:
        """Work out, once, each image's file name (``names``, with ``deeper`` for those
        whose file name clashes) and what its id depends on beyond itself.

        A name is the shortest tail of the path, cut at ``/`` or ``#``, that no other
        path has: two paths that share a tail share every shorter one, so only the
        paths whose last part clashes are cut deeper, and each takes the first depth
        at which its tail is its own, else its deepest (two equal paths, one file
        ingested again after it changed, keep one name). Tables are made by queries,
        never updated in place, so every step can spill to disk."""
        self._insert()
        tail = (
            "CASE WHEN len(starts) = 0 THEN path ELSE path[starts[len(starts) - {d} + 1] + 1:] END"
        )
        self.con.execute(
            f"""
            CREATE TABLE names AS
            WITH last AS (SELECT *, {tail.format(d=1)} AS name FROM images),
                 clashes AS (SELECT name FROM last GROUP BY name HAVING count(*) > 1)
            SELECT *, name IN (SELECT name FROM clashes) AND len(starts) > 1 AS deepens
            FROM last
            """
        )
        self.con.execute(
            f"""
            CREATE TABLE deeper AS
            WITH depths AS (
                SELECT ord, original, path, starts, unnest(range(2, len(starts) + 1)) AS d
                FROM names WHERE deepens
            ),
            tails AS (SELECT ord, original, d, {tail.format(d="d")} AS tail FROM depths),
            counted AS (SELECT tail, count(*) AS n FROM tails GROUP BY tail)
            SELECT ord, any_value(original) AS original,
                   coalesce(arg_min(tail, d) FILTER (WHERE n = 1), arg_max(tail, d)) AS name
            FROM tails JOIN counted USING (tail) GROUP BY ord
            """
        )
        # Where fresh ids start (``_fresh_ids``' arguments), and the original ids that
        # more than one image has: the first in export order keeps it.
        [(largest, largest_text, any_original)] = self.con.execute(
            """
            SELECT max(TRY_CAST(original AS HUGEINT)),
                   max(TRY_CAST(original[2:-2] AS HUGEINT))
                       FILTER (WHERE regexp_full_match(original, '"[0-9]+"')),
                   bool_or(original IS NOT NULL)
            FROM images
            """
        ).fetchall()
        self.fresh_after = (largest, largest_text, bool(any_original))
        self.repeated = {
            original
            for (original,) in self.con.execute(
                "SELECT original FROM images WHERE original IS NOT NULL "
                "GROUP BY original HAVING count(*) > 1"
            ).fetchall()
        }

    def names_and_ids(self) -> Iterator[tuple[str, CocoId]]:
        """Each image's file name and id, in export order."""
        if self.repeated is None:
            self._settle()
        fresh = _fresh_ids(*self.fresh_after)
        seen: set[str] = set()
        rows = _streamed(
            self.con.execute(
                """
                SELECT name, original FROM (
                    SELECT ord, name, original FROM names WHERE NOT deepens
                    UNION ALL SELECT ord, name, original FROM deeper
                ) ORDER BY ord
                """
            )
        )
        for name, original in rows:
            if original in self.repeated:
                if original in seen:
                    original = None  # an earlier image keeps it: a fresh id
                else:
                    seen.add(original)
            yield name, json.loads(original) if original is not None else next(fresh)


def _streamed(result: duckdb.DuckDBPyConnection) -> Iterator[tuple[Any, ...]]:
    while chunk := result.fetchmany(_FETCH_ROWS):
        yield from chunk


@contextmanager
def _image_table() -> Iterator[_ImageTable]:
    with bounded_connection("images.duckdb", NAMING_MEMORY) as con:
        yield _ImageTable(con)


def _fresh_ids(
    largest: int | None, largest_text: int | None, any_original: bool
) -> Iterator[CocoId]:
    """Ids that no original id is: integers above ``largest`` (the largest integer id),
    or, when every original id is a string, such integers as strings above
    ``largest_text`` (the largest string id that reads as an integer), since COCOeval
    sorts the ids of a file and Python cannot order a string against an integer."""
    if largest is not None or not any_original:
        return itertools.count(int(largest or 0) + 1)
    return (str(n) for n in itertools.count(int(largest_text or 0) + 1))


def _file_names(uris: list[str]) -> list[str]:
    """The file name ``write_coco`` gives each of ``uris``."""
    with _image_table() as images:
        images.add(uris, [None] * len(uris))
        return [name for name, _ in images.names_and_ids()]


def _image_ids(originals: list[CocoId | None]) -> list[CocoId]:
    """The id ``write_coco`` gives each image of these original ids: its own where it
    has one not taken by an earlier image; a fresh one otherwise."""
    with _image_table() as images:
        texts = [None if o is None else json.dumps(o) for o in originals]
        images.add([f"{n}.jpg" for n in range(len(originals))], texts)
        return [image_id for _, image_id in images.names_and_ids()]


def _categories(
    labels: Iterable[tuple[CocoId | None, str]],
) -> tuple[dict[tuple[CocoId | None, str], CocoId], dict[CocoId, str]]:
    """``(region.category_id, region.text)`` of every exported object region, distinct and
    in order of first appearance -> each one's category id in the export, and the
    export's categories (id -> name): the users' first, in order of appearance.

    An original id keeps the first name it comes with; a box whose COCO files named its
    id otherwise is a category of its own name (like a machine region's text).
    """
    labels = list(labels)
    names: dict[CocoId, str] = {}
    for category_id, text in labels:
        if category_id is not None:
            names.setdefault(category_id, text)
    by_name: dict[str, CocoId] = {}
    for category_id, name in names.items():
        by_name.setdefault(name, category_id)
    integers = [i for i in names if isinstance(i, int)]
    numbers = [int(i) for i in names if isinstance(i, str) and i.isdigit()]
    fresh = _fresh_ids(max(integers, default=None), max(numbers, default=None), bool(names))
    ids: dict[tuple[CocoId | None, str], CocoId] = {}
    for key in labels:
        category_id, text = key
        if category_id is not None and names[category_id] == text:
            ids[key] = category_id
            continue
        if text not in by_name:
            by_name[text] = next(fresh)
            names[by_name[text]] = text
        ids[key] = by_name[text]
    return ids, names
