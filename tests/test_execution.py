"""Embedded Ray: loopback only, and failing units reported without stopping the others."""

import shutil
import subprocess
from pathlib import Path

import pytest
import ray

from engine.execution import StageError, run_units
from engine.summary import StageSummary

LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


def ray_pids() -> set[int]:
    temp_dir = Path(ray._private.worker._global_node.get_temp_dir_path())
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_embedded_ray_listens_on_loopback_only(ray_cluster):
    pids = ray_pids()
    assert pids, "no Ray process found"
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line for line in listening.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours, "Ray processes listen on no port at all?"
    for line in ours:
        local = line.split()[3]
        assert local.startswith(LOOPBACK), line


def square_or_fail(unit: int) -> StageSummary:
    if unit == 3:
        raise ValueError("unit three is broken")
    return StageSummary("test", inputs=1, outputs=unit * unit)


def test_failed_unit_is_named_and_the_others_finish(ray_cluster):
    with pytest.raises(
        StageError, match=r"1 of 5 units failed.*3: ValueError: unit three is broken"
    ):
        run_units("test", square_or_fail, [0, 1, 2, 3, 4], done=lambda u: False, num_cpus=0.25)


def test_done_units_are_skipped(ray_cluster):
    summary = run_units(
        "test", square_or_fail, [0, 1, 2, 3, 4], done=lambda u: u == 3, num_cpus=0.25
    )
    assert (summary.units_run, summary.units_skipped) == (4, 1)
    assert summary.outputs == 0 + 1 + 4 + 16


def test_a_rerun_with_every_unit_done_says_nothing_to_do(ray_cluster):
    summary = run_units("test", square_or_fail, [0, 1, 2], done=lambda u: True, num_cpus=0.25)
    assert summary.format() == "[test] nothing to do: 3 units already committed"
