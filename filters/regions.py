"""Region filters: box validity, non-maximum suppression, weighted box fusion, matching,
and the region decision for one record.

Everything here is a pure function of boxes, scores and thresholds: a stage computes the
scores once (specialists store them in the record), and these functions decide from the
stored values, so a threshold can change without running a model again.

Conventions shared by every function:
- boxes are ``[x0, y0, x1, y1]`` in absolute pixels;
- IoU is ``inter / (area_a + area_b - inter)``, computed as torchvision computes it;
- NMS suppresses a box when its IoU with a kept, higher-scored box is strictly greater
  than the threshold (torchvision's rule); matching and fusion join boxes at IoU >= the
  threshold;
- a region without a score (a human label) is never dropped for its score and never
  suppressed: it outranks every scored region it overlaps.

Default thresholds (the paper publishes none; ``tests/bench/bench_filter_sweep.py``
measures them against exact truth on 1,000 generated images, table in engine/config.py):
- minimum score per kind (``DEFAULT_MIN_SCORE_BY_KIND``): objects 0.5, the best box F1
  of the sweep (precision 0.849, recall 0.791 vs 0.760 / 0.829 unfiltered); a detector
  with other calibration gets its own threshold (``min_score_by_source``); OCR 0.5,
  RapidOCR's own ``text_score`` default; proposals 0.0, since a proposal's score ranks
  boxes but does not judge them;
- NMS IoU 0.5 (``DEFAULT_NMS_IOU``), torchvision's detection models' ``box_nms_thresh``
  (no effect in the sweep: merge has already joined duplicates at IoU 0.7);
- at most 100 objects per image (``DEFAULT_MAX_OBJECTS``), COCO evaluation's
  ``maxDets``; 100 objects of about 6 tokens each (4 locations and a short label) also
  keep an ``<OD>`` target well inside Florence-2's 1024-token decoder;
- WBF IoU 0.55 (``DEFAULT_WBF_IOU``), the default of Solovyev et al.'s
  ``ensemble_boxes``;
- a box side of at least 1 pixel (``DEFAULT_MIN_SIDE``): a thinner box covers no pixel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
import torch
from torchvision.ops import batched_nms

from engine.geometry import clip_box
from engine.records import ImageRecord, Phrase, Region

DEFAULT_MIN_SCORE_BY_KIND: Mapping[str, float] = MappingProxyType(
    {"object": 0.5, "ocr": 0.5, "proposal": 0.0}
)
DEFAULT_NMS_IOU = 0.5
DEFAULT_MAX_OBJECTS = 100
DEFAULT_WBF_IOU = 0.55
DEFAULT_MIN_SIDE = 1.0

# Drop reasons: fixed strings, so that a report counts drops by cause.
NON_FINITE = "non-finite box"
INVERTED = "inverted box"
ZERO_AREA = "zero area"
OUTSIDE_IMAGE = "outside image"
TOO_SMALL = "too small"
LOW_SCORE = "low score"
SUPPRESSED = "suppressed by nms"
TOO_MANY_OBJECTS = "too many objects"
REGIONS_DROPPED = "regions dropped"


# ---------------------------------------------------------------- geometry


def box_problem(
    box: Sequence[float],
    width: float,
    height: float,
    *,
    min_side: float = DEFAULT_MIN_SIDE,
    min_area: float = 0.0,
) -> str | None:
    """Why ``box`` is unusable in a ``width`` x ``height`` image, or ``None`` if it is fine.

    Checked in this order: a non-finite coordinate, an inverted box (x1 < x0 or y1 < y0),
    zero width or height, no overlap with the image, and, on the box clipped to the
    image, a side under ``min_side`` or an area under ``min_area`` ("too small").
    """
    if not all(math.isfinite(float(v)) for v in box):
        return NON_FINITE
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        return INVERTED
    if x1 == x0 or y1 == y0:
        return ZERO_AREA
    cx0, cy0, cx1, cy1 = clip_box(box, width, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return OUTSIDE_IMAGE
    side_w, side_h = cx1 - cx0, cy1 - cy0
    if min(side_w, side_h) < min_side or side_w * side_h < min_area:
        return TOO_SMALL
    return None


def boxes_array(regions: Sequence[Region]) -> np.ndarray:
    """The regions' boxes as a float64 array of shape ``(n, 4)``."""
    return np.asarray([r.box for r in regions], dtype=np.float64).reshape(-1, 4)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4): an (n, m) array.

    Two boxes with no area between them have IoU 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


