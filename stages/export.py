"""Export a round as WebDataset shards (DESIGN.md sample format) plus a COCO JSON file.

One export unit per unit of the round's records (filtered, else merged, else the
manifest): it writes size-bounded shards named ``<unit>-<k>.tar`` and then a marker
listing them, so a rerun skips finished units and rewrites a half-written one under
the same names. Each sample is ``<image_id>.jpg`` and ``<image_id>.json``; the JSON
carries the record and its Florence-2 task targets (``refinement.targets``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from pycocotools import mask as mask_utils

from engine.config import EngineConfig, ExportConfig
from engine.execution import run_units
from engine.records import IMAGE_COLUMN, ImageRecord, records_from_table
from engine.store import Store, kept_image_ids_by_unit, records_dataset, round_dir
from engine.summary import StageSummary
from refinement.targets import florence2_targets

MANIFEST = "manifest"
# Fixed tar timestamps: exporting the same records twice gives identical bytes.
TAR_MTIME = 0.0


def shards_dir(round_number: int) -> str:
    return f"shards/{round_dir(round_number)}"


@dataclass(frozen=True, slots=True)
class ExportUnit:
    key: str
    store_url: str
    records_dataset: str
    # The manifest rows of this unit that the manifest view keeps (first of each image).
    image_ids: tuple[str, ...]
    out_dir: str
    config: ExportConfig


def run_export(store: Store, config: EngineConfig, round_number: int) -> StageSummary:
    dataset = records_dataset(store, round_number)
    out_dir = shards_dir(round_number)
    # Round datasets are cut into the manifest's units; export what the round has committed.
    committed = set(store.committed_units(dataset))
    units = [
        ExportUnit(key, store.url, dataset, ids, out_dir, config.export)
        for key, ids in kept_image_ids_by_unit(store).items()
        if key in committed
    ]
    summary = run_units(
        "export",
        export_unit,
        units,
        done=lambda unit: store.is_committed(out_dir, unit.key),
        num_cpus=config.ray.task_cpus,
    )
    shards = write_shard_index(store, out_dir)
    if config.export.coco:
        write_coco(store, dataset, units, posixpath.join(out_dir, "coco.json"), shards)
    summary.location = store.path(out_dir)
    return summary


def export_unit(unit: ExportUnit) -> StageSummary:
    store = Store(unit.store_url)
    summary = StageSummary("export")
    wanted = set(unit.image_ids)
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
        for r in records_from_table(store.read_unit(unit.records_dataset, unit.key))
        if r.image_id in wanted
    ]
    summary.inputs = len(records)
    shards: list[dict[str, Any]] = []
    writer = None
    for record in records:
        sample = {
            "__key__": record.image_id,
            "jpg": image_by_id[record.image_id],
            "json": json.dumps(sample_json(record), ensure_ascii=False).encode(),
        }
        size = len(sample["jpg"]) + len(sample["json"])
        full = shards and (
            shards[-1]["samples"] >= unit.config.shard_max_samples
            or shards[-1]["bytes"] + size > unit.config.shard_max_bytes
        )
        if writer is None or full:
            if writer is not None:
                writer.close()
            name = f"{unit.key}-{len(shards):05d}.tar"
            shards.append({"name": name, "samples": 0, "bytes": 0})
            path = store.path(unit.out_dir, name)
            store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            writer = wds.TarWriter(store.fs.open(path, "wb"), encoder=False, mtime=TAR_MTIME)
            # TarWriter closes only files it opened itself; hand it ours to close.
            writer.own_fileobj = writer.tarstream.fileobj
        writer.write(sample)
        shards[-1]["samples"] += 1
        shards[-1]["bytes"] += size
    if writer is not None:
        writer.close()
    summary.outputs = len(records)
    store.write_marker(unit.out_dir, unit.key, {"shards": shards})
    return summary


def sample_json(record: ImageRecord) -> dict[str, Any]:
    """The ``<key>.json`` of a sample, exactly as DESIGN.md's export format."""
    return {
        "image_id": record.image_id,
        "width": record.width,
        "height": record.height,
        "source": record.source,
        "captions": {
            kind: record.caption_text(kind) for kind in ("brief", "detailed", "more_detailed")
        },
        "regions": [
            {
                "box": list(region.box),
                "text": region.text,
                "kind": region.kind,
                "score": region.score,
                "source": region.source,
                "polygons": region.polygons,
                "quad": region.quad,
            }
            for region in record.regions
        ],
        "phrases": [
            {
                "caption": phrase.caption,
                "start": phrase.start,
                "end": phrase.end,
                "text": phrase.text,
                "regions": phrase.regions,
            }
            for phrase in record.phrases
        ],
        "florence2": [
            {"task": t.task, "input": t.input, "target": t.target}
            for t in florence2_targets(record)
        ],
    }


def write_shard_index(store: Store, out_dir: str) -> list[dict[str, Any]]:
    """``_index.json``: every committed shard in order, for ``wds.WebDataset(urls)``."""
    shards = []
    for unit in store.committed_units(out_dir):
        shards.extend(store.read_marker(out_dir, unit)["shards"])
    index = {
        "shards": [store.fs.unstrip_protocol(store.path(out_dir, s["name"])) for s in shards],
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "detail": shards,
    }
    store.write_bytes(posixpath.join(out_dir, "_index.json"), json.dumps(index, indent=1).encode())
    return shards


def write_coco(
    store: Store,
    dataset: str,
    units: list[ExportUnit],
    relpath: str,
    shards: list[dict[str, Any]],
) -> None:
    """A COCO detection file of the exported object regions, loadable by pycocotools.

    Images are named ``<image_id>.jpg`` as in the shards. OCR regions and proposals are
    not COCO categories and are left to the shards' JSON.
    """
    images, annotations = [], []
    categories: dict[str, int] = {}
    for unit in units:
        wanted = set(unit.image_ids)
        for record in records_from_table(store.read_unit(dataset, unit.key)):
            if record.image_id not in wanted:
                continue
            image_number = len(images) + 1
            images.append(
                {
                    "id": image_number,
                    "file_name": f"{record.image_id}.jpg",
                    "width": record.width,
                    "height": record.height,
                    "fld_image_id": record.image_id,
                }
            )
            for region in record.regions:
                if region.kind != "object":
                    continue
                x0, y0, x1, y1 = region.box
                category = categories.setdefault(region.text, len(categories) + 1)
                annotation = {
                    "id": len(annotations) + 1,
                    "image_id": image_number,
                    "category_id": category,
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
                annotations.append(annotation)
    coco = {
        "info": {"description": f"FLD export of {dataset}", "shards": [s["name"] for s in shards]},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
    }
    store.write_bytes(relpath, json.dumps(coco).encode())
