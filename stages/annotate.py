"""Annotate: every configured specialist runs as a Ray actor pool over the manifest.

Work is cut into the manifest's units. For each (specialist, unit) a CPU task reads the
unit's images, decodes them and attaches what the specialist needs from earlier
specialists (captions for a grounder, boxes for a segmenter); the decoded unit goes to
an idle actor of that specialist's pool, which annotates it in batches and commits
``rounds/rNNN/annotate/<name>/part-<unit>.parquet`` with scores and lineage
(stages/annotate_worker.py). Decoding thus happens off the model's critical path,
prefetched while the actors work.

A specialist that needs a product (``captions``, ``objects``...) works on a unit as soon
as every specialist that produces it has committed that unit: there is no barrier
across the manifest between them. Every specialist's pool runs at once where all the
actors fit together (small models share GPUs by their fractions); where they do not,
the specialists run in levels, each level after the one it needs.

An image that makes a model raise is recorded with its error by the actor. An image
that takes the process down (a segfault, an exit, a batch that hangs past
``batch_timeout_s``) is found here: the actor is restarted and the unit retried in
halves down to that image, which is recorded with the cause, so the stage still ends
complete in one run."""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import ray

from engine.config import EngineConfig, SpecialistConfig
from engine.execution import StageError, check_fits, fits, progress_bar
from engine.layout import MANIFEST, round_layout
from engine.manifest import kept_image_ids_by_unit, unit_image_ids
from engine.store import Store, fingerprint
from engine.summary import StageSummary
from specialists import build_specialist
from specialists.base import Specialist
from stages.annotate_worker import BatchTimedOut, Result, SpecialistActor, describe, prepare_unit


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
    levels = specialist_levels(built)
    producers = {
        name: [
            other for other in specs if other != name and built[other].produces & built[name].needs
        ]
        for name in specs
    }
    run = functools.partial(
        _run_specialists, store, config, round_number, specs, units=chosen_units,
        producers=producers, summary=summary,
    )  # fmt: skip
    if not run([name for level in levels for name in level], may_split=len(levels) > 1):
        # Every pool at once does not fit: level by level, each after those it needs.
        for level in levels:
            run(level, may_split=False)
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass(eq=False)
class _UnitJob:
    """One unit of one specialist, and what is known of its images while parts run."""

    unit: str
    size: int
    prepared: ray.ObjectRef
    # What the unit is annotated from (engine.store.fingerprint), recorded at commit.
    inputs: str
    results: dict[int, Result] = field(default_factory=dict)
    open_calls: int = 0
    failed: bool = False


@dataclass(frozen=True, eq=False)
class _Call:
    job: _UnitJob
    # None: the whole unit (less the images already known), annotated and committed by
    # the actor. Otherwise a part of the unit, annotated and handed back uncommitted.
    indices: tuple[int, ...] | None = None


