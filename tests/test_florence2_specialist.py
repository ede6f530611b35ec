"""Florence-2 specialist: a tiny model of the real architecture, taught a few outputs.

The tiny model is trained for a few dozen steps to write one known sequence per task for
the taught prompts, so the whole path (batched generation, the processor's parser,
conversion to records, scores) is checked against known answers. Prompts it was not
taught make it write arbitrary text, which checks that any output gives well-formed
annotations. Known targets from ``refinement.targets`` check the reading on its own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.layout import round_layout
from engine.records import (
    CAPTION_KINDS,
    REGION_KINDS,
    Caption,
    ImageRecord,
    Phrase,
    Region,
    records_from_table,
)
from engine.store import Store
from refinement.targets import dequantise, florence2_targets
from specialists import build_specialist
from specialists.base import Annotations, SpecialistInput
from specialists.florence2 import TASKS, Florence2Specialist, Generation, Prompt
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo, write_coco
from tests.tiny_florence2 import build_florence2_processor, build_tiny_florence2_model

KIND = "specialists.florence2:Florence2Specialist"
CAPTION = "A dog chases a red ball."
DOG = [100, 200, 500, 700]
BALL = [600, 600, 900, 950]
STOP_QUAD = [10, 20, 300, 20, 300, 90, 10, 90]
POLYGON = [100, 200, 500, 200, 300, 700]


def locs(bins: list[int]) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


# (prompt, what the tiny model learns to write for it)
TAUGHT = [
    ("<CAPTION>", CAPTION),
    ("<OD>", f"dog{locs(DOG)}ball{locs(BALL)}"),
    ("<OCR_WITH_REGION>", f"STOP{locs(STOP_QUAD)}"),
    (f"<CAPTION_TO_PHRASE_GROUNDING>{CAPTION}", f"A dog{locs(DOG)}a red ball{locs(BALL)}"),
    *(
        (f"<REGION_TO_SEGMENTATION>{locs(box)}", f"<poly>{locs(POLYGON)}</poly>")
        for box in (DOG, BALL)
    ),
]
# Landscape, portrait and square: the processor resizes each differently.
SIZES = [(100, 50), (30, 70), (64, 64)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model, taught ``TAUGHT``, saved with its processor like a hub checkpoint."""
    processor = build_florence2_processor()
    model = build_tiny_florence2_model()
    # The outputs must not depend on the image, so the vision tower need not learn.
    model.model.vision_tower.requires_grad_(False)
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    inputs = processor(
        text=[p for p, _ in TAUGHT], images=[grey] * len(TAUGHT), padding=True, return_tensors="pt"
    )
    # Labels as Florence-2 is trained: <s> target </s>, padding ignored by the loss.
    labels = processor.tokenizer([t for _, t in TAUGHT], padding=True, return_tensors="pt")
    labels = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(200):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01
    path = tmp_path_factory.mktemp("florence2")
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def spec(path, task: str, options: dict | None = None, **fields) -> SpecialistConfig:
    """A config entry; ``options`` go to the constructor, ``fields`` to the config."""
    options = {"task": task, "max_new_tokens": 40, **(options or {})}
    return SpecialistConfig(
        **{"name": "f2", "kind": KIND, "model": str(path), "num_cpus": 0.25, **fields},
        options=options,
    )


def loaded(path, task: str, options: dict | None = None, **fields) -> Florence2Specialist:
    specialist = build_specialist(spec(path, task, options, **fields))
    specialist.setup()
    return specialist


def item(size: tuple[int, int], seed: int = 0, **annotations) -> SpecialistInput:
    width, height = size
    record = ImageRecord(f"img{seed}", f"mem://{seed}", "test", width, height, "0" * 64)
    for kind, text in annotations.get("captions", {}).items():
        record.captions[kind] = Caption(text, source="human")
    record.regions.extend(annotations.get("regions", []))
    return SpecialistInput(record, photo(width, height, seed=seed))


def pixels(bins: list[int], size: tuple[int, int]) -> list[float]:
    return [dequantise(b, size[i % 2]) for i, b in enumerate(bins)]


def assert_close(values, expected, tolerance: float = 1.0) -> None:
    assert len(values) == len(expected)
    assert all(abs(a - b) <= tolerance for a, b in zip(values, expected, strict=True))


