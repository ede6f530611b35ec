"""Merge: one record per image from its human labels and every specialist's output.

The rule, per image (``merge.iou`` is the match threshold):
- Labels the image came with (``human:*``) come first and are never replaced.
- Captions: for each kind, the human caption; else the specialist caption with the
  highest score (a caption without a score ranks last; ties go to the specialist listed
  first in the config).
- Regions, per kind (object, ocr, proposal): specialist regions in descending score
  order join the kept ones unless one of the same kind overlaps with IoU >= ``merge.iou``.
  Such a duplicate is set aside, counted by reason; if it carries polygons and the kept
  region has none (a box-prompted segmenter on a human box), the kept region takes them.
  With ``merge.fuse_boxes`` a kept specialist region's box becomes the score-weighted
  mean of its own and its duplicates' boxes (the box of weighted box fusion, Solovyev et
  al. 2021; an unscored box weighs 1), and later duplicates match against the fused box;
  its score stays the highest member's, so score thresholds keep their meaning. A human
  box is never moved.
- Phrases keep their text and span; their region indices are remapped to the kept
  region each of their regions became.
- Region texts (from the specialists that produce ``region_text``, e.g.
  specialists/region_text.py) add no region: each is matched one to one, greedily in
  descending IoU, to a kept region of the same kind with IoU >= ``merge.iou`` (the box
  it was computed on matches it with IoU 1) and replaces that region's text, except on
  a human label, whose text is never replaced. With several such specialists the first
  listed in the config that matches a region gives its text. Everything else about the
  region (box, score, polygons, ``source``, ``round``) stays the box's: the score still
  judges the box, and ``source`` names who found it. The text's lineage is the region
  text specialist's output in ``rounds/rNNN/annotate/<name>/`` (the same box with the
  text, its source and score), and the summary counts ``region: text from <name>``.
Every kept annotation keeps its own lineage (``source``, ``round``). Nothing is lost: the
specialists' full outputs stay in ``rounds/rNNN/annotate/``, and every annotation merge
does not keep is counted by reason (``dropped``); what merge does to a kept annotation
(polygons attached, a text written) is counted apart (``notes``).

``run_merge`` takes the base records (the manifest for round 0; a refinement round
merges onto the previous round's records) and a ``MergePolicy``: the object that merges
one image's outputs onto its base record. ``SpecialistMerge`` is the rule above; the
per-record rule itself is the pure function ``merge_record``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from engine.config import EngineConfig, SpecialistConfig
from engine.execution import StageError, run_units
from engine.geometry import pairwise_iou
from engine.layout import MANIFEST, round_layout
from engine.manifest import keeps, kept_image_ids_by_unit, unit_image_ids
from engine.records import (
    HUMAN_PREFIX,
    RECORD_SCHEMA,
    Box,
    ImageRecord,
    Region,
    records_from_table,
    records_to_table,
)
from engine.store import Store, fingerprint
from engine.summary import StageSummary
from filters.regions import match_regions
from specialists import build_specialist


@dataclass(slots=True)
class MergeCounts:
    """What merging did, by reason: annotations set aside, and changes that lose nothing."""

    dropped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)


# Merges one image's new annotations onto its base record: (base, outputs, region_texts,
# counts) -> the merged record. ``outputs`` are the annotating specialists' (or model's)
# records for the image in config order; ``region_texts`` (name, record) of those that
# produce region texts. A policy must be picklable: it is sent to the Ray merge tasks.
MergePolicy = Callable[
    [ImageRecord, list[ImageRecord], Sequence[tuple[str, ImageRecord]], MergeCounts], ImageRecord
]


@dataclass(frozen=True, slots=True)
class SpecialistMerge:
    """The rule of this module's docstring: base labels first, then by score and IoU."""

    # Two regions of a kind with IoU >= this are one object (``merge.iou``).
    iou: float
    # Fuse a kept specialist box with its duplicates (``merge.fuse_boxes``).
    fuse_boxes: bool = False

    def __call__(
        self,
        base: ImageRecord,
        outputs: list[ImageRecord],
        region_texts: Sequence[tuple[str, ImageRecord]],
        counts: MergeCounts,
    ) -> ImageRecord:
        return merge_record(base, outputs, self.iou, counts, region_texts, self.fuse_boxes)