# ---------------------------------------------------------------- NMS


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    classes: Sequence[object] | None = None,
) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, highest score first (torchvision).

    ``classes``: one hashable per box (e.g. the category text); a box is suppressed only
    by a box of its own class. ``None``: class-agnostic, every box competes with every
    other. Boxes are used as float64 so that results do not depend on float32 rounding.
    """
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float64).reshape(-1))
    if len(boxes_t) != len(scores_t):
        raise ValueError(f"{len(boxes_t)} boxes but {len(scores_t)} scores")
    if classes is None:
        group_ids = torch.zeros(len(boxes_t), dtype=torch.int64)
    else:
        if len(classes) != len(boxes_t):
            raise ValueError(f"{len(boxes_t)} boxes but {len(classes)} classes")
        ids: dict[object, int] = {}
        group_ids = torch.as_tensor([ids.setdefault(c, len(ids)) for c in classes])
    if len(boxes_t) == 0:
        return np.empty(0, dtype=np.int64)
    return batched_nms(boxes_t, scores_t, group_ids, iou_threshold).numpy()


def region_nms(
    regions: Sequence[Region],
    iou_threshold: float = DEFAULT_NMS_IOU,
    *,
    class_aware: bool = True,
    across_sources: bool = True,
) -> list[int]:
    """Indices (ascending) of the regions NMS keeps.

    Regions compete only within their kind: an OCR box never suppresses an object.
    ``class_aware``: also only within the same text (compared case- and space-
    insensitively), so "dog" and "Dog " are one class; off for proposals or grounding
    boxes whose texts are phrases, not classes. ``across_sources``: boxes of different
    specialists suppress each other (merging sources); off, each source is cleaned on
    its own. Unscored regions (human labels) are always kept and suppress the scored
    regions they overlap, as if they ranked first.
    """
    keys = [
        (
            r.kind,
            r.text.strip().casefold() if class_aware else None,
            None if across_sources else r.source,
        )
        for r in regions
    ]
    ids: dict[tuple[object, ...], int] = {}
    groups = np.asarray([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    boxes = boxes_array(regions)
    unscored = np.asarray([i for i, r in enumerate(regions) if r.score is None], dtype=np.int64)
    scored = np.asarray([i for i, r in enumerate(regions) if r.score is not None], dtype=np.int64)
    if len(unscored) and len(scored):
        overlap = pairwise_iou(boxes[scored], boxes[unscored]) > iou_threshold
        same_group = groups[scored][:, None] == groups[unscored][None, :]
        scored = scored[~(overlap & same_group).any(axis=1)]
    scores = np.asarray([regions[i].score for i in scored], dtype=np.float64)
    kept = scored[nms(boxes[scored], scores, iou_threshold, classes=groups[scored].tolist())]
    return sorted([*unscored.tolist(), *kept.tolist()])


# ---------------------------------------------------------------- weighted box fusion


@dataclass(frozen=True, slots=True)
class FusedBoxes:
    """Result of ``weighted_box_fusion``, clusters in descending fused score."""

    boxes: np.ndarray  # (k, 4) float64
    scores: np.ndarray  # (k,) float64
    labels: list[str | None]  # None for every cluster when fusion is class-agnostic
    members: list[np.ndarray]  # input indices of each cluster, in the order they joined


def weighted_box_fusion(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    iou_threshold: float = DEFAULT_WBF_IOU,
    n_models: int | None = None,
) -> FusedBoxes:
    """Weighted box fusion (Solovyev et al., "Weighted boxes fusion", 2021).

    Boxes are visited in descending score (ties broken by label, source, then
    coordinates, so the result does not depend on input order). A box joins the cluster
    of the same label (any cluster when ``labels`` is ``None``) whose current fused box
    it overlaps most, if that IoU is >= ``iou_threshold``; otherwise it starts a cluster.
    After each join the fused box is recomputed, so later boxes match against it.

    - fused box: the score-weighted mean of the members' coordinates (the plain mean
      when all members score 0), hence inside the members' union bounding box;
    - fused score: ``mean(member scores) * min(T, n_models) / n_models``, where ``T`` is
      the number of distinct ``sources`` in the cluster. The paper counts boxes for
      ``T``; counting sources instead keeps two boxes of one model from voting twice,
      and is the same when each model puts at most one box in a cluster.
      ``n_models`` defaults to the number of distinct sources given (1 without
      ``sources``, which leaves the mean score unchanged).

    Scores must be finite and >= 0.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    count = len(boxes)
    if len(scores) != count:
        raise ValueError(f"{count} boxes but {len(scores)} scores")
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("WBF scores must be finite and >= 0")
    label_of = list(labels) if labels is not None else [None] * count
    source_of = list(sources) if sources is not None else [""] * count
    if len(label_of) != count or len(source_of) != count:
        raise ValueError("labels and sources need one entry per box")
    models = n_models if n_models is not None else max(len(set(source_of)), 1)
    if models < 1:
        raise ValueError(f"n_models must be >= 1, got {models}")

    order = sorted(
        range(count),
        key=lambda i: (-scores[i], label_of[i] or "", source_of[i], *boxes[i].tolist()),
    )
    fused: list[np.ndarray] = []
    members: list[list[int]] = []
    clusters_of_label: dict[str | None, list[int]] = {}
    for i in order:
        candidates = clusters_of_label.setdefault(label_of[i], [])
        if candidates:
            ious = pairwise_iou(boxes[i], np.stack([fused[c] for c in candidates]))[0]
            best = int(np.argmax(ious))
            if ious[best] >= iou_threshold:
                cluster = candidates[best]
                members[cluster].append(i)
                fused[cluster] = _weighted_mean(boxes[members[cluster]], scores[members[cluster]])
                continue
        candidates.append(len(fused))
        fused.append(boxes[i].copy())
        members.append([i])

    fused_scores = np.asarray(
        [scores[m].mean() * min(len({source_of[i] for i in m}), models) / models for m in members],
        dtype=np.float64,
    )
    rank = np.argsort(-fused_scores, kind="stable")
    return FusedBoxes(
        boxes=np.stack(fused)[rank] if fused else np.empty((0, 4)),
        scores=fused_scores[rank],
        labels=[label_of[members[c][0]] for c in rank],
        members=[np.asarray(members[c], dtype=np.int64) for c in rank],
    )


