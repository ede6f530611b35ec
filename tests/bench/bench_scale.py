"""Driver memory of each stage's planning as the manifest grows.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_scale.py \\
        --rows 100000 1000000 --work /tmp/scale [--only NAME ...] [--rebuild]

Builds, once per size, a synthetic store of N manifest rows under ``--work`` (reused
when a complete one is there; ``--rebuild`` builds it again), cut into units of 1,000
rows as ingest cuts them, and a round 0 that every stage has finished: the manifest and
quarantine parts (as ``ingest_unit`` commits them, folder units listing their files in
their markers), two specialists' outputs (``shapes``, then ``captions`` which needs its
objects), ``merged``, ``scored``, ``filtered`` and ``dropped``, each committed with the
inputs fingerprint its stage computes, so every stage finds each unit current, as on a
rerun. Half the units are folder images without labels, half COCO images with three
human boxes and a human caption each; every record has four machine boxes, three
captions and one grounded phrase. The image column holds empty bytes (never read by
what is measured). Parts are written with ``Store.commit_unit`` from a template unit
whose id columns are replaced, so 100k rows build in seconds, without Ray.

Then, for each function below, one fresh subprocess per (function, size): it imports
everything, calls the function once on a small store of 2,000 rows (so what any first
call costs, modules imported on first use and Arrow's and DuckDB's first allocations,
about 60-170 MB here, is paid before; ``--no-warm`` skips this), prepares the function's
inputs, hands freed memory back (``release_unused``, ``malloc_trim``), resets the
process's peak RSS (``/proc/self/clear_refs``; ``ru_maxrss`` where that is not allowed),
runs the function once, and reports peak RSS (``VmHWM``) minus the RSS just before: the
driver memory the call needs on top of what its caller holds. The table gives that
delta at each size, the ratio between the largest and smallest size (both floored at
1 MB, so noise on a near-zero figure is not called growth), ``flat`` when that ratio is
<= 2, else ``GROWS``, and the growth per 100k rows (the slope between the two ends).
``--only`` takes names from the table's first column.

Measured (what runs with Ray is measured up to Ray; none of these start it):
  kept_image_ids_by_unit   engine.manifest.kept_image_ids_by_unit
  ingest.remove_dup        stages.ingest.remove_duplicates: ingest's last step, on a
                           manifest with no copies left (it commits nothing), its
                           check record removed first so that the check runs
  ingest.plan_rerun        stages.ingest._folder_units_before: what plan_ingest reads
                           of the committed folder units (extra; the files they read)
  annotate.plan            stages.annotate.run_annotate, whole: every unit is current,
                           so it plans and returns before Ray (``check_fits`` is patched
                           to fail the measurement if it would get that far)
  merge.plan               stages.merge.run_merge with ``run_units`` replaced by its
                           planning part (the ``done``/``committed`` checks of each unit)
  filter.plan              stages.filter.run_filter, likewise (extra)
  export.plan              stages.export.run_export up to and including ``run_units``'
                           planning part; it stops there (shard index and coco.json
                           are not written)
  export.write_coco        stages.export_coco.write_coco over the units export plans
                           (planned before the baseline: they are its input)
  report.stats             the statistics block of stages.report.run_report: reading
                           the records, the quarantine and dropped counts, then
                           stages/report_stats.py's tables and histogram data and the
                           gallery's choice (no drawing, no page)
  evaluation.quality       refinement.evaluation.round_quality against a fixed truth of
                           100 images, without a spaCy pipeline

Figures (2 cores, OMP_NUM_THREADS=1; ``--rows 20000 100000``, rows x5; the stores
build in 7 and 8 s; peak RSS delta of one call in MB):

  function                     20000    100000   ratio  verdict  MB/100k rows
  kept_image_ids_by_unit        15.2      87.6    5.78  GROWS            90.6
  ingest.remove_dup             29.1     140.9    4.85  GROWS           139.8
  ingest.plan_rerun              1.6       7.1    4.53  GROWS             7.0
  annotate.plan                 15.1      88.1    5.84  GROWS            91.3
  merge.plan                    15.0      87.0    5.78  GROWS            90.0
  filter.plan                    0.0       0.1    1.00  flat              0.1
  export.plan                   15.0      87.1    5.79  GROWS            90.1
  export.write_coco            175.6     866.3    4.93  GROWS           863.4
  report.stats                  94.2     328.6    3.49  GROWS           293.0
  evaluation.quality           499.2    2585.6    5.18  GROWS          2607.9

Every planning step but filter's was O(images). Annotate's, merge's and export's were
``kept_image_ids_by_unit`` and nothing more (their own units add < 1 MB): it read the
``image_id``, ``regions`` and ``captions`` columns of every manifest unit at once (56 MB
of the 88 at 100k, whole nested regions and captions read to count labels), then
``kept_rows`` listed every id into a dict. ``remove_duplicates`` did the same read plus
one Python dict per row. ``write_coco`` held every exported record, then every image and
box as dicts, then the whole file as one string (8.6 KB per image). The report reads the
whole records dataset into one Arrow table, and its histograms are Python lists of one
value per caption, image and box. ``round_quality`` turned every dataset of the round
into Python records, all held at once (26 KB per image).

Now (the stores record, as ingest's last step does, that their manifest holds each
image once; the whole-dataset questions are answered by DuckDB in bounded memory,
``engine/duck.py``, or batch by batch), ``--rows 100000 1000000``:

  function                    100000   1000000   ratio  verdict  MB/100k rows
  kept_image_ids_by_unit         0.1       0.4    1.00  flat              0.0
  ingest.remove_dup             46.0      73.2    1.59  flat              3.0
  ingest.plan_rerun              7.1      62.9    8.87  GROWS             6.2
  annotate.plan                  0.4       0.7    1.00  flat              0.0
  merge.plan                     0.3       1.2    1.15  flat              0.1
  filter.plan                    0.0       0.6    1.00  flat              0.1
  export.plan                    0.3       0.9    1.00  flat              0.1
  export.write_coco             49.6     158.4    3.20  GROWS            12.1
  report.stats                 153.6     156.7    1.02  flat              0.3
  evaluation.quality             8.4      36.2    4.31  GROWS             3.1

- ingest's last step records the manifest it checked (``record_manifest_checked``);
  while the manifest is that one, ``kept_image_ids_by_unit`` reads markers alone and the
  planners' units carry no id lists (a unit's id column is read for its fingerprint, one
  unit at a time): annotate, merge, filter and export plan in flat memory;
- ``remove_duplicates`` puts the parts' id columns, 64 parts at a time, into a DuckDB
  table on local disk and groups it there (64 MB); only the units holding a copy are
  read into the driver;
- ``write_coco``'s names and ids are queries over a DuckDB table of the images' paths
  and original ids (128 MB: its joins over millions of clashing paths need more pinned
  at once). It fills that memory by 1M images and stays there:
  ``bench_coco_names.py`` measures 217 MB at 1M and 220 at 3M distinct paths, 212 and
  226 with every file name in 1,000 folders;
- the report runs every query on 64 parts at a time and adds counts and sums up;
- ``round_quality`` reads only the truth's images, unit by unit.

Still O(images): the list of files a folder's committed units read (``plan_rerun``, as
the folder's own listing is) and evaluation's per-unit filtering of the truth.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNIT_ROWS = 1_000
WIDTH, HEIGHT = 640, 480
CATEGORIES = ("person", "car", "dog", "cat", "chair", "bottle", "tree", "sign")
BUILT = "built.json"
# Bump when the synthetic store changes, so a stale one is built again.
BUILD_VERSION = 1
TRUTH_IMAGES = 100
# The store each measuring process calls its function on once before the measured call:
# one folder unit and one COCO unit.
WARM_ROWS = 2 * UNIT_ROWS
MEASURES = (
    "kept_image_ids_by_unit",
    "ingest.remove_dup",
    "ingest.plan_rerun",
    "annotate.plan",
    "merge.plan",
    "filter.plan",
    "export.plan",
    "export.write_coco",
    "report.stats",
    "evaluation.quality",
)


# ---------------------------------------------------------------- the synthetic store


def bench_config() -> Any:
    from engine.config import EngineConfig

    return EngineConfig.model_validate(
        {
            "ingest": {"unit_size": UNIT_ROWS},
            "annotate": {
                "specialists": [
                    {"name": "shapes", "kind": "world_shapes"},
                    {"name": "captions", "kind": "world_captions"},
                ]
            },
        }
    )


def unit_key(number: int) -> str:
    # As stages.ingest._key names a unit: a short hash of what it holds.
    return hashlib.sha1(f"bench-scale\n{number}".encode()).hexdigest()[:16]


def is_coco_unit(number: int) -> bool:
    return number % 2 == 1


def row_ids(index: int) -> tuple[str, str]:
    """(image_id, sha256) of manifest row ``index``: every row a distinct image."""
    from engine.records import image_id_for

    sha256 = hashlib.sha256(f"bench-scale-{index}".encode()).hexdigest()
    return image_id_for(sha256), sha256


def row_uri(number: int, index: int) -> str:
    # Distinct file names: the evaluation matches records by the uri's last segment.
    if is_coco_unit(number):
        return f"/data/coco/train2017/{index:09d}.jpg"
    return f"/data/photos/batch{number:05d}/{index:09d}.jpg"


def template_records(number: int, size: int, start: int) -> dict[str, list]:
    """One unit's records at each step, for rows ``start .. start + size``."""
    from engine.records import Caption, ImageRecord, Phrase, Region, TextStats

    coco = is_coco_unit(number)
    out: dict[str, list] = {k: [] for k in ("manifest", "shapes", "captions", "merged")}
    for j in range(size):
        index = start + j
        image_id, sha256 = row_ids(index)
        base = dict(
            image_id=image_id,
            uri=row_uri(number, index),
            source="coco:instances_train2017.json" if coco else "folder",
            width=WIDTH,
            height=HEIGHT,
            sha256=sha256,
        )
        human_regions, human_captions = [], {}
        if coco:
            for k in range(3):
                x, y = (j * 7 + k * 90) % 500, (j * 11 + k * 60) % 380
                category = (j + k) % len(CATEGORIES)
                human_regions.append(
                    Region(
                        (x, y, x + 80 + k * 10, y + 60 + k * 5),
                        CATEGORIES[category],
                        "object",
                        "human:coco",
                        category_id=category + 1,
                    )
                )
            human_captions["brief"] = Caption(f"a {CATEGORIES[j % 8]} near a chair", "human:coco")
        machine = [
            Region(
                (
                    (j + 40 * k) % 560,
                    (j + 30 * k) % 400,
                    (j + 40 * k) % 560 + 50,
                    (j + 30 * k) % 400 + 50,
                ),
                CATEGORIES[(j + k + 3) % len(CATEGORIES)],
                "object",
                "objects:world_shapes",
                score=0.5 + 0.1 * k,
                round=0,
            )
            for k in range(4)
        ]
        texts = {
            "brief": "a red circle",
            "detailed": "a red circle and a blue square on a sand background",
            "more_detailed": "A red circle sits left of a blue square; a small green star "
            "is above them, all on a sand background with faint shading.",
        }
        captions = {k: Caption(t, "captions:world_captions", 0.8, 0) for k, t in texts.items()}
        coco_id = index if coco else None
        out["manifest"].append(
            ImageRecord(
                **base,
                captions=dict(human_captions),
                regions=list(human_regions),
                coco_image_id=coco_id,
            )
        )
        out["shapes"].append(ImageRecord(**base, regions=machine))
        out["captions"].append(ImageRecord(**base, captions=captions))
        merged_captions = {**captions, **human_captions}
        regions = human_regions + machine
        phrase = Phrase(
            "detailed", 2, 12, "red circle", [len(human_regions)], "captions:world", 0.7, 0
        )
        out["merged"].append(
            ImageRecord(
                **base,
                captions=merged_captions,
                regions=regions,
                phrases=[phrase],
                coco_image_id=coco_id,
            )
        )
    stats = TextStats(["circle", "square"], ["red", "blue"], [], [], 1.5, 0.0)
    out["scored"] = [
        dataclasses.replace(
            r,
            captions={k: dataclasses.replace(c, stats=stats) for k, c in r.captions.items()},
        )
        for r in out["merged"]
    ]
    # The filter sets aside the least-scored machine box of every tenth image.
    out["filtered"], out["dropped"] = [], []
    for j, record in enumerate(out["scored"]):
        if j % 10:
            out["filtered"].append(record)
            continue
        out["filtered"].append(dataclasses.replace(record, regions=record.regions[:-1]))
        out["dropped"].append(
            dataclasses.replace(record, captions={}, phrases=[], regions=record.regions[-1:])
        )
    return out


