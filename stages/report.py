"""The report stage: statistics and a gallery of one round, as ``reports/rNNN/``.

It reads the round's most finished records (``records_dataset``: filtered, else merged,
else the manifest), computes with DuckDB the FLD-5B annotation and text tables beside the
paper's figures, counts by source and by refusal reason, draws histograms, a gallery and
the first records dropped for each reason, states the config the records depend on
(``round_config``), and writes under ``reports/rNNN/``:

    index.html          the page (self-contained; everything else is referenced relatively)
    stats.json          the same tables and config, for other tools
    figures/*.png       histograms
    gallery/*.jpg       sample images with their annotations drawn on
    dropped/*.jpg       the first records the filter set aside for each reason, drawn small

When an evaluation scored the round against ground truth (``rounds/rNNN/quality.json``,
written by ``refinement.evaluation.write_round_quality``), its table leads the page.
A report is derived data and is rewritten whole by each run. ``index.html`` is written
last, so a page never references a file that is not there yet.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import yaml

from engine.config import EngineConfig
from engine.layout import MANIFEST, QUARANTINE, round_layout
from engine.manifest import manifest_is_checked, manifest_view
from engine.records import RECORD_SCHEMA
from engine.round_state import RoundState, config_digest, read_round_state
from engine.store import Store, records_dataset
from engine.summary import StageSummary
from stages import report_gallery, report_page, report_rounds, report_stats

# Dropped examples shown per reason: enough to see what a reason catches, few enough
# that a round with many reasons keeps a short page.
DROPPED_PER_REASON = 3
# Longest side of a dropped example's image: a thumbnail beside its reason.
DROPPED_SIDE = 320


def _read(store: Store, dataset: str, schema: pa.Schema, columns: list[str]) -> pa.Table:
    table = store.read(dataset, columns=columns)
    return table if table is not None else schema.empty_table().select(columns)


def _records(store: Store, dataset: str) -> tuple[pa.Table | list[str], int | None]:
    """What the report reads, and how many rows when it read them here: the committed
    parts themselves, which DuckDB reads column by column, so the driver never holds the
    dataset; for a manifest that may still hold two copies of an image (ingest stopped
    before its last step), its one-copy view."""
    if dataset != MANIFEST or manifest_is_checked(store):
        paths = store.part_paths(dataset)
        if paths:
            return paths, None
    read = _read(store, dataset, RECORD_SCHEMA, RECORD_SCHEMA.names)
    return (manifest_view(read) if dataset == MANIFEST else read), read.num_rows


def quality_table(store: Store, round_number: int) -> report_stats.StatTable | None:
    """The round's scores against ground truth, when an evaluation stored them
    (``refinement.evaluation.write_round_quality``)."""
    path = round_layout(round_number).quality
    quality = store.read_json(path)
    if quality is None:
        return None
    return report_stats.StatTable(
        "quality",
        f"Quality against ground truth ({quality['images']} images)",
        quality["columns"],
        [tuple(row) for row in quality["rows"]],
        note=f"truth: {quality['truth']}; P and R at IoU 0.5 count every kept box "
        "whatever its score; full scores in " + path,
    )


def round_config(config: EngineConfig, state: RoundState | None) -> dict[str, Any]:
    """What decided the round's records: its specialists, merge and filter settings, and
    for a refinement round (one with a parent) what its student annotated and the merge
    policy's thresholds."""
    stated: dict[str, Any] = {
        "specialists": [
            {"name": s.name, "kind": s.kind, "model": s.model, "revision": s.revision}
            for s in config.annotate.specialists
        ],
        "merge": config.merge.model_dump(mode="json"),
        "filter": config.filter.model_dump(mode="json"),
    }
    if state is not None and state.parent is not None:
        stated["refine"] = {
            "annotate_tasks": list(config.refine.annotate_tasks),
            "policy": config.refine.policy.model_dump(mode="json"),
        }
    return stated


def config_text(config: EngineConfig, state: RoundState | None) -> str:
    """``round_config`` as YAML, headed by a comment when the round's filter step ran with
    another config than this run's: the report states this run's, which may not be the
    one that made the records (a report can be rerun alone with other overrides)."""
    text = yaml.safe_dump(round_config(config, state), sort_keys=False)
    step = None if state is None else state.steps.get("filter")
    if step is not None and step["config"] != config_digest(config):
        text = (
            f"# the round's filter step ran with config {step['config']}, this report with "
            f"{config_digest(config)}: the values below are this report's\n{text}"
        )
    return text


