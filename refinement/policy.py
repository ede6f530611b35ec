"""The measured merge policy of a refinement round: which of the student's task families
round N+1 takes, decided on held-out human labels, and how the student's output joins.

**Validation images**: the human-labelled images that a hash of the id holds out
(``refine.policy.validation_fraction``; ``student_data.is_validation``). The student
never trains on them; their human labels are the truth here.

**The machine view** of a validation image: what the engine itself says about it, its
human labels set aside. It is round N's ``validation`` dataset where round N has one;
otherwise (round 0, made by ``--stage all``, and images new in this round) the
configured specialists' output merged by round 0's rule onto the bare image. Scoring
round N's kept records instead would be unfair to round N: merge sets aside every
machine box that duplicates a human one, so round N would look blind exactly where it
was right.

**The decision**: for each task family (objects, captions, grounding, OCR) that the
student annotated, its output of that family is merged onto the machine view with
``StudentMerge``; both views go through the round's filter and are scored against the
human labels with the family's figure (``FIGURES``). The family is accepted when the
student raises the figure by at least ``refine.policy.min_gain`` over at least
``refine.policy.min_images`` validation images that have truth for it, and refused
otherwise, with the reason; a refused family's output is merged nowhere. No evidence is
a refusal: the policy protects the data whenever it cannot measure. The decision and its
figures are stored in ``rounds/rNNN/policy.json``; the machine view with the accepted
families merged in becomes the round's ``validation`` dataset, the next round's baseline.

**StudentMerge** is merge's rule (``stages.merge.merge_record``) with three changes for
the student's output: a student region scoring under ``refine.policy.min_score`` is set
aside (only confident student annotations are added); a student box that matches a
machine box is fused with it (weighted box fusion; a human box never moves); and a
student caption replaces the machine caption of its kind (never a human one).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from engine.config import EngineConfig, RefinePolicyConfig, SpecialistConfig
from engine.layout import MANIFEST, round_layout
from engine.manifest import keeps, kept_image_ids_by_unit
from engine.records import (
    HUMAN_PREFIX,
    RECORD_SCHEMA,
    ImageRecord,
    records_from_table,
    records_to_table,
)
from engine.store import Store
from filters.regions import remap_phrases
from filters.text import add_caption_stats
from refinement.metrics import figure
from refinement.student_data import is_validation
from specialists import build_specialist
from stages.filter import decide_record
from stages.merge import MergeCounts, SpecialistMerge, merge_record, output_datasets, read_outputs

if TYPE_CHECKING:
    from spacy.language import Language

# The figure each task family (what a specialist produces) is judged by
# (refinement/metrics.py).
FIGURES = {
    "objects": "box AP50",
    "captions": "caption object F1",
    "grounding": "grounding F1",
    "ocr": "OCR word accuracy",
}


@dataclass(frozen=True, slots=True)
class StudentMerge:
    """Merge's rule for the specialists' output, then the student's on top with its three
    changes (module docstring). ``students`` are the student's annotator names, the part
    of a ``source`` before its ``:``."""

    iou: float
    # ``merge.fuse_boxes``, for the specialists' pass; the student's boxes always fuse.
    fuse_boxes: bool
    min_score: float
    students: frozenset[str]

    def is_student(self, source: str) -> bool:
        return source.split(":", 1)[0] in self.students

    def __call__(
        self,
        base: ImageRecord,
        outputs: list[ImageRecord],
        region_texts: Sequence[tuple[str, ImageRecord]],
        counts: MergeCounts,
    ) -> ImageRecord:
        student, specialists = [], []
        for out in outputs:
            (student if self._from_student(out) else specialists).append(out)
        record = merge_record(base, specialists, self.iou, counts, region_texts, self.fuse_boxes)
        student_kinds = {kind for out in student for kind in out.captions}
        captions = {
            kind: c
            for kind, c in record.captions.items()
            if kind not in student_kinds or c.source.startswith(HUMAN_PREFIX)
        }
        replaced = len(record.captions) - len(captions)
        if replaced:
            counts.notes["caption: the student's caption replaces the machine one"] += replaced
        confident = [self._confident(out, counts) for out in student]
        return merge_record(
            replace(record, captions=captions), confident, self.iou, counts, (), True
        )

    def _from_student(self, out: ImageRecord) -> bool:
        sources = [a.source for a in (*out.captions.values(), *out.regions, *out.phrases)]
        return any(self.is_student(source) for source in sources)

    def _confident(self, out: ImageRecord, counts: MergeCounts) -> ImageRecord:
        keep = [
            i for i, r in enumerate(out.regions) if r.score is None or r.score >= self.min_score
        ]
        if len(keep) == len(out.regions):
            return out
        counts.dropped["region: student score under refine.policy.min_score"] += len(
            out.regions
        ) - len(keep)
        phrases, lost = remap_phrases(out.phrases, keep, "phrase: its student regions set aside")
        for _, reason in lost:
            counts.dropped[reason] += 1
        return replace(out, regions=[out.regions[i] for i in keep], phrases=phrases)


@dataclass(slots=True)
class FamilyDecision:
    family: str
    annotators: list[str]
    figure: str
    # Validation images that have truth for this family.
    images: int
    parent: float | None
    student: float | None
    accepted: bool
    reason: str
    # The share of bootstrap resamples of the images in which the student gained.
    support: float | None = None


@dataclass(slots=True)
class PolicyDecision:
    round: int
    validation_images: int
    families: dict[str, FamilyDecision] = field(default_factory=dict)

    def accepted(self, annotators: Iterable[SpecialistConfig]) -> list[SpecialistConfig]:
        """The student annotators whose family was accepted, in the order given."""
        taken = {name for d in self.families.values() if d.accepted for name in d.annotators}
        return [a for a in annotators if a.name in taken]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PolicyDecision:
        families = {k: FamilyDecision(**v) for k, v in data["families"].items()}
        return cls(data["round"], data["validation_images"], families)


def student_merge(config: EngineConfig, students: Sequence[SpecialistConfig]) -> StudentMerge:
    names = frozenset(s.name for s in students)
    return StudentMerge(
        config.merge.iou, config.merge.fuse_boxes, config.refine.policy.min_score, names
    )


def family_of(annotator: SpecialistConfig) -> str:
    """The task family of a student annotator: what its Florence-2 task produces."""
    (product,) = build_specialist(annotator).produces
    if product not in FIGURES:
        raise ValueError(f"{annotator.name}: the merge policy cannot judge {product}")
    return product


def read_policy(store: Store, round_number: int) -> PolicyDecision | None:
    data = store.read_json(round_layout(round_number).policy)
    return None if data is None else PolicyDecision.from_dict(data)


def judge_student(
    store: Store,
    config: EngineConfig,
    round_number: int,
    parent: int,
    known: Collection[str],
    students: Sequence[SpecialistConfig],
) -> PolicyDecision:
    """Decide per task family whether round ``round_number`` merges its ``students``'
    output (module docstring); store the decision and the round's validation view.

    ``known``: the manifest units round ``parent`` had (the others are new this round).
    """
    policy = config.refine.policy
    layout = round_layout(round_number)
    merge = student_merge(config, students)
    family_of_student = [family_of(student) for student in students]
    families: dict[str, list[SpecialistConfig]] = {}
    for student, family in zip(students, family_of_student, strict=True):
        families.setdefault(family, []).append(student)

    truth: list[ImageRecord] = []
    baselines: list[ImageRecord] = []
    outputs_by_family: dict[str, list[list[ImageRecord]]] = {f: [] for f in families}
    views_by_unit: dict[str, list[tuple[ImageRecord, dict[str, list[ImageRecord]]]]] = {}
    for unit, ids in sorted(kept_image_ids_by_unit(store).items()):
        wanted = None if ids is None else set(ids)
        manifest = store.read_unit(MANIFEST, unit, columns=RECORD_SCHEMA.names)
        chosen = {
            r.image_id: r
            for r in records_from_table(manifest)
            if keeps(wanted, r.image_id) and is_validation(r, policy.validation_fraction)
        }
        views_by_unit[unit] = []
        if not chosen:
            continue
        base = _machine_view(store, config, unit, chosen, parent, round_number, unit in known)
        found = read_outputs(
            store, unit, [layout.annotate(s.name) for s in students], set(chosen), Counter()
        )
        for image_id, record in chosen.items():
            truth.append(human_part(record))
            baselines.append(base[image_id])
            by_family: dict[str, list[ImageRecord]] = {f: [] for f in families}
            for index, out in found[image_id]:
                if out is not None:
                    by_family[family_of_student[index]].append(out)
            for family, outs in by_family.items():
                outputs_by_family[family].append(outs)
            views_by_unit[unit].append((base[image_id], by_family))

    decision = PolicyDecision(round_number, len(truth))
    if families:
        nlp = _caption_pipeline(config) if "captions" in families else None
        if nlp is not None:
            add_caption_stats(nlp, truth)
        before = _kept(baselines, config, nlp)
        for family, annotators in families.items():
            candidate = [
                merge(copy.deepcopy(b), copy.deepcopy(outs), (), MergeCounts())
                for b, outs in zip(baselines, outputs_by_family[family], strict=True)
            ]
            after = _kept(candidate, config, nlp)
            names = [a.name for a in annotators]
            seed = f"{round_number}/{family}"
            decision.families[family] = _decide(
                family, names, truth, before, after, config, nlp, seed
            )

    accepted = {f for f, d in decision.families.items() if d.accepted}
    for unit, views in views_by_unit.items():
        records = [
            merge(base, [o for f in accepted for o in by_family[f]], (), MergeCounts())
            for base, by_family in views
        ]
        store.commit_unit(unit, {layout.validation: records_to_table(records)})
    store.write_bytes(layout.policy, json.dumps(decision.to_dict(), indent=1).encode())
    return decision


def human_part(record: ImageRecord) -> ImageRecord:
    """The record's human labels alone: the truth of a validation image."""
    return _part(record, human=True)


