"""A round's state file, ``rounds/rNNN/round.json``: running or committed, and its steps.

A round exists for readers (``--round`` defaults, the trainer, the next round) only once
its state says ``committed``: a folder ``rounds/rNNN`` alone is work in progress. The
state is written after each step of the round ends, so a killed run leaves a round
``running`` with the steps it finished, and the rerun carries on.

    {"round": 0, "status": "running" | "committed", "parent": null | N,
     "steps": {"annotate": {"config": "<digest>", "at": "<UTC time>"}, ...},
     "committed_at": null | "<UTC time>"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from engine.layout import ROUNDS, parse_round_name, round_layout
from engine.store import Store

RUNNING = "running"
COMMITTED = "committed"


@dataclass
class RoundState:
    round: int
    status: str = RUNNING
    # The round this one refines (None for round 0, made from the specialists alone).
    parent: int | None = None
    # Step name -> {"config": digest of the config it ran with, "at": when it ended}.
    steps: dict[str, dict[str, str]] = field(default_factory=dict)
    committed_at: str | None = None

    @property
    def committed(self) -> bool:
        return self.status == COMMITTED


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def config_digest(config: BaseModel) -> str:
    """A short, stable digest of a config (what a step ran with)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_round_state(store: Store, number: int) -> RoundState | None:
    """The round's state, or None when no run has started it."""
    state = store.read_json(round_layout(number).state)
    return None if state is None else RoundState(**state)


def write_round_state(store: Store, state: RoundState) -> None:
    store.write_bytes(
        round_layout(state.round).state, json.dumps(dataclasses.asdict(state), indent=1).encode()
    )


def started_rounds(store: Store) -> list[int]:
    """Rounds with a state file, committed or not, ascending."""
    base = store.path(ROUNDS)
    if not store.fs.exists(base):
        return []
    numbers = (
        parse_round_name(posixpath.basename(p.rstrip("/"))) for p in store.fs.ls(base, detail=False)
    )
    return sorted(
        n for n in numbers if n is not None and store.fs.exists(store.path(round_layout(n).state))
    )


def committed_rounds(store: Store) -> list[int]:
    """Rounds whose state says committed, ascending: the rounds readers see."""
    return [n for n in started_rounds(store) if read_round_state(store, n).committed]


def record_step(
    store: Store, number: int, step: str, digest: str, *, parent: int | None = None
) -> RoundState:
    """Note that ``step`` of round ``number`` ended, with the config digest it ran with."""
    state = read_round_state(store, number) or RoundState(round=number, parent=parent)
    state.steps[step] = {"config": digest, "at": _now()}
    write_round_state(store, state)
    return state


def commit_round(store: Store, number: int) -> RoundState:
    """Mark the round committed: from now on readers and the next round see it."""
    state = read_round_state(store, number) or RoundState(round=number)
    state.status = COMMITTED
    state.committed_at = _now()
    write_round_state(store, state)
    return state
