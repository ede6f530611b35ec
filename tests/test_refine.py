"""Refinement rounds end to end: round 0 from a generated world, then two refine rounds."""

from __future__ import annotations

import json

import pytest

from engine.config import ExportConfig
from engine.layout import MANIFEST, WRITE_LOCK, round_layout
from engine.lock import StoreLock
from engine.records import Caption, ImageRecord, Region, records_from_table, records_to_table
from engine.round_state import committed_rounds, read_round_state
from engine.run import main
from engine.world import render_image
from refinement.policy import read_policy
from refinement.refine import split_units
from stages.export import ExportUnit, export_unit
from tests.world_shards import exported_world, refine_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HUMAN = "human:coco"


def add_new_images(store, count: int) -> ImageRecord:
    """Images ingested after round 0, one of them with human labels; returns that one."""
    records, images = [], []
    for index in range(count):
        item = render_image(seed=11, index=index)
        records.append(item.record)
        images.append(item.png)
    labelled = records[0]
    labelled.captions = {"brief": Caption("A test image.", HUMAN)}
    labelled.regions = [Region((1, 1, 20, 20), "red circle", "object", HUMAN)]
    labelled.phrases = []
    for record in records[1:]:
        record.captions, record.regions, record.phrases = {}, [], []
    store.commit_unit("u900", {MANIFEST: records_to_table(records, images)})
    return labelled


def human_labels(record: ImageRecord) -> tuple:
    """The human caption texts and boxes of a record (the filter adds caption statistics)."""
    captions = {k: c.text for k, c in record.captions.items() if c.source == HUMAN}
    regions = [(r.box, r.text, r.kind) for r in record.regions if r.source == HUMAN]
    return captions, regions


def kept(store, round_number: int) -> dict[str, ImageRecord]:
    table = store.read(round_layout(round_number).filtered)
    return {r.image_id: r for r in records_from_table(table)}


def test_two_refine_rounds_keep_human_labels_and_refuse_a_second_refine(
    tmp_path, ray_cluster, capsys
):
    store = exported_world(tmp_path / "w", images=16, seed=5, unit=8)
    human = add_new_images(store, 4)
    accepting = refine_config(tmp_path, min_image_gain=0.0)
    args = ["--stage", "refine", "--store", store.url]

    # Round 1: the student is accepted (gain 0 accepts any) and annotates every unit;
    # the world's specialists run only on the 4 images ingested since round 0.
    assert main([*args, "--config", accepting]) == 0
    out = capsys.readouterr().out
    assert "student accepted" in out and "units new since r000: 1" in out
    assert committed_rounds(store) == [0, 1]
    assert read_round_state(store, 1).parent == 0
    layout = round_layout(1)
    annotated = {p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(layout.annotate_root))}
    assert annotated == {"student_od", "shapes", "captions"}
    assert store.committed_units(layout.annotate("shapes")) == ["u900"]
    assert len(store.committed_units(layout.annotate("student_od"))) == 3
    churn = json.loads(store.fs.cat_file(store.path(layout.churn)))
    assert churn["against"] == 0 and churn["kept"] + churn["added"] > 0
    first = kept(store, 1)
    assert human_labels(first[human.image_id]) == human_labels(human)
    # The policy measured the student's objects on the one human-labelled image and
    # refused them (this untrained student finds nothing): none of its boxes is merged.
    policy = read_policy(store, 1)
    assert policy.validation_images == 1
    assert not policy.families["objects"].accepted, policy.families["objects"].reason
    assert "objects refused" in out
    sources = {r.source.split(":")[0] for record in first.values() for r in record.regions}
    assert "student_od" not in sources and "shapes" in sources
    assert main(["--stage", "status", "--store", store.url]) == 0
    assert "merged from the student: none" in capsys.readouterr().out

    # A second refine while one holds the lease is refused with one line naming it.
    holder = StoreLock(store, WRITE_LOCK)
    lease = holder.acquire()
    assert main([*args, "--config", accepting]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and lease.owner in err and "since" in err
    holder.release()

    # Round 2 warm-starts from round 1's student; at the default gain this tiny student
    # is refused, and the round goes on with round 1's records.
    refusing = refine_config(tmp_path, min_image_gain=1.1)
    assert main([*args, "--config", refusing]) == 0
    assert "student refused: image-blind" in capsys.readouterr().out
    assert committed_rounds(store) == [0, 1, 2]
    report = store.fs.cat_file(store.path(round_layout(2).student_report)).decode()
    assert round_layout(1).model in report  # its init: round 1's model
    second = kept(store, 2)
    assert human_labels(second[human.image_id]) == human_labels(human)
    assert second.keys() == first.keys()
    # Round 2 is committed: a refine for it again is refused before any work.
    assert main([*args, "--config", refusing, "--round", "2"]) == 2
    assert "round 3, not 2" in capsys.readouterr().err


def test_refine_is_refused_before_any_work(tmp_path, capsys):
    store = exported_world(tmp_path / "w", images=4, seed=5)
    args = ["--stage", "refine", "--store", store.url]
    # No student to start from: no earlier model, no checkpoint, no tiny model.
    assert main([*args, "--config", "engine/configs/test.yaml"]) == 2
    assert "refine.student needs a checkpoint" in capsys.readouterr().err
    empty = str(tmp_path / "empty")
    assert (
        main(["--stage", "refine", "--store", empty, "--config", refine_config(tmp_path, 0)]) == 2
    )
    assert "run --stage all first" in capsys.readouterr().err


def test_units_known_to_a_round_are_those_its_records_hold_not_its_shards(tmp_path):
    """Export cuts a shard from a run of units, committed under the run's first unit: a
    refine that took the shards' units for the round's would annotate the others again
    as if they were new."""
    store = exported_world(tmp_path, images=12, seed=7, unit=4)  # three units, round 0
    layout = round_layout(0)
    for unit in store.committed_units(MANIFEST):
        store.commit_unit(unit, {layout.filtered: store.read_unit(MANIFEST, unit)})
    for unit in store.committed_units(layout.shards)[1:]:
        store.remove_unit(layout.shards, unit)  # one shard made of all three units
    add_new_images(store, 2)
    known, fresh = split_units(store, 0)
    assert (sorted(known), fresh) == (["u000", "u004", "u008"], {"u900"})


def test_a_round_of_ingest_and_export_alone_knows_the_units_its_shards_span(tmp_path):
    store = exported_world(tmp_path, images=12, seed=7, unit=4)  # no records of its own
    shards = round_layout(0).shards
    for unit in store.committed_units(shards):
        store.remove_unit(shards, unit)
    members = tuple((unit, None) for unit in store.committed_units(MANIFEST))
    export_unit(ExportUnit("u000", store.url, MANIFEST, members, shards, ExportConfig()))
    add_new_images(store, 2)
    known, fresh = split_units(store, 0)
    assert (sorted(known), fresh) == (["u000", "u004", "u008"], {"u900"})