def build_store(path: Path, rows: int) -> None:
    """Write the store described in the module's docstring; a stage at a time per unit."""
    import pyarrow as pa

    from engine.layout import MANIFEST, QUARANTINE, round_layout
    from engine.manifest import record_manifest_checked
    from engine.records import (
        ANNOTATION_SCHEMA,
        DROPPED_SCHEMA,
        quarantine_to_table,
        records_to_table,
    )
    from engine.store import Store, fingerprint
    from stages.annotate import annotate_inputs
    from stages.ingest import FILES_READ
    from stages.merge import SpecialistMerge, output_datasets

    config = bench_config()
    store = Store(str(path))
    layout = round_layout(0)
    shapes_spec, captions_spec = config.annotate.specialists
    shapes, captions = layout.annotate("shapes"), layout.annotate("captions")
    sources, region_texts = output_datasets(config.annotate.specialists, 0)
    assert sources == [shapes, captions] and not region_texts
    policy = SpecialistMerge(config.merge.iou, config.merge.fuse_boxes)
    thresholds = config.filter.model_dump(exclude={"spacy_model"})

    def tables(records: dict[str, list]) -> dict[str, pa.Table]:
        made = {
            name: records_to_table(records[name])
            for name in ("shapes", "captions", "merged", "scored", "filtered")
        }
        made["manifest"] = records_to_table(
            records["manifest"], images=[b""] * len(records["manifest"])
        )
        for name in ("shapes", "captions"):
            errors = pa.nulls(made[name].num_rows, pa.string())
            made[name] = made[name].append_column(ANNOTATION_SCHEMA.field("error"), errors)
        dropped = records_to_table(records["dropped"])
        reasons = pa.array(["region: score below threshold"] * dropped.num_rows, pa.string())
        made["dropped"] = dropped.append_column(DROPPED_SCHEMA.field("reason"), reasons)
        return made

    def with_ids(table: pa.Table, ids: dict[str, list]) -> pa.Table:
        # Only the identity columns change from unit to unit: the rest is the template's.
        count = table.num_rows
        for name, values in ids.items():
            i = table.schema.get_field_index(name)
            field = table.schema.field(i)
            table = table.set_column(i, field, pa.array(values[:count], field.type))
        return table

    templates: dict[tuple[bool, int], dict[str, pa.Table]] = {}
    started = time.perf_counter()
    units = (rows + UNIT_ROWS - 1) // UNIT_ROWS
    empty_quarantine = quarantine_to_table([])
    for number in range(units):
        start = number * UNIT_ROWS
        size = min(UNIT_ROWS, rows - start)
        coco = is_coco_unit(number)
        if (coco, size) not in templates:
            templates[coco, size] = tables(template_records(number, size, start))
        template = templates[coco, size]
        pairs = [row_ids(start + j) for j in range(size)]
        image_ids = [image_id for image_id, _ in pairs]
        uris = [row_uri(number, start + j) for j in range(size)]
        ids = {
            "image_id": image_ids,
            "sha256": [sha256 for _, sha256 in pairs],
            "uri": uris,
            "coco_image_id": [json.dumps(start + j) if coco else None for j in range(size)],
        }
        dropped_ids = {name: values[::10] for name, values in ids.items()}
        key = unit_key(number)
        info = None if coco else {FILES_READ: uris}
        store.commit_unit(
            key,
            {MANIFEST: with_ids(template["manifest"], ids), QUARANTINE: empty_quarantine},
            info=info,
        )
        kept = tuple(image_ids)
        for spec, dataset, upstream in (
            (shapes_spec, shapes, []),
            (captions_spec, captions, [shapes]),
        ):
            inputs = annotate_inputs(store, spec, key, kept, upstream)
            table = with_ids(template[spec.name], ids)
            store.commit_unit(key, {dataset: table}, inputs=inputs)
        read = [MANIFEST, *sources]
        merged_from = {d: store.marker_fingerprint(d, key) for d in read}
        inputs = fingerprint("merge", policy, kept, merged_from)
        store.commit_unit(key, {layout.merged: with_ids(template["merged"], ids)}, inputs=inputs)
        merged_marker = store.marker_fingerprint(layout.merged, key)
        inputs = fingerprint("score", config.filter.spacy_model, merged_marker)
        store.commit_unit(key, {layout.scored: with_ids(template["scored"], ids)}, inputs=inputs)
        scored_marker = store.marker_fingerprint(layout.scored, key)
        inputs = fingerprint("threshold", thresholds, scored_marker)
        store.commit_unit(
            key,
            {
                layout.filtered: with_ids(template["filtered"], ids),
                layout.dropped: with_ids(template["dropped"], dropped_ids),
            },
            inputs=inputs,
        )
        if (number + 1) % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"  built {number + 1}/{units} units ({elapsed:.0f} s)", flush=True)
    # As ingest's last step does: the manifest holds each image once.
    record_manifest_checked(store)


