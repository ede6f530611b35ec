"""Region filters: box validity, non-maximum suppression, matching, and the region
decision for one record.

Everything here is a pure function of boxes, scores and thresholds: a stage computes the
scores once (specialists store them in the record), and these functions decide from the
stored values, so a threshold can change without running a model again. Thresholds are
arguments without defaults: their defaults, and the measurements behind them, are in
``engine/config.py`` (``RegionFilterConfig``).

Conventions shared by every function:
- boxes are ``[x0, y0, x1, y1]`` in absolute pixels; IoU is ``engine.geometry``'s;
- NMS suppresses a box when its IoU with a kept, higher-scored box is strictly greater
  than the threshold (torchvision's rule); matching joins boxes at IoU >= the threshold;
- a region without a score (a human label) is never dropped for its score and never
  suppressed: it outranks every scored region it overlaps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from engine.geometry import all_finite, boxes_array, clip_box, pairwise_iou
from engine.records import ImageRecord, Phrase, Region

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


# ---------------------------------------------------------------- validity


def box_problem(
    box: Sequence[float],
    width: float,
    height: float,
    *,
    min_side: float,
    min_area: float,
) -> str | None:
    """Why ``box`` is unusable in a ``width`` x ``height`` image, or ``None`` if it is fine.

    Checked in this order: a non-finite coordinate, an inverted box (x1 < x0 or y1 < y0),
    zero width or height, no overlap with the image, and, on the box clipped to the
    image, a side under ``min_side`` or an area under ``min_area`` ("too small").
    """
    if not all_finite(box):
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
    # Imported here: torch and torchvision cost seconds to import, and a command that
    # only plans (merge on an up-to-date store) imports this module without running NMS.
    import torch
    from torchvision.ops import batched_nms

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
    iou_threshold: float,
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


# ---------------------------------------------------------------- matching


def match_regions(
    a: Sequence[Region],
    b: Sequence[Region],
    iou_threshold: float,
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
    min_score_by_kind: Mapping[str, float],
    min_score_by_source: Mapping[str, float] | None,
    nms_iou: float | None,
    max_objects: int | None,
    min_side: float,
    min_area: float,
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