def machine_part(record: ImageRecord) -> ImageRecord:
    """The record without its human labels."""
    return _part(record, human=False)


def _part(record: ImageRecord, human: bool) -> ImageRecord:
    def wanted(source: str) -> bool:
        return source.startswith(HUMAN_PREFIX) == human

    keep = [i for i, r in enumerate(record.regions) if wanted(r.source)]
    phrases, _ = remap_phrases([p for p in record.phrases if wanted(p.source)], keep, "")
    return replace(
        record,
        captions={k: c for k, c in record.captions.items() if wanted(c.source)},
        regions=[record.regions[i] for i in keep],
        phrases=phrases,
    )


def _machine_view(
    store: Store,
    config: EngineConfig,
    unit: str,
    chosen: Mapping[str, ImageRecord],
    parent: int,
    round_number: int,
    known: bool,
) -> dict[str, ImageRecord]:
    """Per image id: round ``parent``'s machine view of the validation images ``chosen``
    of ``unit`` (module docstring)."""
    stored = round_layout(parent).validation
    if known and store.is_committed(stored, unit):
        views = {r.image_id: r for r in records_from_table(store.read_unit(stored, unit))}
        missing = chosen.keys() - views.keys()
        if not missing:
            return {i: views[i] for i in chosen}
    # The specialists annotated a known unit in an earlier round (round 0, unless the
    # store predates the validation view); a new unit in this one.
    specialists = config.annotate.specialists
    annotated_in = _annotated_in(store, specialists, unit, parent) if known else round_number
    if annotated_in is None:  # a round 0 of imported labels: no machine said anything
        return {image_id: machine_part(record) for image_id, record in chosen.items()}
    sources, region_texts = output_datasets(specialists, annotated_in)
    counts = MergeCounts()
    outputs = read_outputs(store, unit, sources, set(chosen), counts.dropped)
    texts = read_outputs(store, unit, [d for _, d in region_texts], set(chosen), counts.dropped)
    names = [name for name, _ in region_texts]
    rule = SpecialistMerge(config.merge.iou, config.merge.fuse_boxes)
    return {
        image_id: rule(
            machine_part(record),
            [out for _, out in outputs[image_id] if out is not None],
            [(names[k], out) for k, out in texts[image_id] if out is not None],
            counts,
        )
        for image_id, record in chosen.items()
    }


