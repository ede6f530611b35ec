"""``--stage status``: what a store holds, round by round, read from small files only.

For each round with a state file: its status and parent, the steps it has done, its
record count (from the commit markers of its most finished dataset, so no Parquet is
read), its exported samples and shards (from ``_index.json``), and its headline quality
against ground truth when an evaluation stored one. Then who holds the refine lease.
No Ray, no model, no image is touched: it answers in the time a few small reads take.
"""

from __future__ import annotations

import time

from engine.layout import MANIFEST, WRITE_LOCK, round_layout
from engine.lock import is_live, read_leases
from engine.round_state import read_round_state, started_rounds
from engine.store import Store, records_dataset
from engine.summary import StageSummary
from stages.report_rounds import QUALITY_ROWS as REPORT_QUALITY_ROWS
from stages.report_rounds import accepted_families, round_quality_values

# The quality rows shown, by their label in quality.json (the round as kept).
QUALITY_ROWS = (*REPORT_QUALITY_ROWS, "OCR word acc")


def _exported(store: Store, number: int) -> str:
    index = store.read_json(round_layout(number).shard_index)
    if index is None:
        return "-"
    return f"{index.get('samples', '?')} in {len(index['shards'])} shards"


def _quality(store: Store, number: int) -> str:
    values = round_quality_values(store, number, QUALITY_ROWS)
    return ", ".join(f"{name} {value:.3f}" for name, value in values.items()) or "-"


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
        policy = store.read_json(round_layout(number).policy)
        if policy is not None:
            lines.append(f"      merged from the student: {accepted_families(policy) or 'none'}")
    leases = read_leases(store, WRITE_LOCK)
    now = time.time()
    if not leases:
        lines.append("store lock: free")
    for lease in leases:
        alive = "held" if is_live(lease, now) else "stale (the next run takes it over)"
        lines.append(f"store lock: {alive} by {lease.describe()}")
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
