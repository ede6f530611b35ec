"""Merge's region matching: indexed per kind, the same results as a pass over every region."""

import random
import time
from collections import Counter

import numpy as np
import pytest

from engine.geometry import iou as box_iou
from engine.records import HUMAN_PREFIX, ImageRecord, Phrase, Region
from stages.merge import MergeCounts, merge_record

KINDS = ("object", "ocr", "proposal")


def image(**parts) -> ImageRecord:
    return ImageRecord("img", "u", "coco", 2000, 2000, "h", **parts)


def random_regions(
    rng: random.Random, n: int, source: str, scored: bool = True, spacing: int = 200
) -> list[Region]:
    """Boxes around centres ``spacing`` apart (by default a hundred centres, so that many
    overlap enough to match); scores drawn from few values, so that ties in score (broken
    by order) are common."""
    regions = []
    for _ in range(n):
        cx, cy = rng.randrange(0, 2000, spacing), rng.randrange(0, 2000, spacing)
        w, h = rng.uniform(30, 45), rng.uniform(30, 45)
        x0, y0 = cx + rng.uniform(-6, 6), cy + rng.uniform(-6, 6)
        score = rng.choice([0.9, 0.5, 0.5, 0.2, None]) if scored else None
        polygons = [[x0, y0, x0 + w, y0, x0, y0 + h]] if rng.random() < 0.2 else None
        kind = rng.choice(KINDS)
        box = (x0, y0, x0 + w, y0 + h)
        regions.append(Region(box, "t", kind, source, score, polygons=polygons))
    return regions


def reference_regions(
    base: ImageRecord, outputs: list[ImageRecord], iou: float, fuse: bool
) -> tuple[list[tuple], dict[tuple[int, int], int], Counter[str]]:
    """The matching rule written out directly: each candidate, by descending score, against
    every kept region one by one. Returns (box, kind, source, polygons) of each kept
    region, where each candidate went, and the counts (drops and notes together)."""
    kept = [[r.box, r.kind, r.source, r.polygons, r.score] for r in base.regions]
    members: dict[int, list[tuple[tuple, float]]] = {}
    placed, counts = {}, Counter()
    candidates = [(o, i, r) for o, out in enumerate(outputs) for i, r in enumerate(out.regions)]
    candidates.sort(key=lambda c: -(c[2].score if c[2].score is not None else -1.0))
    for o, i, region in candidates:
        best, best_iou = None, -1.0
        for k, (box, kind, *_) in enumerate(kept):
            overlap = box_iou(region.box, box) if kind == region.kind else -1.0
            if kind == region.kind and overlap > best_iou:
                best, best_iou = k, overlap
        if best is None or best_iou < iou:
            placed[(o, i)] = len(kept)
            kept.append([region.box, region.kind, region.source, region.polygons, region.score])
            continue
        placed[(o, i)] = best
        target = kept[best]
        human = target[2].startswith(HUMAN_PREFIX)
        if region.polygons and not target[3]:
            target[3] = region.polygons
            counts["region: polygons attached to a matching region"] += 1
        elif human:
            counts["region: duplicate of a human label"] += 1
        else:
            counts["region: duplicate of a higher-scored region"] += 1
        if fuse and not human:
            group = members.setdefault(best, [(target[0], weight(target[4]))])
            group.append((region.box, weight(region.score)))
            boxes = np.asarray([b for b, _ in group])
            weights = np.asarray([w for _, w in group])
            mean = boxes.mean(0) if weights.sum() <= 0 else weights @ boxes / weights.sum()
            target[0] = tuple(mean.tolist())
            counts["region: box fused with a duplicate"] += 1
    return [tuple(k[:4]) for k in kept], placed, counts


def weight(score: float | None) -> float:
    return 1.0 if score is None else max(score, 0.0)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indexed_matching_gives_what_matching_every_region_gives(seed, fuse):
    rng = random.Random(seed)
    base = image(regions=random_regions(rng, 60, "human:coco", scored=False))
    outputs = []
    for name in ("det", "seg", "ocr"):
        regions = random_regions(rng, 400, name)
        # One phrase per region: where it points after merge says where each one went.
        phrases = [Phrase("detailed", 0, 1, "t", [k], name) for k in range(len(regions))]
        outputs.append(image(regions=regions, phrases=phrases))
    expected, placed, expected_counts = reference_regions(base, outputs, 0.5, fuse)

    counts = MergeCounts()
    merged = merge_record(base, outputs, iou=0.5, counts=counts, fuse_boxes=fuse)

    assert [(r.box, r.kind, r.source, r.polygons) for r in merged.regions] == expected
    where = [placed[(o, k)] for o, out in enumerate(outputs) for k in range(len(out.regions))]
    assert [p.regions[0] for p in merged.phrases] == where
    assert counts.dropped + counts.notes == expected_counts
    # The random boxes did exercise the rule: matches of every kind, and fusion.
    assert expected_counts["region: duplicate of a higher-scored region"] > 50
    assert expected_counts["region: duplicate of a human label"] > 0
    assert expected_counts["region: polygons attached to a matching region"] > 0
    assert fuse == (expected_counts["region: box fused with a duplicate"] > 0)


def test_eight_thousand_boxes_on_one_image_merge_in_seconds():
    # A pass over every kept region per candidate took 9 s on these boxes, the index 0.9 s
    # (tests/bench/bench_merge_matching.py, two shared cores); the bound is loose.
    rng = random.Random(3)
    # Centres 10 px apart: most boxes are kept, so each later one is matched against
    # thousands.
    outputs = [image(regions=random_regions(rng, 4000, n, spacing=10)) for n in ("a", "b")]
    started = time.perf_counter()
    merged = merge_record(image(), outputs, iou=0.7, counts=MergeCounts(), fuse_boxes=True)
    assert time.perf_counter() - started < 5
    assert 4000 < len(merged.regions) < 8000