def run_report(store: Store, config: EngineConfig, round_number: int) -> StageSummary:
    """Write ``reports/rNNN/`` for round ``round_number``; works on an empty store too.

    The summary counts the records read (``inputs``) and the records reported
    (``outputs``: one per image, after the manifest's duplicates are set aside) and
    points at the page (``location``).
    """
    started = time.perf_counter()
    layout = round_layout(round_number)
    base = layout.report
    dataset = records_dataset(store, round_number)
    records, rows_read = _records(store, dataset)
    state = read_round_state(store, round_number)

    found = report_stats.record_stats(
        records,
        store.fs,
        config.report.spacy_model,
        len(report_page.UNIT_BINS) - 1,
        config.report.gallery_size,
    )
    rows_read = found.rows if rows_read is None else rows_read
    reported, parsed = found.images, found.parsed
    # In the CLI's unit: images for image: reasons, annotations for the others.
    by_reason = report_stats.reason_table(
        store.part_paths(layout.dropped),
        store.fs,
        "dropped",
        "Dropped by reason (images or annotations)",
    )
    quarantined = report_stats.reason_table(
        store.part_paths(QUARANTINE), store.fs, "quarantine", "Quarantined inputs by reason"
    )
    tables = [*found.tables, quarantined, by_reason]
    histograms = {
        "caption_tokens": ("Caption length", "words per caption", found.caption_tokens,
                           report_page.integer_bins(found.caption_tokens)),
        "regions_per_image": ("Regions per image", "regions", found.regions_per_image,
                              report_page.integer_bins(found.regions_per_image)),
        "box_sizes": ("Box size relative to the image", "sqrt(box area / image area)",
                      found.box_sizes, report_page.UNIT_BINS),
    }  # fmt: skip
    # The page leads with the round's quality, then every round so far.
    quality = quality_table(store, round_number)
    leading = [quality] if quality is not None else []
    policy = report_rounds.policy_table(store, round_number)
    leading += [report_rounds.rounds_table(store, round_number)]
    leading += [policy] if policy is not None else []
    tables = [*leading, *tables]

    figures = []
    by_round = report_rounds.quality_by_round_png(store, round_number)
    if by_round is not None:
        store.write_bytes(f"{base}/figures/quality_by_round.png", by_round)
        figures.append(("figures/quality_by_round.png", "Quality against ground truth by round"))
    for name, (title, xlabel, series, bins) in histograms.items():
        if any(len(values) > 0 for values in series.values()):
            src = f"figures/{name}.png"
            png = report_page.histogram_png(title, xlabel, series, bins)
            store.write_bytes(f"{base}/{src}", png)
            figures.append((src, title))

    reasons = {reason: min(n, DROPPED_PER_REASON) for reason, n in by_reason.rows}
    examples = report_gallery.dropped_examples(store, layout.dropped, reasons)
    # One pass over the manifest for the gallery's and the dropped examples' images.
    images = report_gallery.manifest_images(
        store, [*(r.image_id for r in found.gallery), *(r.image_id for _, r in examples)]
    )
    gallery = []
    for record in found.gallery:
        if record.image_id in images:
            src = f"gallery/{record.image_id}.jpg"
            store.write_bytes(f"{base}/{src}", report_gallery.draw(record, images[record.image_id]))
            gallery.append(report_page.GalleryItem(record, src))
    dropped_items = []
    for n, (reason, record) in enumerate(examples):
        # Numbered: one image may be dropped in parts for several reasons.
        src = f"dropped/{n:03d}.jpg" if record.image_id in images else None
        if src is not None:
            drawn = report_gallery.draw(record, images[record.image_id], DROPPED_SIDE)
            store.write_bytes(f"{base}/{src}", drawn)
        dropped_items.append(report_page.DroppedItem(record, reason, src))

    title = f"FLD data engine report, round {round_number}"
    facts = [
        f"store: {store.url}",
        f"records: {dataset} ({reported} images; {rows_read} rows read)",
        f"captions parsed with spaCy pipeline {config.report.spacy_model!r} for this report: "
        f"{parsed}",
    ]
    stats = {
        "round": round_number,
        "dataset": dataset,
        "records": reported,
        "config": round_config(config, state),
        "tables": {table.name: table.as_json() for table in tables},
    }
    store.write_bytes(f"{base}/stats.json", json.dumps(stats, indent=2).encode())
    page = report_page.render(
        title,
        facts,
        tables,
        figures,
        gallery,
        dropped_items,
        config_text(config, state),
        empty=reported == 0,
    )
    store.write_bytes(f"{base}/index.html", page.encode())

    return StageSummary(
        stage="report",
        inputs=rows_read,
        outputs=reported,
        seconds=time.perf_counter() - started,
        location=store.fs.unstrip_protocol(store.path(f"{base}/index.html")),
    )
