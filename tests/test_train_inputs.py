"""The trainer's inputs: a committed round's shards by default, never a running round's."""

from __future__ import annotations

import pytest

from engine.config import ExportConfig
from engine.layout import round_layout
from engine.records import Caption, ImageRecord, records_to_table
from engine.round_state import commit_round, config_digest, record_step
from engine.store import Store
from engine.train.config import TrainConfig, TrainDataConfig
from engine.train.inputs import TrainInputError, training_inputs
from stages.export import ExportUnit, export_unit, write_shard_index
from tests.inputs import encode, photo


def export_round(store: Store, number: int) -> None:
    """The export stage's own code, unit by unit, without Ray: one record per round."""
    record = ImageRecord(
        f"img{number}", f"file:///{number}.jpg", "test", 24, 16, f"{number:064d}",
        captions={"brief": Caption(f"photo {number}", "human:test")},
    )  # fmt: skip
    unit = f"u{number:03d}"
    store.commit_unit(unit, {"manifest": records_to_table([record], [encode(photo(24, 16))])})
    layout = round_layout(number)
    members = ((unit, (record.image_id,)),)
    export_unit(ExportUnit(unit, store.url, "manifest", members, layout.shards, ExportConfig()))
    write_shard_index(store, layout)


@pytest.fixture
def store(tmp_path) -> Store:
    """Round 0 committed and exported; round 1 exported but still running."""
    store = Store(str(tmp_path / "store"))
    for number in (0, 1):
        export_round(store, number)
        record_step(store, number, "export", config_digest(ExportConfig()))
    commit_round(store, 0)
    return store


def shard_round(shards: list[str]) -> set[str]:
    return {url.rsplit("/", 2)[-2] for url in shards}


def test_default_is_the_latest_committed_round_not_a_running_one(store):
    shards, output = training_inputs(TrainConfig(), store, None)
    assert shards and shard_round(shards) == {"r000"}
    assert output == store.url.rstrip("/") + "/florence_vl"
    commit_round(store, 1)
    assert shard_round(training_inputs(TrainConfig(), store, None)[0]) == {"r001"}


def test_an_explicit_round_must_be_committed_and_exported(store):
    assert shard_round(training_inputs(TrainConfig(), store, 0)[0]) == {"r000"}
    with pytest.raises(TrainInputError, match="round 1 is not committed"):
        training_inputs(TrainConfig(), store, 1)
    commit_round(store, 2)  # committed, but nothing exported
    with pytest.raises(TrainInputError, match="round 2 has no exported shards"):
        training_inputs(TrainConfig(), store, 2)


def test_a_store_without_a_committed_export_is_refused(tmp_path):
    store = Store(str(tmp_path / "store"))
    export_round(store, 0)  # exported, never committed
    with pytest.raises(TrainInputError, match="no exported shards of a committed round") as err:
        training_inputs(TrainConfig(), store, None)
    assert "\n" not in str(err.value)


def test_configured_shards_and_output_need_no_store():
    config = TrainConfig(output="/runs/a", data=TrainDataConfig(shards=("/data/x-{0..3}.tar",)))
    assert training_inputs(config, None, None) == (["/data/x-{0..3}.tar"], "/runs/a")
    with pytest.raises(TrainInputError, match="needs --store"):
        training_inputs(TrainConfig(data=TrainDataConfig(shards=("/x.tar",))), None, None)
