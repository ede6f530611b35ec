"""Running units: embedded Ray on loopback only, local processes for a small plan, failing
units reported without stopping the others, a Ray that does not start named in one line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from engine.execution import StageError, run_units
from engine.summary import StageSummary
from tests.processes import REPO

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


def run_without_ray(body: str) -> subprocess.CompletedProcess:
    """``body`` in a fresh interpreter where starting Ray prints ``ray.init`` and fails."""
    script = "\n".join(
        [
            "import ray",
            "def refuse(*args, **kwargs):",
            "    print('ray.init')",
            "    raise RuntimeError('The current node timed out during startup')",
            "ray.init = refuse",
            "from engine.config import RayConfig",
            "from engine.execution import StageError, ray_session, run_units",
            "from tests.test_execution import square_or_fail",
            body,
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_a_small_plan_runs_in_local_processes_without_starting_ray():
    done = run_without_ray(
        "\n".join(
            [
                "with ray_session(RayConfig(num_cpus=2)):",
                "    s = run_units('t', square_or_fail, [0, 1, 2, 4], done=lambda u: False,",
                "                  num_cpus=0.5)",
                "    print('outputs', s.outputs, s.units_run)",
                "    try:",
                "        run_units('t', square_or_fail, [1, 3], done=lambda u: False, num_cpus=1)",
                "    except StageError as exc:",
                "        print(exc)",
            ]
        )
    )
    assert done.returncode == 0, done.stderr
    assert "ray.init" not in done.stdout
    assert "outputs 21 4" in done.stdout
    assert "1 of 2 units failed (rerun to retry them): 3: ValueError: unit three" in done.stdout


def test_a_larger_plan_starts_ray_and_a_start_that_times_out_is_one_line():
    done = run_without_ray(
        "\n".join(
            [
                "with ray_session(RayConfig(local_max_units=2)):",
                "    try:",
                "        run_units('t', square_or_fail, [0, 1, 2], done=lambda u: False,",
                "                  num_cpus=0.5)",
                "    except StageError as exc:",
                "        print(exc)",
            ]
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ray.init") == 2  # tried again once
    error = done.stdout.splitlines()[-1]
    assert error.startswith("Ray did not start (RuntimeError: The current node timed out")
    assert "Local cluster" in error
