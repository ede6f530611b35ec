"""The store: immutable Parquet parts under one fsspec root, committed by marker files.

What lives where is named in ``engine/layout.py``. A dataset is a folder of parts
``part-<unit>.parquet``; a part is visible only once its marker
``_committed/<unit>.json`` exists. The marker is written after the part is complete,
so the rule holds on object stores, which have no atomic rename, as well as on local
disk. Units are fixed and deterministic: a rerun rewrites an uncommitted part under
the same name and skips committed ones, so no row is ever written twice.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.layout import MANIFEST, round_layout
from engine.records import CAPTION_KINDS, MANIFEST_SCHEMA

MARKER_DIR = "_committed"


class StoreError(RuntimeError):
    pass


class Store:
    """A dataset store rooted at an fsspec URL (local path, ``file://``, ``memory://``, ``s3://``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def is_local(self) -> bool:
        """True when every process on this machine sees the same files (not ``memory://``)."""
        return "memory" not in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def check_writable(self) -> None:
        """Fail early, with a clear message, when the root cannot be created or written."""
        probe = self.path(".write-probe")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # any backend error means the same to the user
            raise StoreError(f"store {self.url!r} is not writable: {exc}") from exc

    # ------------------------------------------------------------ parts and markers

    def _marker(self, dataset: str, unit: str) -> str:
        return self.path(dataset, MARKER_DIR, f"{unit}.json")

    def part_path(self, dataset: str, unit: str) -> str:
        return self.path(dataset, f"part-{unit}.parquet")

    def is_committed(self, dataset: str, unit: str) -> bool:
        return self.fs.exists(self._marker(dataset, unit))

    def unit_done(self, unit: str, datasets: Iterable[str]) -> bool:
        return all(self.is_committed(dataset, unit) for dataset in datasets)

    def commit_unit(self, unit: str, tables: dict[str, pa.Table], info: dict | None = None) -> None:
        """Write one part per dataset for ``unit``, then their markers (with ``info``).

        All parts are complete before the first marker is written; a unit counts as done
        only when every one of its markers exists (``unit_done``), so a kill between two
        markers makes the rerun redo the whole unit, rewriting identical parts.
        """
        for dataset, table in tables.items():
            path = self.part_path(dataset, unit)
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, compression=_compression(table))
        for dataset, table in tables.items():
            marker = {"part": f"part-{unit}.parquet", "rows": table.num_rows, **(info or {})}
            self.write_marker(dataset, unit, marker)

    def write_marker(self, dataset: str, unit: str, info: dict) -> None:
        """Commit a unit of ``dataset`` whose files are complete; ``info`` describes them."""
        marker = self._marker(dataset, unit)
        self.fs.makedirs(posixpath.dirname(marker), exist_ok=True)
        with self.fs.open(marker, "w") as f:
            json.dump(info, f)

    def read_marker(self, dataset: str, unit: str) -> dict:
        with self.fs.open(self._marker(dataset, unit), "r") as f:
            return json.load(f)

    def committed_units(self, dataset: str) -> list[str]:
        marker_dir = self.path(dataset, MARKER_DIR)
        if not self.fs.exists(marker_dir):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(marker_dir, detail=False)]
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def committed_rows(self, dataset: str) -> int:
        """Rows of a dataset's committed parts, from their markers: no Parquet is read."""
        return sum(
            self.read_marker(dataset, unit)["rows"] for unit in self.committed_units(dataset)
        )

    def read(self, dataset: str, columns: list[str] | None = None) -> pa.Table | None:
        """All committed parts of a dataset in unit order, or None when it has none."""
        tables = []
        for unit in self.committed_units(dataset):
            with self.fs.open(self.part_path(dataset, unit), "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def read_unit(self, dataset: str, unit: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.part_path(dataset, unit), "rb") as f:
            return pq.read_table(f, columns=columns)

    # ------------------------------------------------------------ files

    def write_bytes(self, relpath: str, data: bytes) -> None:
        path = self.path(relpath)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def read_json(self, relpath: str) -> Any:
        """A small JSON file of the store (a state, an index, a score sheet), or None when
        there is none."""
        path = self.path(relpath)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))


def records_dataset(store: Store, round_number: int) -> str:
    """The most finished set of records a round has: filtered, else merged, else the manifest.

    Export and report work on whatever the round has reached, so a store holding only
    ingested images (with their human labels) can already be exported.
    """
    layout = round_layout(round_number)
    for dataset in (layout.filtered, layout.merged):
        if store.committed_units(dataset):
            return dataset
    return MANIFEST


def manifest_view(table: pa.Table | None) -> pa.Table:
    """The manifest as stages see it: one row per ``image_id`` (see ``kept_rows``)."""
    if table is None:
        return MANIFEST_SCHEMA.empty_table()
    keep = kept_rows(table)
    return table.take(keep) if len(keep) < table.num_rows else table


def kept_rows(table: pa.Table) -> list[int]:
    """Indices of the rows the manifest keeps, ascending: one per ``image_id``.

    Ingest units run in parallel and each keeps every image it decoded, so the same
    content can land in two parts (a photo in a folder and again in a COCO file).
    Of such rows the one with the most human labels wins, then the first in unit
    order: labels are never lost to an unlabelled copy, and the choice does not depend
    on which unit finished first. ``table`` needs ``image_id``, ``regions``, ``captions``.
    """
    labels = pc.fill_null(pc.list_value_length(table.column("regions")), 0).to_numpy()
    labels = labels.astype(np.int64)
    captions = table.column("captions")
    for index in range(len(CAPTION_KINDS)):
        present = pc.is_valid(pc.struct_field(captions, [index, 0]))
        labels += present.to_numpy(zero_copy_only=False).astype(np.int64)
    best: dict[str, int] = {}
    for row, image_id in enumerate(table.column("image_id").to_pylist()):
        kept = best.get(image_id)
        if kept is None or labels[row] > labels[kept]:
            best[image_id] = row
    return sorted(best.values())


def kept_image_ids_by_unit(store: Store) -> dict[str, tuple[str, ...]]:
    """For each committed manifest unit, the image ids the manifest view keeps from it.

    Reads no image bytes, so a driver can plan per-unit work over a large manifest.
    """
    units = store.committed_units(MANIFEST)
    if not units:
        return {}
    tables = [
        store.read_unit(MANIFEST, unit, columns=["image_id", "regions", "captions"])
        for unit in units
    ]
    owner = [unit for unit, table in zip(units, tables, strict=True) for _ in range(table.num_rows)]
    combined = pa.concat_tables(tables)
    ids = combined.column("image_id").to_pylist()
    kept: dict[str, list[str]] = {unit: [] for unit in units}
    for row in kept_rows(combined):
        kept[owner[row]].append(ids[row])
    return {unit: tuple(image_ids) for unit, image_ids in kept.items()}


def _compression(table: pa.Table) -> dict[str, str]:
    """zstd for annotations; none for encoded images, which do not compress."""

    def leaves(prefix: str, data_type: pa.DataType) -> list[tuple[str, pa.DataType]]:
        # Parquet names nested leaves by path: captions.brief.text, regions.list.element.box...
        if pa.types.is_struct(data_type):
            return [leaf for f in data_type for leaf in leaves(f"{prefix}.{f.name}", f.type)]
        if pa.types.is_list(data_type) or pa.types.is_fixed_size_list(data_type):
            return leaves(f"{prefix}.list.element", data_type.value_type)
        return [(prefix, data_type)]

    return {
        path: "none" if pa.types.is_binary(data_type) else "zstd"
        for field in table.schema
        for path, data_type in leaves(field.name, field.type)
    }


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
