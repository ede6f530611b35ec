"""Command line: ``python -m engine.run --config C --stage S [--store URL] [--input URL]... [k=v]``.

Everything that can be checked before work starts is checked first (config, store,
inputs, round), each failure as one line on stderr and exit status 2. Then the
stages run on Ray, each printing progress and a summary. ``--stage train`` runs the
Florence-VL trainer (engine/train/recipe.py) without Ray: in this process, or in each
rank that ``torchrun`` starts, rank 0 printing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable

from engine.config import ConfigError, EngineConfig, load_config
from engine.execution import StageError, ray_session
from engine.store import Store, StoreError
from engine.summary import StageSummary
from specialists import build_specialist
from stages.annotate import run_annotate, specialist_levels
from stages.export import run_export
from stages.filter import run_filter
from stages.ingest import InputError, plan_ingest, run_ingest
from stages.merge import run_merge
from stages.report import run_report

# The stages this build runs, in pipeline order; "all" runs them as one round.
PIPELINE = ("ingest", "annotate", "merge", "filter", "export", "report")
# The trainer consumes a round's shards; it is not part of a round.
STAGES = (*PIPELINE, "train", "all")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not a usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine.run", description=__doc__)
    parser.add_argument("--config", help="YAML config (engine/configs/*.yaml)")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--store", help="store root URL (overrides the config's store)")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        help="ingest source: image folder, glob, COCO JSON or WebDataset .tar (repeatable)",
    )
    parser.add_argument("--round", help="round number or 'next' (default: the latest)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def resolve_round(value: str | None, store: Store) -> int:
    existing = store.rounds()
    latest = existing[-1] if existing else 0
    if value is None:
        return latest
    if value == "next":
        return latest + 1 if existing else 0
    if not value.isdigit():
        raise UsageError(f"--round must be a number or 'next', not {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
        config = load_config(args.config, args.overrides)
        if args.stage == "train":
            steps = [plan_train(config, args.store, args.round, args.input)]
            session = contextlib.nullcontext()
        else:
            store = open_store(args.store or config.store)
            round_number = resolve_round(args.round, store)
            stages = PIPELINE if args.stage == "all" else (args.stage,)
            steps = plan_steps(stages, store, config, args.input, round_number)
            session = ray_session(config.ray)
    except (UsageError, ConfigError, StoreError, InputError) as exc:
        print(f"engine.run: error: {exc}", file=sys.stderr)
        return 2

    # Under torchrun every rank runs this; one of them reports.
    report = int(os.environ.get("RANK", "0")) == 0
    started = time.perf_counter()
    summaries = []
    try:
        with session:
            for step in steps:
                summary = step()
                summaries.append(summary)
                if report:
                    print(summary.format(), flush=True)
    except StageError as exc:
        print(f"engine.run: error: {exc}", file=sys.stderr)
        return 1
    if report:
        names = ", ".join(s.stage for s in summaries)
        print(f"done in {time.perf_counter() - started:.1f}s: {names}")
    return 0


def plan_train(
    config: EngineConfig, store_url: str | None, round_value: str | None, inputs: list[str]
) -> Callable[[], StageSummary]:
    """The trainer as one step: shards and output resolved (and checked) before it starts.

    The store is needed only for what the ``train`` section leaves unset: the shards
    (default: the round's export) and the output (default: ``<store>/florence_vl``).
    """
    # Imported here: only this stage pays for torch and transformers at start-up.
    from engine.train.recipe import TrainInputError, train, training_inputs

    if inputs:
        raise UsageError("--input is only used by --stage ingest or all")
    if round_value is not None and not round_value.isdigit():
        raise UsageError(f"--round must be a number for train, not {round_value!r}")
    url = store_url or config.store
    store = open_store(url) if url else None
    round_number = int(round_value) if round_value is not None else None
    try:
        shards, output = training_inputs(config.train, store, round_number)
    except TrainInputError as exc:
        raise UsageError(str(exc)) from exc
    return lambda: train(config.train, shards, output)


def open_store(url: str | None) -> Store:
    if not url:
        raise UsageError("no store: pass --store URL or set 'store' in the config")
    store = Store(url)
    if not store.is_local:
        # memory:// lives inside one process; Ray workers would each see an empty store.
        raise StoreError(f"store {url!r} is not shared between processes; use a path or s3://")
    store.check_writable()
    return store


def check_specialists(config: EngineConfig) -> None:
    """Kinds, options and dependency order of the specialists, checked without a model."""
    try:
        specialists = {s.name: build_specialist(s) for s in config.annotate.specialists}
        specialist_levels(specialists)
    except ValueError as exc:
        raise ConfigError(f"annotate.specialists: {exc}") from exc


def plan_steps(
    stages: tuple[str, ...],
    store: Store,
    config: EngineConfig,
    inputs: list[str],
    round_number: int,
) -> list[Callable[[], StageSummary]]:
    """The stages as ready-to-run steps; input problems surface here, before any work."""
    steps: list[Callable[[], StageSummary]] = []
    if inputs and "ingest" not in stages:
        raise UsageError("--input is only used by --stage ingest or all")
    for stage in stages:
        if stage == "ingest":
            if not inputs:
                raise UsageError("ingest needs at least one --input")
            plan = plan_ingest(inputs, store, config.ingest)
            steps.append(lambda plan=plan: run_ingest(store, config, plan))
        elif stage == "annotate":
            if not config.annotate.specialists:
                if stages == ("annotate",):
                    raise UsageError("annotate needs annotate.specialists in the config")
                continue  # a round of human labels alone goes straight to export
            check_specialists(config)
            steps.append(lambda: run_annotate(store, config, round_number))
        elif stage == "merge":
            if not config.annotate.specialists and stages != ("merge",):
                continue  # nothing to merge into the human labels
            steps.append(lambda: run_merge(store, config, round_number))
        elif stage == "filter":
            if not config.annotate.specialists and stages != ("filter",):
                continue  # human labels alone are not filtered
            steps.append(lambda: run_filter(store, config, round_number))
        elif stage == "export":
            steps.append(lambda: run_export(store, config, round_number))
        elif stage == "report":
            steps.append(lambda: run_report(store, config, round_number))
    return steps


if __name__ == "__main__":
    sys.exit(main())