def _annotated_in(
    store: Store, specialists: Sequence[SpecialistConfig], unit: str, parent: int
) -> int | None:
    """The latest round up to ``parent`` whose specialists annotated ``unit``, if any."""
    for number in range(parent, -1, -1):
        if all(
            store.is_committed(round_layout(number).annotate(s.name), unit) for s in specialists
        ):
            return number
    return None


def _kept(
    records: list[ImageRecord], config: EngineConfig, nlp: Language | None
) -> list[ImageRecord]:
    """``records`` as the round keeps them: caption statistics computed as the filter
    stage computes them, then through the round's filter."""
    if nlp is not None:
        add_caption_stats(nlp, records)
    kept = []
    for record in records:
        result, _ = decide_record(record, config.filter)
        # A record the filter drops whole still stands for its image, with nothing on it.
        kept.append(result or replace(record, captions={}, regions=[], phrases=[]))
    return kept


def truth_images(family: str, truth: Iterable[ImageRecord]) -> int:
    """Validation images whose human labels can score ``family``."""

    def has(record: ImageRecord) -> bool:
        if family == "objects":
            return any(r.kind == "object" for r in record.regions)
        if family == "captions":
            return bool(record.captions)
        if family == "grounding":
            return bool(record.phrases)
        return any(r.kind == "ocr" for r in record.regions)

    return sum(has(r) for r in truth)


