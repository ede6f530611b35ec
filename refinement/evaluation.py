"""A round scored against ground truth, as a pipeline step: ``rounds/rNNN/quality.json``.

The metrics themselves are pure functions in ``refinement/metrics.py``; this module
reads a round from the store at three points (every specialist's raw output together,
after merge, after filter), scores each, and stores the headline table where the
report stage finds it (``RoundLayout.quality``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from engine.layout import MANIFEST, round_layout
from engine.manifest import manifest_view
from engine.pipeline import PlanError, Request, Step, Work
from engine.records import RECORD_SCHEMA, ImageRecord, records_from_table
from engine.store import Store
from engine.summary import StageSummary
from engine.world import load_truth
from refinement.metrics import Evaluation, evaluate, file_name, format_value

if TYPE_CHECKING:
    from spacy.language import Language


def round_quality(
    store: Store, round_number: int, truth: Mapping[str, ImageRecord], nlp: Language | None
) -> dict[str, Evaluation]:
    """A round scored against the truth at three points: every specialist's raw output
    together (no deduplication), after merge, and after filter.

    Only the truth's images (by file name, as ``evaluate`` pairs them) are read into
    records, unit by unit: the driver holds the scored images, not the dataset (a
    world's truth is a few hundred images; the store beside it can hold millions)."""
    from stages.annotate_worker import attach

    layout = round_layout(round_number)
    names = set(truth)  # the truth's file names

    def in_truth(table: pa.Table) -> pa.Array:
        uris = table.column("uri").to_pylist()
        return pa.array([file_name(uri) in names for uri in uris], pa.bool_())

    manifest, outside = _rows_of(store, MANIFEST, in_truth, RECORD_SCHEMA.names)
    raw = {r.image_id: r for r in records_from_table(manifest_view(manifest))}
    scored = pa.array(sorted(raw), pa.string())

    def scored_image(table: pa.Table) -> pa.Array:
        return pc.is_in(table.column("image_id"), value_set=scored)

    for dataset in store_datasets(store, layout.annotate_root):
        table, _ = _rows_of(store, dataset, scored_image)
        for extra in records_from_table(table) if table is not None else []:
            attach(raw[extra.image_id], extra)
    # What each point predicted, and for how many images outside the truth.
    points = {"raw": (list(raw.values()), outside)}
    for name, dataset in (("merged", layout.merged), ("filtered", layout.filtered)):
        table, outside = _rows_of(store, dataset, scored_image)
        if table is not None:
            points[name] = (records_from_table(table), outside)
    return {
        name: replace(evaluate(records, truth, nlp), unmatched_predictions=outside)
        for name, (records, outside) in points.items()
    }


def _rows_of(
    store: Store,
    dataset: str,
    keep: Callable[[pa.Table], pa.Array],
    columns: list[str] | None = None,
) -> tuple[pa.Table | None, int]:
    """The rows of ``dataset`` that ``keep`` selects, read unit by unit, and how many it
    left out."""
    tables, left_out = [], 0
    for unit in store.committed_units(dataset):
        table = store.read_unit(dataset, unit, columns)
        kept = table.filter(keep(table))
        tables.append(kept)
        left_out += table.num_rows - kept.num_rows
    return (pa.concat_tables(tables, promote_options="default") if tables else None), left_out


def store_datasets(store: Store, folder: str) -> list[str]:
    """The datasets (sub-folders) under ``folder`` of the store, sorted."""
    path = store.path(folder)
    if not store.fs.exists(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False))
    return [f"{folder}/{name}" for name in names]


def quality_rows(evaluations: Mapping[str, Evaluation]) -> list[tuple[str, ...]]:
    """The headline metrics, one row each: the metric's name, then one value per
    evaluation point (``"-"`` where there is nothing to compute it from)."""

    def detailed_caption(e: Evaluation, field: str) -> float | None:
        scores = e.captions.get("detailed")
        return getattr(scores, field) if scores else None

    metrics = {
        "box AP": lambda e: e.box.ap,
        "box AP50": lambda e: e.box.ap50,
        "box P @.5": lambda e: e.box_matching.precision,
        "box R @.5": lambda e: e.box_matching.recall,
        "mask AP": lambda e: e.mask.ap,
        "caption obj P": lambda e: detailed_caption(e, "object_precision"),
        "caption obj R": lambda e: detailed_caption(e, "object_recall"),
        "grounding P": lambda e: e.grounding_precision.value,
        "grounding R": lambda e: e.grounding.value,
        "OCR word acc": lambda e: e.ocr.value,
    }
    return [
        (label, *(format_value(metric(e)) for e in evaluations.values()))
        for label, metric in metrics.items()
    ]


def quality_table(quality: Mapping) -> str:
    """A stored ``quality.json`` as text: one column per evaluation point, one row per
    headline metric."""
    header = f"{'':<16}" + "".join(f"{name:>10}" for name in quality["columns"][1:])
    lines = [f"{r[0]:<16}" + "".join(f"{v:>10}" for v in r[1:]) for r in quality["rows"]]
    return "\n".join([header, *lines])


def write_round_quality(
    store: Store, round_number: int, evaluations: Mapping[str, Evaluation], truth: str
) -> str:
    """Store a round's scores as ``rounds/rNNN/quality.json``, where the report stage
    finds them: the headline rows and every evaluation in full. Returns the path."""
    first = next(iter(evaluations.values()))
    quality = {
        "truth": truth,
        "images": first.images,
        "columns": ["metric", *evaluations],
        "rows": quality_rows(evaluations),
        "evaluations": {name: e.to_dict() for name, e in evaluations.items()},
    }
    path = round_layout(round_number).quality
    store.write_bytes(path, json.dumps(quality, indent=1).encode())
    return path


def evaluate_step(truth: Path) -> Step:
    """A step that scores its round against a generated world's truth (``truth.json``)
    and stores ``quality.json``; put it before ``report`` and the report leads with it."""

    def plan(request: Request) -> Work:
        if request.store is None or request.round_number is None:
            raise PlanError("evaluate needs a store and a round")
        if not truth.exists():
            raise PlanError(f"no ground truth at {truth}")
        store, number = request.store, request.round_number

        def work() -> StageSummary:
            from filters.text import load_pipeline

            started = time.perf_counter()
            nlp = load_pipeline(request.config.filter.spacy_model)
            evaluations = round_quality(store, number, load_truth(truth), nlp)
            path = write_round_quality(store, number, evaluations, truth=truth.name)
            first = next(iter(evaluations.values()))
            return StageSummary(
                "evaluate",
                inputs=first.images,
                outputs=len(evaluations),
                seconds=time.perf_counter() - started,
                location=store.path(path),
            )

        return work

    return Step("evaluate", plan, uses_ray=False)
