"""Export a round as WebDataset shards (DESIGN.md sample format) plus a COCO JSON file.

One export unit per unit of the round's records (filtered, else merged, else the
manifest): it writes size-bounded shards named ``<unit>-<inputs>-<k>.tar`` and then a
marker listing them, so a rerun skips finished units and rewrites a half-written one
under the same names. ``<inputs>`` is what the unit was exported from (the records'
and the manifest's units, the export settings: ``engine.store.fingerprint``): records
filtered again on other thresholds are exported again to new shards, and the shards
they replace are removed once the new marker is in, so shards, ``coco.json`` and the
filtered records always agree. Each sample is ``<image_id>.jpg`` and ``<image_id>.json``; the JSON
carries the record and its Florence-2 task targets (``refinement.targets``).
"""

from __future__ import annotations

import io
import itertools
import json
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from pycocotools import mask as mask_utils

from engine.config import EngineConfig, ExportConfig
from engine.execution import run_units
from engine.layout import MANIFEST, RoundLayout, round_layout
from engine.manifest import keeps, kept_image_ids_by_unit, unit_image_ids
from engine.records import (
    IMAGE_COLUMN,
    RECORD_SCHEMA,
    CocoId,
    ImageRecord,
    Region,
    record_to_sample,
    records_from_table,
)
from engine.store import Store, fingerprint, records_dataset
from engine.summary import StageSummary
from refinement.targets import florence2_targets

# Fixed tar timestamps: exporting the same records twice gives identical bytes.
TAR_MTIME = 0
# What coco.json needs of a record: no captions or phrases.
_COCO_COLUMNS = [
    "image_id", "uri", "source", "width", "height", "sha256", "regions", "coco_image_id",
]  # fmt: skip
# Where a uri's tail is cut to name an image in coco.json: folders, and tar members.
_SEPARATOR = re.compile("[/#]")


@dataclass(frozen=True, slots=True)
class ExportUnit:
    key: str
    store_url: str
    records_dataset: str
    # The manifest rows of this unit that the manifest view keeps; None: all of them.
    image_ids: tuple[str, ...] | None
    out_dir: str
    config: ExportConfig
    # What the unit is exported from (engine.store.fingerprint).
    inputs: str = ""


def run_export(store: Store, config: EngineConfig, round_number: int) -> StageSummary:
    dataset = records_dataset(store, round_number)
    layout = round_layout(round_number)
    out_dir = layout.shards
    # Round datasets are cut into the manifest's units; export what the round has committed.
    committed = set(store.committed_units(dataset))
    units = [
        ExportUnit(
            key,
            store.url,
            dataset,
            kept,
            out_dir,
            config.export,
            fingerprint(
                "export",
                config.export,
                unit_image_ids(store, key, kept),
                {d: store.marker_fingerprint(d, key) for d in (dataset, MANIFEST)},
            ),
        )
        for key, kept in kept_image_ids_by_unit(store).items()
        if key in committed
    ]
    summary = run_units(
        "export",
        export_unit,
        units,
        done=lambda unit: store.is_current(out_dir, unit.key, unit.inputs),
        committed=lambda unit: store.is_committed(out_dir, unit.key),
        num_cpus=config.ray.task_cpus,
    )
    shards = write_shard_index(store, layout)
    if config.export.coco:
        write_coco(store, dataset, units, layout.coco, shards)
    summary.location = store.path(out_dir)
    summary.held = sum(shard["samples"] for shard in shards)
    return summary


