"""Weighted box fusion in merge (``merge.fuse_boxes``), measured against exact truth.

    .venv/bin/python tests/bench/bench_merge_fusion.py [--demo out/demo] [--work out/fusion]

Takes the output folder of ``make demo`` (its store has round 0 annotated, and the
generated world's truth lies beside it), copies the store once per setting, runs merge
and filter again on the stored specialist outputs (no specialist runs again) with
fusion off and on, and scores each round against the truth (refinement/evaluation.py).
Prints the headline quality rows of both settings side by side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.config import CONFIG_DIR, load_config
from engine.layout import round_layout
from engine.run import main as run_engine
from engine.store import Store
from engine.world import load_truth
from filters.text import load_pipeline
from refinement.evaluation import quality_rows, round_quality

CONFIG = CONFIG_DIR / "demo.yaml"


def rerun(demo_store: Path, work: Path, fuse: bool) -> Store:
    """A copy of the demo store with merge and filter run again with ``fuse``."""
    store = work / f"fuse_boxes={fuse}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(demo_store, store)
    layout = round_layout(0)
    for dataset in (layout.merged, layout.scored, layout.filtered, layout.dropped):
        shutil.rmtree(store / dataset, ignore_errors=True)
    for stage in ("merge", "filter"):
        args = ["--config", str(CONFIG), "--stage", stage, "--store", str(store), "--round", "0"]
        if run_engine([*args, f"merge.fuse_boxes={str(fuse).lower()}"]) != 0:
            raise SystemExit(f"{stage} failed")
    return Store(str(store))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", default="out/demo", help="the output folder of make demo")
    parser.add_argument("--work", default="out/fusion")
    args = parser.parse_args()
    demo, work = Path(args.demo).resolve(), Path(args.work).resolve()
    truth = load_truth(demo / "world" / "truth.json")
    nlp = load_pipeline(load_config(CONFIG).filter.spacy_model)

    tables = {}
    for fuse in (False, True):
        store = rerun(demo / "store", work, fuse)
        tables[fuse] = quality_rows(round_quality(store, 0, truth, nlp))
    print(f"\n{len(truth)} images; merged and filtered, fusion off | on")
    print(f"{'':<16}{'merged':>10}{'merged':>10}{'filtered':>10}{'filtered':>10}")
    for off, on in zip(tables[False], tables[True], strict=True):
        print(f"{off[0]:<16}{off[2]:>10}{on[2]:>10}{off[3]:>10}{on[3]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