class _Planned(Exception):
    """Raised by ``plan_then_stop`` where a stage would hand its units to Ray."""

    def __init__(self, units: list, todo: int) -> None:
        super().__init__(f"{len(units)} units planned, {todo} to run")
        self.units, self.todo = units, todo


def _planning(units, done, committed) -> int:
    # The planning part of engine.execution.run_units, as it is written there.
    todo = [unit for unit in units if not done(unit)]
    if committed is not None:
        sum(1 for unit in todo if committed(unit))
    return len(todo)


def plan_only(stage, work, units, *, done, num_cpus, max_in_flight=64, committed=None):
    """A stand-in for ``run_units`` that plans and runs nothing: the summary of a rerun."""
    from engine.summary import StageSummary

    summary = StageSummary(stage)
    summary.units_skipped = len(units) - _planning(units, done, committed)
    return summary


def plan_then_stop(stage, work, units, *, done, num_cpus, max_in_flight=64, committed=None):
    raise _Planned(list(units), _planning(units, done, committed))


def export_units(store: Any, config: Any) -> list:
    """The units ``run_export`` plans (its planning, stopped before Ray)."""
    import stages.export

    real = stages.export.run_units
    stages.export.run_units = plan_then_stop
    try:
        stages.export.run_export(store, config, 0)
    except _Planned as planned:
        return planned.units
    finally:
        stages.export.run_units = real
    raise RuntimeError("run_export did not reach run_units")