def assert_score(score) -> None:
    assert isinstance(score, float) and 0.0 < score <= 1.0


def assert_well_formed(annotations: Annotations, record: ImageRecord) -> None:
    """Types and bounds, whatever the content."""
    width, height = record.width, record.height

    def inside(coords) -> bool:
        return all(0 <= v <= (width, height)[i % 2] for i, v in enumerate(coords))

    assert set(annotations.captions) <= set(CAPTION_KINDS)
    for caption in annotations.captions.values():
        assert isinstance(caption.text, str) and caption.text
        assert caption.source == ""
        assert_score(caption.score)
    for region in annotations.regions:
        x0, y0, x1, y1 = region.box
        assert region.kind in REGION_KINDS and isinstance(region.text, str)
        assert inside(region.box) and x0 <= x1 and y0 <= y1
        assert region.source == ""
        assert_score(region.score)
        for part in region.polygons or []:
            assert len(part) >= 6 and len(part) % 2 == 0 and inside(part)
        if region.quad is not None:
            assert len(region.quad) == 8 and inside(region.quad)
    for phrase in annotations.phrases:
        caption = record.caption_text(phrase.caption)
        assert caption is not None and 0 <= phrase.start < phrase.end <= len(caption)
        assert caption[phrase.start : phrase.end] == phrase.text
        assert phrase.regions and all(0 <= i < len(annotations.regions) for i in phrase.regions)
        assert_score(phrase.score)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_declares_what_it_produces_and_needs(tmp_path, task):
    specialist = build_specialist(spec(tmp_path, task))
    product, needs = TASKS[task]
    assert specialist.produces == {product}
    assert specialist.needs == needs
    if task == "<CAPTION_TO_PHRASE_GROUNDING>":
        assert needs == {"captions"}
    if task == "<REGION_TO_SEGMENTATION>":
        assert needs == {"objects"}


@pytest.mark.parametrize(
    "options",
    [
        {"task": "<OCR>"},
        {"task": "<OD>", "num_beams": 0},
        {"task": "<CAPTION_TO_PHRASE_GROUNDING>", "grounding_captions": ["long"]},
    ],
)
def test_bad_options_fail_when_built(tmp_path, options):
    config = SpecialistConfig(name="f2", kind=KIND, model=str(tmp_path), options=options)
    with pytest.raises(ValueError):
        Florence2Specialist(config, **options)


def test_lineage_names_the_pinned_commit(checkpoint):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert loaded(checkpoint, "<OD>").model_revision == f"{checkpoint}@local"
    assert loaded(checkpoint, "<OD>", revision=commit).model_revision == f"{checkpoint}@{commit}"


# ---------------------------------------------------------------- taught outputs


def test_captions_of_images_of_different_sizes(checkpoint):
    specialist = loaded(checkpoint, "<CAPTION>")
    items = [item(size, seed=k) for k, size in enumerate(SIZES)]
    results = specialist.annotate(items)
    for result, source in zip(results, items, strict=True):
        assert set(result.captions) == {"brief"}
        assert result.captions["brief"].text == CAPTION
        assert not result.regions and not result.phrases
        assert_well_formed(result, source.record)
    # A taught sequence is near certain.
    assert results[0].captions["brief"].score > 0.9


def test_objects_are_the_taught_boxes_in_each_image_s_pixels(checkpoint):
    specialist = loaded(checkpoint, "<OD>", batch_size=2)
    items = [item(size, seed=k) for k, size in enumerate(SIZES)]
    for result, source in zip(specialist.annotate(items), items, strict=True):
        size = source.image.size
        assert [r.text for r in result.regions] == ["dog", "ball"]
        assert all(r.kind == "object" for r in result.regions)
        assert_close(result.regions[0].box, pixels(DOG, size))
        assert_close(result.regions[1].box, pixels(BALL, size))
        assert_well_formed(result, source.record)


def test_ocr_regions_carry_their_quad(checkpoint):
    specialist = loaded(checkpoint, "<OCR_WITH_REGION>")
    items = [item(size, seed=k) for k, size in enumerate(SIZES)]
    for result, source in zip(specialist.annotate(items), items, strict=True):
        (region,) = result.regions
        assert (region.kind, region.text) == ("ocr", "STOP")
        assert_close(region.quad, pixels(STOP_QUAD, source.image.size))
        assert region.box == (min(region.quad[0::2]), min(region.quad[1::2]),
                              max(region.quad[0::2]), max(region.quad[1::2]))  # fmt: skip
        assert_well_formed(result, source.record)


