"""The manifest as stages see it: one row per image, and which rows of each unit those are.

Ingest units decode in parallel, so until ingest's last step has taken them out the same
content can sit in two units; the rule that picks one copy (``kept_rows``) lives here,
with what planners read to cut work into the manifest's units without holding its ids.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.layout import CHECKED_MANIFEST, MANIFEST
from engine.records import CAPTION_KINDS, MANIFEST_SCHEMA
from engine.store import Store, fingerprint


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


def kept_image_ids_by_unit(store: Store) -> dict[str, tuple[str, ...] | None]:
    """For each committed manifest unit, the image ids the manifest view keeps from it;
    None where that is every image of the unit, read from the unit itself
    (``unit_image_ids``).

    Ingest's last step takes copies of an image out of the manifest and records the
    manifest it checked (``record_manifest_checked``). While the manifest is that one,
    every unit keeps all its images and nothing is read here but the markers: a planner
    holds a few bytes per unit, whatever the units hold. Otherwise (a run killed before
    that step, a store from before it) the id columns are read, and the labels that
    choose between copies only when some id is there twice.
    """
    units = store.committed_units(MANIFEST)
    if not units:
        return {}
    if manifest_is_checked(store, units):
        return dict.fromkeys(units)
    ids = [store.read_unit(MANIFEST, unit, columns=["image_id"]) for unit in units]
    combined = pa.concat_tables(ids)
    if pc.count_distinct(combined.column("image_id")).as_py() == combined.num_rows:
        return {
            unit: tuple(table.column("image_id").to_pylist())
            for unit, table in zip(units, ids, strict=True)
        }
    tables = [
        store.read_unit(MANIFEST, unit, columns=["image_id", "regions", "captions"])
        for unit in units
    ]
    owner = [unit for unit, table in zip(units, tables, strict=True) for _ in range(table.num_rows)]
    combined = pa.concat_tables(tables)
    image_ids = combined.column("image_id").to_pylist()
    kept: dict[str, list[str]] = {unit: [] for unit in units}
    for row in kept_rows(combined):
        kept[owner[row]].append(image_ids[row])
    return {unit: tuple(image_ids) for unit, image_ids in kept.items()}


def unit_image_ids(store: Store, unit: str, kept: tuple[str, ...] | None) -> tuple[str, ...]:
    """A unit's ``kept`` ids (from ``kept_image_ids_by_unit``), read from the unit when
    they are all of its images: what a stage's fingerprint of the unit names."""
    if kept is not None:
        return kept
    table = store.read_unit(MANIFEST, unit, columns=["image_id"])
    return tuple(table.column("image_id").to_pylist())


def keeps(kept: Collection[str] | None, image_id: str) -> bool:
    """Whether a unit whose kept ids are ``kept`` keeps ``image_id`` (None: all)."""
    return kept is None or image_id in kept


def manifest_state(store: Store, units: Iterable[str] | None = None) -> str:
    """A fingerprint of the manifest's committed units, from their markers."""
    units = store.committed_units(MANIFEST) if units is None else units
    return fingerprint({unit: store.marker_fingerprint(MANIFEST, unit) for unit in units})


def manifest_is_checked(store: Store, units: Iterable[str] | None = None) -> bool:
    """Whether the manifest is the one ingest last found to hold each image once."""
    checked = store.read_json(CHECKED_MANIFEST)
    return checked is not None and checked.get("manifest") == manifest_state(store, units)


def record_manifest_checked(store: Store) -> None:
    """Record that the manifest as it is now holds each image once."""
    state = {"manifest": manifest_state(store)}
    store.write_bytes(CHECKED_MANIFEST, json.dumps(state).encode())
