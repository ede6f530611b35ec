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
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig, ExportConfig
from engine.execution import run_units
from engine.layout import MANIFEST, RoundLayout, round_layout
from engine.manifest import keeps, kept_image_ids_by_unit, unit_image_ids
from engine.records import (
    IMAGE_COLUMN,
    RECORD_SCHEMA,
    ImageRecord,
    record_to_sample,
    records_from_table,
)
from engine.store import Store, fingerprint, records_dataset
from engine.summary import StageSummary
from refinement.targets import florence2_targets
from stages.export_coco import write_coco

# Fixed tar timestamps: exporting the same records twice gives identical bytes.
TAR_MTIME = 0


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
        write_coco(store, dataset, [(u.key, u.image_ids) for u in units], layout.coco, shards)
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