def ensure_store(work: Path, rows: int, rebuild: bool) -> Path:
    path = work / f"store-{rows}"
    built = path / BUILT
    expected = {"rows": rows, "unit_rows": UNIT_ROWS, "version": BUILD_VERSION}
    if not rebuild and built.exists() and json.loads(built.read_text()) == expected:
        print(f"store of {rows} rows: reusing {path}", flush=True)
        return path
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    print(f"store of {rows} rows: building {path}", flush=True)
    started = time.perf_counter()
    build_store(path, rows)
    built.write_text(json.dumps(expected))
    print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
    return path


# ---------------------------------------------------------------- measured functions


def report_statistics(store: Any, config: Any) -> None:
    """The statistics block of stages.report.run_report, as written there."""
    from engine.layout import QUARANTINE, round_layout
    from engine.store import records_dataset
    from stages import report_page, report_stats
    from stages.report import _records

    records, _ = _records(store, records_dataset(store, 0))
    report_stats.record_stats(
        records,
        store.fs,
        config.report.spacy_model,
        len(report_page.UNIT_BINS) - 1,
        config.report.gallery_size,
    )
    for dataset, name in ((round_layout(0).dropped, "dropped"), (QUARANTINE, "quarantine")):
        report_stats.reason_table(store.part_paths(dataset), store.fs, name, name)


