"""A refine round killed (SIGKILL, driver and Ray together) at points in training and
after it, then rerun, ends with exactly the rows of a round that was never killed."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.layout import round_layout
from engine.round_state import committed_rounds, read_round_state
from engine.run import main
from engine.store import Store
from tests.processes import kill_process_tree, ray_temp_dir, start_cli
from tests.world_shards import exported_world, refine_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What a round writes, beside its model: every dataset and the small files.
DATASETS = ("annotate/student_od", "validation", "merged", "scored", "filtered", "dropped")
FILES = ("policy.json", "churn.json", "model/model.safetensors")
LEASE_S = 8.0


def round_digest(store: Store, number: int) -> dict[str, list[str] | str]:
    """Sorted row hashes of every dataset of the round, and hashes of its files."""
    layout = round_layout(number)
    digest: dict[str, list[str] | str] = {}
    for name in DATASETS:
        rows = store.read(f"{layout.root}/{name}").to_pylist()
        digest[name] = sorted(hashlib.sha256(repr(r).encode()).hexdigest() for r in rows)
    for name in FILES:
        digest[name] = hashlib.sha256(store.fs.cat_file(store.path(layout.root, name))).hexdigest()
    index = store.read_json(layout.shard_index)
    digest["shards"] = repr((index["samples"], len(index["shards"])))
    return digest


def kill_when(
    process: subprocess.Popen, ray_dir: Path, reached: Callable[[], bool], delay: float
) -> None:
    """Kill the run ``delay`` seconds after ``reached()`` first holds; the run must
    still be going then, or the kill would test nothing."""
    deadline = time.monotonic() + 300
    while not reached():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before the kill"
    kill_process_tree(process, ray_dir)


def test_a_refine_round_killed_and_rerun_ends_with_the_rows_of_an_unbroken_one(
    tmp_path, ray_cluster, capsys
):
    # The first images carry their labels as human labels: the policy's step runs too.
    first = exported_world(tmp_path / "clean", images=16, seed=5, unit=8, human=4)
    broken_root = tmp_path / "killed" / "store"
    shutil.copytree(Path(first.url), broken_root)
    config = refine_config(tmp_path, min_image_gain=0.0)
    # A killed run's lease is taken over once it expires: a short one keeps this quick.
    args = ["--stage", "refine", "--config", config, f"lock_ttl_s={LEASE_S}"]

    assert main([*args, "--store", first.url]) == 0
    capsys.readouterr()

    broken = Store(str(broken_root))
    layout = round_layout(1)
    rng = random.Random(7)

    def checkpointed() -> bool:
        return any((broken_root / layout.root / "student_run").glob("checkpoint_*"))

    def annotated() -> bool:
        state = read_round_state(broken, 1)
        return state is not None and "annotate" in state.steps

    # Killed in training after its first checkpoint, then again after annotate.
    for reached in (checkpointed, annotated):
        ray_dir = ray_temp_dir()
        process = start_cli([*args, "--store", broken.url], ray_dir)
        kill_when(process, ray_dir, reached, delay=rng.uniform(0.0, 0.5))
        assert committed_rounds(broken) == [0]
        time.sleep(LEASE_S)

    assert main([*args, "--store", broken.url]) == 0
    out = capsys.readouterr().out
    assert "done by an earlier run" in out and "took over the lease of a dead run" in out
    assert committed_rounds(broken) == [0, 1]
    assert round_digest(broken, 1) == round_digest(first, 1)
    policy = json.loads(broken.fs.cat_file(broken.path(layout.policy)))
    assert policy["validation_images"] == 4
