"""``--stage status``: rounds, their state, size, export, quality and the lock, without Ray."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.layout import MANIFEST, WRITE_LOCK, round_layout
from engine.lock import StoreLock
from engine.records import ImageRecord, records_to_table
from engine.round_state import commit_round, record_step
from engine.run import main
from engine.store import Store


def records(count: int) -> list[ImageRecord]:
    return [ImageRecord(f"id{k}", f"u{k}", "folder", 8, 8, "h") for k in range(count)]


def test_status_lists_rounds_export_quality_and_the_lock(tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    store.commit_unit("u0", {MANIFEST: records_to_table(records(3), images=[b"x"] * 3)})
    r0 = round_layout(0)
    store.commit_unit("u0", {r0.filtered: records_to_table(records(2))})
    store.write_bytes(r0.shard_index, json.dumps({"shards": ["a.tar"], "samples": 2}).encode())
    quality = {"columns": ["metric", "raw", "filtered"], "rows": [["box AP50", "0.1", "0.7"]]}
    store.write_bytes(r0.quality, json.dumps(quality).encode())
    for step in ("annotate", "merge", "filter", "export", "report"):
        record_step(store, 0, step, "digest")
    commit_round(store, 0)
    record_step(store, 1, "train", "digest", parent=0)
    lock = StoreLock(store, WRITE_LOCK)
    lease = lock.acquire()

    assert main(["--stage", "status", "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert "3 manifest rows" in out
    assert "r000  committed  parent -  2 records (filtered)" in out
    assert "steps: annotate merge filter export report" in out
    assert "export: 2 in 1 shards" in out
    assert "quality: box AP50 0.7" in out
    assert "r001  running    parent r000  3 records (manifest)" in out
    assert f"store lock: held by {lease.owner}" in out
    lock.release()
    assert main(["--stage", "status", "--store", store.url]) == 0
    assert "store lock: free" in capsys.readouterr().out


def test_status_starts_no_ray(tmp_path):
    # A fresh interpreter in which starting Ray fails the command.
    store = str(tmp_path / "store")
    script = "\n".join(
        [
            "import ray",
            "def refuse(*args, **kwargs):",
            "    raise SystemExit('status started Ray')",
            "ray.init = refuse",
            "from engine.run import main",
            f"raise SystemExit(main(['--stage', 'status', '--store', {store!r}]))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "store lock: free" in done.stdout
