"""Churn of a refinement round: how much of the previous round's annotations it changed.

Compared per image between round N's kept records and round N+1's:

- **regions**, per kind: each new region takes the unmatched old region of its kind it
  overlaps most, if at IoU >= 0.5. Matched with the same text: kept; with another text:
  changed; a new region left unmatched: added; an old one: retired.
- **captions**, per kind: the same text kept, another text changed, a kind only the new
  round has added, one only the old round has retired.

An image only one round keeps counts all its annotations as added or retired. Shares:
added and changed over the new round's annotations, retired over the old round's.
Computed unit by unit, so memory stays one unit's records whatever the dataset's size.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass

from engine.geometry import iou
from engine.layout import round_layout
from engine.records import ImageRecord, records_from_table
from engine.store import Store, records_dataset

MATCH_IOU = 0.5


@dataclass
class Churn:
    kept: int = 0
    changed: int = 0
    added: int = 0
    retired: int = 0

    @property
    def new_total(self) -> int:
        return self.kept + self.changed + self.added

    @property
    def old_total(self) -> int:
        return self.kept + self.changed + self.retired

    def shares(self) -> dict[str, float | None]:
        def share(part: int, whole: int) -> float | None:
            return part / whole if whole else None

        return {
            "added": share(self.added, self.new_total),
            "changed": share(self.changed, self.new_total),
            "retired": share(self.retired, self.old_total),
        }


def record_churn(old: ImageRecord | None, new: ImageRecord | None) -> Counter[str]:
    """Kept, changed, added and retired annotations of one image between two rounds."""
    counts: Counter[str] = Counter()
    old_captions = {k: c.text for k, c in old.captions.items()} if old else {}
    new_captions = {k: c.text for k, c in new.captions.items()} if new else {}
    for kind in old_captions.keys() | new_captions.keys():
        if kind not in new_captions:
            counts["retired"] += 1
        elif kind not in old_captions:
            counts["added"] += 1
        else:
            counts["kept" if old_captions[kind] == new_captions[kind] else "changed"] += 1
    unmatched = list(old.regions) if old else []
    for region in new.regions if new else []:
        candidates = [(iou(region.box, o.box), i) for i, o in enumerate(unmatched)
                      if o.kind == region.kind]  # fmt: skip
        best = max(candidates, default=(0.0, -1))
        if best[0] < MATCH_IOU:
            counts["added"] += 1
            continue
        match = unmatched.pop(best[1])
        counts["kept" if match.text == region.text else "changed"] += 1
    if unmatched:
        counts["retired"] += len(unmatched)
    return counts


def round_churn(store: Store, old_round: int, new_round: int) -> Churn:
    """Churn of ``new_round``'s kept records against ``old_round``'s, unit by unit."""
    old_dataset, new_dataset = records_dataset(store, old_round), records_dataset(store, new_round)
    old_units = set(store.committed_units(old_dataset))
    new_units = set(store.committed_units(new_dataset))
    total: Counter[str] = Counter()
    for unit in sorted(old_units | new_units):
        old = _unit_records(store, old_dataset, unit) if unit in old_units else {}
        new = _unit_records(store, new_dataset, unit) if unit in new_units else {}
        for image_id in old.keys() | new.keys():
            total.update(record_churn(old.get(image_id), new.get(image_id)))
    return Churn(**{k: total[k] for k in ("kept", "changed", "added", "retired")})


def _unit_records(store: Store, dataset: str, unit: str) -> dict[str, ImageRecord]:
    return {r.image_id: r for r in records_from_table(store.read_unit(dataset, unit))}


def write_churn(store: Store, old_round: int, new_round: int) -> Churn:
    """Compute and store ``rounds/rNNN/churn.json`` (counts and shares)."""
    churn = round_churn(store, old_round, new_round)
    content = {"against": old_round, **asdict(churn), **churn.shares()}
    store.write_bytes(round_layout(new_round).churn, json.dumps(content, indent=1).encode())
    return churn
