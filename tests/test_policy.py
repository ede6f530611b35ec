"""The measured merge policy: StudentMerge's rule, and judge_student's decisions on a
store whose validation images carry their true labels as human labels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from engine.config import EngineConfig, SpecialistConfig
from engine.layout import MANIFEST, round_layout
from engine.records import (
    ANNOTATION_SCHEMA,
    Caption,
    ImageRecord,
    Phrase,
    Region,
    records_from_table,
    records_to_table,
)
from engine.store import Store
from engine.world import render_image
from refinement.policy import (
    StudentMerge,
    human_part,
    judge_student,
    machine_part,
    read_policy,
)
from stages.merge import MergeCounts

HUMAN = "human:coco"
SHAPES = "shapes:world"
STUDENT = "student_od:r001-model"


def record(regions: list[Region], captions: dict | None = None) -> ImageRecord:
    return ImageRecord("img", "file:///img.png", "test", 100, 100, "0", captions or {}, regions)


def test_student_merge_fuses_adds_confident_and_never_touches_human_labels():
    rule = StudentMerge(
        iou=0.5, fuse_boxes=False, min_score=0.5, students=frozenset({"student_od"})
    )
    base = record(
        [
            Region((0, 0, 10, 10), "red circle", "object", HUMAN),
            Region((50, 50, 70, 70), "blue square", "object", SHAPES, score=0.5),
        ],
        {"brief": Caption("A human caption.", HUMAN), "detailed": Caption("Machine.", SHAPES)},
    )
    student = record(
        [
            Region((1, 1, 11, 11), "red circle", "object", STUDENT, score=0.9),  # a human box
            Region((52, 52, 72, 72), "blue square", "object", STUDENT, score=0.5),  # fused
            Region((80, 0, 99, 20), "green star", "object", STUDENT, score=0.8),  # added
            Region((0, 80, 20, 99), "grey cross", "object", STUDENT, score=0.2),  # not sure
        ],
        {"brief": Caption("Student brief.", STUDENT), "detailed": Caption("Student.", STUDENT)},
    )
    counts = MergeCounts()
    merged = rule(base, [student], (), counts)

    assert merged.regions[0] == base.regions[0]  # the human box never moves
    assert merged.regions[1].box == (51.0, 51.0, 71.0, 71.0)  # equal scores: the mean box
    assert merged.regions[1].source == SHAPES  # who found it first keeps the lineage
    assert [r.text for r in merged.regions] == ["red circle", "blue square", "green star"]
    assert merged.captions["brief"].source == HUMAN
    assert merged.captions["detailed"].text == "Student."
    assert counts.dropped["region: student score under refine.policy.min_score"] == 1
    assert counts.dropped["region: duplicate of a human label"] == 1
    assert counts.notes["caption: the student's caption replaces the machine one"] == 1


def test_student_merge_merges_specialists_by_round_zero_rule_first():
    rule = StudentMerge(
        iou=0.5, fuse_boxes=False, min_score=0.5, students=frozenset({"student_od"})
    )
    shapes = record([Region((10, 10, 30, 30), "red circle", "object", SHAPES, score=0.4)])
    student = record(
        [Region((10, 10, 30, 32), "red circle", "object", STUDENT, score=0.9)],
        {"brief": Caption("Student.", STUDENT)},
    )
    merged = rule(record([]), [student, shapes], (), MergeCounts())
    # The specialist's box is placed first although the student scored higher, and the
    # student's duplicate fuses into it.
    assert merged.regions[0].source == SHAPES
    assert merged.regions[0].box[3] == pytest.approx((30 * 0.4 + 32 * 0.9) / 1.3)
    assert merged.captions["brief"].source == STUDENT


def test_human_and_machine_parts_split_a_record_and_its_phrases():
    full = record(
        [
            Region((0, 0, 10, 10), "red circle", "object", HUMAN),
            Region((20, 20, 30, 30), "blue square", "object", SHAPES, score=0.7),
        ],
        {"brief": Caption("A red circle.", HUMAN)},
    )
    full.phrases = [
        Phrase("brief", 2, 12, "red circle", [0], HUMAN),
        Phrase("brief", 0, 1, "A", [1], SHAPES),
    ]
    human, machine = human_part(full), machine_part(full)
    assert [r.source for r in human.regions] == [HUMAN] and human.phrases[0].regions == [0]
    assert [r.source for r in machine.regions] == [SHAPES] and machine.phrases[0].regions == [0]
    assert not machine.captions and human.captions == full.captions


# ---------------------------------------------------------------- judge_student


def policy_config(min_images: int = 4) -> EngineConfig:
    config = yaml.safe_load(Path("engine/configs/test.yaml").read_text())
    config["annotate"] = {"specialists": [{"name": "shapes", "kind": "world_shapes"}]}
    config["refine"] = {"policy": {"validation_fraction": 1.0, "min_images": min_images}}
    return EngineConfig(**config)


def annotation_table(records: list[ImageRecord]) -> pa.Table:
    table = records_to_table(records)
    errors = pa.array([None] * len(records), pa.string())
    return table.append_column(ANNOTATION_SCHEMA.field("error"), errors)


def objects_of(truth: ImageRecord, source: str, score: float, shift: float = 0.0) -> ImageRecord:
    regions = [
        Region(tuple(v + shift for v in r.box), r.text, "object", source, score=score)
        for r in truth.regions
        if r.kind == "object"
    ]
    return dataclasses.replace(truth, captions={}, regions=regions, phrases=[])


@pytest.fixture
def world_store(tmp_path) -> tuple[Store, list[ImageRecord]]:
    """A manifest of 8 world images, 6 with their true labels as human labels; round 0's
    shapes specialist found every other object of each image."""
    store = Store(str(tmp_path / "store"))
    items = [render_image(seed=3, index=i) for i in range(8)]
    truths = [item.record for item in items]
    manifest = []
    for index, truth in enumerate(truths):
        labelled = dataclasses.replace(truth, captions={}, regions=[], phrases=[])
        if index < 6:
            labelled.regions = [
                dataclasses.replace(r, source=HUMAN, score=None)
                for r in truth.regions
                if r.kind == "object"
            ]
        manifest.append(labelled)
    store.commit_unit("u000", {MANIFEST: records_to_table(manifest, [i.png for i in items])})
    found = []
    for truth in truths:
        seen = objects_of(truth, SHAPES, 0.6)
        seen.regions = seen.regions[::2]
        found.append(seen)
    store.commit_unit("u000", {round_layout(0).annotate("shapes"): annotation_table(found)})
    return store, truths


# As refine makes them (refinement.refine.student_annotators): the round's model, a task.
MODEL = "file:///store/rounds/r001/model"
STUDENT_OD = SpecialistConfig(
    name="student_od", kind="florence2", model=MODEL, options={"task": "<OD>"}
)


def test_a_student_that_finds_the_missing_objects_is_accepted(tmp_path, world_store):
    store, truths = world_store
    config = policy_config()
    outputs = [objects_of(t, STUDENT, 0.9) for t in truths]
    store.commit_unit("u000", {round_layout(1).annotate("student_od"): annotation_table(outputs)})

    decision = judge_student(store, config, 1, 0, {"u000"}, [STUDENT_OD])

    objects = decision.families["objects"]
    assert decision.validation_images == 6 and objects.images == 6
    assert objects.accepted, objects.reason
    assert objects.student > objects.parent + 0.2
    assert objects.support == 1.0  # better in every bootstrap resample of the images
    assert decision.accepted([STUDENT_OD]) == [STUDENT_OD]
    assert read_policy(store, 1) == decision
    # The round's validation view is the parent's machine view with the student merged
    # in: every object once, and no human label in it.
    views = records_from_table(store.read(round_layout(1).validation))
    assert len(views) == 6
    for view, truth in zip(views, truths, strict=False):
        assert len(view.regions) == sum(r.kind == "object" for r in truth.regions)
        assert not any(r.source == HUMAN for r in view.regions)


def test_a_student_worse_than_the_round_is_refused_and_the_next_round_builds_on_its_view(
    tmp_path, world_store
):
    store, truths = world_store
    config = policy_config()
    # Confident boxes that hit nothing: ranked first, they cost precision at every recall.
    outputs = [objects_of(t, STUDENT, 0.9, shift=40.0) for t in truths]
    store.commit_unit("u000", {round_layout(1).annotate("student_od"): annotation_table(outputs)})

    decision = judge_student(store, config, 1, 0, {"u000"}, [STUDENT_OD])

    objects = decision.families["objects"]
    assert not objects.accepted and "needs a gain of 0.01 in 90%" in objects.reason
    assert decision.accepted([STUDENT_OD]) == []
    stored = json.loads(store.fs.cat_file(store.path(round_layout(1).policy)))
    assert stored["families"]["objects"]["accepted"] is False
    first = records_from_table(store.read(round_layout(1).validation))
    assert all(r.source == SHAPES for view in first for r in view.regions)

    # Round 2 measures against round 1's view; a good student there is accepted.
    good = [objects_of(t, STUDENT, 0.9) for t in truths]
    store.commit_unit("u000", {round_layout(2).annotate("student_od"): annotation_table(good)})
    second = judge_student(store, config, 2, 1, {"u000"}, [STUDENT_OD])
    assert second.families["objects"].parent == objects.parent
    assert second.families["objects"].accepted


def test_a_gain_that_one_image_makes_is_not_taken(world_store):
    store, truths = world_store
    # The student finds the missing objects of one image and says nothing elsewhere.
    outputs = [objects_of(t, STUDENT, 0.9) for t in truths[:1]]
    outputs += [objects_of(t, STUDENT, 0.9, shift=500.0) for t in truths[1:]]
    for out in outputs[1:]:
        out.regions = []
    store.commit_unit("u000", {round_layout(1).annotate("student_od"): annotation_table(outputs)})

    decision = judge_student(store, policy_config(), 1, 0, {"u000"}, [STUDENT_OD])

    objects = decision.families["objects"]
    assert objects.student > objects.parent + 0.01  # the point figure gains
    assert objects.support < 0.9 and not objects.accepted, objects.reason
    assert "of resamples" in objects.reason


def test_without_enough_human_labels_every_family_is_refused(tmp_path, world_store):
    store, truths = world_store
    config = policy_config(min_images=7)
    outputs = [objects_of(t, STUDENT, 0.9) for t in truths]
    store.commit_unit("u000", {round_layout(1).annotate("student_od"): annotation_table(outputs)})
    caption = SpecialistConfig(
        name="student_caption", kind="florence2", model=MODEL, options={"task": "<CAPTION>"}
    )
    captions = [
        dataclasses.replace(t, captions={"brief": Caption("A shape.", "student_caption:m")},
                            regions=[], phrases=[])
        for t in truths
    ]  # fmt: skip
    table = annotation_table(captions)
    store.commit_unit("u000", {round_layout(1).annotate("student_caption"): table})

    decision = judge_student(store, config, 1, 0, {"u000"}, [STUDENT_OD, caption])

    assert not decision.families["objects"].accepted
    assert "6 images with objects truth, needs 7" in decision.families["objects"].reason
    # The human labels have no captions: nothing to measure the captions by.
    assert decision.families["captions"].images == 0
    assert not decision.families["captions"].accepted
