"""The report's histogram data: counts of values computed in DuckDB, the same over the
committed Parquet parts (as the report reads them) as over a table."""

import pytest

from engine.records import Caption, ImageRecord, Region, records_to_table
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