def _decide(
    family: str,
    annotators: list[str],
    truth: list[ImageRecord],
    before: list[ImageRecord],
    after: list[ImageRecord],
    config: EngineConfig,
    nlp: Language | None,
    seed: str,
) -> FamilyDecision:
    """Accepted when the student raises the family's figure by ``min_gain`` on the
    validation images, and does so in at least ``confidence`` of ``bootstrap`` resamples
    of them (a paired bootstrap: a gain a few images make is not a gain)."""
    policy = config.refine.policy
    images = truth_images(family, truth)
    name = FIGURES[family]
    pairs_before = list(zip(truth, before, strict=True))
    pairs_after = list(zip(truth, after, strict=True))
    parent, student = figure(name, pairs_before, nlp), figure(name, pairs_after, nlp)
    support = None
    if images < policy.min_images:
        accepted = False
        reason = (
            f"too few held-out human labels to measure: {images} images with {family} "
            f"truth, needs {policy.min_images}"
        )
    elif student is None or parent is None:
        accepted, reason = False, f"{name} could not be measured on the held-out images"
    else:
        support = _support(pairs_before, pairs_after, name, nlp, policy, seed)
        gain = student - parent
        accepted = gain >= policy.min_gain and (support is None or support >= policy.confidence)
        reason = f"{name} {parent:.3f} -> {student:.3f} on {images} held-out images"
        if support is not None:
            reason += f", a gain of {policy.min_gain} or more in {support:.0%} of resamples"
        needed = f"needs a gain of {policy.min_gain}"
        if policy.bootstrap:
            needed += f" in {policy.confidence:.0%}"
        reason += f": {'accepted' if accepted else needed}"
    return FamilyDecision(
        family, annotators, name, images, parent, student, accepted, reason, support
    )


def _support(
    before: list[tuple[ImageRecord, ImageRecord]],
    after: list[tuple[ImageRecord, ImageRecord]],
    name: str,
    nlp: Language | None,
    policy: RefinePolicyConfig,
    seed: str,
) -> float | None:
    """The share of paired bootstrap resamples of the images in which the student's
    figure is at least ``min_gain`` above the parent's (None without resamples)."""
    if not policy.bootstrap:
        return None
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    gains = []
    for _ in range(policy.bootstrap):
        chosen = rng.integers(0, len(before), len(before))
        parent = figure(name, [before[i] for i in chosen], nlp)
        student = figure(name, [after[i] for i in chosen], nlp)
        gains.append(None if parent is None or student is None else student - parent)
    return sum(g is not None and g >= policy.min_gain for g in gains) / policy.bootstrap


def _caption_pipeline(config: EngineConfig) -> Language:
    """The filter's spaCy pipeline: caption figures count objects as the filter does."""
    from filters.text import load_pipeline

    return load_pipeline(config.filter.spacy_model)
