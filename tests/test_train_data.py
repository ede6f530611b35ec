"""Trainer data: conversations from exported shards and LLaVA JSON, answer-only labels, batches."""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from engine.config import ExportConfig
from engine.layout import round_layout
from engine.records import (
    Caption,
    ImageRecord,
    Phrase,
    Region,
    record_from_sample,
    records_to_table,
)
from engine.store import Store
from engine.train.config import TrainDataConfig
from engine.train.data import (
    Conversation,
    ReadStats,
    Turn,
    caption_conversation,
    instruction_conversations,
    read_conversations,
    read_llava,
)
from engine.train.instructions import (
    BRIEF_CAPTION_PROMPTS,
    CAPTION_PROMPTS,
    COUNTING_PROMPTS,
    GROUNDING_PROMPTS,
    MAX_TURNS,
    OCR_LOCATE_PROMPTS,
    OCR_READ_PROMPTS,
    REFERRING_PROMPTS,
    REGION_PROMPTS,
)
from stages.export import ExportUnit, ShardWriter, export_unit, write_shard_index
from tests.inputs import encode, photo

RECORDS = 14
UNIT = 5  # records per manifest unit: three export units
SHARD_SAMPLES = 3  # several shards per unit


# ---------------------------------------------------------------- hand-made records

# Written as sample JSON, the way the trainer reads them (engine.records.record_from_sample).

# 1000 x 500 pixels: a bin is one pixel across and half a pixel down, so the expected
# coordinates are exact: x -> x, y -> 2y.
W, H = 1000, 500


def region(box, text, kind="object", quad=None) -> dict:
    return {"box": box, "text": text, "kind": kind, "score": None, "source": "human:test",
            "polygons": None, "quad": quad}  # fmt: skip


def rich_record() -> dict:
    caption = "A brown dog sits next to a grey cat."
    return {
        "image_id": "rich",
        "width": W,
        "height": H,
        "source": "test",
        "captions": {"brief": "A dog.", "detailed": None, "more_detailed": caption},
        "regions": [
            region([10, 20, 110, 120], "dog"),  # 0
            region([200, 30, 300, 130], "Dog"),  # 1: the same category, other case
            region([400, 50, 500, 150], "grey cat"),  # 2
            region([0, 0, 999, 499], "a red sofa under the window"),  # 3: a description
            region([600, 300, 700, 320], "STOP", "ocr",
                   quad=[600, 300, 700, 302, 699, 320, 601, 318]),
            region([100, 400, 180, 420], "EXIT 4", "ocr"),  # 5: no quad
            region([50, 380, 90, 405], "A", "ocr"),  # 6: same line as 5, to its left
            region([5, 5, 6, 6], "", "proposal"),  # 7: no text
            region([float("nan"), 0, 1, 1], "ghost"),  # 8: not finite
        ],
        "phrases": [
            {"caption": "more_detailed", "start": 0, "end": 11, "text": "A brown dog",
             "regions": [0]},
            {"caption": "more_detailed", "start": 26, "end": 35, "text": "a grey cat",
             "regions": [2]},
            {"caption": "brief", "start": 2, "end": 5, "text": "dog", "regions": [1, 0]},
            {"caption": "brief", "start": 0, "end": 1, "text": "ghost", "regions": [8]},
        ],
        "florence2": [],
    }  # fmt: skip


def bare_record() -> dict:
    return {"image_id": "bare", "width": W, "height": H, "source": "test",
            "captions": {"brief": None, "detailed": "  ", "more_detailed": None},
            "regions": [], "phrases": [], "florence2": []}  # fmt: skip


def pairs(conversation: Conversation) -> list[tuple[str, str]]:
    turns = conversation.turns
    assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    return [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns), 2)]


def asked(question: str, prompts: tuple[str, ...], **fields: str) -> bool:
    return question in {p.format(**fields) for p in prompts}


