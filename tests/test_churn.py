"""Churn: annotations a round kept, changed, added and retired against its parent."""

from __future__ import annotations

import json

import pytest

from engine.layout import round_layout
from engine.records import Caption, ImageRecord, Region, records_to_table
from engine.store import Store
from refinement.churn import record_churn, round_churn, write_churn


def image(image_id: str, captions: dict[str, str], regions: list[Region]) -> ImageRecord:
    return ImageRecord(
        image_id, f"u/{image_id}", "test", 100, 100, "h",
        captions={k: Caption(t, "spec") for k, t in captions.items()}, regions=regions,
    )  # fmt: skip


OLD = image(
    "a",
    {"brief": "A cat.", "detailed": "A grey cat on a mat."},
    [
        Region((0, 0, 50, 50), "cat", "object", "spec"),
        Region((60, 60, 90, 90), "mat", "object", "spec"),
        Region((0, 60, 40, 70), "EXIT", "ocr", "spec"),
    ],
)
NEW = image(
    "a",
    {"brief": "A cat.", "detailed": "A cat sleeps on a red mat.", "more_detailed": "..."},
    [
        Region((1, 1, 51, 51), "cat", "object", "student"),  # kept: same text, IoU 0.92
        Region((61, 61, 91, 91), "rug", "object", "student"),  # changed text
        Region((0, 60, 40, 70), "EXIT", "object", "student"),  # same box, other kind: added
    ],
)


def test_one_image_is_counted_by_kind_and_overlap():
    assert record_churn(OLD, NEW) == {"kept": 2, "changed": 2, "added": 2, "retired": 1}
    assert record_churn(None, NEW) == {"added": 6}
    assert record_churn(OLD, None) == {"retired": 5}


def test_a_round_is_compared_unit_by_unit_with_shares(tmp_path):
    store = Store(str(tmp_path / "store"))
    only_old = image("b", {"brief": "Gone."}, [])
    store.commit_unit("u0", {round_layout(0).filtered: records_to_table([OLD, only_old])})
    store.commit_unit("u0", {round_layout(1).filtered: records_to_table([NEW])})
    store.commit_unit("u1", {round_layout(1).filtered: records_to_table([image("c", {}, [])])})
    churn = round_churn(store, 0, 1)
    assert (churn.kept, churn.changed, churn.added, churn.retired) == (2, 2, 2, 2)
    written = write_churn(store, 0, 1)
    stored = json.loads(store.fs.cat_file(store.path(round_layout(1).churn)))
    assert written == churn and stored["against"] == 0
    assert stored["added"] == pytest.approx(2 / 6) and stored["retired"] == pytest.approx(2 / 6)
