"""The README's local cluster recipe, run as written: a head on loopback, `ray job submit`.

The commands are read from README.md ("Local cluster") so the test keeps the README
true; only ports and paths are substituted, and `ray stop` (which ends every Ray on the
machine) is replaced by ending this head's processes by id. The job's shards and
manifest must equal those of the same command run locally on embedded Ray.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.layout import MANIFEST
from engine.manifest import manifest_view
from engine.store import Store
from tests.inputs import good_images
from tests.processes import REPO, kill_ray_head, ray_head_processes

# What `ray job submit` answers in the seconds after `ray start`, before the head's job
# agent has registered; the README says to submit again.
NO_AGENT_YET = "No available agent to submit job"

README_ADDRESS = "http://127.0.0.1:8265"
README_STORE = '"$PWD/out/local-cluster"'
README_INPUT = '"$PWD/out/demo/inputs"'

pytestmark = pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "activate").exists(),
    reason="the recipe activates .venv, which `make install` creates",
)


def readme_recipe() -> list[str]:
    """The shell commands of the README's "Local cluster" block, continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Local cluster", 1)[1]
    block = re.search(r"\n\n((?:    .*\n)+)", section)
    assert block, "README: no indented command block under 'Local cluster'"
    source = "\n".join(line[4:] for line in block.group(1).splitlines())
    return [line.strip() for line in source.replace("\\\n", " ").splitlines() if line.strip()]


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (closed again, so a head can take them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def substitute(
    commands: list[str], ray_dir: Path, store: Path, inputs: Path, ports: list[int]
) -> list[str]:
    """Ports and paths of this run in the README's commands; `ray stop` left out."""
    gcs, dashboard, client, agent = ports
    out = []
    for command in commands:
        if command == "ray stop":
            continue
        if " ray start " in f" {command} ":
            # Every port Ray would otherwise take at a fixed default (6379, 8265, 10001,
            # 52365), so the head cannot collide with another one on this machine.
            command += (
                f" --port {gcs} --dashboard-port {dashboard} --ray-client-server-port {client}"
                f" --dashboard-agent-listen-port {agent} --temp-dir {ray_dir}"
            )
        if command.startswith("ray job submit"):
            for old, new in (
                (README_ADDRESS, f"http://127.0.0.1:{dashboard}"),
                (README_STORE, shlex.quote(str(store))),
                (README_INPUT, shlex.quote(str(inputs))),
            ):
                assert old in command, f"README's submit line no longer has {old}"
                command = command.replace(old, new)
        out.append(command)
    assert any(c.startswith("ray job submit") for c in out), out
    return out


def engine_args(submit: str, store: Path) -> list[str]:
    """The engine's arguments of a substituted submit line, with ``store`` as its store."""
    words = shlex.split(submit)
    args = words[words.index("engine.run") + 1 :]
    args[args.index("--store") + 1] = str(store)
    return args


def store_outputs(root: Path) -> tuple[dict[str, bytes], list[dict]]:
    """Every shard file's bytes (the index by its shard names, its URLs name the store),
    and the manifest's rows."""
    shards = root / "shards"
    files = {
        str(p.relative_to(shards)): p.read_bytes()
        for p in sorted(shards.rglob("*"))
        if p.is_file() and p.name != "_index.json"
    }
    for index in shards.rglob("_index.json"):
        names = [url.rsplit("/", 1)[1] for url in json.loads(index.read_text())["shards"]]
        files[str(index.relative_to(shards))] = "\n".join(names).encode()
    rows = manifest_view(Store(str(root)).read(MANIFEST)).to_pylist()
    return files, sorted(rows, key=lambda row: row["image_id"])


def in_own_session(command: list[str], env: dict) -> subprocess.Popen:
    """``command`` started in a session of its own, output captured, so that every process
    it leaves behind can be found by that session's id and ended."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def submit_until_an_agent_is_up(head_lines: list[str], submit: str, env: dict) -> str:
    """Run the submit line (after the recipe's source and export lines) as the README
    says to: again, a few seconds later, while the head's job agent is not up yet."""
    setup = [line for line in head_lines if line.startswith(("source ", "export "))]
    for _ in range(10):
        run = subprocess.run(
            ["bash", "-ec", "\n".join([*setup, submit])],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        output = run.stdout + run.stderr
        if NO_AGENT_YET not in output:
            break
        time.sleep(3)
    return output if run.returncode == 0 else output + f"\nsubmit exited {run.returncode}"


def test_readme_local_cluster_job_equals_a_local_run(tmp_path):
    inputs = tmp_path / "images"
    for name, data in list(good_images().items())[:4]:
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_bytes(data)
    # A home of its own: a fresh machine's (no ~/.ray/auth_token until the recipe makes
    # one), and the user's token is neither read nor written.
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    # Ray's socket paths must stay under 108 bytes: not under pytest's deep tmp_path.
    ray_dir, local_ray_dir = (Path(tempfile.mkdtemp(prefix="fld-job-", dir="/tmp")) for _ in "ab")
    ports = free_ports(4)
    dashboard = ports[1]
    script = substitute(readme_recipe(), ray_dir, tmp_path / "cluster", inputs, ports)

    # The same command on embedded Ray, while the head starts; its Ray in a known temp
    # dir, so that a failed run's processes are found and ended too.
    submit = next(c for c in script if c.startswith("ray job submit"))
    engine = [sys.executable, "-m", "engine.run", *engine_args(submit, tmp_path / "local")]
    local = in_own_session([*engine, f"ray.temp_dir={local_ray_dir}"], env)
    # The head is started by the recipe's lines up to the submit, in a session of its
    # own: its daemons keep that id after `ray start` returns.
    head_lines = script[: script.index(submit)]
    recipe = in_own_session(["bash", "-ec", "\n".join(head_lines)], env)
    try:
        output, _ = recipe.communicate(timeout=240)
        if recipe.returncode == 0:
            output += submit_until_an_agent_is_up(head_lines, submit, env)
        local_output, _ = local.communicate(timeout=240)
        # Auth stayed on: the job API refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=30)
    finally:
        killed = kill_ray_head(recipe.pid, ray_dir)
        kill_ray_head(local.pid, local_ray_dir)
        recipe.wait()
        local.wait()
        left = ray_head_processes(recipe.pid, ray_dir)
        left |= ray_head_processes(local.pid, local_ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(local_ray_dir, ignore_errors=True)
    assert recipe.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert local.returncode == 0, local_output[-4000:]
    assert killed, "the head's processes were not found"
    assert not left
    assert refused.value.code == 401

    job_files, job_rows = store_outputs(tmp_path / "cluster")
    local_files, local_rows = store_outputs(tmp_path / "local")
    assert any(name.endswith(".tar") for name in job_files)
    assert job_files == local_files
    assert len(job_rows) == 4
    assert job_rows == local_rows
