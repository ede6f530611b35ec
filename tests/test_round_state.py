"""A round exists for readers once its state says committed, not when its folder does."""

from __future__ import annotations

import pytest

from engine.config import load_config
from engine.layout import parse_round_name, round_layout, round_name
from engine.round_state import (
    commit_round,
    committed_rounds,
    config_digest,
    read_round_state,
    record_step,
    started_rounds,
)
from engine.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


def test_round_names_round_trip():
    assert round_name(7) == "r007"
    assert parse_round_name("r007") == 7
    assert parse_round_name("r12345") == 12345
    assert parse_round_name("annotate") is None
    assert parse_round_name("r") is None
    with pytest.raises(ValueError):
        round_name(-1)


def test_layout_names_every_round_path():
    layout = round_layout(1)
    assert layout.annotate("ocr") == "rounds/r001/annotate/ocr"
    assert layout.filtered == "rounds/r001/filtered"
    assert layout.state == "rounds/r001/round.json"
    assert layout.shard_index == "exports/r001/_index.json"
    assert layout.report == "reports/r001"


def test_a_folder_without_a_committed_state_is_no_round(store):
    store.write_bytes(f"{round_layout(2).merged}/part-0.parquet", b"x")
    assert started_rounds(store) == committed_rounds(store) == []
    record_step(store, 0, "annotate", "d1")
    assert started_rounds(store) == [0]
    assert committed_rounds(store) == []
    commit_round(store, 0)
    record_step(store, 1, "train", "d2", parent=0)
    assert started_rounds(store) == [0, 1]
    assert committed_rounds(store) == [0]


def test_state_keeps_steps_parent_and_digest(store):
    record_step(store, 1, "train", "aaa", parent=0)
    state = record_step(store, 1, "annotate", "bbb")
    assert list(state.steps) == ["train", "annotate"]
    assert state.steps["annotate"]["config"] == "bbb"
    again = read_round_state(store, 1)
    assert again == state and again.parent == 0 and not again.committed
    assert commit_round(store, 1).committed and read_round_state(store, 1).committed_at


def test_config_digest_follows_the_config():
    config = load_config(None, [])
    changed = load_config(None, ["filter.region.min_score=0.9"])
    assert config_digest(config) == config_digest(load_config(None, []))
    assert config_digest(config) != config_digest(changed)