def _weighted_mean(boxes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    if weights.sum() > 0:
        return (boxes * weights[:, None]).sum(axis=0) / weights.sum()
    return boxes.mean(axis=0)


def fuse_regions(
    regions: Sequence[Region],
    iou_threshold: float = DEFAULT_WBF_IOU,
    *,
    class_aware: bool = True,
    n_models: int | None = None,
) -> list[tuple[Region, list[int]]]:
    """WBF over regions (see ``weighted_box_fusion``), each fused region with its members.

    Regions fuse only within their kind, and with ``class_aware`` only within the same
    text (case- and space-insensitive). An unscored region (a human label) weighs as a
    score of 1. A fused region takes the text and round of its best member, the source
    ``wbf:`` + its members' sources joined by ``+``, and no polygon or quad: those
    belonged to the members' boxes.
    """
    labels = [f"{r.kind}\n{r.text.strip().casefold() if class_aware else ''}" for r in regions]
    sources = [r.source for r in regions]
    scores = np.asarray([1.0 if r.score is None else r.score for r in regions], dtype=np.float64)
    fused = weighted_box_fusion(
        boxes_array(regions),
        scores,
        labels=labels,
        sources=sources,
        iou_threshold=iou_threshold,
        n_models=n_models,
    )
    result = []
    for box, score, group in zip(fused.boxes, fused.scores, fused.members, strict=True):
        best = regions[int(group[np.argmax(scores[group])])]
        region = Region(
            box=tuple(box.tolist()),
            text=best.text,
            kind=best.kind,
            source="wbf:" + "+".join(sorted({regions[i].source for i in group})),
            score=float(score),
            round=best.round,
        )
        result.append((region, group.tolist()))
    return result


# ---------------------------------------------------------------- matching


def match_regions(
    a: Sequence[Region],
    b: Sequence[Region],
    iou_threshold: float = DEFAULT_NMS_IOU,
    *,
    same_kind: bool = True,
) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of ``a`` to ``b``: pairs ``(i, j)`` sorted by ``i``.

    Pairs with IoU >= ``iou_threshold`` are taken in descending IoU (ties by ``i`` then
    ``j``); each region is matched at most once. ``same_kind``: an object never matches
    an OCR box. Greedy rather than optimal (Hungarian) assignment: boxes of one object
    from two sources overlap far more than boxes of neighbours, and greedy is what COCO
    evaluation does.
    """
    iou = pairwise_iou(boxes_array(a), boxes_array(b))
    if same_kind:
        kinds_a = np.asarray([r.kind for r in a], dtype=object)
        kinds_b = np.asarray([r.kind for r in b], dtype=object)
        iou = np.where(kinds_a[:, None] == kinds_b[None, :], iou, -1.0)
    rows, cols = np.nonzero(iou >= iou_threshold)
    order = np.lexsort((cols, rows, -iou[rows, cols]))
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for i, j in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs)


# ---------------------------------------------------------------- the decision for one record


@dataclass(slots=True)
class RecordDecision:
    """What a filter keeps and drops of one record.

    ``regions`` and ``phrases`` are what remains (phrase region indices point into the
    kept ``regions``); every dropped annotation is listed with its reason. When
    ``image_reason`` is set the whole record is dropped with that reason.
    """

    regions: list[Region]
    phrases: list[Phrase]
    dropped_regions: list[tuple[Region, str]] = field(default_factory=list)
    dropped_phrases: list[tuple[Phrase, str]] = field(default_factory=list)
    image_reason: str | None = None

    @property
    def keep(self) -> bool:
        return self.image_reason is None

    def applied_to(self, record: ImageRecord) -> ImageRecord:
        """``record`` with the kept regions and phrases."""
        return replace(record, regions=list(self.regions), phrases=list(self.phrases))


def remap_phrases(
    phrases: Sequence[Phrase], kept: Sequence[int], reason: str
) -> tuple[list[Phrase], list[tuple[Phrase, str]]]:
    """Phrases with their region indices moved to positions in ``kept`` (old indices of
    the kept regions, in their new order). A link to a dropped region is removed; a
    phrase left with no region is dropped with ``reason``."""
    new_index = {old: new for new, old in enumerate(kept)}
    remaining: list[Phrase] = []
    dropped: list[tuple[Phrase, str]] = []
    for phrase in phrases:
        links = [new_index[i] for i in phrase.regions if i in new_index]
        if links:
            remaining.append(replace(phrase, regions=links))
        else:
            dropped.append((phrase, reason))
    return remaining, dropped


def min_score_for(
    region: Region,
    by_kind: Mapping[str, float],
    by_source: Mapping[str, float] | None = None,
) -> float:
    """The score a region must reach: its source's threshold if listed (the full source,
    e.g. ``det:dino@1.0``, or its name before ``@``), else its kind's, else 0."""
    if by_source:
        for key in (region.source, region.source.split("@", 1)[0]):
            if key in by_source:
                return by_source[key]
    return by_kind.get(region.kind, 0.0)


