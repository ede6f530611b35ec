"""A refinement round: ``--stage refine --round next`` makes round N+1 from round N.

Round N is the latest committed round. Under the store's refine lease
(refinement/lock.py), each step below is recorded in round N+1's state when it ends and
skipped when a rerun finds it recorded, so a killed round started again carries on:

1. **train**: the Florence-2 student on round N's shards (refinement/student.py), into
   ``rounds/r(N+1)/model/``. A student that fails its image check annotates nothing.
2. **annotate**: the accepted student over every manifest unit, one florence2 specialist
   per ``refine.annotate_tasks``; the configured specialists only over the units
   ingested since round N (old images keep the specialist labels they have).
3. **judge**: per task family, the student's output is taken only where it is measured
   better than round N's annotations on held-out human-labelled images it never trained
   on (refinement/policy.py); the decision and its figures go to ``policy.json``.
4. **merge**: for units round N had, the accepted families' output onto round N's kept
   records; for new units, specialists and accepted student output onto the manifest
   (``policy.StudentMerge``). Human labels are never replaced and every annotation
   keeps its lineage (``source`` names the student's model and revision, ``round`` the
   round that made it).
5. **filter**, **export**: the stages as in round 0.
6. **churn**: annotations added, changed and retired against round N
   (refinement/churn.py), in ``rounds/r(N+1)/churn.json``; then **report**.
7. The round is committed: readers, ``--round`` defaults and the next refine see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.config import EngineConfig, SpecialistConfig
from engine.execution import StageError
from engine.layout import MANIFEST, WRITE_LOCK, round_layout
from engine.lock import LockHeld, StoreLock
from engine.round_state import (
    RoundState,
    commit_round,
    committed_rounds,
    config_digest,
    read_round_state,
    record_step,
    write_round_state,
)
from engine.store import Store, records_dataset
from engine.summary import StageSummary
from refinement.churn import write_churn
from refinement.policy import judge_student, read_policy, student_merge
from refinement.student import StudentReport, init_source, train_student


def student_annotators(config: EngineConfig, model_url: str) -> list[SpecialistConfig]:
    """One florence2 specialist per task the student annotates, running its model."""
    template = config.refine.annotator
    return [
        template.model_copy(
            update={
                "name": f"{template.name}_{task.strip('<>').lower()}",
                "model": model_url,
                "options": {**template.options, "task": task},
            }
        )
        for task in config.refine.annotate_tasks
    ]


def split_units(store: Store, parent: int) -> tuple[set[str], set[str]]:
    """The manifest's units as (known to round ``parent``, ingested since it was made).

    Known: the units its records hold (``records_dataset``, what the round merges onto);
    for a round of ingest and export alone, the units its shards were cut from (an
    export unit's marker lists them: a shard spans a run of units, committed under the
    first; a marker written before shards spanned units is its one unit)."""
    manifest = set(store.committed_units(MANIFEST))
    dataset = records_dataset(store, parent)
    if dataset != MANIFEST:
        held = set(store.committed_units(dataset))
    else:
        shards = round_layout(parent).shards
        held = {
            unit
            for key in store.committed_units(shards)
            for unit in store.read_marker(shards, key).get("units", [key])
        }
    known = manifest & held
    return known, manifest - known


def parent_round(store: Store, config: EngineConfig, round_number: int) -> int:
    """The committed round that ``round_number`` refines, checked before any work: only
    the round after the latest committed one, and a student with something to start from."""
    committed = committed_rounds(store)
    if not committed:
        raise StageError("refine needs a committed round to start from: run --stage all first")
    if round_number != committed[-1] + 1:
        raise StageError(
            f"refine makes the round after the latest committed one "
            f"(r{committed[-1]:03d}), so round {committed[-1] + 1}, not {round_number}"
        )
    student = config.refine.student
    if init_source(store, round_number, student) == "tiny" and student.tiny is None:
        raise StageError(
            "refine.student needs a checkpoint (a Florence-2 release) or a tiny model: "
            "no earlier round has a model to start from"
        )
    return committed[-1]


def run_refine(
    store: Store,
    config: EngineConfig,
    round_number: int,
    round_steps: Callable[[str], StageSummary],
    echo: Callable[[str], None] | None = print,
) -> StageSummary:
    """Make round ``round_number`` from the round before it; see the module docstring.

    ``round_steps(name)`` runs the pipeline's own step ``name`` (filter, export, report)
    for this round, so a refine round runs the very steps round 0 runs.
    """
    parent = parent_round(store, config, round_number)
    try:
        with StoreLock(store, WRITE_LOCK, ttl_s=config.lock_ttl_s) as lock:
            summary = _refine(store, config, round_number, parent, lock, round_steps, echo)
            store.clear_staging()  # the folders the round's commits emptied
            return summary
    except LockHeld as exc:
        raise StageError(f"refine: {exc}") from exc


def _refine(
    store: Store,
    config: EngineConfig,
    round_number: int,
    parent: int,
    lock: StoreLock,
    round_steps: Callable[[str], StageSummary],
    echo: Callable[[str], None] | None,
) -> StageSummary:
    from stages.annotate import run_annotate
    from stages.merge import run_merge

    started = time.perf_counter()
    layout = round_layout(round_number)
    summary = StageSummary("refine", location=store.path(layout.root))
    for lease in lock.taken_over:
        summary.notes[f"took over the lease of a dead run ({lease.owner})"] += 1
    store.clear_staging()  # what a killed run left half-written
    state = read_round_state(store, round_number) or RoundState(round_number, parent=parent)
    write_round_state(store, state)
    digest = config_digest(config)
    known, fresh = split_units(store, parent)
    base = records_dataset(store, parent)

    def step(name: str, work: Callable[[], StageSummary]) -> None:
        """Run one step unless the round's state has it done, then record it."""
        if name in state.steps:
            summary.notes[f"{name}: done by an earlier run"] += 1
            return
        lock.check()  # a lost lease means another refine may be writing this round
        done = work()
        if echo is not None:
            echo(done.format())
        state.steps.update(record_step(store, round_number, name, digest).steps)

    step("train", lambda: _trained(store, config, round_number))
    student = _student_report(store, round_number)
    model_url = store.fs.unstrip_protocol(store.path(layout.model))
    students = student_annotators(config, model_url) if student.accepted else []
    verdict = "accepted" if student.accepted else "refused"
    summary.notes[f"student {verdict}: {student.reason}"] += 1
    specialists = list(config.annotate.specialists)

    def annotate() -> StageSummary:
        done = run_annotate(store, config, round_number, students)
        if fresh:
            done.add(run_annotate(store, config, round_number, specialists, fresh))
        return done

    def judge() -> StageSummary:
        started = time.perf_counter()
        decision = judge_student(store, config, round_number, parent, known, students)
        done = StageSummary("refine: judge", inputs=decision.validation_images)
        done.outputs = len(decision.accepted(students))
        for family, verdict in decision.families.items():
            taken = "accepted" if verdict.accepted else "refused"
            done.notes[f"{family} {taken}: {verdict.reason}"] += 1
        done.seconds = time.perf_counter() - started
        done.location = store.path(layout.policy)
        return done

    def merge() -> StageSummary:
        decision = read_policy(store, round_number)
        accepted = decision.accepted(students) if decision is not None else []
        rule = student_merge(config, accepted)
        done = run_merge(store, config, round_number, base, rule, accepted, known)
        if fresh:
            everyone = [*accepted, *specialists]
            done.add(run_merge(store, config, round_number, MANIFEST, rule, everyone, fresh))
        return done

    step("annotate", annotate)
    step("judge", judge)
    step("merge", merge)
    step("filter", lambda: round_steps("filter"))
    step("export", lambda: round_steps("export"))
    step("churn", lambda: _churn(store, parent, round_number))
    step("report", lambda: round_steps("report"))
    commit_round(store, round_number)
    summary.inputs = len(known) + len(fresh)
    summary.outputs = len(store.committed_units(layout.filtered))
    summary.notes[f"units new since r{parent:03d}"] += len(fresh)
    summary.seconds = time.perf_counter() - started
    return summary


def _trained(store: Store, config: EngineConfig, round_number: int) -> StageSummary:
    started = time.perf_counter()
    report = train_student(store, config, round_number)
    done = StageSummary("refine: train", seconds=time.perf_counter() - started)
    done.inputs = report.steps * config.refine.student.batch_size
    done.location = store.path(round_layout(round_number).model)
    return done


def _churn(store: Store, parent: int, round_number: int) -> StageSummary:
    started = time.perf_counter()
    churn = write_churn(store, parent, round_number)
    done = StageSummary("refine: churn", inputs=churn.old_total, outputs=churn.new_total)
    for name, share in churn.shares().items():
        if share is not None:
            done.notes[f"{name}: {share:.1%} of the annotations"] += getattr(churn, name)
    done.seconds = time.perf_counter() - started
    done.location = store.path(round_layout(round_number).churn)
    return done


def _student_report(store: Store, round_number: int) -> StudentReport:
    return StudentReport(**store.read_json(round_layout(round_number).student_report))