@dataclass(frozen=True, slots=True)
class MergeUnit:
    key: str
    store_url: str
    # The manifest rows of this unit that the manifest view keeps; None: all of them.
    image_ids: tuple[str, ...] | None
    # The dataset whose records the outputs are merged onto.
    base: str
    # Specialist outputs to merge, in config order (that order breaks caption ties).
    sources: tuple[str, ...]
    out: str
    policy: MergePolicy
    # (name, dataset) of the specialists producing region texts, in config order.
    region_texts: tuple[tuple[str, str], ...] = ()
    # What the unit is merged from (engine.store.fingerprint).
    inputs: str = ""


def run_merge(
    store: Store,
    config: EngineConfig,
    round_number: int,
    base: str = MANIFEST,
    policy: MergePolicy | None = None,
    specialists: Sequence[SpecialistConfig] | None = None,
    units: Collection[str] | None = None,
) -> StageSummary:
    """Merge the outputs of ``specialists`` (default: the config's) onto the ``base``
    dataset's records with ``policy`` (default: ``SpecialistMerge`` with ``merge.iou``),
    for the manifest's ``units`` (default: all), into the round's ``merged/``.

    ``base`` is cut into the manifest's units, like every round dataset. A refinement
    round merges its student onto the previous round's records for the units that round
    had, and student and specialists onto the manifest for the units new since.
    """
    if policy is None:
        policy = SpecialistMerge(config.merge.iou, config.merge.fuse_boxes)
    chosen_specialists = config.annotate.specialists if specialists is None else specialists
    sources, region_texts = output_datasets(chosen_specialists, round_number)
    chosen = {
        key: ids
        for key, ids in kept_image_ids_by_unit(store).items()
        if units is None or key in units
    }
    read = [base, *sources, *(dataset for _, dataset in region_texts)]
    # One marker read per (dataset, unit): it says whether the unit is committed and,
    # for the merged unit's inputs, what it holds.
    upstream = {unit: {d: store.marker_fingerprint(d, unit) for d in read} for unit in chosen}
    missing = [
        f"{dataset} has not committed unit {unit}"
        for dataset in read
        for unit in chosen
        if upstream[unit][dataset] is None
    ]
    if missing:
        # Merging a unit before every specialist has annotated it would commit a record
        # that later specialist output could never join.
        raise StageError(f"merge: run annotate first ({len(missing)} missing): {missing[0]}")
    out = round_layout(round_number).merged
    work = [
        MergeUnit(
            key,
            store.url,
            ids,
            base,
            tuple(sources),
            out,
            policy,
            tuple(region_texts),
            fingerprint("merge", policy, unit_image_ids(store, key, ids), upstream[key]),
        )
        for key, ids in chosen.items()
    ]
    summary = run_units(
        "merge",
        merge_unit,
        work,
        done=lambda unit: store.is_current(out, unit.key, unit.inputs),
        committed=lambda unit: store.is_committed(out, unit.key),
        num_cpus=config.ray.task_cpus,
    )
    summary.location = store.path(out)
    summary.held = store.committed_rows(out)
    return summary


