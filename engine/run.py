"""Command line: ``python -m engine.run --config C --stage S [--store URL] [--input URL]... [k=v]``.

Everything that can be checked before work starts is checked first (config, store,
inputs, round), each failure as one line on stderr and exit status 2. Then the
stages run on Ray, each printing progress and a summary. ``--stage train`` runs the
Florence-VL trainer (engine/train/recipe.py) without Ray: in this process, or in each
rank that ``torchrun`` starts, rank 0 printing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from engine.config import ConfigError, EngineConfig, load_config
from engine.execution import StageError
from engine.layout import (
    EXPORTS,
    LOCKS,
    MANIFEST,
    MARKER_ROOT,
    QUARANTINE,
    REPORTS,
    ROUNDS,
    SHARDS,
)
from engine.pipeline import ROUND, STEPS, PlanError, Request, execute, plan
from engine.round_state import committed_rounds, started_rounds
from engine.store import Store, StoreError
from engine.train.inputs import DEFAULT_OUTPUT
from engine.upgrade import upgrade_layout

# "all" runs one round, from ingest to report.
STAGES = (*STEPS, "all")
# Stages that may start a round that has no state yet: annotate (alone or in all) the
# specialists' round, refine the next one. The others work on a round that has started.
STARTS_ROUND = frozenset({"annotate", "all", "refine"})
# Top-level names of a store (engine/layout.py, and the trainer's default output): a root
# holding none of them but other files is no store of ours.
STORE_ENTRIES = frozenset(
    {MANIFEST, QUARANTINE, LOCKS, ROUNDS, SHARDS, EXPORTS, REPORTS, MARKER_ROOT, DEFAULT_OUTPUT}
)


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
    parser.add_argument(
        "--round", help="round number or 'next' (default: the latest committed round)"
    )
    parser.add_argument(
        "--allow-nonempty-store",
        action="store_true",
        help="use a store root that already holds other files and no store",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def resolve_round(value: str | None, store: Store, stage: str) -> int:
    """``--round`` as a number: the latest committed round by default (before any round
    is committed, the one in progress, else 0); ``next`` is the one after the latest
    committed round.

    The round must have started (have a state), or be the default, or, for a stage that
    starts rounds (``STARTS_ROUND``), the next one: a mistyped number would otherwise
    make a stray round, which a later default could follow.
    """
    committed, started = committed_rounds(store), started_rounds(store)
    latest = committed[-1] if committed else max(started, default=0)
    following = committed[-1] + 1 if committed else 0
    if value is None:
        return latest
    if value == "next":
        number = following
    elif value.isdigit():
        number = int(value)
    else:
        raise UsageError(f"--round must be a number or 'next', not {value!r}")
    if number in started or number == latest:
        return number
    if stage in STARTS_ROUND and number == following:
        return number
    running = [n for n in started if n not in committed]
    if stage in STARTS_ROUND:
        allowed = f"{stage} can start round {following} only"
    else:
        allowed = f"{stage} works on a round that has started"
    raise UsageError(
        f"--round {value}: the store has no round {number} "
        f"(committed: {committed}, running: {running}); {allowed}"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
        config = load_config(args.config, args.overrides)
        steps = [STEPS[name] for name in ROUND] if args.stage == "all" else [STEPS[args.stage]]
        request = make_request(args, config)
        planned = plan(steps, request)
    except (UsageError, ConfigError, StoreError, PlanError) as exc:
        print(f"engine.run: error: {exc}", file=sys.stderr)
        return 2

    # Under torchrun every rank runs this; one of them reports.
    echo = print if int(os.environ.get("RANK", "0")) == 0 else None
    started = time.perf_counter()
    try:
        summaries = execute(planned, request, echo=echo)
    except (StageError, StoreError) as exc:  # a StoreError here names a damaged file
        print(f"engine.run: error: {exc}", file=sys.stderr)
        return 1
    if echo is not None:
        names = ", ".join(s.stage for s in summaries)
        echo(f"done in {time.perf_counter() - started:.1f}s: {names}")
    return 0


def make_request(args: argparse.Namespace, config: EngineConfig) -> Request:
    """The run's store and round, checked before any work."""
    if args.stage == "train":
        # The trainer picks the latest committed round itself and may need no store.
        if args.round is not None and not args.round.isdigit():
            raise UsageError(f"--round must be a number for train, not {args.round!r}")
        url = args.store or config.store
        store = open_store(url, args.allow_nonempty_store) if url else None
        if store is not None:
            _upgrade(store, config)
        round_number = int(args.round) if args.round is not None else None
    else:
        store = open_store(args.store or config.store, args.allow_nonempty_store)
        _upgrade(store, config)
        # A refine makes a new round: the one after the latest committed, by default.
        wanted = "next" if args.stage == "refine" and args.round is None else args.round
        round_number = resolve_round(wanted, store, args.stage)
    return Request(config, store, round_number, tuple(args.input), alone=args.stage != "all")


def _upgrade(store: Store, config: EngineConfig) -> None:
    moved = upgrade_layout(store, config.lock_ttl_s)
    if moved:
        print(f"moved the markers of {len(moved)} datasets to {store.path(MARKER_ROOT)}")


def open_store(url: str | None, allow_nonempty: bool = False) -> Store:
    """The store at ``url``, checked before any work: shared between processes, a store
    (or empty, or new) unless ``allow_nonempty``, and writable."""
    if not url:
        raise UsageError("no store: pass --store URL or set 'store' in the config")
    store = Store(url)
    if not store.is_local:
        # memory:// lives inside one process; Ray workers would each see an empty store.
        raise StoreError(f"store {url!r} is not shared between processes; use a path or s3://")
    if not allow_nonempty:
        try:
            store.check_is_store(STORE_ENTRIES)
        except StoreError as exc:
            raise StoreError(f"{exc}, or pass --allow-nonempty-store") from exc
    store.check_writable()
    return store


if __name__ == "__main__":
    sys.exit(main())
