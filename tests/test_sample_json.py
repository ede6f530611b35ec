"""The one converter between records and the exported sample JSON (DESIGN.md format)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from engine.records import (
    Caption,
    ImageRecord,
    Phrase,
    Region,
    TextStats,
    record_from_sample,
    record_to_sample,
)
from stages.export import sample_json


def full_record() -> ImageRecord:
    return ImageRecord(
        image_id="abc123",
        uri="file:///data/cat.jpg",
        source="folder",
        width=640,
        height=480,
        sha256="ab" * 32,
        captions={
            "brief": Caption("A cat on a mat.", "human:coco"),
            "more_detailed": Caption(
                "A grey cat sleeps on a red mat.", "blip@abc", 0.75, 0, TextStats(["cat"])
            ),
        },
        regions=[
            Region((10.5, 20.0, 200.25, 300.0), "cat", "object", "human:coco", category_id=17),
            Region((1, 2, 3, 4), "STOP", "ocr", "ocr:rapidocr", 0.5, 1,
                   quad=[1, 2, 3, 2, 3, 4, 1, 4]),
            Region((0, 0, 5, 5), "", "proposal", "sam",
                   polygons=[[0, 0, 5, 0, 5, 5], [1, 1, 2, 2, 1, 2]]),
            Region((math.nan, 0, 1, 1), "ghost", "object", "owl", 0.1, 1),
        ],
        phrases=[
            Phrase("brief", 2, 5, "cat", [0], "gdino", 0.9, 0),
            Phrase("more_detailed", 0, 5, "A gre", [7], "gdino"),  # points past the regions
        ],
        coco_image_id=397133,
    )  # fmt: skip


def without_lineage_the_export_drops(record: ImageRecord) -> ImageRecord:
    return dataclasses.replace(
        record,
        sha256="",
        coco_image_id=None,
        captions={k: Caption(c.text, "") for k, c in record.captions.items()},
        regions=[dataclasses.replace(r, round=None, category_id=None) for r in record.regions],
        phrases=[Phrase(p.caption, p.start, p.end, p.text, p.regions, "") for p in record.phrases],
    )


def test_a_record_comes_back_less_what_the_format_does_not_carry():
    record = full_record()
    text = json.dumps(record_to_sample(record))  # through JSON text, as in a shard
    back = record_from_sample(json.loads(text))
    expected = without_lineage_the_export_drops(record)
    # NaN != NaN: compare the finite regions exactly and the NaN one field by field.
    assert back.regions[:3] == expected.regions[:3]
    assert math.isnan(back.regions[3].box[0]) and back.regions[3].box[1:] == (0, 1, 1)
    back.regions, expected.regions = back.regions[:3], expected.regions[:3]
    assert back == expected


def test_a_sample_carries_where_its_image_came_from():
    sample = json.loads(json.dumps(sample_json(full_record())))
    assert (sample["uri"], sample["source"]) == ("file:///data/cat.jpg", "folder")


def test_a_sample_exported_before_it_carried_its_uri_is_still_read():
    sample = record_to_sample(full_record())
    del sample["uri"]
    assert record_from_sample(sample).uri == ""


def test_a_sample_comes_back_exactly():
    sample = record_to_sample(dataclasses.replace(full_record(), regions=full_record().regions[:3]))
    # Integers where the format has numbers: read as floats, equal as values.
    sample["regions"][0]["box"] = [10, 20, 200, 300]
    assert record_to_sample(record_from_sample(sample)) == sample
    assert set(sample["captions"]) == {"brief", "detailed", "more_detailed"}
    assert sample["captions"]["detailed"] is None


def test_the_exported_sample_is_the_converter_plus_florence2_targets():
    record = dataclasses.replace(full_record(), regions=full_record().regions[:3])
    exported = sample_json(record)
    assert exported["florence2"]
    assert {k: v for k, v in exported.items() if k != "florence2"} == record_to_sample(record)
    # What the trainer reads: the export's JSON, florence2 and all.
    assert record_from_sample(json.loads(json.dumps(exported))) == (
        without_lineage_the_export_drops(record)
    )


def broken(change) -> dict:
    sample = record_to_sample(full_record())
    change(sample)
    return sample


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        ([1, 2], "a sample is a JSON object, not a list"),
        (broken(lambda s: s.pop("image_id")), "sample has no 'image_id'"),
        (broken(lambda s: s.update(uri=None)), "'uri' is null"),
        (broken(lambda s: s.update(width="640")), "'width' is a str"),
        (broken(lambda s: s.update(height=True)), "'height' is a bool"),
        (broken(lambda s: s.update(width=0)), "an image of 0x480 pixels"),
        (broken(lambda s: s.update(captions="none")), "'captions' is a str"),
        (broken(lambda s: s["captions"].update(huge="x")), "unknown caption kinds"),
        (broken(lambda s: s["captions"].pop("detailed")), "captions has no 'detailed'"),
        (broken(lambda s: s["captions"].update(brief=5)), "'brief' is an int"),
        (broken(lambda s: s.update(regions={})), "'regions' is a dict"),
        (broken(lambda s: s["regions"].append("cat")), "regions[4] is a str"),
        (broken(lambda s: s["regions"][0].pop("box")), "regions[0] has no 'box'"),
        (broken(lambda s: s["regions"][0].update(box=[1, 2, 3])), "box has 3 values, not 4"),
        (broken(lambda s: s["regions"][0].update(box=[1, 2, 3, "4"])), "other than numbers"),
        (broken(lambda s: s["regions"][0].update(kind="blob")), "'kind' is 'blob'"),
        (broken(lambda s: s["regions"][0].update(score="high")), "'score' is a str"),
        (broken(lambda s: s["regions"][0].pop("quad")), "regions[0] has no 'quad'"),
        (broken(lambda s: s["regions"][1].update(quad=[1] * 7)), "quad has 7 values, not 8"),
        (broken(lambda s: s["regions"][2].update(polygons=[5])), "polygons[0] is an int"),
        (broken(lambda s: s["phrases"][0].update(caption="long")), "'caption' is 'long'"),
        (broken(lambda s: s["phrases"][0].update(start=1.5)), "'start' is a float"),
        (broken(lambda s: s["phrases"][0].update(regions=["0"])), "indices are integers"),
    ],
)
def test_a_sample_not_in_the_format_is_refused_with_the_reason(sample, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        record_from_sample(sample)
