import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.records import (
    MANIFEST_SCHEMA,
    RECORD_SCHEMA,
    REGION_TYPE,
    Caption,
    ImageRecord,
    Phrase,
    Region,
    TextStats,
    records_from_table,
    records_to_table,
)


def full_record() -> ImageRecord:
    return ImageRecord(
        image_id="abc123",
        uri="file:///data/cat.jpg",
        source="folder",
        width=640,
        height=480,
        sha256="ab" * 32,
        captions={
            "brief": Caption("A cat on a mat.", source="human:coco"),
            "detailed": Caption(
                "A grey cat sleeps on a red mat.",
                source="blip@abc",
                score=0.75,
                round=0,
                stats=TextStats(["cat", "mat"], ["grey", "red"], ["sleeps"], [], 2.0, 1.5),
            ),
        },
        regions=[
            Region((10.5, 20.0, 200.25, 300.0), "cat", "object", "human:coco", category_id=17),
            Region(
                (1, 2, 3, 4),
                "STOP",
                "ocr",
                "ocr:rapidocr",
                score=0.5,
                round=1,
                quad=[1, 2, 3, 2, 3, 4, 1, 4],
            ),
            Region(
                (0, 0, 5, 5),
                "",
                "proposal",
                "sam",
                polygons=[[0, 0, 5, 0, 5, 5], [1, 1, 2, 2, 1, 2]],
            ),
        ],
        phrases=[Phrase("brief", 2, 5, "cat", [0], source="gdino", score=0.9, round=0)],
        coco_image_id=397133,
    )


def test_record_round_trips_through_parquet():
    record = full_record()
    table = records_to_table([record])
    assert table.schema.equals(RECORD_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    buffer.seek(0)
    assert records_from_table(pq.read_table(buffer)) == [record]


def test_coco_ids_come_back_with_their_type():
    # Some COCO-like files use string ids; a digit string must not come back an int.
    record = full_record()
    record.coco_image_id = "397133"
    record.regions[0].category_id = 2**70  # JSON allows it; an int64 column would not
    assert records_from_table(records_to_table([record])) == [record]


def test_a_part_written_before_coco_ids_were_kept_reads_them_as_none():
    old_region = pa.struct([f for f in REGION_TYPE if f.name != "category_id"])
    table = records_to_table([full_record()]).drop_columns(["coco_image_id"])
    table = table.set_column(
        table.schema.get_field_index("regions"),
        "regions",
        table.column("regions").cast(pa.list_(old_region)),
    )
    [record] = records_from_table(table)
    assert record.coco_image_id is None
    assert [r.category_id for r in record.regions] == [None, None, None]
    assert record.regions[0].text == "cat"


def test_manifest_layout_carries_the_image_bytes():
    table = records_to_table([full_record()], images=[b"\xff\xd8jpeg"])
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("image")[0].as_py() == b"\xff\xd8jpeg"
    assert records_from_table(table) == [full_record()]


def test_empty_record_round_trips():
    record = ImageRecord("id", "u", "s", 1, 1, "0" * 64)
    assert records_from_table(records_to_table([record])) == [record]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Region((0, 0, 1, 1), "x", "blob", "s"),
        lambda: Region((0, 0, 1), "x", "object", "s"),
        lambda: Phrase("long", 0, 1, "x", [], "s"),
        lambda: ImageRecord("i", "u", "s", 1, 1, "h", captions={"huge": Caption("x", "s")}),
    ],
)
def test_invalid_parts_are_refused(build):
    with pytest.raises(ValueError):
        build()