@pytest.mark.parametrize(
    ("kinds", "choice", "expected"),
    [
        (("detailed", "more_detailed"), "first", {"d"}),
        (("brief",), "first", {"b"}),
        (("more_detailed", "detailed", "brief"), "random", {"b", "d", "m"}),
        (("detailed",), "random", {"d"}),
    ],
)
def test_stage1_caption_kinds_are_a_config_choice(kinds, choice, expected):
    captions = {"brief": "b", "detailed": "d", "more_detailed": "m"}
    record = record_from_sample({**bare_record(), "captions": captions})
    answers = {
        pairs(caption_conversation(record, b"jpg", random.Random(seed), kinds, choice))[0][1]
        for seed in range(30)
    }
    assert answers == expected
    with pytest.raises(ValueError, match="unknown caption kinds"):
        caption_conversation(record, b"jpg", random.Random(0), ("long",))


@pytest.mark.parametrize(
    ("captions", "expected"),
    [
        ({"brief": "b", "detailed": "d", "more_detailed": "m"}, "m"),
        ({"brief": "b", "detailed": "d", "more_detailed": None}, "d"),
        ({"brief": "b", "detailed": " ", "more_detailed": ""}, "b"),
        ({"brief": None, "detailed": None, "more_detailed": None}, None),
    ],
)
def test_stage1_takes_the_most_detailed_caption(captions, expected):
    record = {**bare_record(), "captions": captions}
    conversation = caption_conversation(record_from_sample(record), b"jpg", random.Random(0))
    if expected is None:
        assert conversation is None
        return
    ((question, answer),) = pairs(conversation)
    # A brief caption is asked for briefly: the prompt must not promise detail it lacks.
    assert answer == expected
    assert question in (BRIEF_CAPTION_PROMPTS if expected == "b" else CAPTION_PROMPTS)
    assert (conversation.image, conversation.image_id, conversation.task) == (
        b"jpg",
        "bare",
        "caption",
    )


def stage2(record: dict, task: str) -> list[tuple[str, str]]:
    conversations = instruction_conversations(
        record_from_sample(record), b"jpg", [task], random.Random(1)
    )
    assert all(c.task == task and c.image == b"jpg" for c in conversations)
    return pairs(conversations[0]) if conversations else []


def test_region_task_asks_for_each_object_box():
    got = stage2(rich_record(), "region")
    expected = {
        "[10, 40, 110, 240]": "dog",
        "[200, 60, 300, 260]": "Dog",
        "[400, 100, 500, 300]": "grey cat",
        "[0, 0, 999, 998]": "a red sofa under the window",
    }
    assert len(got) == MAX_TURNS == len(expected)
    for question, answer in got:
        (box,) = [b for b in expected if asked(question, REGION_PROMPTS, box=b)]
        assert answer == expected.pop(box)
    assert not expected


def test_grounding_task_gives_every_box_of_a_phrase():
    got = {}
    for question, answer in stage2(rich_record(), "grounding"):
        (phrase,) = [
            p
            for p in ("A brown dog", "a grey cat", "dog")
            if asked(question, GROUNDING_PROMPTS, phrase=p)
        ]
        got[phrase] = answer
    assert got == {
        "A brown dog": "[10, 40, 110, 240]",
        "a grey cat": "[400, 100, 500, 300]",
        # Boxes in the record's region order, whatever order the phrase lists them in.
        "dog": "[10, 40, 110, 240], [200, 60, 300, 260]",
    }


def test_referring_task_uses_texts_that_name_one_region():
    got = {a: q for q, a in stage2(rich_record(), "referring")}
    # "dog" and "Dog" name two regions: no single answer, so not asked.
    assert set(got) == {"[400, 100, 500, 300]", "[0, 0, 999, 998]"}
    assert asked(got["[400, 100, 500, 300]"], REFERRING_PROMPTS, expression="grey cat")
    assert asked(
        got["[0, 0, 999, 998]"], REFERRING_PROMPTS, expression="a red sofa under the window"
    )


