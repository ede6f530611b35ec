"""The filter stage: statistics stored first, then cheap threshold passes."""

import os

import webdataset as wds

from engine.config import AnnotateConfig, FilterConfig, SpecialistConfig, load_config
from engine.layout import round_layout
from engine.records import Caption, ImageRecord, Phrase, Region, TextStats, records_from_table
from engine.store import Store
from stages.annotate import run_annotate
from stages.export import run_export
from stages.filter import (
    decide_record,
    run_filter,
)
from stages.ingest import plan_ingest, run_ingest
from stages.merge import run_merge
from tests.inputs import encode, photo, write_coco


def test_decisions_set_aside_every_dropped_annotation_with_its_reason():
    busy = TextStats(objects=["a"] * 12, object_complexity=2.0)
    record = ImageRecord(
        "i", "u", "s", 100, 100, "h",
        captions={
            "brief": Caption("A cat.", "cap", stats=TextStats(["cat"], object_complexity=1.0)),
            "detailed": Caption("Many things.", "cap", stats=busy),
        },
        regions=[
            Region((0, 0, 50, 50), "cat", "object", "det", score=0.9),
            Region((1, 1, 50, 50), "cat", "object", "det", score=0.8),  # NMS duplicate
            Region((60, 60, 90, 90), "dog", "object", "det", score=0.1),  # low score
            Region((10, 10, 10, 40), "pole", "object", "det", score=0.9),  # zero width
        ],
        phrases=[
            Phrase("brief", 2, 5, "cat", [0], "g", score=0.9),
            Phrase("detailed", 0, 4, "Many", [2], "g"),
        ],
    )  # fmt: skip
    config = FilterConfig(text={"max_objects": {"detailed": 10}})
    kept, aside = decide_record(record, config)
    assert list(kept.captions) == ["brief"]
    assert [r.text for r in kept.regions] == ["cat"]
    assert [(p.text, p.regions) for p in kept.phrases] == [("cat", [0])]
    reasons = {reason: part for reason, part in aside}
    assert list(reasons["caption: too many objects"].captions) == ["detailed"]
    assert [p.text for p in reasons["phrase: its caption was dropped"].phrases] == ["Many"]
    dropped_regions = sorted(
        r.text for k, p in reasons.items() if k.startswith("region") for r in p.regions
    )
    assert dropped_regions == ["cat", "dog", "pole"]
    # Nothing vanished: every annotation is kept or set aside.
    total = sum(len(p.captions) + len(p.regions) + len(p.phrases) for p in reasons.values())
    assert total + 1 + 1 + 1 == 2 + 4 + 2


def test_too_many_objects_drops_the_image():
    regions = [Region((i, 0, i + 5, 5), "dot", "object", "det", score=0.9) for i in range(0, 60, 6)]
    record = ImageRecord("i", "u", "s", 100, 100, "h", regions=regions)
    kept, aside = decide_record(record, FilterConfig(region={"max_objects": 5}))
    assert kept is None
    assert aside[-1][0] == "image: too many objects" and len(aside[-1][1].regions) == 10


def test_refiltering_runs_no_model_and_export_follows_it(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {f"{k}.jpg": (40 + 3 * k, 30) for k in range(6)}
    for k, name in enumerate(sizes):
        (folder / name).write_bytes(encode(photo(*sizes[name], seed=k)))
    write_coco(folder / "labels.json", sizes, [])
    specs = (
        SpecialistConfig(
            name="cap", kind="tests.specialists_for_tests:SizeCaptioner", num_cpus=0.25
        ),
    )
    config = load_config("engine/configs/test.yaml").model_copy(
        update={"annotate": AnnotateConfig(specialists=specs)}
    )
    store = Store(str(tmp_path / "store"))
    layout = round_layout(0)
    run_ingest(store, config, plan_ingest([str(folder / "labels.json")], store, config.ingest))
    run_annotate(store, config, 0)
    run_merge(store, config, 0)

    first = run_filter(store, config, 0)
    scored = records_from_table(store.read(layout.scored))
    stats = scored[0].captions["detailed"].stats
    assert stats is not None and "image" in stats.objects and "pixels" in stats.objects
    assert first.outputs == 6 and store.read(layout.dropped).num_rows == 0
    run_export(store, config, 0)
    shards_before = set(os.listdir(store.path(layout.shards)))
    assert "detailed" in exported_captions(store)

    def scored_markers() -> list[dict]:
        return [store.read_marker(layout.scored, u) for u in store.committed_units(layout.scored)]

    markers = scored_markers()
    only_thresholds = {"text": {"max_objects": {"detailed": 1}}}
    strict = config.model_copy(
        update={"filter": FilterConfig(**{**config.filter.model_dump(), **only_thresholds})}
    )
    second = run_filter(store, strict, 0)
    assert scored_markers() == markers  # no caption parsed again: only thresholds changed
    assert second.units_run == first.units_run and second.outputs == 6
    assert second.notes["units redone: what they are computed from changed"] == first.units_run
    assert all(
        "detailed" not in r.captions for r in records_from_table(store.read(layout.filtered))
    )
    reasons = store.read(layout.dropped).column("reason").to_pylist()
    assert reasons == ["caption: too many objects"] * 6
    # The same thresholds again: nothing to do.
    assert run_filter(store, strict, 0).units_run == 0

    # Export follows the filtered records: new shards, the old ones gone.
    again = run_export(store, strict, 0)
    assert again.units_run == first.units_run
    assert "detailed" not in exported_captions(store)
    shards_after = set(os.listdir(store.path(layout.shards)))
    assert not shards_before & {name for name in shards_after if name.endswith(".tar")}
    assert run_export(store, strict, 0).units_run == 0


def exported_captions(store: Store) -> set[str]:
    """Caption kinds found in any sample of round 0's shards."""
    index = store.read_json(round_layout(0).shard_index)
    kinds = set()
    for sample in wds.WebDataset(index["shards"], shardshuffle=False).decode():
        kinds.update(kind for kind, text in sample["json"]["captions"].items() if text)
    return kinds
