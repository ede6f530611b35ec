"""Models that fail harder than an exception: a segfault, an exit, a hang, a killed actor.

Each costs only the image that causes it: the stage restarts the actor, narrows the unit
down to that image, records it with the cause and ends complete in the same run.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.execution import StageError
from engine.layout import round_layout
from engine.records import records_from_table
from engine.store import Store
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo

BASE = load_config("engine/configs/test.yaml")  # units of four images
FAULTY = "tests.specialists_for_tests:FaultyCaptioner"


def faulty(max_crashed_images: int = 10, **fields) -> object:
    spec = SpecialistConfig(
        **{"name": "cap", "kind": FAULTY, "num_cpus": 0.25, "batch_timeout_s": 3, **fields}
    )
    annotate = AnnotateConfig(specialists=(spec,), max_crashed_images=max_crashed_images)
    return BASE.model_copy(update={"annotate": annotate})


def ingested(folder: Path, names: list[str]) -> Store:
    folder.mkdir()
    for k, name in enumerate(names):
        (folder / name).write_bytes(encode(photo(40 + k, 30, seed=k)))
    store = Store(str(folder.parent / "store"))
    run_ingest(store, BASE, plan_ingest([str(folder)], store, BASE.ingest))
    return store


def outcomes(store: Store) -> dict[str, tuple[str | None, str | None]]:
    """Per file name: the caption written for it, and its error."""
    table = store.read(round_layout(0).annotate("cap"))
    errors = table.column("error").to_pylist()
    return {
        record.uri.rsplit("/", 1)[-1]: (record.caption_text("brief"), error)
        for record, error in zip(records_from_table(table), errors, strict=True)
    }


def test_raise_exit_segfault_and_hang_each_cost_one_image_in_one_run(tmp_path, ray_cluster):
    good = [f"good{k}.jpg" for k in range(5)]
    # Sorted into units of four: good0-3 | crash exit good4 hang | raise.
    store = ingested(tmp_path / "in", [*good, "raise.jpg", "exit.jpg", "crash.jpg", "hang.jpg"])
    summary = run_annotate(store, faulty(batch_size=4), 0)

    out = outcomes(store)
    assert len(out) == 9 and summary.units_run == 3
    assert {name: caption for name, (caption, error) in out.items() if error is None} == {
        name: name for name in good
    }
    assert out["raise.jpg"][1] == "ValueError: cannot read raise.jpg"
    assert out["exit.jpg"][1] == "SystemExit: 3"
    assert out["crash.jpg"][1].startswith("ProcessDied: the specialist's process died")
    assert out["hang.jpg"][1].startswith("BatchTimedOut: no answer within 3 s")
    assert summary.dropped["model failed: ProcessDied"] == 1
    assert summary.dropped["model failed: BatchTimedOut"] == 1
    assert summary.notes["cap: actor restarted after its process died"] >= 1
    assert summary.notes["cap: actor restarted after a batch hung"] >= 1


def test_an_actor_killed_mid_batch_ends_in_a_complete_stage(tmp_path, ray_cluster):
    names = [f"img{k}.jpg" for k in range(8)]
    store = ingested(tmp_path / "in", names)
    busy = tmp_path / "busy"
    busy.touch()

    def kill_during_the_second_batch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = busy.read_text().split()
            if len(pids) >= 2:
                os.kill(int(pids[1]), signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_during_the_second_batch)
    killer.start()
    config = faulty(batch_size=2, options={"busy_file": str(busy), "seconds_per_image": 0.5})
    summary = run_annotate(store, config, 0)
    killer.join()

    assert summary.notes["cap: actor restarted after its process died"] == 1
    assert {name: out for name, out in outcomes(store).items()} == {
        name: (name, None) for name in names
    }


def test_a_model_that_keeps_crashing_stops_the_stage(tmp_path, ray_cluster):
    store = ingested(tmp_path / "in", ["crash1.jpg", "crash2.jpg"])
    with pytest.raises(StageError, match=r"on 2 images \(annotate.max_crashed_images=1\)"):
        run_annotate(store, faulty(max_crashed_images=1, batch_size=2), 0)