def test_grounded_phrases_point_into_their_caption_and_regions(checkpoint):
    specialist = loaded(checkpoint, "<CAPTION_TO_PHRASE_GROUNDING>")
    items = [
        item(SIZES[0], seed=0, captions={"brief": CAPTION}),
        item(SIZES[1], seed=1, captions={"brief": CAPTION, "detailed": CAPTION}),
        item(SIZES[2], seed=2),
    ]
    results = specialist.annotate(items)
    for result, source in zip(results, items, strict=True):
        assert_well_formed(result, source.record)
    expected = [("A dog", 0, 5), ("a red ball", 13, 23)]
    assert [(p.text, p.start, p.end) for p in results[0].phrases] == expected
    assert [r.text for r in results[0].regions] == ["A dog", "a red ball"]
    assert_close(results[0].regions[0].box, pixels(DOG, SIZES[0]))
    # Two captions: two sets of phrases, each pointing at its own regions.
    assert [p.caption for p in results[1].phrases] == ["brief", "brief", "detailed", "detailed"]
    assert [p.regions for p in results[1].phrases] == [[0], [1], [2], [3]]
    assert results[2] == Annotations()
    only_detailed = loaded(
        checkpoint,
        "<CAPTION_TO_PHRASE_GROUNDING>",
        options={"grounding_captions": ["detailed"]},
    )
    assert {p.caption for p in only_detailed.annotate(items[1:2])[0].phrases} == {"detailed"}


def test_segmentation_adds_polygons_to_each_object_box(checkpoint):
    size = SIZES[0]
    dog = Region(tuple(pixels(DOG, size)), "dog", "object", source="human")
    ball = Region(tuple(pixels(BALL, size)), "ball", "object", source="human", score=0.3)
    text = Region((1, 1, 20, 10), "STOP", "ocr", source="ocr")
    items = [item(size, regions=[dog, text, ball]), item(SIZES[1], seed=1)]
    results = loaded(checkpoint, "<REGION_TO_SEGMENTATION>", batch_size=1).annotate(items)
    regions = results[0].regions
    assert [(r.box, r.text, r.kind) for r in regions] == [
        (dog.box, "dog", "object"),
        (ball.box, "ball", "object"),
    ]
    for region in regions:
        (polygon,) = region.polygons
        assert_close(polygon, pixels(POLYGON, size))
    assert_well_formed(results[0], items[0].record)
    assert results[1] == Annotations()


@pytest.mark.parametrize(
    "task", ["<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<DENSE_REGION_CAPTION>",
             "<REGION_PROPOSAL>"],
)  # fmt: skip
def test_untaught_tasks_give_well_formed_annotations(checkpoint, task):
    items = [item(size, seed=k) for k, size in enumerate(SIZES)]
    results = loaded(checkpoint, task, {"num_beams": 2}).annotate(items)
    for result, source in zip(results, items, strict=True):
        assert_well_formed(result, source.record)


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize(("task", "num_beams"), [("<OD>", 1), ("<DETAILED_CAPTION>", 3)])
def test_scores_are_the_model_s_own_token_log_probabilities(checkpoint, task, num_beams):
    """Generation's log-probabilities equal a teacher-forced pass over the same output."""
    specialist = loaded(checkpoint, task, {"num_beams": num_beams})
    image = photo(*SIZES[0])
    (generation,) = specialist.generate([image], [task])
    processor, model = specialist._processor, specialist._model
    tokenizer = processor.tokenizer
    inputs = processor(text=[task], images=[image], return_tensors="pt")
    with torch.no_grad():
        (sequence,) = model.generate(
            **inputs, max_new_tokens=40, num_beams=num_beams, do_sample=False
        )
        logits = model(**inputs, decoder_input_ids=sequence[None, :-1]).logits[0]
    direct = logits.log_softmax(-1).gather(1, sequence[1:, None])[:, 0].tolist()
    # What a Generation keeps: no <s> or padding, nothing after </s>.
    kept = []
    for token, log_prob in zip(sequence[1:].tolist(), direct, strict=True):
        if token not in (tokenizer.bos_token_id, tokenizer.pad_token_id):
            kept.append((token, log_prob))
            if token == tokenizer.eos_token_id:
                break
    assert generation.token_ids == [token for token, _ in kept]
    assert generation.log_probs == pytest.approx([lp for _, lp in kept], abs=1e-4)
    mean = sum(lp for _, lp in kept) / len(kept)
    assert generation.score == pytest.approx(math.exp(mean), rel=1e-4)
    assert 0 < generation.score <= 1


