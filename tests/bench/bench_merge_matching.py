"""Merge's region matching on one image with many boxes: a pass over every kept region per
candidate (the rule as it was written before, reimplemented here) against merge_record.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_merge_matching.py [--sizes 1000 4000 8000]

Boxes lie on a 10-px grid of centres over a 2000 x 2000 image, so most are kept and each
later one is compared with thousands. Both paths must keep the same boxes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.geometry import boxes_array, pairwise_iou
from engine.records import ImageRecord, Region
from stages.merge import MergeCounts, merge_record


def regions(n: int, seed: int) -> list[Region]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x0, y0 = rng.randrange(0, 2000, 10), rng.randrange(0, 2000, 10)
        w, h = rng.uniform(30, 45), rng.uniform(30, 45)
        out.append(Region((x0, y0, x0 + w, y0 + h), "t", "object", "det", rng.random()))
    return out


def old_matching(base: ImageRecord, outputs: list[ImageRecord], iou: float) -> list[Region]:
    """The kept regions as merge found them before: for each candidate, the regions of its
    kind gathered and their boxes converted anew from every kept region."""
    kept = list(base.regions)
    candidates = [r for out in outputs for r in out.regions]
    candidates.sort(key=lambda r: -(r.score if r.score is not None else -1.0))
    for region in candidates:
        same_kind = [i for i, other in enumerate(kept) if other.kind == region.kind]
        if same_kind:
            overlaps = pairwise_iou(region.box, boxes_array([kept[i] for i in same_kind]))[0]
            if float(overlaps.max()) >= iou:
                continue
        kept.append(region)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 8000])
    args = parser.parse_args()
    print(f"{'boxes':>6} {'kept':>6} {'old s':>8} {'new s':>8} {'speed-up':>9}")
    for n in args.sizes:
        base = ImageRecord("img", "u", "bench", 2000, 2000, "h")
        outputs = [
            ImageRecord("img", "u", "bench", 2000, 2000, "h", regions=regions(n // 2, seed))
            for seed in (0, 1)
        ]
        started = time.perf_counter()
        old = old_matching(base, outputs, 0.7)
        old_s = time.perf_counter() - started
        started = time.perf_counter()
        new = merge_record(base, outputs, 0.7, MergeCounts()).regions
        new_s = time.perf_counter() - started
        if [r.box for r in old] != [r.box for r in new]:
            raise SystemExit(f"{n} boxes: the two paths kept different boxes")
        print(f"{n:>6} {len(new):>6} {old_s:>8.2f} {new_s:>8.3f} {old_s / new_s:>8.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
