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
from engine.pipeline import ROUND, STEPS, PlanError, Request, execute, plan
from engine.round_state import committed_rounds, started_rounds
from engine.store import Store, StoreError

# "all" runs one round, from ingest to report.
STAGES = (*STEPS, "all")


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
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def resolve_round(value: str | None, store: Store) -> int:
    """``--round`` as a number: the latest committed round by default (before any round
    is committed, the one in progress, else 0); ``next`` is the one after the latest
    committed round."""
    committed = committed_rounds(store)
    if value is None:
        return committed[-1] if committed else max(started_rounds(store), default=0)
    if value == "next":
        return committed[-1] + 1 if committed else 0
    if not value.isdigit():
        raise UsageError(f"--round must be a number or 'next', not {value!r}")
    return int(value)


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
    except StageError as exc:
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
        store = open_store(url) if url else None
        round_number = int(args.round) if args.round is not None else None
    else:
        store = open_store(args.store or config.store)
        # A refine makes a new round: the one after the latest committed, by default.
        wanted = "next" if args.stage == "refine" and args.round is None else args.round
        round_number = resolve_round(wanted, store)
    return Request(config, store, round_number, tuple(args.input), alone=args.stage != "all")


def open_store(url: str | None) -> Store:
    if not url:
        raise UsageError("no store: pass --store URL or set 'store' in the config")
    store = Store(url)
    if not store.is_local:
        # memory:// lives inside one process; Ray workers would each see an empty store.
        raise StoreError(f"store {url!r} is not shared between processes; use a path or s3://")
    store.check_writable()
    return store


if __name__ == "__main__":
    sys.exit(main())
