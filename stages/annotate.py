"""Annotate: every configured specialist runs as a Ray actor pool over the manifest.

Work is cut into the manifest's units. For each (specialist, unit) a CPU task reads the
unit's images, decodes them and attaches what the specialist needs from earlier
specialists (captions for a grounder, boxes for a segmenter); the decoded unit goes to
the least busy actor of that specialist's pool, which annotates it in batches and
commits ``rounds/rNNN/annotate/<name>/part-<unit>.parquet`` with scores and lineage.
Decoding thus happens off the model's critical path, prefetched while the actor works.

Specialists run in levels: one that needs a product (``captions``, ``objects``...)
runs after every specialist that produces it; those of one level run together, so
small models share GPUs by their fractions. An image that makes a model fail is
recorded with its error and the rest of the batch goes on; a CUDA out-of-memory error
retries the batch at half the size.
"""

from __future__ import annotations

import io
import sys
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import ray
from PIL import Image
from tqdm import tqdm

from engine.config import EngineConfig, SpecialistConfig
from engine.execution import StageError, check_fits
from engine.layout import MANIFEST, round_layout
from engine.records import (
    ANNOTATION_SCHEMA,
    IMAGE_COLUMN,
    RECORD_SCHEMA,
    ImageRecord,
    records_from_table,
    records_to_table,
)
from engine.store import Store, kept_image_ids_by_unit
from engine.summary import StageSummary
from specialists import build_specialist
from specialists.base import Annotations, Specialist, SpecialistInput


def specialist_levels(specialists: dict[str, Specialist]) -> list[list[str]]:
    """Specialist names in levels: each level needs only what earlier levels produce.

    A need that no specialist produces is met by the labels the images came with
    (human boxes or captions), so it orders nothing. Raises ValueError on a cycle.
    """
    producers = {
        product: {name for name, s in specialists.items() if product in s.produces}
        for s in specialists.values()
        for product in s.needs
    }
    waiting = {
        name: set().union(*(producers[p] for p in s.needs)) - {name} if s.needs else set()
        for name, s in specialists.items()
    }
    levels: list[list[str]] = []
    done: set[str] = set()
    while waiting:
        ready = sorted(name for name, deps in waiting.items() if deps <= done)
        if not ready:
            raise ValueError(f"specialists need each other in a cycle: {sorted(waiting)}")
        levels.append(ready)
        done.update(ready)
        for name in ready:
            del waiting[name]
    return levels


def run_annotate(
    store: Store,
    config: EngineConfig,
    round_number: int,
    specialists: Sequence[SpecialistConfig] | None = None,
    units: Collection[str] | None = None,
) -> StageSummary:
    """Run ``specialists`` (default: the config's) over the manifest's ``units`` (default:
    all of them) into the round's ``annotate/<name>/`` datasets, skipping committed units.

    A refinement round runs its student over every unit and the specialists only over
    the units ingested since the previous round.
    """
    started = time.perf_counter()
    summary = StageSummary(
        "annotate", location=store.path(round_layout(round_number).annotate_root)
    )
    chosen = config.annotate.specialists if specialists is None else specialists
    specs = {s.name: s for s in chosen}
    if not specs:
        summary.notes["no specialists configured"] += 1
        return summary
    built = {name: build_specialist(spec) for name, spec in specs.items()}
    chosen_units = {
        key: ids
        for key, ids in kept_image_ids_by_unit(store).items()
        if units is None or key in units
    }
    for level in specialist_levels(built):
        upstream = {
            name: [
                round_layout(round_number).annotate(other)
                for other in specs
                if other != name and built[other].produces & built[name].needs
            ]
            for name in level
        }
        level_specs = [specs[n] for n in level]
        _run_level(store, config, round_number, level_specs, chosen_units, upstream, summary)
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass(frozen=True, slots=True)
class PreparedUnit:
    unit: str
    records: list[ImageRecord]
    # Decoded RGB pixels, one array per record: numpy travels through Ray's object store
    # without a copy into the actor.
    pixels: list[np.ndarray]