def test_each_box_is_scored_by_its_own_label_and_loc_tokens(checkpoint):
    specialist = loaded(checkpoint, "<OD>")
    tokenizer = specialist._processor.tokenizer
    first = tokenizer(f"dog{locs(DOG)}", add_special_tokens=False).input_ids
    second = tokenizer(f"ball{locs(BALL)}", add_special_tokens=False).input_ids
    ids = [*first, *second, tokenizer.eos_token_id]
    log_probs = [math.log(0.9)] * len(first) + [math.log(0.2)] * len(second) + [math.log(0.5)]
    result = specialist.read(Generation(ids, log_probs), (640, 480), Prompt("<OD>"))
    assert [r.score for r in result.regions] == pytest.approx([0.9, 0.2])


# ---------------------------------------------------------------- reading known outputs


def known_record() -> ImageRecord:
    record = ImageRecord("known", "mem://known", "test", 640, 480, "0" * 64)
    record.captions["brief"] = Caption(CAPTION, source="human")
    triangle = [64, 96, 320, 96, 200, 336]
    quad = [10, 10, 200, 12, 198, 40, 12, 38]
    record.regions = [
        Region((64, 96, 320, 336), "dog", "object", "human", polygons=[triangle]),
        Region((384, 288, 576, 456), "red ball", "object", "human"),
        Region((10, 10, 200, 40), "STOP", "ocr", "human", quad=quad),
    ]
    record.phrases = [
        Phrase("brief", 0, 5, "A dog", [0], "human"),
        Phrase("brief", 13, 23, "a red ball", [1], "human"),
    ]
    return record


def test_known_targets_read_back_into_the_record(checkpoint):
    """Each target Florence-2 is trained on, read as if the model had written it."""
    record = known_record()
    size = (record.width, record.height)
    tolerance = record.width / 1000 + 1  # half a bin, then truncation to a whole pixel
    seen = set()
    for target in florence2_targets(record):
        if target.task not in TASKS:
            continue
        seen.add(target.task)
        specialist = loaded(checkpoint, target.task)
        tokenizer = specialist._processor.tokenizer
        ids = [*tokenizer(target.target, add_special_tokens=False).input_ids]
        ids.append(tokenizer.eos_token_id)
        generation = Generation(ids, [math.log(0.5)] * len(ids))
        if target.task == "<CAPTION_TO_PHRASE_GROUNDING>":
            prompt = Prompt(target.task + target.input, "brief", target.input)
        elif target.task == "<REGION_TO_SEGMENTATION>":
            prompt = Prompt(target.task + target.input, region=record.regions[0])
        else:
            prompt = Prompt(target.task)
        result = specialist.read(generation, size, prompt)
        assert_well_formed(result, record)
        scores = [*(c.score for c in result.captions.values()), *(r.score for r in result.regions)]
        assert scores and scores == pytest.approx([0.5] * len(scores))
        if target.task == "<CAPTION>":
            assert result.captions["brief"].text == CAPTION
        elif target.task == "<OD>":
            assert [r.text for r in result.regions] == ["dog", "red ball"]
            for got, want in zip(result.regions, record.regions[:2], strict=True):
                assert_close(got.box, want.box, tolerance)
        elif target.task == "<REGION_PROPOSAL>":
            assert [r.kind for r in result.regions] == ["proposal", "proposal"]
            assert_close(result.regions[1].box, record.regions[1].box, tolerance)
        elif target.task == "<OCR_WITH_REGION>":
            (region,) = result.regions
            assert region.text == "STOP"
            assert_close(region.quad, record.regions[2].quad, tolerance)
        elif target.task == "<CAPTION_TO_PHRASE_GROUNDING>":
            assert [(p.text, p.start, p.end, p.regions) for p in result.phrases] == [
                ("A dog", 0, 5, [0]),
                ("a red ball", 13, 23, [1]),
            ]
            assert_close(result.regions[1].box, record.regions[1].box, tolerance)
        else:
            (region,) = result.regions
            assert region.box == record.regions[0].box
            assert_close(region.polygons[0], record.regions[0].polygons[0], tolerance)
    assert seen == set(TASKS) - {"<DENSE_REGION_CAPTION>", "<DETAILED_CAPTION>",
                                 "<MORE_DETAILED_CAPTION>"}  # fmt: skip


