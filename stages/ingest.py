"""Ingest: image folders, globs, COCO files and WebDataset tars into the manifest.

The driver expands the inputs into fixed units (a sorted chunk of files, one tar, a
chunk of a COCO file's images) named by a hash of what they hold, so a rerun finds
the same units and skips the committed ones. A folder's files that a committed unit
already read are not planned again: a folder that grows between runs (nightly images
added to it) gives units of its new files only, and the units already committed, with
all the work done on them downstream, stay as they are. Each unit, a Ray task, reads its inputs,
decodes and normalises every image (``image_decode``) and commits one manifest part
and one quarantine part together. Content that arrived twice is listed in quarantine
and taken out of the manifest by a final step (``remove_duplicates``); until that step
has run, the manifest view keeps one copy of each image.

Inputs are hostile until read: a local input is read only if it is a regular file
that resolves inside what the user named (links are resolved, never trusted), and a
name that is not UTF-8 is read by its bytes and recorded escaped (``_recordable``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from engine.config import EngineConfig, IngestConfig
from engine.duck import bounded_connection, part_batches, view_parts
from engine.execution import run_units
from engine.layout import MANIFEST, QUARANTINE
from engine.manifest import kept_rows, manifest_is_checked, record_manifest_checked
from engine.records import (
    ImageRecord,
    QuarantineEntry,
    image_id_for,
    quarantine_to_table,
    records_to_table,
)
from engine.store import Store, StoreError, fingerprint
from engine.summary import StageSummary
from stages.image_decode import RefusedInput, decode_image
from stages.ingest_coco import CocoInput, HumanLabels, labels_to_regions, read_coco, unite

GLOB_CHARS = "*?["
# The marker key listing the files of a folder unit: a later plan leaves them out.
FILES_READ = "files"


class InputError(ValueError):
    """An input path that cannot be read at all; raised before any work starts."""


@dataclass(frozen=True, slots=True)
class IngestItem:
    # Where to read it. A local name that is not UTF-8 keeps its undecodable bytes as
    # Python's surrogate escapes, so it reopens the very file; records get ``_recordable``.
    uri: str
    source: str
    # What the user named that this input must stay inside: the folder, a glob's
    # folder, the COCO file's folder, or the file itself.
    root: str
    labels: HumanLabels | None = None


@dataclass(frozen=True, slots=True)
class IngestUnit:
    key: str
    store_url: str
    config: IngestConfig
    items: tuple[IngestItem, ...] = ()
    # A WebDataset shard is one unit: its members are only known by reading it.
    tar: IngestItem | None = None
    # Refusals found while planning (COCO annotations), committed with this unit.
    refused: tuple[QuarantineEntry, ...] = ()


@dataclass
class IngestPlan:
    units: list[IngestUnit]
    notes: Counter[str]
    # Files of folders and globs that committed units have read before.
    already_ingested: int = 0


def plan_ingest(inputs: list[str], store: Store, config: IngestConfig) -> IngestPlan:
    """Expand inputs into units. Raises InputError for a path that does not exist."""
    files: dict[str, IngestItem] = {}
    tars: dict[str, IngestItem] = {}
    cocos: list[CocoInput] = []
    notes: Counter[str] = Counter()
    for spec in inputs:
        uris, root, from_folder = _expand(spec)
        for uri in uris:
            # A COCO file is named as an input; a .json inside an image folder is not one.
            if uri.endswith(".json") and not from_folder:
                try:
                    with _open_input(uri, root) as f:
                        coco = read_coco(uri, f, max_labels_per_image=config.max_labels_per_image)
                except (ValueError, OSError, RefusedInput) as exc:
                    raise InputError(f"input {uri!r} is not a readable COCO file: {exc}") from exc
                notes.update(coco.notes)
                cocos.append(coco)
            elif uri.endswith(".tar"):
                tars.setdefault(uri, IngestItem(uri, "tar", root))
            else:
                files.setdefault(uri, IngestItem(uri, "folder", root))
    read_before, unfinished = _folder_units_before(store)
    listed = {_recordable(uri): uri for uri in files}
    # A unit cut short between its two markers is planned again as it was (same files,
    # same key), so it is redone whole; the other files go into new units.
    chunks = [
        [listed[uri] for uri in unit_files]
        for unit_files in unfinished
        if all(uri in listed for uri in unit_files)
    ]
    planned = read_before.union(*(map(_recordable, chunk) for chunk in chunks))
    new = sorted(uri for uri in files if _recordable(uri) not in planned)
    chunks += [
        new[start : start + config.unit_size] for start in range(0, len(new), config.unit_size)
    ]
    units = []
    for chunk in chunks:
        items = tuple(files[uri] for uri in chunk)
        units.append(IngestUnit(_key("files", *chunk), store.url, config, items=items))
    for uri in sorted(tars):
        units.append(IngestUnit(_key("tar", uri), store.url, config, tar=tars[uri]))
    already = sum(1 for uri in files if _recordable(uri) in read_before)
    units += _coco_units(cocos, store, config)
    return IngestPlan(units, notes, already_ingested=already)


def _folder_units_before(store: Store) -> tuple[set[str], list[list[str]]]:
    """The files (recorded URIs) that committed folder units have read, kept, duplicate
    or refused; and the files of each folder unit not committed whole.

    Units list their files in their markers. A file changed in place under the same
    name is therefore not read again.
    """
    in_manifest = set(store.committed_units(MANIFEST))
    in_quarantine = set(store.committed_units(QUARANTINE))
    read_before: set[str] = set()
    unfinished: list[list[str]] = []
    for unit in sorted(in_manifest | in_quarantine):
        dataset = MANIFEST if unit in in_manifest else QUARANTINE
        try:
            files = store.read_marker(dataset, unit).get(FILES_READ)
        except StoreError:
            continue  # a damaged marker: its unit is redone when planned from the listing
        if files is None:
            continue  # a tar or COCO unit, which a rerun plans the same
        # Whole in both datasets: markers and the parts they name (a kill between a
        # marker and its part's move leaves the marker without its part).
        if store.unit_done(unit, (MANIFEST, QUARANTINE)):
            read_before.update(files)
        else:
            unfinished.append(files)
    return read_before, unfinished


def run_ingest(store: Store, config: EngineConfig, plan: IngestPlan) -> StageSummary:
    """Run the units of ``plan`` (from ``plan_ingest``) not yet committed."""
    summary = run_units(
        "ingest",
        ingest_unit,
        plan.units,
        done=lambda unit: store.unit_done(unit.key, (MANIFEST, QUARANTINE)),
        num_cpus=config.ray.task_cpus,
    )
    summary.dropped.update(plan.notes)
    if plan.already_ingested:
        summary.notes["files read by an earlier run, not read again"] += plan.already_ingested
    duplicates = remove_duplicates(store)
    if duplicates:
        summary.quarantined["duplicate image"] += duplicates
        summary.outputs -= duplicates
    summary.location = store.path(MANIFEST)
    summary.held = store.committed_rows(MANIFEST)
    return summary


def ingest_unit(unit: IngestUnit) -> StageSummary:
    """Decode every input of one unit; commit its manifest and quarantine parts together."""
    store = Store(unit.store_url)
    summary = StageSummary("ingest")
    records: list[ImageRecord] = []
    images: list[bytes] = []
    refused: list[QuarantineEntry] = list(unit.refused)
    first_uri: dict[str, str] = {}
    for item, data, problem in _read_items(unit):
        summary.inputs += 1
        if problem is not None:
            refused.append(_refusal(item, problem))
            continue
        try:
            decoded = decode_image(
                data,
                max_pixels=unit.config.max_image_pixels,
                max_bytes=unit.config.max_file_bytes,
                jpeg_quality=unit.config.jpeg_quality,
            )
        except RefusedInput as exc:
            refused.append(_refusal(item, exc, hashlib.sha256(data).hexdigest()))
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        kept_uri = first_uri.setdefault(sha256, item.uri)
        if kept_uri != item.uri:
            duplicate = RefusedInput("duplicate image", f"same content as {kept_uri}")
            refused.append(_refusal(item, duplicate, sha256))
            continue
        record = ImageRecord(
            image_id=image_id_for(sha256),
            uri=_recordable(item.uri),
            source=item.source,
            width=decoded.width,
            height=decoded.height,
            sha256=sha256,
        )
        if item.labels is not None:
            regions, captions, label_refusals, changed = labels_to_regions(
                item.labels, decoded.width, decoded.height, _recordable(item.uri)
            )
            record.regions, record.captions = regions, captions
            record.coco_image_id = item.labels.image_id
            refused.extend(label_refusals)
            summary.notes.update(changed)
        records.append(record)
        images.append(decoded.jpeg)
    for entry in refused:
        summary.quarantined[entry.reason] += 1
    summary.outputs = len(records)
    # Names (in uris, and in details such as an OSError's message) may not be UTF-8.
    refused = [replace(e, uri=_recordable(e.uri), detail=_recordable(e.detail)) for e in refused]
    folder_files = [_recordable(item.uri) for item in unit.items if item.source == "folder"]
    store.commit_unit(
        unit.key,
        {
            MANIFEST: records_to_table(records, images=images),
            QUARANTINE: quarantine_to_table(refused),
        },
        info={FILES_READ: folder_files} if folder_files else None,
    )
    return summary


def remove_duplicates(store: Store) -> int:
    """Take the copies of an image that the manifest view leaves out (``kept_rows``) out
    of the manifest, listing them in quarantine first; returns how many were new.

    Units decode in parallel, so the same content can land in two of them (a photo in a
    folder and again in a COCO file, or a copy added to a folder later). A unit holding
    such a copy is committed again without it, under inputs that name what was taken
    out (``Store.commit_unit``): a committed manifest holds each image once, for every
    reader of its folder. Idempotent: a rerun finds nothing left to list or take out.
    """
    if manifest_is_checked(store):  # no unit committed since the last check
        return 0
    units = store.committed_units(MANIFEST)
    copies = _rows_of_repeated_ids(store, units)
    if copies is None:  # each image once: the usual answer
        record_manifest_checked(store)
        return 0
    rows = copies.select(["image_id", "uri", "sha256", "unit"]).to_pylist()
    kept = set(kept_rows(copies))
    kept_uri = {rows[k]["image_id"]: rows[k]["uri"] for k in kept}
    taken_out = [row for index, row in enumerate(rows) if index not in kept]
    duplicates = [
        QuarantineEntry(
            uri=row["uri"],
            source="ingest",
            reason="duplicate image",
            detail=f"same content as {kept_uri[row['image_id']]}",
            sha256=row["sha256"],
        )
        for row in taken_out
    ]
    listed = _quarantined(store, [d.uri for d in duplicates], "duplicate image")
    new = [d for d in duplicates if d.uri not in listed]
    if new:
        key = _key("duplicates", *sorted(d.uri for d in new))
        store.commit_unit(key, {QUARANTINE: quarantine_to_table(new)})
    for unit in sorted({row["unit"] for row in taken_out}):
        _commit_without(store, unit, {row["uri"] for row in taken_out if row["unit"] == unit})
    record_manifest_checked(store)
    return len(new)


def _rows_of_repeated_ids(store: Store, units: list[str]) -> pa.Table | None:
    """Every manifest row whose image id another row has too, in unit order, with what
    ``kept_rows`` needs and the unit it is in; None when every id is there once.

    The parts' id columns go, a batch of parts at a time, into a DuckDB table on local
    disk, whose grouping finds the repeated ids in bounded memory (it spills); then only
    the units holding a copy are read, for their copies' rows. The driver never holds
    the manifest's ids."""
    paths = store.part_paths(MANIFEST)
    # Parts are named uniquely within their folder; DuckDB reports a path without its
    # scheme, so parts are matched to their units by file name.
    unit_of = {posixpath.basename(path): unit for path, unit in zip(paths, units, strict=True)}
    with bounded_connection("ids.duckdb") as con:
        con.execute("CREATE TABLE ids (image_id VARCHAR, part VARCHAR)")
        for batch in part_batches(paths):
            view_parts(con, "batch", batch, store.fs, "filename = true")
            con.execute("INSERT INTO ids SELECT image_id, parse_filename(filename) FROM batch")
        repeated = con.execute(
            "SELECT image_id, list(DISTINCT part) FROM ids GROUP BY image_id HAVING count(*) > 1"
        ).fetchall()
    if not repeated:
        # Before any Arrow array is built: the first one imports pandas, where it is
        # installed, which is a quarter of a second of a small ingest.
        return None
    ids = pa.array([image_id for image_id, _ in repeated], pa.string())
    holders = {unit_of[part] for _, parts in repeated for part in parts}
    columns = ["image_id", "uri", "sha256", "regions", "captions"]
    tables = []
    for unit in (u for u in units if u in holders):
        table = store.read_unit(MANIFEST, unit, columns=columns)
        table = table.filter(pc.is_in(table.column("image_id"), value_set=ids))
        tables.append(table.append_column("unit", pa.array([unit] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def _quarantined(store: Store, uris: list[str], reason: str) -> set[str]:
    """Those of ``uris`` the quarantine already lists for ``reason``."""
    paths = store.part_paths(QUARANTINE)
    if not paths or not uris:
        return set()
    with bounded_connection() as con:
        view_parts(con, "quarantine", paths, store.fs)
        con.register("wanted", pa.table({"uri": uris}))
        found = con.execute(
            "SELECT DISTINCT uri FROM quarantine JOIN wanted USING (uri) WHERE reason = ?",
            [reason],
        ).fetchall()
    return {uri for (uri,) in found}


def _commit_without(store: Store, unit: str, uris: set[str]) -> None:
    """Commit a manifest unit again without the rows of ``uris``, keeping its marker's
    information (the files it read)."""
    marker = store.read_marker(MANIFEST, unit)
    table = store.read_unit(MANIFEST, unit)
    keep = pc.invert(pc.is_in(table.column("uri"), value_set=pa.array(sorted(uris))))
    info = {k: v for k, v in marker.items() if k not in ("part", "rows", "bytes", "inputs")}
    inputs = fingerprint("duplicates taken out", marker.get("inputs"), sorted(uris))
    store.commit_unit(unit, {MANIFEST: table.filter(keep)}, info=info, inputs=inputs)


# ---------------------------------------------------------------- reading inputs

Problem = RefusedInput | None

_FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _read_items(unit: IngestUnit) -> Iterator[tuple[IngestItem, bytes, Problem]]:
    if unit.tar is not None:
        yield from _read_tar(unit.tar, unit.config)
        return
    for item in unit.items:
        try:
            with _open_input(item.uri, item.root) as f:
                # Read one byte past the limit: enough to know the file is too large.
                data = f.read(unit.config.max_file_bytes + 1)
        except RefusedInput as exc:
            yield item, b"", exc
            continue
        except (OSError, ValueError) as exc:
            yield item, b"", RefusedInput("unreadable file", f"{type(exc).__name__}: {exc}")
            continue
        yield item, data, None


def _open_input(uri: str, root: str) -> IO[bytes]:
    """Open one input for reading, if it lies inside ``root`` and is a regular file.

    Raises RefusedInput (``outside input root``, ``not a regular file``), or OSError
    and ValueError as the file system does. Opening a FIFO blocks until some writer
    comes, and a device may never end: such files are judged by ``stat`` and never
    opened, so nothing here waits on another process.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    root_path = fsspec.core.url_to_fs(root)[1]
    if not isinstance(fs, LocalFileSystem):
        # Object stores have no links: the normalised name says where it is.
        if not _within(posixpath.normpath(path), posixpath.normpath(root_path)):
            raise RefusedInput("outside input root", f"{path} is not inside {root_path}")
        return fs.open(path, "rb")
    real, real_root = os.path.realpath(path), os.path.realpath(root_path)
    if not _within(real, real_root):
        raise RefusedInput("outside input root", f"resolves to {real}, not inside {real_root}")
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise RefusedInput("not a regular file", _FILE_KINDS.get(stat.S_IFMT(mode), oct(mode)))
    # Should a FIFO or a link take the file's place after the checks, the open neither
    # waits for a writer nor follows the link: the read then ends at once, or fails.
    return os.fdopen(os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _read_tar(tar: IngestItem, config: IngestConfig) -> Iterator[tuple[IngestItem, bytes, Problem]]:
    """Members of a WebDataset shard, streamed; never extracted to disk.

    Members with unsafe names (absolute, escaping with ``..``) or that are links or
    devices are refused, as a tar extractor would be attacked through them. Sidecars
    (``.json``, ``.txt``, ``.cls``...) are not images and are skipped.
    """
    try:
        with _open_input(tar.uri, tar.root) as f, tarfile.open(fileobj=f, mode="r|*") as archive:
            for member in archive:
                item = IngestItem(f"{tar.uri}#{member.name}", "tar", tar.uri)
                if member.isdir():
                    continue
                unsafe = _unsafe_member(member)
                if unsafe:
                    yield item, b"", RefusedInput("unsafe tar member", unsafe)
                    continue
                extension = posixpath.splitext(member.name)[1].lower()
                if extension not in config.image_extensions:
                    continue
                if member.size > config.max_file_bytes:
                    size = f"{member.size} bytes > {config.max_file_bytes}"
                    yield item, b"", RefusedInput("file too large", size)
                    continue
                fileobj = archive.extractfile(member)
                yield item, fileobj.read() if fileobj else b"", None
    except RefusedInput as exc:
        yield tar, b"", exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield tar, b"", RefusedInput("corrupt tar", f"{type(exc).__name__}: {exc}")


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if not member.isfile():
        return "not a regular file"
    name = member.name
    if name.startswith("/") or posixpath.normpath(name).split("/")[0] == "..":
        return f"name escapes the shard: {name!r}"
    return None


def _refusal(item: IngestItem, problem: RefusedInput, sha256: str | None = None) -> QuarantineEntry:
    return QuarantineEntry(
        uri=item.uri,
        source=item.source,
        reason=problem.reason,
        detail=problem.detail,
        sha256=sha256,
    )


def _expand(spec: str) -> tuple[list[str], str, bool]:
    """One input argument as file URLs, the root they must stay inside, and whether it
    named a folder.

    A folder is walked recursively (hidden files skipped); a glob is expanded; a file is
    itself. Links, FIFOs and devices are listed like files (fsspec lists a link to a
    folder without following it): their unit refuses them with a reason.
    """
    fs, path = fsspec.core.url_to_fs(spec)
    if any(c in path for c in GLOB_CHARS):
        matches = [p for p in fs.glob(path) if not fs.isdir(p)]
        if not matches:
            raise InputError(f"input {spec!r} matches no file")
        literal = path[: min(path.index(c) for c in GLOB_CHARS if c in path)]
        root = fs.unstrip_protocol(posixpath.dirname(literal))
        return [fs.unstrip_protocol(p) for p in sorted(matches)], root, False
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if not posixpath.basename(p).startswith("."))
        if not found:
            raise InputError(f"input folder {spec!r} is empty")
        return [fs.unstrip_protocol(p) for p in found], fs.unstrip_protocol(path), True
    if fs.isfile(path):
        return [fs.unstrip_protocol(path)], fs.unstrip_protocol(path), False
    raise InputError(f"input {spec!r} does not exist or cannot be read")


def _coco_units(cocos: list[CocoInput], store: Store, config: IngestConfig) -> list[IngestUnit]:
    """Units of the images the COCO files name. An image named by several files is one
    item with the labels of all of them (``unite``), in units of the images named by
    the same files; each file's refusals are a unit of their own, committed once."""
    named_by: dict[str, list[CocoInput]] = {}
    for coco in sorted(cocos, key=lambda c: c.uri):
        for uri in coco.images:
            named_by.setdefault(uri, []).append(coco)
    groups: dict[tuple[str, ...], list[str]] = {}
    for uri in sorted(named_by):
        groups.setdefault(tuple(c.uri for c in named_by[uri]), []).append(uri)
    units = []
    for files, uris in sorted(groups.items()):
        for start in range(0, len(uris), config.unit_size):
            chunk = uris[start : start + config.unit_size]
            items = tuple(_coco_item(uri, named_by[uri]) for uri in chunk)
            units.append(IngestUnit(_key("coco", *files, *chunk), store.url, config, items=items))
    for coco in cocos:
        if coco.refused:
            key = _key("coco refused", coco.uri)
            units.append(IngestUnit(key, store.url, config, refused=tuple(coco.refused)))
    return units


def _coco_item(uri: str, cocos: list[CocoInput]) -> IngestItem:
    source = "coco:" + "+".join(posixpath.basename(coco.uri) for coco in cocos)
    labels = unite([coco.images[uri] for coco in cocos])
    # Resolved inside the first file's folder; read only if it stays inside it.
    return IngestItem(uri, source, cocos[0].folder, labels)


def _key(*parts: str) -> str:
    # surrogatepass: a name that is not UTF-8 (surrogate escapes) hashes too, the same
    # way on every run.
    return hashlib.sha1("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _recordable(text: str) -> str:
    """``text`` as valid UTF-8, which Arrow strings must be; unchanged if it already is.

    A file or tar member name that is not UTF-8 reaches Python with each undecodable
    byte b as the lone surrogate U+DC00+b (surrogateescape); it is recorded as ``%XX``,
    the byte in hex, so the same name gives the same URI on every run. Any other lone
    surrogate (only a JSON escape can make one) is recorded as ``\\uXXXX``.
    """
    return _SURROGATE.sub(_escape_surrogate, text)


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