class _Pool:
    """One specialist's actors and its work: whole units first, then, for a unit whose
    call took the process down (a crash, an exit, a hung batch), the halves of that unit,
    then their halves, down to the image that does it, which is recorded with the cause.
    Each actor runs one call at a time, so the call that was running when the process
    died is the one to blame; decoding runs ahead in tasks of its own."""

    def __init__(
        self,
        spec: SpecialistConfig,
        store_url: str,
        round_number: int,
        units: list[str],
        open_unit: Callable[[str], _UnitJob],
        config: EngineConfig,
    ) -> None:
        self.spec = spec
        # A lost process is replaced by a new actor rather than restarted by Ray: calls
        # sent to a restarting actor fail, while a new one queues them until it is up.
        actor_class = ray.remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus)(SpecialistActor)
        self.new_actor = lambda: actor_class.remote(spec, store_url, round_number)
        self.actors = [self.new_actor() for _ in range(spec.pool_size)]
        self.idle = set(range(spec.pool_size))
        self.units = deque(units)
        self.open_unit = open_unit
        self.calls: deque[_Call] = deque()
        self.open_jobs = 0
        self.max_open_jobs = spec.pool_size * config.annotate.prefetch_units
        self.max_crashed = config.annotate.max_crashed_images
        self.crashed: list[str] = []

    def next_call(self) -> _Call | None:
        while self.units and self.open_jobs < self.max_open_jobs:
            job = self.open_unit(self.units.popleft())
            parts = self._parts(job.size)
            job.open_calls = len(parts)
            self.open_jobs += 1
            self.calls.extend(_Call(job, part) for part in parts)
        return self.calls.popleft() if self.calls else None

    def _parts(self, size: int) -> list[tuple[int, ...] | None]:
        """How a unit is spread over the pool: whole on one actor (which commits it), or,
        when the pool has several actors and the unit several batches, in up to one part
        per actor, so a unit larger than a batch keeps every actor busy; the parts'
        annotations come back here and one more call commits the unit."""
        batches = math.ceil(size / self.spec.batch_size)
        count = min(self.spec.pool_size, batches)
        if count <= 1:
            return [None]
        bounds = [round(k * size / count) for k in range(count + 1)]
        return [tuple(range(bounds[k], bounds[k + 1])) for k in range(count)]

    def submit(self, actor_index: int, call: _Call) -> ray.ObjectRef:
        self.idle.discard(actor_index)
        actor = self.actors[actor_index]
        if call.indices is None:
            return actor.run_unit.remote(
                call.job.prepared, call.job.inputs, call.job.results or None
            )
        return actor.annotate_images.remote(call.job.prepared, call.indices)

    def finish(
        self, actor_index: int, call: _Call, ref: ray.ObjectRef, summary: StageSummary
    ) -> str | None:
        """Take a call's outcome; the unit's failure, if the call failed it."""
        self.idle.add(actor_index)
        job = call.job
        job.open_calls -= 1
        try:
            value = ray.get(ref)
        except Exception as exc:
            if getattr(exc, "actor_init_failed", False):
                raise StageError(f"annotate: {self.spec.name} cannot start: {exc}") from None
            lost = self._process_lost(actor_index, exc, summary)
            if job.failed:
                return None  # the unit's failure is already reported
            if lost is None:
                job.failed = True
                cause = getattr(exc, "cause", None) or exc
                return f"{self.spec.name}/{job.unit}: {describe(cause)}"
            self._narrow_down(call, lost)
        else:
            if call.indices is None:
                summary.add(value)
                summary.units_run += 1
                return None
            results, notes = value
            job.results.update(zip(call.indices, results, strict=True))
            summary.notes.update(notes)
        if job.open_calls == 0 and not job.failed:
            job.open_calls = 1
            self.calls.appendleft(_Call(job))
        return None

    def job_done(self, call: _Call) -> bool:
        done = call.job.open_calls == 0
        if done:
            self.open_jobs -= 1
        return done

    def _process_lost(self, actor_index: int, exc: Exception, summary: StageSummary) -> str | None:
        """Why the call's process was lost (it died, or a batch hung and the actor is
        restarted here), as stored with an image; None for an ordinary error."""
        cause = getattr(exc, "cause", None)
        if isinstance(exc, ray.exceptions.ActorDiedError):
            lost = (
                "ProcessDied: the specialist's process died on this image alone "
                "(a crash in native code, an abort or an exit)"
            )
            note = "its process died"
        elif isinstance(cause, BatchTimedOut):
            lost, note = f"{describe(cause)} on this image alone", "a batch hung"
        else:
            return None
        ray.kill(self.actors[actor_index])
        self.actors[actor_index] = self.new_actor()
        summary.notes[f"{self.spec.name}: actor restarted after {note}"] += 1
        return lost

    def _narrow_down(self, call: _Call, lost: str) -> None:
        job = call.job
        indices = call.indices
        if indices is None:
            indices = tuple(i for i in range(job.size) if i not in job.results)
        if len(indices) == 1:
            job.results[indices[0]] = (None, lost)
            self.crashed.append(f"{job.unit} image {indices[0]}: {lost}")
            if len(self.crashed) > self.max_crashed:
                raise StageError(
                    f"annotate: {self.spec.name} lost its process on {len(self.crashed)} images "
                    f"(annotate.max_crashed_images={self.max_crashed}); the model, not the "
                    f"images, looks broken: {'; '.join(self.crashed[:3])}"
                )
            return
        # An empty call was the commit of a unit whose images are all known: again.
        halves = [indices[: len(indices) // 2], indices[len(indices) // 2 :]] if indices else [()]
        for part in reversed(halves):
            self.calls.appendleft(_Call(job, part) if part else _Call(job))
        job.open_calls += len(halves)


def annotate_inputs(
    store: Store,
    spec: SpecialistConfig,
    unit: str,
    image_ids: Sequence[str],
    upstream: Sequence[str],
) -> str:
    """What a specialist's unit is computed from: the model and its options (not where or
    how fast it runs), the unit's images and what earlier specialists said about them."""
    model = spec.model_dump(include={"kind", "model", "revision", "dtype", "options"})
    upstream_markers = {dataset: store.marker_fingerprint(dataset, unit) for dataset in upstream}
    manifest = store.marker_fingerprint(MANIFEST, unit)
    return fingerprint("annotate", model, manifest, image_ids, upstream_markers)


def _run_specialists(
    store: Store,
    config: EngineConfig,
    round_number: int,
    specs: dict[str, SpecialistConfig],
    names: list[str],
    *,
    units: dict[str, tuple[str, ...] | None],
    producers: dict[str, list[str]],
    summary: StageSummary,
    may_split: bool,
) -> bool:
    """Run the specialists ``names`` (in an order where each comes after those it needs)
    together, each over every unit not yet current. A unit of a specialist whose
    producers in ``names`` still have that unit to do waits for them, unit by unit.
    With ``may_split``, returns False having run nothing where their pools do not fit
    at once (the caller then runs them level by level); else a pool set that cannot
    fit is refused (``check_fits``)."""
    layout = round_layout(round_number)
    in_run = set(names)
    upstream = {name: [layout.annotate(other) for other in producers[name]] for name in names}
    sizes: dict[str, int] = {}
    inputs: dict[str, dict[str, str]] = {name: {} for name in names}
    # Specialist -> its units to run, in order (a dict for a set's lookups).
    todo: dict[str, dict[str, None]] = {name: {} for name in names}
    # Specialist -> unit -> the producers in this run that have yet to commit it.
    waiting: dict[str, dict[str, set[str]]] = {name: {} for name in names}

    def current(name: str, unit: str, ids: Sequence[str]) -> bool:
        """Whether ``name``'s unit is current; records its inputs, counts a skip or a redo."""
        inputs[name][unit] = annotate_inputs(store, specs[name], unit, ids, upstream[name])
        dataset = layout.annotate(name)
        if store.is_current(dataset, unit, inputs[name][unit]):
            summary.units_skipped += 1
            return True
        if store.is_committed(dataset, unit):
            summary.notes["units redone: what they are computed from changed"] += 1
        return False

    for unit, kept in units.items():
        # A unit's ids are read once here (kept only as a count), and again only for a
        # unit that waits on a producer, when it is let go.
        ids = unit_image_ids(store, unit, kept)
        sizes[unit] = len(ids)
        for name in names:  # producers first
            pending = {
                other
                for other in producers[name]
                if other in in_run and (unit in waiting[other] or unit in todo[other])
            }
            if pending:
                waiting[name][unit] = pending
            elif not current(name, unit, ids):
                todo[name][unit] = None
    busy = [name for name in names if todo[name] or waiting[name]]
    if not busy:
        return True  # nothing to do: no Ray, no actors, no models loaded
    # Every actor, plus one decode task to feed them, must fit at once.
    cpus = sum(specs[n].num_cpus * specs[n].pool_size for n in busy) + config.ray.task_cpus
    gpus = sum(specs[n].num_gpus * specs[n].pool_size for n in busy)
    if may_split and not fits(cpus, gpus):
        return False
    check_fits("annotate", cpus=cpus, gpus=gpus)
    prepare = ray.remote(num_cpus=config.ray.task_cpus)(prepare_unit)
    pools: dict[str, _Pool] = {}
    for name in busy:

        def open_unit(unit: str, name: str = name) -> _UnitJob:
            ref = prepare.remote(store.url, unit, units[unit], upstream[name])
            return _UnitJob(unit, sizes[unit], ref, inputs[name][unit])

        pools[name] = _Pool(
            specs[name], store.url, round_number, list(todo[name]), open_unit, config
        )

    def release(done: str, unit: str) -> int:
        """The units of other specialists that ``done`` committing ``unit`` lets start
        (or finds current); returns how many were found current."""
        skipped = 0
        for name in busy:
            pending = waiting[name].get(unit)
            if pending is None or done not in pending:
                continue
            pending.discard(done)
            if not pending:
                del waiting[name][unit]
                if current(name, unit, unit_image_ids(store, unit, units[unit])):
                    skipped += 1
                else:
                    pools[name].units.append(unit)
        return skipped

    in_flight: dict[ray.ObjectRef, tuple[_Pool, int, _Call]] = {}
    failures: list[str] = []
    total = sum(len(todo[n]) + len(waiting[n]) for n in busy)
    try:
        with progress_bar(total, f"annotate [{', '.join(busy)}]", disable=not total) as bar:
            while True:
                for pool in pools.values():
                    for actor_index in sorted(pool.idle):
                        call = pool.next_call()
                        if call is None:
                            break
                        in_flight[pool.submit(actor_index, call)] = (pool, actor_index, call)
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                pool, actor_index, call = in_flight.pop(ready[0])
                failure = pool.finish(actor_index, call, ready[0], summary)
                if failure:
                    failures.append(failure)
                if pool.job_done(call):
                    skipped = 0 if call.job.failed else release(pool.spec.name, call.job.unit)
                    bar.update(1 + skipped)
                    bar.set_postfix(images=summary.inputs)
    finally:
        for pool in pools.values():
            for actor in pool.actors:
                ray.kill(actor)
    stranded = sum(len(waiting[name]) for name in busy)
    if stranded:
        summary.notes["units not annotated: a specialist they need failed on them"] += stranded
    if failures:
        raise StageError(
            f"annotate: {len(failures)} units failed (rerun to retry them): "
            + "; ".join(failures[:3])
        )
    return True
