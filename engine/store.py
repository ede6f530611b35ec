"""The store: immutable Parquet parts under one fsspec root, committed by marker files.

What lives where is named in ``engine/layout.py``. A dataset is a folder of parts
``part-<unit>.parquet`` and nothing else: a unit's marker ``_committed/<dataset>/<unit>.json``
and its part while being written ``_staging/<dataset>/...`` live outside it, so any
Parquet reader pointed at a dataset's folder (DuckDB, pandas, Ray Data, Hugging Face
``datasets``) reads exactly the rows the engine reads. A unit is committed in three
steps: its part is written under ``_staging/``, then its marker, then the part is moved
to its dataset's folder. Until that move the marker names a part that is not there, so
the unit is not committed for the engine either; the rule holds on object stores, where
a move is a copy and a delete, as well as on local disk. Units are fixed and
deterministic: a rerun writes an uncommitted unit again under the same names and skips
committed ones, so no row is ever written twice. What a killed run left in
``_staging/`` is cleared by the next writing run (``clear_staging``).

A marker records what it commits: the part's name, rows and bytes. A kill or a full disk
can still leave a marker empty or cut short, and a part can be truncated after it was
committed; such a unit is not committed (``is_committed`` is False, so the stage that
writes it redoes it on its next run), and a reader that meets it raises a one-line
``StoreError`` naming the file. The checks cost a file size and the row count Parquet
reads anyway, never a pass over the bytes.

A unit computed from other units records what it was computed from as ``inputs``: a
``fingerprint`` of the upstream units' markers (which carry their own inputs, so a
change anywhere upstream reaches every stage below) and of the settings that shape it.
A stage redoes a unit whose recorded inputs differ from today's (``is_current``), and
writes the new part under a name of its own, ``part-<unit>-<inputs>.parquet``. The part
it replaces is removed before the new marker is written: a run killed between the two
leaves the unit not committed (and redone by the next run), never a folder holding
both the old rows and the new.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import posixpath
from collections.abc import Collection, Iterable
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from engine.layout import MANIFEST, MARKER_ROOT, STAGING_ROOT, round_layout

# What ``check_writable`` writes and removes at the root; a kill can leave it behind.
WRITE_PROBE = ".write-probe"


class StoreError(RuntimeError):
    """A store that cannot be used as asked, or a damaged file in one; one line for the user."""


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
        probe = self.path(WRITE_PROBE)
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # any backend error means the same to the user
            raise StoreError(f"store {self.url!r} is not writable: {exc}") from exc

    def check_is_store(self, names: Collection[str]) -> None:
        """Refuse a root that holds files but none of a store's top-level ``names``: a store
        written into ``/etc`` or a home folder would mix its folders with someone else's
        files. A root that does not exist, is empty, or cannot be listed passes (the last
        is left to ``check_writable``)."""
        try:
            if not self.fs.isdir(self.root):
                return
            found = {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)}
        except OSError:
            return
        found.discard(WRITE_PROBE)
        if found and not found & set(names):
            example = sorted(found)[0]
            raise StoreError(
                f"store {self.url!r} is a folder of other files ({len(found)}, e.g. {example!r}) "
                "and holds no store; pick an empty or new folder"
            )

    # ------------------------------------------------------------ parts and markers

    def marker_path(self, dataset: str, unit: str) -> str:
        return self.path(MARKER_ROOT, dataset, f"{unit}.json")

    def part_path(self, dataset: str, unit: str, inputs: str | None = None) -> str:
        return self.path(dataset, _part_name(unit, inputs))

    def staging_path(self, dataset: str, name: str) -> str:
        """Where a file of ``dataset`` is written before its unit's marker: outside the
        dataset's folder, so no reader sees it half-written or uncommitted."""
        return self.path(STAGING_ROOT, dataset, name)

    def publish(self, dataset: str, names: Iterable[str]) -> None:
        """Move staged files into the dataset's folder, after their unit's marker."""
        for name in names:
            final = self.path(dataset, name)
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self.fs.mv(self.staging_path(dataset, name), final)

    def clear_staging(self) -> None:
        """Remove what a killed run left half-written. Only a run holding the store's
        write lease calls this: no other run can be writing there."""
        staging = self.path(STAGING_ROOT)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def is_committed(self, dataset: str, unit: str) -> bool:
        """True when the unit's marker reads and its part (if it names one) has the size
        the marker recorded; a damaged unit is not committed, so its stage redoes it."""
        return self._intact_marker(dataset, unit) is not None

    def is_current(self, dataset: str, unit: str, inputs: str) -> bool:
        """Committed, and computed from ``inputs`` (a ``fingerprint``)."""
        marker = self._intact_marker(dataset, unit)
        return marker is not None and marker.get("inputs") == inputs

    def marker_fingerprint(self, dataset: str, unit: str) -> str | None:
        """A fingerprint of a committed unit's marker (its part's name, rows, bytes and
        inputs), for the inputs of the units computed from it; None if not committed."""
        marker = self._intact_marker(dataset, unit)
        return None if marker is None else fingerprint(marker)

    def _intact_marker(self, dataset: str, unit: str) -> dict | None:
        try:
            marker = self.read_marker(dataset, unit)
            self._check_part(dataset, unit, marker)
        except StoreError:
            return None
        return marker

    def unit_done(self, unit: str, datasets: Iterable[str]) -> bool:
        return all(self.is_committed(dataset, unit) for dataset in datasets)

    def unit_current(self, unit: str, datasets: Iterable[str], inputs: str) -> bool:
        return all(self.is_current(dataset, unit, inputs) for dataset in datasets)

    def commit_unit(
        self,
        unit: str,
        tables: dict[str, pa.Table],
        info: dict | None = None,
        inputs: str | None = None,
    ) -> None:
        """Stage one part per dataset for ``unit``, write their markers (with ``info``),
        then publish the parts (see the module's docstring).

        All parts are staged before the first marker is written; a unit counts as done
        only when every one of its datasets is committed (``unit_done``), so a kill between
        two markers or two moves makes the rerun redo the whole unit, writing identical
        parts. With ``inputs`` (what the unit was computed from) the parts are named by
        them, so a unit computed again from other inputs never overwrites its committed
        part in place.
        """
        name = _part_name(unit, inputs)
        sizes = {}
        for dataset, table in tables.items():
            path = self.staging_path(dataset, name)
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, compression=_compression(table))
                sizes[dataset] = f.tell()
        for dataset in tables:
            self.remove_replaced(dataset, unit, [name])
        for dataset, table in tables.items():
            # What the marker commits comes last, so no ``info`` key can overwrite it.
            marker = {
                **(info or {}),
                "part": _part_name(unit, inputs),
                "rows": table.num_rows,
                "bytes": sizes[dataset],
            }
            if inputs is not None:
                marker["inputs"] = inputs
            self.write_marker(dataset, unit, marker)
        for dataset in tables:
            self.publish(dataset, [name])

    def remove_replaced(self, dataset: str, unit: str, names: Collection[str]) -> None:
        """Before a unit's new marker: remove the files its old marker names and any file
        already at the new ``names``. The unit stops being committed until its new files
        are published, rather than showing readers old files beside or instead of the
        new ones the marker counts."""
        try:
            old = set(_marked_files(self.read_marker(dataset, unit)))
        except StoreError:  # no marker, or a damaged one: nothing it names is trusted
            old = set()
        for name in sorted(old | set(names)):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(dataset, name))

    def remove_unit(self, dataset: str, unit: str) -> None:
        """Take a committed unit out of ``dataset``: its files first, so readers of the
        folder never list a file the engine does not count, then its marker (a kill in
        between leaves a unit the engine sees as damaged, and removes again)."""
        self.remove_replaced(dataset, unit, ())
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.marker_path(dataset, unit))

    def write_marker(self, dataset: str, unit: str, info: dict) -> None:
        """Commit a unit of ``dataset`` whose files are complete; ``info`` describes them."""
        marker = self.marker_path(dataset, unit)
        self.fs.makedirs(posixpath.dirname(marker), exist_ok=True)
        with self.fs.open(marker, "w") as f:
            json.dump(info, f)

    def read_marker(self, dataset: str, unit: str) -> dict:
        """A unit's marker; ``StoreError`` naming it when it is missing, empty or cut short."""
        path = self.marker_path(dataset, unit)
        try:
            marker = json.loads(self.fs.cat_file(path))
        except FileNotFoundError as exc:
            raise StoreError(
                f"unit {unit} of {dataset} is not committed: no {self._url(path)}"
            ) from exc
        except ValueError as exc:  # empty, cut short or not text: a kill or a full disk
            raise self._damaged(path, "is empty or not JSON") from exc
        if not isinstance(marker, dict):
            raise self._damaged(path, "is not a JSON object")
        return marker

    def _check_part(self, dataset: str, unit: str, marker: dict) -> None:
        """The files a marker names (a part, or export's shards) exist with the sizes it
        recorded. A model's marker names no file."""
        for name, expected in _marked_files(marker).items():
            path = self.path(dataset, name)
            try:
                size = self.fs.size(path)
            except FileNotFoundError as exc:
                raise self._damaged(path, "is missing but its unit has a marker") from exc
            if expected is not None and size != expected:
                raise self._damaged(path, f"has {size} bytes, its marker recorded {expected}")

    def _marked_part(self, dataset: str, marker: dict) -> str:
        # The name alone: a part lives in its dataset's folder, whatever a marker says.
        return self.path(dataset, posixpath.basename(str(marker["part"])))

    def _damaged(self, path: str, problem: str) -> StoreError:
        return StoreError(
            f"{self._url(path)} {problem}: its unit counts as not committed; "
            "run the stage that writes it again"
        )

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def committed_units(self, dataset: str) -> list[str]:
        """Units of a dataset that have a marker, from one listing. A damaged one is kept in
        the list, so the stage reading it fails naming the file instead of losing its rows."""
        marker_dir = self.path(MARKER_ROOT, dataset)
        if not self.fs.exists(marker_dir):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(marker_dir, detail=False)]
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def part_paths(self, dataset: str) -> list[str]:
        """URLs of a dataset's committed parts in unit order, for a reader of its own
        (DuckDB); ``StoreError`` naming a damaged unit, as ``read`` does."""
        paths = []
        for unit in self.committed_units(dataset):
            marker = self.read_marker(dataset, unit)
            self._check_part(dataset, unit, marker)
            paths.append(self._url(self._marked_part(dataset, marker)))
        return paths

    def committed_rows(self, dataset: str) -> int:
        """Rows of a dataset's committed parts, from their markers: no Parquet is read.
        A damaged unit counts none, as for any reader of the dataset's folder."""
        markers = (self._intact_marker(dataset, u) for u in self.committed_units(dataset))
        return sum(marker["rows"] for marker in markers if marker is not None)

    def read(self, dataset: str, columns: list[str] | None = None) -> pa.Table | None:
        """All committed parts of a dataset in unit order, or None when it has none."""
        tables = [self.read_unit(dataset, unit, columns) for unit in self.committed_units(dataset)]
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def read_unit(self, dataset: str, unit: str, columns: list[str] | None = None) -> pa.Table:
        """One committed part, checked against its marker; ``StoreError`` naming the file
        when the unit is not committed or the part or marker is damaged."""
        marker = self.read_marker(dataset, unit)
        self._check_part(dataset, unit, marker)
        path = self._marked_part(dataset, marker)
        try:
            with self.fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                # A part written before a column was added lacks it: read what it has,
                # and let the reader take the missing column as absent.
                present = set(parquet.schema_arrow.names)
                wanted = None if columns is None else [c for c in columns if c in present]
                table = parquet.read(columns=wanted)
        except (pa.ArrowException, OSError) as exc:
            # Markers without a size cannot catch a truncated part before Parquet does.
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise self._damaged(path, f"cannot be read ({reason})") from exc
        expected = marker.get("rows")
        if expected is not None and table.num_rows != expected:
            raise self._damaged(path, f"has {table.num_rows} rows, its marker recorded {expected}")
        return table

    # ------------------------------------------------------------ files

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write a small file whole: staged, then moved over the old one, so a reader,
        or a run started again after a kill, never meets it empty or cut short (a round
        state read while it was being written once stopped a rerun)."""
        folder, name = posixpath.split(relpath)
        staged = self.staging_path(folder, name)
        self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        with self.fs.open(staged, "wb") as f:
            f.write(data)
        self.publish(folder, [name])

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


def _marked_files(marker: dict) -> dict[str, int | None]:
    """The files of a dataset's folder a marker commits, with their sizes in bytes (None
    where it recorded none): a Parquet part, or export's shards."""
    if "part" in marker:
        # The name alone: a part lives in its dataset's folder, whatever a marker says.
        return {posixpath.basename(str(marker["part"])): marker.get("bytes")}
    return {s["name"]: s.get("file_bytes") for s in marker.get("shards", [])}


def _part_name(unit: str, inputs: str | None) -> str:
    return f"part-{unit}.parquet" if inputs is None else f"part-{unit}-{inputs}.parquet"


def fingerprint(*parts: Any) -> str:
    """A short hash of ``parts`` (JSON values, sets, dataclasses, pydantic models), the
    same in every process: what a unit is computed from."""
    text = json.dumps(parts, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    # Sets are sorted: their iteration order changes with each process's string hashing.
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"class": type(value).__qualname__, **fields}
    if hasattr(value, "model_dump"):  # a config section
        return value.model_dump(mode="json")
    return repr(value)