def export_unit(unit: ExportUnit) -> StageSummary:
    store = Store(unit.store_url)
    summary = StageSummary("export")
    wanted = None if unit.image_ids is None else set(unit.image_ids)
    images = store.read_unit(MANIFEST, unit.key, columns=["image_id", IMAGE_COLUMN])
    image_by_id = dict(
        zip(
            images.column("image_id").to_pylist(),
            images.column(IMAGE_COLUMN).to_pylist(),
            strict=True,
        )
    )
    records = [
        r
        for r in records_from_table(
            store.read_unit(unit.records_dataset, unit.key, columns=RECORD_SCHEMA.names)
        )
        if keeps(wanted, r.image_id)
    ]
    summary.inputs = len(records)
    shards: list[dict[str, Any]] = []
    prefix = f"{unit.key}-{unit.inputs}" if unit.inputs else unit.key
    with ShardWriter(store, unit.out_dir, prefix) as writer:
        for record in records:
            jpg = image_by_id[record.image_id]
            meta = json.dumps(sample_json(record), ensure_ascii=False).encode()
            size = len(jpg) + len(meta)
            full = shards and (
                shards[-1]["samples"] >= unit.config.shard_max_samples
                or shards[-1]["bytes"] + size > unit.config.shard_max_bytes
            )
            if not shards or full:
                shards.append({"name": writer.next_shard(), "samples": 0, "bytes": 0})
            writer.add(f"{record.image_id}.jpg", jpg)
            writer.add(f"{record.image_id}.json", meta)
            shards[-1]["samples"] += 1
            shards[-1]["bytes"] += size
    summary.outputs = len(records)
    # Committed as a store part is (engine/store.py): staged shards, the replaced ones
    # removed, the marker, then the shards moved into the folder readers list.
    names = [shard["name"] for shard in shards]
    for shard in shards:
        shard["file_bytes"] = store.fs.size(store.staging_path(unit.out_dir, shard["name"]))
    store.remove_replaced(unit.out_dir, unit.key, names)
    store.write_marker(unit.out_dir, unit.key, {"shards": shards, "inputs": unit.inputs})
    store.publish(unit.out_dir, names)
    return summary


class ShardWriter:
    """Writes ``<prefix>-00000.tar``, ``<prefix>-00001.tar``... one at a time, staged
    (``Store.staging_path``) until their unit is committed.

    Plain ``tarfile`` in streaming mode: a WebDataset shard is an ordinary tar whose
    members of one sample share a key, and writing it needs no more (webdataset's own
    writer would import torch into every export worker). Fixed owner and mtime make the
    bytes a function of the records alone.
    """

    def __init__(self, store: Store, out_dir: str, prefix: str) -> None:
        self.store, self.out_dir, self.prefix = store, out_dir, prefix
        self.count = 0
        self._file = None
        self._tar: tarfile.TarFile | None = None

    def next_shard(self) -> str:
        self.close()
        name = f"{self.prefix}-{self.count:05d}.tar"
        self.count += 1
        path = self.store.staging_path(self.out_dir, name)
        self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._file = self.store.fs.open(path, "wb")
        # Closed in close(): a shard stays open across many add() calls.
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        return name

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uname = info.gname = "fld"
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sample_json(record: ImageRecord) -> dict[str, Any]:
    """The ``<key>.json`` of a sample in DESIGN.md's export format, plus the image's
    ``uri``: the record (``engine.records.record_to_sample``) and its Florence-2 task
    targets."""
    targets = [
        {"task": t.task, "input": t.input, "target": t.target} for t in florence2_targets(record)
    ]
    return {**record_to_sample(record), "florence2": targets}


def write_shard_index(store: Store, layout: RoundLayout) -> list[dict[str, Any]]:
    """``_index.json``: every committed shard in order, for ``wds.WebDataset(urls)``."""
    out_dir = layout.shards
    shards = []
    for unit in store.committed_units(out_dir):
        shards.extend(store.read_marker(out_dir, unit)["shards"])
    index = {
        "shards": [store.fs.unstrip_protocol(store.path(out_dir, s["name"])) for s in shards],
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "detail": shards,
    }
    store.write_bytes(layout.shard_index, json.dumps(index, indent=1).encode())
    return shards


