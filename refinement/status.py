"""``--stage status``: what a store holds, round by round, read from small files only.

For each round with a state file: its status and parent, the steps it has done, its
record count (from the commit markers of its most finished dataset, so no Parquet is
read), its exported samples and shards (from ``_index.json``), and its headline quality
against ground truth when an evaluation stored one. Then who holds the refine lease.
No Ray, no model, no image is touched: it answers in the time a few small reads take.
"""

from __future__ import annotations

import json
import time

from engine.layout import MANIFEST, REFINE_LOCK, round_layout
from engine.round_state import read_round_state, started_rounds
from engine.store import Store, records_dataset
from engine.summary import StageSummary
from refinement.lock import read_leases

# The quality rows shown, by their label in quality.json, and the column read.
QUALITY_ROWS = ("box AP50", "box P @.5", "box R @.5", "grounding R", "OCR word acc")


def _exported(store: Store, number: int) -> str:
    path = store.path(round_layout(number).shard_index)
    if not store.fs.exists(path):
        return "-"
    index = json.loads(store.fs.cat_file(path))
    return f"{index.get('samples', '?')} in {len(index['shards'])} shards"


def _quality(store: Store, number: int) -> str:
    path = store.path(round_layout(number).quality)
    if not store.fs.exists(path):
        return "-"
    quality = json.loads(store.fs.cat_file(path))
    column = len(quality["columns"]) - 1  # the last evaluation point: the round as kept
    values = {row[0]: row[column] for row in quality["rows"]}
    return ", ".join(f"{name} {values[name]}" for name in QUALITY_ROWS if name in values)


def store_status(store: Store) -> list[str]:
    """The status lines of a store, as ``--stage status`` prints them."""
    lines = [f"store {store.url}: {store.committed_rows(MANIFEST)} manifest rows"]
    for number in started_rounds(store):
        state = read_round_state(store, number)
        parent = "-" if state.parent is None else round_layout(state.parent).name
        dataset = records_dataset(store, number).rsplit("/", 1)[-1]
        lines += [
            f"{round_layout(number).name}  {state.status:<9}  parent {parent}  "
            f"{store.committed_rows(records_dataset(store, number))} records ({dataset})",
            f"      steps: {' '.join(state.steps) or '-'}",
            f"      export: {_exported(store, number)}",
            f"      quality: {_quality(store, number)}",
        ]
    leases = read_leases(store, REFINE_LOCK)
    now = time.time()
    if not leases:
        lines.append("refine lock: free")
    for lease in leases:
        alive = "held" if lease.expires >= now else "expired (a new refine takes it over)"
        lines.append(f"refine lock: {alive} by {lease.describe()}")
    return lines


def run_status(store: Store) -> StageSummary:
    started = time.perf_counter()
    lines = store_status(store)
    print("\n".join(lines), flush=True)
    return StageSummary(
        "status",
        outputs=len(started_rounds(store)),
        seconds=time.perf_counter() - started,
    )