@pytest.mark.parametrize("task", sorted(TASKS))
def test_unparsable_outputs_give_empty_or_well_formed_annotations(checkpoint, task):
    specialist = loaded(checkpoint, task)
    tokenizer = specialist._processor.tokenizer
    record = known_record()
    prompt = Prompt(task, "brief", CAPTION, region=record.regions[0])
    size = (record.width, record.height)
    nothing = Generation([tokenizer.eos_token_id], [-0.1])
    assert specialist.read(nothing, size, prompt) == Annotations()
    # A loc number spelt out in plain text, too large for the parser's tensors.
    spelt = tokenizer("dog<loc_99999999999999999999999><loc_1><loc_2><loc_3>").input_ids
    result = specialist.read(Generation(spelt, [-0.1] * len(spelt)), size, prompt)
    assert_well_formed(result, record)
    rng = np.random.default_rng(0)
    # Any tokens at all, and texts that come close to the task's format: mostly loc tokens,
    # between caption words and the format's other tokens.
    pieces = [*CAPTION.split(), "A dog", " ", "<poly>", "</poly>", "<sep>", "<s>", "</s>",
              "<pad>", "<od>", "\n"]  # fmt: skip
    for _ in range(30):
        ids = rng.integers(0, len(tokenizer), rng.integers(0, 40)).tolist()
        text = "".join(
            f"<loc_{rng.integers(0, 1000)}>" if rng.random() < 0.7 else rng.choice(pieces)
            for _ in range(rng.integers(0, 40))
        )
        for sequence in (ids, tokenizer(text, add_special_tokens=False).input_ids):
            result = specialist.read(Generation(sequence, [-1.0] * len(sequence)), size, prompt)
            assert_well_formed(result, record)


# ---------------------------------------------------------------- devices and actors


@pytest.mark.gpu
def test_bf16_on_cuda_with_a_fraction_of_the_gpu(checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    specialist = loaded(checkpoint, "<OD>", dtype="bfloat16", num_gpus=0.5)
    assert specialist.device == "cuda"
    assert next(specialist._model.parameters()).dtype == torch.bfloat16
    items = [item(size, seed=k) for k, size in enumerate(SIZES)]
    for result, source in zip(specialist.annotate(items), items, strict=True):
        assert_well_formed(result, source.record)
        assert [r.text for r in result.regions] == ["dog", "ball"]


def test_grounding_as_an_actor_pool_over_ingested_captions(tmp_path, checkpoint, ray_cluster):
    """Captions that came with the images reach the grounder in its actor."""
    base = load_config("engine/configs/test.yaml")
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {f"{k}.jpg": size for k, size in enumerate([*SIZES, (40, 40), (90, 30)])}
    for k, (name, (width, height)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(width, height, seed=k)))
    # Every image but the last has a caption.
    captions = [{"image_id": k + 1, "caption": CAPTION} for k in range(len(sizes) - 1)]
    write_coco(folder / "labels.json", sizes, captions)
    store = Store(str(tmp_path / "store"))
    run_ingest(store, base, plan_ingest([str(folder / "labels.json")], store, base.ingest))
    grounder = spec(checkpoint, "<CAPTION_TO_PHRASE_GROUNDING>", name="ground", batch_size=2)
    config = base.model_copy(update={"annotate": AnnotateConfig(specialists=(grounder,))})
    summary = run_annotate(store, config, 0)
    assert summary.inputs == len(sizes)
    table = store.read(round_layout(0).annotate("ground"))
    assert table.column("error").to_pylist() == [None] * len(sizes)
    records = records_from_table(table)
    assert sum(1 for r in records if r.phrases) == len(sizes) - 1
    for record in records:
        assert [p.text for p in record.phrases] in ([], ["A dog", "a red ball"])
        parts = [*record.regions, *record.phrases]
        assert all(p.source == f"ground:{checkpoint}@local" and p.round == 0 for p in parts)
