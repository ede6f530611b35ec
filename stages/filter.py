"""Filter: score, then threshold (filters/ holds the rules; this stage runs them).

1. Score: every caption of the round's merged records is parsed once with spaCy
   (``filters.text.text_stats``, batched) and its statistics are stored beside it in
   ``rounds/rNNN/scored/``. Region scores are already stored by the specialists.
2. Threshold: a cheap pass over the scored records decides, from stored numbers only,
   which captions, regions, phrases and images stay (``filters.text.caption_decision``,
   ``filters.regions.decide_regions``, ``filters.grounding.decide_grounding``). Kept
   records go to ``filtered/``; everything set aside goes to ``dropped/`` with its
   reason: a whole record, or a record holding only the annotations dropped for one
   reason (their phrase region indices refer to the scored record).

Each pass records what a unit was computed from (``engine.store.fingerprint``): the
score pass, the merged unit and the spaCy model; the threshold pass, the scored unit
and the thresholds. So ``--stage filter filter.region.min_score=0.4`` again redoes only
the threshold pass (no model and no spaCy parse runs a second time), a merge run again
on other settings is scored again, and export, which records the filtered unit it
wrote, follows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import pyarrow as pa

from engine.config import EngineConfig, FilterConfig
from engine.execution import StageError, run_units
from engine.layout import round_layout
from engine.records import (
    DROPPED_SCHEMA,
    ImageRecord,
    Phrase,
    Region,
    records_from_table,
    records_to_table,
)
from engine.store import Store, fingerprint
from engine.summary import StageSummary
from filters.grounding import decide_grounding
from filters.regions import RecordDecision, decide_regions
from filters.text import add_caption_stats, caption_decision, load_pipeline

if TYPE_CHECKING:  # spaCy (and torch under it) loads in the workers that parse, not to plan
    from spacy.language import Language


@dataclass(frozen=True, slots=True)
class FilterUnit:
    key: str
    store_url: str
    round_number: int
    config: FilterConfig
    # What this pass computes the unit from (engine.store.fingerprint).
    inputs: str = ""


def run_filter(store: Store, config: EngineConfig, round_number: int) -> StageSummary:
    layout = round_layout(round_number)
    units = store.committed_units(layout.merged)
    if not units:
        raise StageError(f"filter: round {round_number} has no merged records; run merge first")
    scored = layout.scored
    scoring = [
        FilterUnit(
            unit,
            store.url,
            round_number,
            config.filter,
            fingerprint(
                "score", config.filter.spacy_model, store.marker_fingerprint(layout.merged, unit)
            ),
        )
        for unit in units
    ]
    score_summary = run_units(
        "filter: score",
        score_unit,
        scoring,
        done=lambda unit: store.is_current(scored, unit.key, unit.inputs),
        committed=lambda unit: store.is_committed(scored, unit.key),
        num_cpus=config.ray.task_cpus,
    )
    thresholds = config.filter.model_dump(exclude={"spacy_model"})
    deciding = [
        replace(
            unit,
            inputs=fingerprint("threshold", thresholds, store.marker_fingerprint(scored, unit.key)),
        )
        for unit in scoring
    ]
    outputs = (layout.filtered, layout.dropped)
    summary = run_units(
        "filter: threshold",
        threshold_unit,
        deciding,
        done=lambda unit: store.unit_current(unit.key, outputs, unit.inputs),
        committed=lambda unit: store.unit_done(unit.key, outputs),
        num_cpus=config.ray.task_cpus,
    )
    summary.stage = "filter"
    summary.seconds += score_summary.seconds
    summary.location = store.path(outputs[0])
    summary.held = store.committed_rows(outputs[0])
    return summary


@lru_cache(maxsize=2)
def _pipeline(name: str) -> Language:
    """Loaded once per worker process, not once per unit."""
    return load_pipeline(name)


def score_unit(unit: FilterUnit) -> StageSummary:
    """Store text statistics beside every caption that has none yet."""
    store = Store(unit.store_url)
    layout = round_layout(unit.round_number)
    records = records_from_table(store.read_unit(layout.merged, unit.key))
    if any(c.stats is None for record in records for c in record.captions.values()):
        add_caption_stats(_pipeline(unit.config.spacy_model), records)
    store.commit_unit(unit.key, {layout.scored: records_to_table(records)}, inputs=unit.inputs)
    return StageSummary("filter: score", inputs=len(records), outputs=len(records))


def threshold_unit(unit: FilterUnit) -> StageSummary:
    """Decide one unit from stored statistics; commit kept and dropped records together."""
    store = Store(unit.store_url)
    layout = round_layout(unit.round_number)
    records = records_from_table(store.read_unit(layout.scored, unit.key))
    summary = StageSummary("filter", inputs=len(records))
    kept: list[ImageRecord] = []
    dropped: list[tuple[ImageRecord, str]] = []
    for record in records:
        result, set_aside = decide_record(record, unit.config)
        for reason, part in set_aside:
            dropped.append((part, reason))
            summary.dropped[reason] += 1 if reason.startswith("image:") else _count(part)
        if result is not None:
            kept.append(result)
    summary.outputs = len(kept)
    dropped_table = records_to_table([record for record, _ in dropped])
    reasons = pa.array([reason for _, reason in dropped], pa.string())
    dropped_table = dropped_table.append_column(DROPPED_SCHEMA.field("reason"), reasons)
    store.commit_unit(
        unit.key,
        {
            layout.filtered: records_to_table(kept),
            layout.dropped: dropped_table,
        },
        inputs=unit.inputs,
    )
    return summary


def _region_decision(record: ImageRecord, config: FilterConfig) -> RecordDecision:
    region = config.region
    return decide_regions(
        record,
        min_score_by_kind=region.min_score_by_kind,
        min_score_by_source=region.min_score_by_source,
        nms_iou=region.nms_iou,
        max_objects=region.max_objects,
        min_side=region.min_side,
        min_area=region.min_area,
    )


def _grounding_decision(record: ImageRecord, config: FilterConfig) -> RecordDecision | None:
    """None for a record without grounded phrases: there is nothing to decide."""
    if not record.phrases:
        return None
    grounding = config.grounding
    return decide_grounding(
        record,
        min_score=grounding.min_score,
        nms_iou=grounding.nms_iou,
        drop_image_without_grounding=grounding.drop_image_without_grounding,
    )


def decide_record(
    record: ImageRecord, config: FilterConfig
) -> tuple[ImageRecord | None, list[tuple[str, ImageRecord]]]:
    """The record as kept (None when dropped whole) and what was set aside, by reason."""
    aside: dict[str, ImageRecord] = defaultdict(lambda: _empty_like(record))

    captions = {}
    for kind, caption in record.captions.items():
        keep, reason = (True, None)
        if caption.stats is not None:
            keep, reason = caption_decision(
                caption.stats,
                max_objects=config.text.max_objects.get(kind),
                min_object_complexity=config.text.min_object_complexity.get(kind),
                min_action_complexity=config.text.min_action_complexity.get(kind),
            )
        if keep:
            captions[kind] = caption
        else:
            aside[f"caption: {reason}"].captions[kind] = caption
    phrases = []
    for phrase in record.phrases:
        if phrase.caption in captions:
            phrases.append(phrase)
        else:
            aside["phrase: its caption was dropped"].phrases.append(phrase)
    current = replace(record, captions=captions, phrases=phrases)

    for part, decide in (("region", _region_decision), ("grounding", _grounding_decision)):
        decision = decide(current, config)
        if decision is None:
            continue
        _set_aside(aside, part, decision.dropped_regions, decision.dropped_phrases)
        if not decision.keep:
            return None, [*aside.items(), (f"image: {decision.image_reason}", current)]
        current = decision.applied_to(current)
    return current, list(aside.items())


def _set_aside(
    aside: dict[str, ImageRecord],
    filter_name: str,
    regions: list[tuple[Region, str]],
    phrases: list[tuple[Phrase, str]],
) -> None:
    for region, reason in regions:
        aside[f"{filter_name}: {reason}"].regions.append(region)
    for phrase, reason in phrases:
        aside[f"{filter_name}: {reason}"].phrases.append(phrase)


def _empty_like(record: ImageRecord) -> ImageRecord:
    return replace(record, captions={}, regions=[], phrases=[])


def _count(record: ImageRecord) -> int:
    """Annotations in a record that holds only set-aside annotations."""
    return len(record.captions) + len(record.regions) + len(record.phrases)
