"""One refinement round on the demo world: time per step, student throughput, re-annotation.

    .venv/bin/python tests/bench/bench_refine.py [--demo out/demo] [--work out/refine] [--steps 200]

Takes the output folder of ``make demo`` (round 0 committed over 300 generated images and
the photos), copies its store, and runs ``--stage refine`` on it with the demo config
plus a tiny student (``--steps`` steps of batch 8) that is accepted whatever its image
check says, so that its re-annotation is measured too. Then trains the same student for
the same steps in a plain single-process PyTorch loop on the same shards
(``StudentTraining``, no Ray) to give Ray Train's overhead as a ratio.

Prints: wall time of each step of the round (from the round's state file), the student's
samples/s under Ray Train and in the plain loop, and the re-annotation images/s.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.config import CONFIG_DIR, load_config
from engine.execution import ray_session
from engine.layout import round_layout
from engine.pipeline import STEPS, Request, execute, plan
from engine.round_state import read_round_state
from engine.store import Store
from refinement.student import StudentTraining

TINY = {"hidden_size": 64, "layers": 1, "heads": 4, "image_size": 64}


def bench_config(work: Path, steps: int) -> Path:
    config = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    config["refine"] = {
        "student": {
            "tiny": TINY, "steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 10,
            "checkpoint_every": max(1, steps // 2), "cpus_per_worker": 1.0,
            "min_image_gain": 0.0,
        },
        "annotate_tasks": ["<OD>"],
        "annotator": {"name": "student", "kind": "florence2", "num_cpus": 1.0,
                      "batch_size": 16, "options": {"max_new_tokens": 64}},
    }  # fmt: skip
    path = work / "refine.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", default="out/demo", help="the output folder of make demo")
    parser.add_argument("--work", default="out/refine")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(Path(args.demo).resolve() / "store", work / "store")
    store = Store(str(work / "store"))
    config = load_config(bench_config(work, args.steps))

    started = time.time()
    request = Request(config, store, 1)
    printed = io.StringIO()
    with ray_session(config.ray), contextlib.redirect_stdout(printed):
        execute(plan([STEPS["refine"]], request), request)
    lines = printed.getvalue().splitlines()
    print("\n".join(lines))

    print(f"\none refine round over {store.committed_rows(round_layout(0).filtered)} images")
    previous = started
    for step, done in read_round_state(store, 1).steps.items():
        at = calendar.timegm(time.strptime(done["at"], "%Y-%m-%dT%H:%M:%SZ"))
        print(f"  {step:<10}{at - previous:8.0f} s")
        previous = at
    student = json.loads(store.fs.cat_file(store.path(round_layout(1).student_report)))
    annotate = next(line for line in lines if line.startswith("[annotate]"))
    print(f"  re-annotation: {annotate.split('  ')[-1]} ({annotate.split('  ')[0]})")

    shards = json.loads(store.fs.cat_file(store.path(round_layout(0).shard_index)))["shards"]
    training = StudentTraining(config.refine.student, shards, "tiny")
    plain_started = time.perf_counter()
    for _ in range(args.steps):
        training.train_step()
    plain = args.steps * config.refine.student.batch_size / (time.perf_counter() - plain_started)
    ray_rate = student["samples_per_s"]
    print(f"  student samples/s: Ray Train {ray_rate:.1f}, plain loop {plain:.1f} "
          f"(Ray Train / plain = {ray_rate / plain:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