def test_counting_task_counts_categories_case_blind():
    got = {}
    for question, answer in stage2(rich_record(), "counting"):
        (category,) = [
            c for c in ("dog", "grey cat") if asked(question, COUNTING_PROMPTS, category=c)
        ]
        got[category] = answer
    # The five-word description is not a category.
    assert got == {"dog": "2", "grey cat": "1"}


def test_ocr_task_reads_then_locates_in_reading_order():
    (read_q, read_a), (where_q, where_a) = stage2(rich_record(), "ocr")
    assert read_q in OCR_READ_PROMPTS and where_q in OCR_LOCATE_PROMPTS
    assert read_a == "STOP\nA\nEXIT 4"
    assert where_a == (
        "STOP [600, 600, 700, 604, 699, 640, 601, 636]\n"
        "A [50, 760, 90, 810]\n"
        "EXIT 4 [100, 800, 180, 840]"
    )


def test_caption_task_asks_for_the_stage1_caption_among_the_instructions():
    record = record_from_sample(rich_record())
    caption, counting = instruction_conversations(
        record, b"jpg", ["caption", "counting"], random.Random(1)
    )
    assert (caption.task, counting.task) == ("caption", "counting")
    ((question, answer),) = pairs(caption)
    assert question in CAPTION_PROMPTS and answer == "A brown dog sits next to a grey cat."
    # The caption kinds stage 1 is configured with, asked for as stage 1 asks.
    (brief,) = instruction_conversations(
        record, b"jpg", ["caption"], random.Random(1), caption_kinds=("brief",)
    )
    ((question, answer),) = pairs(brief)
    assert question in BRIEF_CAPTION_PROMPTS and answer == "A dog."
    bare = record_from_sample(bare_record())
    assert instruction_conversations(bare, b"jpg", ["caption"], random.Random(0)) == []


@pytest.mark.parametrize("task", ["region", "grounding", "ocr", "counting", "referring"])
def test_a_record_without_the_data_gives_no_sample(task):
    bare = record_from_sample(bare_record())
    assert instruction_conversations(bare, b"jpg", [task], random.Random(0)) == []
    # Only unusable annotations: a proposal, a non-finite box, a phrase pointing at it.
    record = rich_record()
    record["regions"] = [record["regions"][7], record["regions"][8]]
    record["phrases"] = [{**record["phrases"][3], "regions": [1]}, record["phrases"][3]]
    unusable = record_from_sample(record)
    assert instruction_conversations(unusable, b"jpg", [task], random.Random(0)) == []


def test_many_items_are_capped_per_conversation():
    record = {
        **bare_record(),
        "regions": [region([i, i, i + 5, i + 5], f"thing {i}") for i in range(9)],
    }
    (conversation,) = instruction_conversations(
        record_from_sample(record), b"jpg", ["region"], random.Random(0)
    )
    assert len(pairs(conversation)) == MAX_TURNS


# ---------------------------------------------------------------- shards


