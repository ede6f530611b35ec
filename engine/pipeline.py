"""The pipeline as data: the steps that the command line, the demo and rounds compose.

A ``Step`` has a name and a ``plan`` function. Planning checks everything that can be
checked before work starts (inputs exist, specialists are well formed, a round has
what the step reads) and raises ``PlanError`` with one line for the user; it returns
the work to do, or None when the step has nothing to do in this run (a round of human
labels alone has no annotate, merge or filter). ``execute`` runs planned steps in
order, prints each summary and keeps the round's state (``engine/round_state.py``):
each round step is recorded when it ends, and a round whose report ends after its
export is committed.

The registry is ``STEPS``; ``ROUND`` is the order ``--stage all`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from engine.config import ConfigError, EngineConfig
from engine.execution import StageError, ray_session
from engine.layout import MANIFEST, WRITE_LOCK
from engine.lock import LockHeld, StoreLock
from engine.round_state import commit_round, config_digest, record_step
from engine.store import Store
from engine.summary import StageSummary

Work = Callable[[], StageSummary]


class PlanError(ValueError):
    """A step cannot run as asked; the message is one line for the user."""


@dataclass(frozen=True)
class Request:
    """What one run was asked to do.

    ``round_number`` is None only for steps that pick their round themselves (the
    trainer: the latest committed one). ``alone`` is True when the step was asked for
    by itself rather than as part of a pipeline, which decides whether a step with
    nothing to do is an error (``--stage annotate`` with no specialists) or a skip.
    """

    config: EngineConfig
    store: Store | None
    round_number: int | None
    inputs: tuple[str, ...] = ()
    alone: bool = True


@dataclass(frozen=True)
class Step:
    name: str
    plan: Callable[[Request], Work | None]
    # Recorded in the round's state; ingest fills the store-wide manifest instead, and
    # the trainer only reads a committed round.
    in_round: bool = True
    # Runs its work on Ray (the trainer runs in this process, or under torchrun).
    uses_ray: bool = True
    # Writes to the store, so the run holds the store's write lease while it works: two
    # runs writing one store would do all the work twice and read each other's parts
    # half-written. Refine holds the lease itself, to check it between its steps; the
    # trainer writes only its own output folder, from every torchrun rank.
    holds_lease: bool = True


@dataclass(frozen=True)
class Planned:
    step: Step
    work: Work


def _store(request: Request) -> Store:
    if request.store is None:
        raise PlanError("no store: pass --store URL or set 'store' in the config")
    return request.store


def _store_with_images(request: Request) -> Store:
    """The store, which a step asked for alone needs to hold ingested images: on an empty
    store it would start Ray only to find nothing to do."""
    store = _store(request)
    if request.alone and not store.committed_units(MANIFEST):
        raise PlanError(f"the store {store.url} holds no images yet: run --stage ingest first")
    return store


def _round(request: Request) -> int:
    if request.round_number is None:
        raise PlanError("this step needs a round")
    return request.round_number


def _plan_ingest(request: Request) -> Work:
    from stages.ingest import InputError, plan_ingest, run_ingest

    if not request.inputs:
        raise PlanError("ingest needs at least one --input")
    store = _store(request)
    try:
        plan = plan_ingest(list(request.inputs), store, request.config.ingest)
    except InputError as exc:
        raise PlanError(str(exc)) from exc
    return lambda: run_ingest(store, request.config, plan)


def _needs_specialists(request: Request, step: str) -> bool:
    """True when the step has specialists' output to work on; a pipeline of human labels
    alone skips it, a step asked for alone without any is an error."""
    if request.config.annotate.specialists:
        return True
    if request.alone and step == "annotate":
        raise PlanError("annotate needs annotate.specialists in the config")
    return request.alone


def check_specialists(config: EngineConfig) -> None:
    """Kinds, options and dependency order of the specialists, checked without a model."""
    from specialists import build_specialist
    from stages.annotate import specialist_levels

    try:
        specialists = {s.name: build_specialist(s) for s in config.annotate.specialists}
        specialist_levels(specialists)
    except ValueError as exc:
        raise ConfigError(f"annotate.specialists: {exc}") from exc


def _plan_annotate(request: Request) -> Work | None:
    from stages.annotate import run_annotate

    if not _needs_specialists(request, "annotate"):
        return None
    check_specialists(request.config)
    store, number = _store_with_images(request), _round(request)
    return lambda: run_annotate(store, request.config, number)


def _plan_merge(request: Request) -> Work | None:
    from stages.merge import run_merge

    if not _needs_specialists(request, "merge"):
        return None
    store, number = _store_with_images(request), _round(request)
    return lambda: run_merge(store, request.config, number)


def _plan_filter(request: Request) -> Work | None:
    from stages.filter import run_filter

    if not _needs_specialists(request, "filter"):
        return None
    store, number = _store_with_images(request), _round(request)
    return lambda: run_filter(store, request.config, number)


def _plan_export(request: Request) -> Work:
    from stages.export import run_export

    store, number = _store_with_images(request), _round(request)
    return lambda: run_export(store, request.config, number)


def _plan_report(request: Request) -> Work:
    from stages.report import run_report

    store, number = _store_with_images(request), _round(request)
    return lambda: run_report(store, request.config, number)


def _plan_refine(request: Request) -> Work:
    from refinement.refine import parent_round, run_refine

    store, number = _store(request), _round(request)
    try:
        parent_round(store, request.config, number)
    except StageError as exc:
        raise PlanError(str(exc)) from exc

    def round_step(name: str) -> StageSummary:
        # Planned as if asked for alone: filter runs on the student's output even when
        # no specialist is configured.
        alone = Request(request.config, store, number)
        return STEPS[name].plan(alone)()

    return lambda: run_refine(store, request.config, number, round_step)


def _plan_status(request: Request) -> Work:
    from refinement.status import run_status

    store = _store(request)
    return lambda: run_status(store)


def _plan_train(request: Request) -> Work:
    """The Florence-VL trainer: shards and output resolved (and checked) before it starts.

    The store is needed only for what the ``train`` section leaves unset: the shards
    (default: the latest committed round's export) and the output.
    """
    # Imported here: only this step pays for torch and transformers at start-up.
    from engine.train.recipe import TrainInputError, train, training_inputs

    try:
        shards, output = training_inputs(request.config.train, request.store, request.round_number)
    except TrainInputError as exc:
        raise PlanError(str(exc)) from exc
    return lambda: train(request.config.train, shards, output)


# Stage modules are imported inside the plan functions: a command pays at start-up only
# for the stages it runs.
STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("ingest", _plan_ingest, in_round=False),
        Step("annotate", _plan_annotate),
        Step("merge", _plan_merge),
        Step("filter", _plan_filter),
        Step("export", _plan_export),
        Step("report", _plan_report),
        # A whole refinement round; it keeps its own round's state step by step.
        Step("refine", _plan_refine, in_round=False, holds_lease=False),
        Step("train", _plan_train, in_round=False, uses_ray=False, holds_lease=False),
        Step("status", _plan_status, in_round=False, uses_ray=False, holds_lease=False),
    )
}
# One round from the specialists, in order: what ``--stage all`` runs.
ROUND = ("ingest", "annotate", "merge", "filter", "export", "report")


def plan(steps: Sequence[Step], request: Request) -> list[Planned]:
    """Plan every step before any runs, so a bad input fails the run before work starts."""
    if request.inputs and not any(step.name == "ingest" for step in steps):
        raise PlanError("--input is only used by --stage ingest or all")
    planned = []
    for step in steps:
        work = step.plan(request)
        if work is not None:
            planned.append(Planned(step, work))
    return planned


def execute(
    planned: Sequence[Planned], request: Request, echo: Callable[[str], None] | None = print
) -> list[StageSummary]:
    """Run planned steps in order (on Ray when any needs it) under the store's write lease
    when any writes, printing each summary with ``echo``, recording round steps in the
    round's state and committing the round once its report ends after its export. A
    ``StageError`` stops the run; a lease held by another run is one."""
    uses_ray = any(p.step.uses_ray for p in planned)
    session = ray_session(request.config.ray) if uses_ray else contextlib.nullcontext()
    digest = config_digest(request.config)
    summaries = []
    with _write_lease(planned, request, echo), session:
        for item in planned:
            summary = item.work()
            summaries.append(summary)
            if echo is not None:
                echo(summary.format())
            if item.step.in_round and request.store is not None:
                _record(request.store, _round(request), item.step.name, digest)
    return summaries


@contextlib.contextmanager
def _write_lease(
    planned: Sequence[Planned], request: Request, echo: Callable[[str], None] | None
) -> Iterator[None]:
    if request.store is None or not any(p.step.holds_lease for p in planned):
        yield
        return
    try:
        with StoreLock(request.store, WRITE_LOCK, ttl_s=request.config.lock_ttl_s) as lock:
            for lease in lock.taken_over:
                if echo is not None:
                    echo(f"took over the store's lease from a run that stopped: {lease.describe()}")
            request.store.clear_staging()  # what a killed run left half-written
            yield
            request.store.clear_staging()  # the folders the run's commits emptied
            lock.check()  # a lost lease means another run may have written meanwhile
    except LockHeld as exc:
        raise StageError(f"store lease: {exc}") from None


def _record(store: Store, number: int, step: str, digest: str) -> None:
    state = record_step(store, number, step, digest)
    if step == "report" and "export" in state.steps and not state.committed:
        commit_round(store, number)