def output_datasets(
    specialists: Sequence[SpecialistConfig], round_number: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """The round's annotate datasets of ``specialists`` in config order: those merged as
    annotations, and (name, dataset) of those that produce region texts."""
    sources, region_texts = [], []
    for spec in specialists:
        dataset = round_layout(round_number).annotate(spec.name)
        # Constructors are cheap by contract; an instance also knows what options decide.
        if "region_text" in build_specialist(spec).produces:
            region_texts.append((spec.name, dataset))
        else:
            sources.append(dataset)
    return sources, region_texts


def merge_unit(unit: MergeUnit) -> StageSummary:
    store = Store(unit.store_url)
    summary = StageSummary("merge")
    wanted = None if unit.image_ids is None else set(unit.image_ids)
    base = store.read_unit(unit.base, unit.key, columns=RECORD_SCHEMA.names)
    records = {r.image_id: r for r in records_from_table(base) if keeps(wanted, r.image_id)}
    outputs = read_outputs(store, unit.key, unit.sources, set(records), summary.dropped)
    region_text_datasets = [d for _, d in unit.region_texts]
    texts = read_outputs(store, unit.key, region_text_datasets, set(records), summary.dropped)
    names = [name for name, _ in unit.region_texts]
    merged = []
    counts = MergeCounts(summary.dropped, summary.notes)
    for image_id, record in records.items():
        summary.inputs += 1
        region_texts = [(names[k], out) for k, out in texts[image_id] if out is not None]
        new = [out for _, out in outputs[image_id] if out is not None]
        merged.append(unit.policy(record, new, region_texts, counts))
    summary.outputs = len(merged)
    store.commit_unit(unit.key, {unit.out: records_to_table(merged)}, inputs=unit.inputs)
    return summary


def read_outputs(
    store: Store, unit: str, datasets: Sequence[str], wanted: set[str], dropped: Counter[str]
) -> dict[str, list[tuple[int, ImageRecord | None]]]:
    """Per image id in ``wanted``: (index into ``datasets``, that specialist's output for
    the image in ``unit``, or None where it failed on the image, counted in ``dropped``)."""
    outputs: dict[str, list[tuple[int, ImageRecord | None]]] = {i: [] for i in wanted}
    for index, dataset in enumerate(datasets):
        table = store.read_unit(dataset, unit)
        errors = table.column("error").to_pylist()
        for record, error in zip(records_from_table(table), errors, strict=True):
            if record.image_id not in outputs:
                continue
            if error is not None:
                dropped["specialist failed on the image"] += 1
            outputs[record.image_id].append((index, record if error is None else None))
    return outputs


def merge_record(
    base: ImageRecord,
    outputs: list[ImageRecord],
    iou: float,
    counts: MergeCounts,
    region_texts: Sequence[tuple[str, ImageRecord]] = (),
    fuse_boxes: bool = False,
) -> ImageRecord:
    """``base`` (the base record, with human labels) merged with specialist outputs.

    ``region_texts``: (specialist name, its output for this image) of the specialists
    that produce region texts, in config order; they change texts, never add regions.
    """
    dropped = counts.dropped
    captions = dict(base.captions)
    for kind in {k for out in outputs for k in out.captions}:
        if kind in captions:
            dropped[f"{kind} caption: human caption kept"] += sum(
                kind in o.captions for o in outputs
            )
            continue
        candidates = [
            (o.captions[kind], rank) for rank, o in enumerate(outputs) if kind in o.captions
        ]
        best = max(
            candidates, key=lambda c: (c[0].score if c[0].score is not None else -1.0, -c[1])
        )
        captions[kind] = best[0]
        if len(candidates) > 1:
            dropped[f"{kind} caption: higher-scored caption kept"] += len(candidates) - 1

    regions = list(base.regions)
    # (output index, region index) -> index in ``regions``, for remapping phrases.
    placed: dict[tuple[int, int], int] = {}
    # index in ``regions`` -> the (box, weight) of every box fused into it.
    fused: dict[int, list[tuple[Box, float]]] = {}
    candidates = [
        (out_index, region_index, region)
        for out_index, out in enumerate(outputs)
        for region_index, region in enumerate(out.regions)
    ]
    candidates.sort(key=lambda c: -(c[2].score if c[2].score is not None else -1.0))
    index = _KindIndex(regions)
    for out_index, region_index, region in candidates:
        match = index.best_match(region, iou)
        if match is None:
            placed[(out_index, region_index)] = len(regions)
            index.add(len(regions), region)
            regions.append(region)
            continue
        placed[(out_index, region_index)] = match
        kept = regions[match]
        if region.polygons and not kept.polygons:
            kept.polygons = region.polygons
            counts.notes["region: polygons attached to a matching region"] += 1
        elif kept.source.startswith(HUMAN_PREFIX):
            dropped["region: duplicate of a human label"] += 1
        else:
            dropped["region: duplicate of a higher-scored region"] += 1
        if fuse_boxes and not kept.source.startswith(HUMAN_PREFIX):
            members = fused.setdefault(match, [(kept.box, _weight(kept))])
            members.append((region.box, _weight(region)))
            regions[match] = replace(kept, box=_weighted_box(members))
            index.move(match, regions[match].box)
            counts.notes["region: box fused with a duplicate"] += 1

    phrases = list(base.phrases)
    for out_index, out in enumerate(outputs):
        for phrase in out.phrases:
            phrase.regions = [placed[(out_index, index)] for index in phrase.regions]
            phrases.append(phrase)
    _apply_region_texts(regions, region_texts, iou, counts)
    return replace(base, captions=captions, regions=regions, phrases=phrases)


def _weight(region: Region) -> float:
    return 1.0 if region.score is None else max(region.score, 0.0)


def _weighted_box(members: list[tuple[Box, float]]) -> Box:
    """The score-weighted mean box; the plain mean when every weight is 0."""
    boxes = np.asarray([box for box, _ in members], dtype=np.float64)
    weights = np.asarray([weight for _, weight in members], dtype=np.float64)
    mean = boxes.mean(axis=0) if weights.sum() <= 0 else weights @ boxes / weights.sum()
    x0, y0, x1, y1 = mean.tolist()
    return (x0, y0, x1, y1)


def _apply_region_texts(
    regions: list[Region],
    region_texts: Sequence[tuple[str, ImageRecord]],
    iou: float,
    counts: MergeCounts,
) -> None:
    """Write region texts onto the matching ``regions``, in place (see the module rule)."""
    dropped = counts.dropped
    named: set[int] = set()  # regions that already took a region text
    # Region texts change texts only: the boxes, and so this index, stay as they are.
    kept_boxes = _KindIndex(regions)
    for name, output in region_texts:
        pairs = match_regions(output.regions, regions, iou)
        for text_index, index in pairs:
            kept = regions[index]
            if kept.source.startswith(HUMAN_PREFIX):
                dropped["region text: human label kept"] += 1
            elif index in named:
                dropped["region text: an earlier specialist's text kept"] += 1
            else:
                regions[index] = replace(kept, text=output.regions[text_index].text)
                named.add(index)
                counts.notes[f"region: text from {name}"] += 1
        matched = {text_index for text_index, _ in pairs}
        for text_index, text in enumerate(output.regions):
            if text_index in matched:
                continue
            if kept_boxes.best_match(text, iou) is None:
                dropped["region text: no matching region"] += 1
            else:
                # Its box was a duplicate, merged into a region that took the text
                # computed on that region's own box.
                dropped["region text: a closer box's text kept"] += 1


class _KindIndex:
    """The boxes of kept regions, per kind, in arrays that grow with them.

    Finding a region's best match is then one vectorised IoU against the kept boxes of
    its kind, where a pass over every kept region in Python (what this replaces) made
    merging quadratic Python: 55 s for 8,000 boxes on one image. The result is the same:
    the boxes are kept in ``regions`` order, so ties go to the earliest region.
    """

    def __init__(self, regions: Sequence[Region]) -> None:
        # kind -> (boxes, with spare rows; how many rows are used; index in ``regions``
        # of each used row).
        self._kinds: dict[str, tuple[np.ndarray, int, list[int]]] = {}
        # index in ``regions`` -> (kind, row).
        self._rows: dict[int, tuple[str, int]] = {}
        for position, region in enumerate(regions):
            self.add(position, region)

    def add(self, position: int, region: Region) -> None:
        """Index ``region``, which is ``regions[position]``."""
        boxes, used, positions = self._kinds.get(region.kind, (np.empty((8, 4)), 0, []))
        if used == len(boxes):
            # Doubling keeps the copies to O(n) in all.
            boxes = np.concatenate([boxes, np.empty_like(boxes)])
        boxes[used] = region.box
        positions.append(position)
        self._rows[position] = (region.kind, used)
        self._kinds[region.kind] = (boxes, used + 1, positions)

    def move(self, position: int, box: Box) -> None:
        """Record that ``regions[position]`` now has ``box``."""
        kind, row = self._rows[position]
        self._kinds[kind][0][row] = box

    def best_match(self, region: Region, iou: float) -> int | None:
        """Index in ``regions`` of the kept region of ``region``'s kind with the highest
        IoU with it, if that IoU is >= ``iou``; None otherwise."""
        if region.kind not in self._kinds:
            return None
        boxes, used, positions = self._kinds[region.kind]
        overlaps = pairwise_iou(region.box, boxes[:used])[0]
        best = int(overlaps.argmax())
        return positions[best] if float(overlaps[best]) >= iou else None