def prepare_unit(
    store_url: str, unit: str, image_ids: Sequence[str], upstream: Sequence[str]
) -> PreparedUnit:
    """Read and decode one unit's images and attach the upstream specialists' output."""
    store = Store(store_url)
    table = store.read_unit(MANIFEST, unit, columns=[*RECORD_SCHEMA.names, IMAGE_COLUMN])
    wanted = set(image_ids)
    records, pixels = [], []
    by_id = {}
    for record, jpeg in zip(
        records_from_table(table), table.column(IMAGE_COLUMN).to_pylist(), strict=True
    ):
        if record.image_id in wanted and record.image_id not in by_id:
            by_id[record.image_id] = record
            records.append(record)
            with Image.open(io.BytesIO(jpeg)) as image:
                pixels.append(np.asarray(image.convert("RGB")))
    for dataset in upstream:
        if not store.is_committed(dataset, unit):
            continue
        for extra in records_from_table(store.read_unit(dataset, unit)):
            if extra.image_id in by_id:
                attach(by_id[extra.image_id], extra)
    return PreparedUnit(unit, records, pixels)


def attach(record: ImageRecord, extra: ImageRecord) -> None:
    """Add another source's annotations to a record: captions fill missing kinds only
    (the labels an image came with come first), regions and phrases are appended."""
    for kind, caption in extra.captions.items():
        record.captions.setdefault(kind, caption)
    offset = len(record.regions)
    record.regions.extend(extra.regions)
    for phrase in extra.phrases:
        phrase.regions = [offset + index for index in phrase.regions]
        record.phrases.append(phrase)


class SpecialistActor:
    """Holds one loaded specialist; annotates whole units and commits their parts."""

    def __init__(self, config: SpecialistConfig, store_url: str, round_number: int) -> None:
        self.config = config
        self.store = Store(store_url)
        self.round_number = round_number
        self.dataset = round_layout(round_number).annotate(config.name)
        self.specialist = build_specialist(config)
        self.specialist.setup()

    def run_unit(self, prepared: PreparedUnit) -> StageSummary:
        items = [
            SpecialistInput(record, Image.fromarray(pixels))
            for record, pixels in zip(prepared.records, prepared.pixels, strict=True)
        ]
        summary = StageSummary("annotate", inputs=len(items))
        results = annotate_resilient(self.specialist, items, self.config.batch_size, summary)
        rows = []
        for item, (found, error) in zip(items, results, strict=True):
            row = self._stamp(item.record, found or Annotations())
            rows.append((row, error))
        table = _annotation_table(rows)
        self.store.commit_unit(prepared.unit, {self.dataset: table})
        summary.outputs = sum(1 for _, error in rows if error is None)
        return summary

    def _stamp(self, record: ImageRecord, annotations: Annotations) -> ImageRecord:
        """The specialist's output as a record of its own, every annotation with lineage."""
        source = self.specialist.source
        for part in (*annotations.captions.values(), *annotations.regions, *annotations.phrases):
            part.source = part.source or source
            part.round = self.round_number
        return replace(
            record,
            captions=annotations.captions,
            regions=annotations.regions,
            phrases=annotations.phrases,
        )