def prepare(name: str, store_path: Path) -> Callable[[], Any]:
    """Import what ``name`` needs and build its inputs; returns the call to measure."""
    import stages.annotate
    import stages.filter
    import stages.merge
    from engine.layout import CHECKED_MANIFEST, round_layout
    from engine.manifest import kept_image_ids_by_unit
    from engine.store import Store
    from refinement.evaluation import round_quality
    from stages.export import run_export
    from stages.export_coco import write_coco
    from stages.ingest import _folder_units_before, remove_duplicates

    store = Store(str(store_path))
    config = bench_config()

    def refuse_ray(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("annotate found units to run: the store is not current")

    def export_plan() -> None:
        with contextlib.suppress(_Planned):
            run_export(store, config, 0)

    # Ray never starts: the stages' hand-over to it is replaced before the baseline.
    stages.merge.run_units = plan_only
    stages.filter.run_units = plan_only
    stages.export.run_units = plan_then_stop
    stages.annotate.check_fits = refuse_ray
    if name == "export.write_coco":
        units = export_units(store, config)
        dataset = units[0].records_dataset
        coco = round_layout(0).coco
        exported = [member for unit in units for member in unit.members]
        return lambda: write_coco(store, dataset, exported, coco, [])
    if name == "ingest.remove_dup":
        # As after a unit committed since the last check: the check runs in full (it
        # finds no copies and records the check again).
        store.fs.rm(store.path(CHECKED_MANIFEST))
        return lambda: remove_duplicates(store)
    if name == "evaluation.quality":
        records = template_records(1, TRUTH_IMAGES, UNIT_ROWS)["manifest"]
        truth = {record.image_id: record for record in records}
        return lambda: round_quality(store, 0, truth, None)
    calls: dict[str, Callable[[], Any]] = {
        "kept_image_ids_by_unit": lambda: kept_image_ids_by_unit(store),
        "ingest.plan_rerun": lambda: _folder_units_before(store),
        "annotate.plan": lambda: stages.annotate.run_annotate(store, config, 0),
        "merge.plan": lambda: stages.merge.run_merge(store, config, 0),
        "filter.plan": lambda: stages.filter.run_filter(store, config, 0),
        "export.plan": export_plan,
        "report.stats": lambda: report_statistics(store, config),
    }
    return calls[name]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Make VmHWM the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _release() -> None:
    """Hand freed memory back to the system, so the next call's peak is its own."""
    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak(call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call`` once: its peak RSS over the RSS before it, in MB."""
    _release()
    resettable = _reset_peak()
    before = _status_kb("VmRSS")
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    if resettable:
        delta, method = _status_kb("VmHWM") - before, "VmHWM"
    else:  # the process's peak so far cannot be reset: only a higher one shows
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        delta, method = after - max(before, before_max), "ru_maxrss"
    return {
        "delta_mb": max(delta, 0) / 1024,
        "baseline_mb": before / 1024,
        "seconds": seconds,
        "method": method,
    }


def measure_child(name: str, store_path: Path, warm_path: Path | None) -> dict[str, Any]:
    """Measure ``name`` on ``store_path``, after one call on the small ``warm_path`` store:
    what a first call costs whatever the size (modules imported on first use, Arrow's
    and DuckDB's first allocations) is then paid, and the figure is what grows."""
    warm = _peak(prepare(name, warm_path)) if warm_path is not None else None
    result = _peak(prepare(name, store_path))
    result["warm_mb"] = None if warm is None else warm["delta_mb"]
    return result


def measure(name: str, store_path: Path, warm_path: Path | None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, __file__, "--child", name, "--store", str(store_path)]
    if warm_path is not None:
        command += ["--warm", str(warm_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- table


def print_table(sizes: list[int], results: dict[str, dict[int, dict[str, Any]]]) -> None:
    first, last = sizes[0], sizes[-1]
    head = f"{'function':<24}" + "".join(f"{n:>10}" for n in sizes)
    head += f"{'ratio':>8}  verdict  {'MB/100k rows':>12}"
    print(f"peak RSS delta of one call, MB, by manifest rows (rows x{last / first:g})")
    print(head)
    for name, by_size in results.items():
        cells, values = [], []
        for n in sizes:
            result = by_size[n]
            if "error" in result:
                cells.append(f"{'error':>10}")
            else:
                cells.append(f"{result['delta_mb']:>10.1f}")
                values.append(result["delta_mb"])
        line = f"{name:<24}" + "".join(cells)
        if len(values) == len(sizes) and len(sizes) > 1:
            ratio = max(values[-1], 1.0) / max(values[0], 1.0)
            slope = (values[-1] - values[0]) / (last - first) * 100_000
            line += f"{ratio:>8.2f}  {'flat' if ratio <= 2 else 'GROWS':<7}  {slope:>12.1f}"
        print(line)
        for n in sizes:
            if "error" in by_size[n]:
                print(f"    {n} rows: {by_size[n]['error']}")
    print("seconds per call:")
    for name, by_size in results.items():
        times = [f"{by_size[n].get('seconds', float('nan')):>10.2f}" for n in sizes]
        print(f"{name:<24}" + "".join(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--only", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--child", choices=MEASURES, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-warm",
        action="store_true",
        help="measure first calls (with the one-off cost of first use), no warm-up call",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(args.child, args.store, args.warm)))
        return
    sizes = sorted(set(args.rows))
    args.work.mkdir(parents=True, exist_ok=True)
    stores = {n: ensure_store(args.work, n, args.rebuild) for n in sizes}
    warm = None if args.no_warm else ensure_store(args.work, WARM_ROWS, args.rebuild)
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in args.only}
    for name in args.only:
        for n in sizes:
            results[name][n] = result = measure(name, stores[n], warm)
            shown = result.get("error") or (
                f"+{result['delta_mb']:.1f} MB over {result['baseline_mb']:.0f} MB "
                f"in {result['seconds']:.1f} s ({result['method']}; "
                f"warm-up call on {WARM_ROWS} rows: +{result['warm_mb'] or 0:.1f} MB)"
            )
            print(f"  {name} @ {n}: {shown}", flush=True)
    print()
    print_table(sizes, results)


if __name__ == "__main__":
    main()
