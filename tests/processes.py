"""The engine's command line as a separate process that a test can kill at any point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ray_temp_dir() -> Path:
    """A fresh Ray temp dir for one run: its processes are found by it at kill time.
    Ray's socket paths must stay under 108 bytes, so not under pytest's deep tmp_path."""
    return Path(tempfile.mkdtemp(prefix="fld-kill-", dir="/tmp"))


def start_cli(args: list[str], ray_dir: Path) -> subprocess.Popen:
    """``python -m engine.run *args`` in its own session, with its Ray under ``ray_dir``."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine.run", *args, f"ray.temp_dir={ray_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_process_tree(process: subprocess.Popen, ray_dir: Path) -> None:
    """SIGKILL the driver's session and every Ray process that runs from its temp dir."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    marker = str(ray_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _stat(pid: str) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a live process, or None once it is gone."""
    try:
        stat = (Path("/proc") / pid / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces and parentheses: split after it.
    state, ppid, _pgrp, sid = stat[stat.rindex(")") + 2 :].split()[:4]
    return state, int(ppid), int(sid)


def ray_head_processes(session: int, ray_dir: Path) -> set[int]:
    """The live processes of a Ray head started (by ``ray start``) in session ``session``.

    ``ray start`` exits once its daemons run, so they are found by what they keep: the
    session id, and the temp dir in their command lines. Their descendants are added, for
    a job's entrypoint runs in a session of its own under the job's supervisor.
    """
    marker = str(ray_dir).encode()
    parents: dict[int, int] = {}
    found: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        stat = _stat(proc.name)
        if stat is None or stat[0] == "Z":  # a zombie holds nothing; its parent reaps it
            continue
        pid = int(proc.name)
        parents[pid] = stat[1]
        try:
            ours = stat[2] == session or marker in (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if ours:
            found.add(pid)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def kill_ray_head(session: int, ray_dir: Path, rounds: int = 20) -> set[int]:
    """SIGKILL every process of the head (``ray_head_processes``) until none is left,
    without ``ray stop``, which ends every Ray on the machine. Returns what was killed."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = ray_head_processes(session, ray_dir)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        killed |= pids
        time.sleep(0.2)
    left = ray_head_processes(session, ray_dir)
    raise RuntimeError(f"Ray head processes survive SIGKILL: {sorted(left)}")
