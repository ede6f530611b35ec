"""The engine's command line as a separate process that a test can kill at any point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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