def annotate_resilient(
    specialist: Specialist,
    items: list[SpecialistInput],
    batch_size: int,
    summary: StageSummary,
) -> list[tuple[Annotations | None, str | None]]:
    """Annotate ``items`` in batches; per item, its annotations or the error it caused.

    Out of memory: halve the batch and go on (down to one image). Any other failure:
    rerun that batch image by image, so one bad image costs only itself.
    """
    results: list[tuple[Annotations | None, str | None]] = []
    start, size = 0, batch_size
    while start < len(items):
        batch = items[start : start + size]
        try:
            results.extend((a, None) for a in _checked(specialist, batch))
            start += len(batch)
        except Exception as exc:
            if _is_out_of_memory(exc) and size > 1:
                size = max(1, size // 2)
                summary.notes[f"batch halved after out of memory (to {size})"] += 1
                _free_accelerator_memory()
                continue
            for item in batch:
                try:
                    results.append((_checked(specialist, [item])[0], None))
                except Exception as single:
                    error = f"{type(single).__name__}: {single}".splitlines()[0][:500]
                    summary.dropped[f"model failed: {type(single).__name__}"] += 1
                    results.append((None, error))
                    _free_accelerator_memory()
            start += len(batch)
    return results


def _checked(specialist: Specialist, batch: list[SpecialistInput]) -> list[Annotations]:
    out = specialist.annotate(batch)
    if len(out) != len(batch):
        raise RuntimeError(f"{type(specialist).__name__} returned {len(out)} for {len(batch)}")
    return out


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, without importing torch for specialists that have none.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _annotation_table(rows: list[tuple[ImageRecord, str | None]]) -> pa.Table:
    table = records_to_table([record for record, _ in rows])
    errors = [error for _, error in rows]
    return table.append_column(ANNOTATION_SCHEMA.field("error"), pa.array(errors, pa.string()))


def _run_level(
    store: Store,
    config: EngineConfig,
    round_number: int,
    specs: list[SpecialistConfig],
    units: dict[str, tuple[str, ...]],
    upstream: dict[str, list[str]],
    summary: StageSummary,
) -> None:
    """Run the specialists of one level together, each over every unit not yet committed."""
    # Every actor of the level, plus one decode task to feed them, must fit at once.
    check_fits(
        "annotate",
        cpus=sum(s.num_cpus * s.pool_size for s in specs) + config.ray.task_cpus,
        gpus=sum(s.num_gpus * s.pool_size for s in specs),
    )
    prepare = ray.remote(num_cpus=config.ray.task_cpus)(prepare_unit)
    queues: dict[str, deque[str]] = {}
    pools: dict[str, list] = {}
    busy: dict[str, list[int]] = {}
    for spec in specs:
        dataset = round_layout(round_number).annotate(spec.name)
        pending_units = [u for u in units if not store.is_committed(dataset, u)]
        summary.units_skipped += len(units) - len(pending_units)
        if not pending_units:
            continue
        actor_class = ray.remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus)(SpecialistActor)
        pools[spec.name] = [
            actor_class.remote(spec, store.url, round_number) for _ in range(spec.pool_size)
        ]
        busy[spec.name] = [0] * spec.pool_size
        queues[spec.name] = deque(pending_units)

    # Each actor holds at most prefetch_units units: one being annotated, the rest decoded
    # and waiting, so the model never waits for the decoder and memory stays bounded.
    in_flight: dict = {}
    failures: list[str] = []
    total = sum(len(q) for q in queues.values())
    names = ", ".join(s.name for s in specs)
    with tqdm(total=total, desc=f"annotate [{names}]", unit="unit", file=sys.stderr) as bar:
        while True:
            for name, queue in queues.items():
                while queue and min(busy[name]) < config.annotate.prefetch_units:
                    unit = queue.popleft()
                    actor_index = busy[name].index(min(busy[name]))
                    prepared = prepare.remote(store.url, unit, units[unit], upstream[name])
                    ref = pools[name][actor_index].run_unit.remote(prepared)
                    in_flight[ref] = (name, unit, actor_index)
                    busy[name][actor_index] += 1
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            name, unit, actor_index = in_flight.pop(ready[0])
            busy[name][actor_index] -= 1
            try:
                summary.add(ray.get(ready[0]))
                summary.units_run += 1
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                failures.append(f"{name}/{unit}: {type(cause).__name__}: {cause}".splitlines()[0])
            bar.update(1)
            bar.set_postfix(images=summary.inputs)
    for actors in pools.values():
        for actor in actors:
            ray.kill(actor)
    if failures:
        raise StageError(
            f"annotate: {len(failures)} units failed (rerun to retry them): "
            + "; ".join(failures[:3])
        )