def image_record(k: int) -> ImageRecord:
    captions = {"brief": Caption(f"photo {k}", "human:test")}
    if k % 3:
        captions["more_detailed"] = Caption(f"a detailed view of photo {k}", "human:test")
    return ImageRecord(
        image_id=f"img{k:03d}",
        uri=f"file:///in/{k}.jpg",
        source="test",
        width=40,
        height=30,
        sha256=f"{k:064d}",
        captions=captions,
        regions=[
            Region((1, 1, 20, 20), "dog", "object", "human:test"),
            Region((5, 10, 38, 28), f"sign {k}", "ocr", "ocr:test", 0.9),
        ],
        phrases=[Phrase("brief", 0, 5, "photo", [0], "grounding:test")],
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """The engine's export of 14 records (three units, several shards each), run unit by
    unit in this process: the export stage's own code, without starting Ray."""
    store = Store(str(tmp_path_factory.mktemp("train_data") / "store"))
    records = [image_record(k) for k in range(RECORDS)]
    for start in range(0, RECORDS, UNIT):
        unit = f"u{start:03d}"
        chunk = records[start : start + UNIT]
        images = [encode(photo(40, 30, seed=k)) for k in range(start, start + len(chunk))]
        store.commit_unit(unit, {"manifest": records_to_table(chunk, images)})
        ids = tuple(r.image_id for r in chunk)
        config = ExportConfig(shard_max_samples=SHARD_SAMPLES)
        export_unit(ExportUnit(unit, store.url, "manifest", ((unit, ids),), "shards/r000", config))
    write_shard_index(store, round_layout(0))
    return store.read_json(round_layout(0).shard_index)["shards"]


def data_config(**overrides) -> TrainDataConfig:
    return TrainDataConfig(**{"shuffle_buffer": 6, **overrides})


def stream(shards, stage="stage1", epoch=0, **kw) -> list[tuple[str, str, tuple[Turn, ...]]]:
    data = kw.pop("data", data_config())
    return [
        (c.image_id, c.task, c.turns)
        for c in read_conversations(shards, stage, data, seed=7, epoch=epoch, **kw)
    ]


def test_stage1_reads_every_record_of_the_export(shards):
    assert len(shards) >= 6
    got = stream(shards)
    assert sorted(i for i, _, _ in got) == [f"img{k:03d}" for k in range(RECORDS)]
    answers = {i: turns[1].text for i, _, turns in got}
    assert answers["img001"] == "a detailed view of photo 1" and answers["img003"] == "photo 3"


def test_shards_may_be_given_as_a_glob_or_brace_range(shards):
    folder = shards[0].rsplit("/", 1)[0]
    everything = sorted(i for i, _, _ in stream(shards))
    assert sorted(i for i, _, _ in stream([folder + "/*.tar"])) == everything
    first_unit = stream([folder + "/u000-{00000..00001}.tar"])
    assert sorted(i for i, _, _ in first_unit) == everything[:UNIT]


def test_stream_is_fixed_by_seed_and_epoch(shards):
    assert stream(shards, epoch=0) == stream(shards, epoch=0)
    first = [i for i, _, _ in stream(shards, epoch=0)]
    second = [i for i, _, _ in stream(shards, epoch=1)]
    assert first != second and sorted(first) == sorted(second)
    in_order = [f"img{k:03d}" for k in range(RECORDS)]
    assert first != in_order
    unshuffled = stream(shards, data=data_config(shuffle_buffer=0))
    assert [i for i, _, _ in unshuffled] == in_order


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_the_stream(shards, world_size):
    whole = stream(shards, stage="stage2")
    shares = [
        stream(shards, stage="stage2", rank=r, world_size=world_size) for r in range(world_size)
    ]
    assert Counter(x for share in shares for x in share) == Counter(whole)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # Conversation i of the shuffled stream goes to rank i % world_size.
    assert shares[1] == whole[1::world_size]


def test_stage2_makes_the_configured_tasks(shards):
    tasks = Counter(task for _, task, _ in stream(shards, stage="stage2"))
    assert tasks == {"region": RECORDS, "grounding": RECORDS, "ocr": RECORDS,
                     "counting": RECORDS, "referring": RECORDS}  # fmt: skip
    only = data_config(instruction_tasks=("ocr",))
    assert {task for _, task, _ in stream(shards, stage="stage2", data=only)} == {"ocr"}
    # Stage 1's caption among the instructions: the same answers stage 1 trains on.
    mixed = data_config(instruction_tasks=("caption", "counting"))
    got = stream(shards, stage="stage2", data=mixed)
    assert Counter(task for _, task, _ in got) == {"caption": RECORDS, "counting": RECORDS}
    captions = {i: turns for i, task, turns in got if task == "caption"}
    assert captions == {i: turns for i, _, turns in stream(shards)}


def test_corrupt_samples_are_skipped_warned_and_counted(shards, tmp_path, caplog):
    store = Store(str(tmp_path))
    good = encode(photo(40, 30, seed=1))
    record = json.dumps(rich_record()).encode()
    with ShardWriter(store, "bad", "mixed") as writer:
        writer.next_shard()
        for key, members in {
            "ok1": {"jpg": good, "json": record},
            "badjson": {"jpg": good, "json": b"{not json"},
            "nojpg": {"json": record},
            "notrecord": {"jpg": good, "json": b'{"image_id": "odd", "captions": "none"}'},
            "cutjpg": {"jpg": good[: len(good) // 2], "json": record},
            "ok2": {"jpg": good, "json": record},
        }.items():
            for ext, data in members.items():
                writer.add(f"{key}.{ext}", data)
    store.publish("bad", ["mixed-00000.tar"])
    mixed = tmp_path / "bad" / "mixed-00000.tar"
    with tarfile.open(mixed) as tar:
        cut_at = tar.getmember("badjson.jpg").offset_data + 10
    # Cut inside the second sample: the first is still read, the rest of the shard is not.
    (tmp_path / "bad" / "cut.tar").write_bytes(mixed.read_bytes()[:cut_at])
    stats = ReadStats()
    bad = [str(mixed), str(tmp_path / "bad" / "cut.tar")]
    with caplog.at_level(logging.WARNING, logger="engine.train.data"):
        got = list(
            read_conversations(
                [*bad, shards[0]], "stage1", data_config(), seed=0, epoch=0, stats=stats
            )
        )
    assert sum(c.image_id == "rich" for c in got) == 3  # ok1, ok2 and the cut shard's ok1
    assert len(got) == 3 + SHARD_SAMPLES
    assert stats.skipped == {"bad json": 1, "incomplete sample": 1, "malformed record": 1,
                             "unreadable image": 1, "unreadable shard": 1}  # fmt: skip
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for where in (
        "mixed-00000.tar#badjson",
        "mixed-00000.tar#nojpg",
        "mixed-00000.tar#cutjpg",
        "mixed-00000.tar#notrecord",
        "cut.tar",
    ):
        assert where in messages


# ---------------------------------------------------------------- LLaVA JSON


@pytest.fixture
def llava(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    (images / "coco" / "a.jpg").write_bytes(encode(photo(32, 24, seed=3)))

    def entry(i, image="coco/a.jpg", turns=(("human", "<image>\nWhat is it?"), ("gpt", "A cat."))):
        return {
            "id": i,
            "image": image,
            "conversations": [{"from": f, "value": v} for f, v in turns],
        }

    entries = [
        entry("good"),
        entry("two", turns=(("human", "What color?\n<image>"), ("gpt", "Grey."),
                            ("human", "Size?"), ("gpt", "Small."))),
        {"id": "textonly", "conversations": [{"from": "human", "value": "Hi"},
                                             {"from": "gpt", "value": "Hello"}]},
        entry("order", turns=(("gpt", "A cat."), ("human", "<image>\nWhat is it?"))),
        entry("noanswer", turns=(("human", "<image>\nWhat is it?"),)),
        entry("missing", image="coco/none.jpg"),
    ]  # fmt: skip
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    return path, images


def test_llava_entries_are_read_and_bad_ones_skipped(llava, caplog):
    path, images = llava
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="engine.train.data"):
        got = list(read_llava(str(path), str(images), stats=stats))
    assert [(c.image_id, c.task) for c in got] == [("good", "llava"), ("two", "llava")]
    assert got[0].turns == (Turn("user", "What is it?"), Turn("assistant", "A cat."))
    assert [t.text for t in got[1].turns] == ["What color?", "Grey.", "Size?", "Small."]
    assert got[0].image == (images / "coco" / "a.jpg").read_bytes()
    assert stats.skipped == {"bad llava entry": 3, "unreadable image": 1}
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert all(f"llava.json#{i}" in messages for i in ("textonly", "order", "noanswer", "missing"))


def test_stage2_mixes_llava_with_the_shards(shards, llava):
    path, images = llava
    data = data_config(llava_json=str(path), llava_images=str(images))
    tasks = Counter(task for _, task, _ in stream(shards, stage="stage2", data=data))
    assert tasks["llava"] == 2 and tasks["region"] == RECORDS
    assert "llava" not in {task for _, task, _ in stream(shards, stage="stage1", data=data)}
