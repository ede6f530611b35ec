"""Export a round as WebDataset shards (DESIGN.md sample format) plus a COCO JSON file.

Shards are sized by ``export.shard_max_samples`` and ``shard_max_bytes``, not by the
ingest unit: an export unit is a run of consecutive units of the round's records
(filtered, else merged, else the manifest) that together fill a shard, sized from the
manifest units' markers (rows and bytes, no data read); a unit larger than a shard is
an export unit of its own and writes several. Runs are cut greedily from the first
unit, so images added at the end change only the last run. An export unit writes its
shards, named ``<first unit>-<inputs>-<k>.tar``, then a marker listing them, so a
rerun skips finished ones and rewrites a half-written one under the same names.
``<inputs>`` is what it was exported from (its units of the records and the manifest,
the export settings: ``engine.store.fingerprint``): records filtered again on other
thresholds are exported again to new shards, and the shards they replace are removed
once the new marker is in; export units the plan no longer has (the shard size
changed) are removed after the run; so shards, ``coco.json`` and the filtered records
always agree. Each sample is ``<image_id>.jpg`` and ``<image_id>.json``; the JSON
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


# A unit of the round's records in an export unit: its key, and the manifest rows of
# it that the manifest view keeps (None: all of them).
Member = tuple[str, tuple[str, ...] | None]


@dataclass(frozen=True, slots=True)
class ExportUnit:
    # The key of its first member: export units sort as their members do.
    key: str
    store_url: str
    records_dataset: str
    members: tuple[Member, ...]
    out_dir: str
    config: ExportConfig
    # What the unit is exported from (engine.store.fingerprint).
    inputs: str = ""


def run_export(store: Store, config: EngineConfig, round_number: int) -> StageSummary:
    dataset = records_dataset(store, round_number)
    layout = round_layout(round_number)
    out_dir = layout.shards
    units = plan_export(store, config.export, dataset, out_dir)
    summary = run_units(
        "export",
        export_unit,
        units,
        done=lambda unit: store.is_current(out_dir, unit.key, unit.inputs),
        committed=lambda unit: store.is_committed(out_dir, unit.key),
        num_cpus=config.ray.task_cpus,
    )
    planned = {unit.key for unit in units}
    for stale in store.committed_units(out_dir):
        if stale not in planned:
            store.remove_unit(out_dir, stale)
    shards = write_shard_index(store, layout)
    if config.export.coco:
        members = [member for unit in units for member in unit.members]
        made_from = fingerprint("coco", [(unit.key, unit.inputs) for unit in units])
        write_coco(store, dataset, members, layout.coco, shards, made_from)
    summary.location = store.path(out_dir)
    summary.held = sum(shard["samples"] for shard in shards)
    return summary


def plan_export(store: Store, config: ExportConfig, dataset: str, out_dir: str) -> list[ExportUnit]:
    """The export units of the committed units of ``dataset``: runs of consecutive units
    whose kept manifest rows (and their bytes, in proportion) fill one shard."""
    committed = set(store.committed_units(dataset))
    runs: list[list[Member]] = []
    rows = size = 0.0
    for key, kept in kept_image_ids_by_unit(store).items():
        if key not in committed:
            continue
        marker = store.read_marker(MANIFEST, key)
        count = marker["rows"] if kept is None else len(kept)
        share = marker.get("bytes", 0) * count / max(marker["rows"], 1)
        fits = rows + count <= config.shard_max_samples and size + share <= config.shard_max_bytes
        if not runs or not fits:
            runs.append([])
            rows = size = 0
        runs[-1].append((key, kept))
        rows, size = rows + count, size + share
    units = []
    for run in runs:
        members = tuple(run)
        sources = [
            (
                unit_image_ids(store, key, kept),
                {d: store.marker_fingerprint(d, key) for d in (dataset, MANIFEST)},
            )
            for key, kept in members
        ]
        inputs = fingerprint("export", config, sources)
        units.append(
            ExportUnit(members[0][0], store.url, dataset, members, out_dir, config, inputs)
        )
    return units


def export_unit(unit: ExportUnit) -> StageSummary:
    store = Store(unit.store_url)
    summary = StageSummary("export")
    shards: list[dict[str, Any]] = []
    prefix = f"{unit.key}-{unit.inputs}" if unit.inputs else unit.key
    with ShardWriter(store, unit.out_dir, prefix) as writer:
        for key, image_ids in unit.members:  # one member's images in memory at a time
            for record, jpg in _samples(store, unit.records_dataset, key, image_ids):
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
                summary.inputs += 1
                summary.outputs += 1
    # Committed as a store part is (engine/store.py): staged shards, the replaced ones
    # removed, the marker, then the shards moved into the folder readers list.
    names = [shard["name"] for shard in shards]
    for shard in shards:
        shard["file_bytes"] = store.fs.size(store.staging_path(unit.out_dir, shard["name"]))
    store.remove_replaced(unit.out_dir, unit.key, names)
    members = [key for key, _ in unit.members]
    marker = {"shards": shards, "inputs": unit.inputs, "units": members}
    store.write_marker(unit.out_dir, unit.key, marker)
    store.publish(unit.out_dir, names)
    return summary


def _samples(
    store: Store, dataset: str, key: str, image_ids: tuple[str, ...] | None
) -> list[tuple[ImageRecord, bytes]]:
    """The exported records of one unit with their JPEG bytes, in the unit's order."""
    wanted = None if image_ids is None else set(image_ids)
    images = store.read_unit(MANIFEST, key, columns=["image_id", IMAGE_COLUMN])
    image_by_id = dict(
        zip(
            images.column("image_id").to_pylist(),
            images.column(IMAGE_COLUMN).to_pylist(),
            strict=True,
        )
    )
    records = records_from_table(store.read_unit(dataset, key, columns=RECORD_SCHEMA.names))
    return [(r, image_by_id[r.image_id]) for r in records if keeps(wanted, r.image_id)]


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