def write_coco(
    store: Store,
    dataset: str,
    units: list[ExportUnit],
    relpath: str,
    shards: list[dict[str, Any]],
) -> None:
    """A COCO detection file of the exported object regions, loadable by pycocotools.

    It keeps the user's names and ids, so ``COCOeval`` against the user's own ground
    truth needs no remapping:

    - ``file_name``: the image's original file name, the last part of its uri; where
      exported images share one, each takes as many of its folders as tell it apart
      (``a/0.jpg``, ``b/0.jpg``; a tar member counts its shard as a folder). A COCO
      file's own ``file_name`` folders are kept only that way. ``fld_image_id`` (the key
      of the image's shard sample) and ``fld_uri`` say which record each image is.
    - ``id``: an image ingested from a COCO file keeps its id there; any other image,
      and any that finds its id taken (two COCO files can give two images one id; the
      first in export order keeps it), gets one that no original id takes.
    - categories: a human box keeps its COCO category id and name; any other object
      region takes the id of the user's category of the same name, else one that no
      original id takes. Only categories that label some exported human box are known
      here: a COCO file's categories without boxes are not kept by ingest.

    OCR regions and proposals are not COCO categories and are left to the shards' JSON.

    Streamed: a first pass over the units gathers what names and ids depend on (each
    image's uri and original id, the distinct categories), then the images and the
    annotations are written unit by unit, so the driver holds a name and an id per
    image, never the records. The file is written under ``_staging/`` and moved into
    place, so a reader never meets it half-written.
    """
    uris: list[str] = []
    originals: list[CocoId | None] = []
    labels: dict[tuple[CocoId | None, str], None] = {}  # in order of first appearance
    for record in _object_records(store, dataset, units):
        uris.append(record.uri)
        originals.append(record.coco_image_id)
        labels.update(dict.fromkeys((r.category_id, r.text) for r in record.regions))
    file_names = _file_names(uris)
    image_ids = _image_ids(originals)
    category_ids, categories = _categories(labels)
    folder, name = posixpath.split(relpath)
    staged = store.staging_path(folder, name)
    store.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
    with store.fs.open(staged, "w") as out:
        info = {"description": f"FLD export of {dataset}", "shards": [s["name"] for s in shards]}
        out.write(f'{{"info": {json.dumps(info)}, "images": [')
        records = _object_records(store, dataset, units)
        for index, (record, file_name, image_id) in enumerate(
            zip(records, file_names, image_ids, strict=True)
        ):
            image = {
                "id": image_id,
                "file_name": file_name,
                "width": record.width,
                "height": record.height,
                "fld_image_id": record.image_id,
                "fld_uri": record.uri,
            }
            out.write(("," if index else "") + json.dumps(image))
        out.write('], "annotations": [')
        annotations = 0
        for record, image_id in zip(_object_records(store, dataset, units), image_ids, strict=True):
            for region in record.regions:
                annotation = _annotation(record, region, image_id, category_ids)
                annotations += 1
                annotation["id"] = annotations
                out.write(("," if annotations > 1 else "") + json.dumps(annotation))
        listed = [{"id": i, "name": label} for i, label in categories.items()]
        out.write(f'], "categories": {json.dumps(listed)}}}')
    store.publish(folder, [name])


def _object_records(store: Store, dataset: str, units: list[ExportUnit]) -> Iterator[ImageRecord]:
    """The exported records in export order, with their object regions only, one unit
    read at a time."""
    for unit in units:
        wanted = None if unit.image_ids is None else set(unit.image_ids)
        table = store.read_unit(dataset, unit.key, columns=_COCO_COLUMNS)
        for record in records_from_table(table):
            if keeps(wanted, record.image_id):
                objects = [r for r in record.regions if r.kind == "object"]
                yield replace(record, regions=objects)


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


def _file_names(uris: list[str]) -> list[str]:
    """Each uri's shortest tail, cut at ``/`` or ``#``, that no other uri shares; two
    equal uris (one file ingested again after it changed) keep one name."""
    paths = [uri.split("://", 1)[-1] for uri in uris]
    cuts = [[m.end() for m in _SEPARATOR.finditer(path)] for path in paths]
    depths = [1] * len(paths)
    while True:
        names = [
            path[cut[-depth] :] if cut else path
            for path, cut, depth in zip(paths, cuts, depths, strict=True)
        ]
        counts = Counter(names)
        longer = [i for i, n in enumerate(names) if counts[n] > 1 and depths[i] < len(cuts[i])]
        if not longer:
            return names
        for i in longer:
            depths[i] += 1


def _fresh_ids(taken: Iterable[CocoId]) -> Iterator[CocoId]:
    """Ids that none of ``taken`` is: integers above the largest integer among them, or,
    when all of them are strings, such integers as strings, since COCOeval sorts the ids
    of a file and Python cannot order a string against an integer."""
    taken = set(taken)
    largest = max((i for i in taken if isinstance(i, int)), default=None)
    as_text = bool(taken) and largest is None
    for number in itertools.count((largest or 0) + 1):
        if not as_text:
            yield number
        elif str(number) not in taken:
            yield str(number)


def _image_ids(originals: list[CocoId | None]) -> list[CocoId]:
    """Each image's original COCO id where it has one not taken by an earlier image;
    a fresh one otherwise."""
    fresh = _fresh_ids(i for i in originals if i is not None)
    ids: list[CocoId] = []
    seen: set[CocoId] = set()
    for original in originals:
        image_id = original if original is not None and original not in seen else next(fresh)
        seen.add(image_id)
        ids.append(image_id)
    return ids


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
    fresh = _fresh_ids(names)
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