def decide_regions(
    record: ImageRecord,
    *,
    min_score_by_kind: Mapping[str, float] = DEFAULT_MIN_SCORE_BY_KIND,
    min_score_by_source: Mapping[str, float] | None = None,
    nms_iou: float | None = DEFAULT_NMS_IOU,
    max_objects: int | None = DEFAULT_MAX_OBJECTS,
    min_side: float = DEFAULT_MIN_SIDE,
    min_area: float = 0.0,
) -> RecordDecision:
    """Which regions of ``record`` survive, and whether the record does.

    In order: invalid boxes are dropped (``box_problem``) and the rest clipped to the
    image; regions scoring under their threshold (``min_score_for``; unscored regions
    pass) are dropped; class-aware NMS across sources at ``nms_iou`` (``None``: no NMS)
    drops duplicates. If more than ``max_objects`` object regions remain (``None``: no
    limit; OCR and proposals are not counted), the record is dropped with
    ``"too many objects"``; counted after NMS so that duplicates do not count. Kept
    regions keep their order; phrases are remapped (``remap_phrases``).
    """
    dropped: list[tuple[Region, str]] = []
    candidates: list[int] = []
    clipped: dict[int, Region] = {}
    for i, region in enumerate(record.regions):
        problem = box_problem(
            region.box, record.width, record.height, min_side=min_side, min_area=min_area
        )
        if problem is not None:
            dropped.append((region, problem))
            continue
        clipped[i] = replace(region, box=clip_box(region.box, record.width, record.height))
        threshold = min_score_for(region, min_score_by_kind, min_score_by_source)
        # Written so that a NaN score fails too.
        if region.score is not None and not region.score >= threshold:
            dropped.append((region, LOW_SCORE))
        else:
            candidates.append(i)
    kept = candidates
    if nms_iou is not None:
        survivors = region_nms([clipped[i] for i in candidates], nms_iou)
        kept = [candidates[k] for k in survivors]
        kept_set = set(kept)
        dropped.extend((record.regions[i], SUPPRESSED) for i in candidates if i not in kept_set)
    phrases, dropped_phrases = remap_phrases(record.phrases, kept, REGIONS_DROPPED)
    objects = sum(1 for i in kept if clipped[i].kind == "object")
    return RecordDecision(
        regions=[clipped[i] for i in kept],
        phrases=phrases,
        dropped_regions=dropped,
        dropped_phrases=dropped_phrases,
        image_reason=TOO_MANY_OBJECTS
        if max_objects is not None and objects > max_objects
        else None,
    )
