"""OWLv2 and Grounding DINO specialists: tiny models of the real architectures, real
processors, real pre- and post-processing; then OWLv2 as an actor pool in the annotate
stage, which knows specialists only by their contract."""

from __future__ import annotations

import pytest
import torch

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.layout import round_layout
from engine.records import Caption, ImageRecord, Phrase, Region, records_from_table
from engine.store import Store
from specialists.base import SpecialistInput
from specialists.grounding_dino import GroundingDINOSpecialist, label_span, vocabulary_prompts
from specialists.owlv2 import OWLv2Specialist, noun_phrases
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo, write_coco
from tests.tiny_detectors import build_grounding_dino, build_owlv2

OWL = "specialists.owlv2:OWLv2Specialist"
DINO = "specialists.grounding_dino:GroundingDINOSpecialist"
VOCABULARY = ["cat", "dog", "red ball"]
CAPTIONS = {
    "brief": "A brown dog runs on the green grass next to a red ball.",
    "detailed": "A cat sits on a mat, and a dog looks at the cat",
}
# Landscape, portrait, wide and square, so padding and rescaling differ per image.
SIZES = [(64, 48), (30, 90), (100, 40), (50, 50)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    torch.manual_seed(0)
    return {"owl": build_owlv2(root / "owlv2"), "dino": build_grounding_dino(root / "dino")}


def config(name: str, kind: str, model, **fields) -> SpecialistConfig:
    return SpecialistConfig(
        **{"name": name, "kind": kind, "model": str(model), "num_cpus": 0.25, **fields}
    )


def inputs() -> list[SpecialistInput]:
    """Captioned images of different sizes and one with no caption."""
    items = []
    for k, (width, height) in enumerate(SIZES):
        record = ImageRecord(f"img{k}", f"mem://{k}.jpg", "test", width, height, "0" * 64)
        if k != 1:
            captions = {"brief": CAPTIONS["brief"]} if k == 0 else CAPTIONS
            record.captions = {kind: Caption(text, "human:test") for kind, text in captions.items()}
        items.append(SpecialistInput(record, photo(width, height, seed=k)))
    return items


def assert_well_formed(
    record: ImageRecord, regions: list[Region], phrases: list[Phrase], min_score: float
) -> None:
    """In-bounds object regions with scores; phrases that are their caption's text, with
    valid indices into ``regions``, each region in one phrase at most."""
    for region in regions:
        assert region.kind == "object"
        x0, y0, x1, y1 = region.box
        assert 0 <= x0 < x1 <= record.width and 0 <= y0 < y1 <= record.height
        assert min_score < region.score <= 1.0
    for phrase in phrases:
        caption = record.captions[phrase.caption].text
        assert caption[phrase.start : phrase.end] == phrase.text
        assert phrase.regions and all(0 <= i < len(regions) for i in phrase.regions)
        assert all(regions[i].text == phrase.text for i in phrase.regions)
        assert phrase.score == max(regions[i].score for i in phrase.regions)
    grounded = [i for phrase in phrases for i in phrase.regions]
    assert len(grounded) == len(set(grounded))


def check_batch(items, results, min_score, vocabulary):
    assert len(results) == len(items)
    for item, found in zip(items, results, strict=True):
        assert_well_formed(item.record, found.regions, found.phrases, min_score)
        # Lineage is the stage's to stamp.
        assert all(part.source == "" for part in (*found.regions, *found.phrases))
        grounded = {i for phrase in found.phrases for i in phrase.regions}
        ungrounded = {r.text for i, r in enumerate(found.regions) if i not in grounded}
        assert ungrounded <= set(vocabulary)
        if not item.record.captions:
            assert not found.phrases
    # The random models score widely enough that every path produced something.
    assert any(r.text in vocabulary for found in results for r in found.regions)
    assert any(found.phrases for found in results)


# ------------------------------------------------------------------ OWLv2


@pytest.fixture(scope="module")
def owl(checkpoints):
    specialist = OWLv2Specialist(
        config("owl", OWL, checkpoints["owl"]), vocabulary=VOCABULARY, ground_captions=True
    )
    specialist.setup()
    return specialist


def test_owlv2_boxes_vocabulary_and_grounds_noun_chunks(owl):
    items = inputs()
    results = owl.annotate(items)
    check_batch(items, results, owl.min_score, VOCABULARY)
    chunks = {"A brown dog", "the green grass", "a red ball", "A cat", "a mat", "a dog", "the cat"}
    assert {p.text for found in results for p in found.phrases} <= chunks


def test_a_repeated_noun_chunk_is_one_query_at_its_first_occurrence(owl):
    doc = owl._nlp("A dog chases a dog around the tree.")
    assert noun_phrases(doc) == [(0, 5, "A dog"), (26, 34, "the tree")]


def test_owlv2_declares_what_its_options_make(checkpoints):
    model = checkpoints["owl"]
    boxes = OWLv2Specialist(config("o", OWL, model), vocabulary=["cat"])
    assert boxes.produces == {"objects"} and boxes.needs == set()
    grounder = OWLv2Specialist(config("o", OWL, model), ground_captions=True)
    assert grounder.produces == {"grounding"} and grounder.needs == {"captions"}
    with pytest.raises(ValueError, match="vocabulary, ground_captions"):
        OWLv2Specialist(config("o", OWL, model))
    with pytest.raises(ValueError, match="needs `model`"):
        OWLv2Specialist(SpecialistConfig(name="o", kind=OWL), vocabulary=["cat"])


def test_owlv2_with_nothing_above_the_floor_returns_empty_annotations(checkpoints):
    specialist = OWLv2Specialist(
        config("owl", OWL, checkpoints["owl"]),
        vocabulary=VOCABULARY,
        ground_captions=True,
        min_score=1.0,
    )
    specialist.setup()
    assert specialist.annotate([]) == []
    results = specialist.annotate(inputs())
    assert all(not found.regions and not found.phrases for found in results)


# ------------------------------------------------------------------ Grounding DINO


@pytest.fixture(scope="module")
def dino(checkpoints):
    specialist = GroundingDINOSpecialist(
        config("dino", DINO, checkpoints["dino"], batch_size=3),
        vocabulary=VOCABULARY,
        ground_captions=True,
    )
    specialist.setup()
    return specialist


def test_grounding_dino_boxes_vocabulary_and_grounds_captions(dino):
    items = inputs()
    results = dino.annotate(items)
    check_batch(items, results, dino.min_score, VOCABULARY)


def test_grounding_dino_with_nothing_above_the_floor_returns_empty_annotations(checkpoints):
    specialist = GroundingDINOSpecialist(
        config("dino", DINO, checkpoints["dino"]), ground_captions=True, min_score=1.0
    )
    specialist.setup()
    assert specialist.produces == {"grounding"} and specialist.needs == {"captions"}
    results = specialist.annotate(inputs())
    assert all(not found.regions and not found.phrases for found in results)


def test_vocabulary_is_split_into_prompts_that_fit_the_text_length(dino):
    tokenizer = dino._processor.tokenizer
    vocabulary = [f"red dog {k}" for k in range(30)] + ["green grass"]
    prompts = vocabulary_prompts(vocabulary, tokenizer, max_text_len=32)
    assert len(prompts) > 1
    assert [i for p in prompts for i, _ in p.entries] == list(range(len(vocabulary)))
    for prompt in prompts:
        ids = tokenizer(prompt.text)["input_ids"]
        assert len(ids) <= 32
        for index, tokens in prompt.entries:
            assert tokenizer.decode([ids[t] for t in tokens]) == vocabulary[index]


def test_decoded_labels_map_to_caption_spans(dino):
    """The processor's own label decoding on chosen token probabilities, then the span."""
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoObjectDetectionOutput,
    )

    caption = "A brown dog runs on the green grass."
    processor = dino._processor
    input_ids = processor.tokenizer([caption], return_tensors="pt")["input_ids"]
    tokens = processor.tokenizer.convert_ids_to_tokens(input_ids[0])
    picks = {
        "brown dog": ["brown", "dog"],
        "runs": ["r", "##u", "##n", "##s"],  # a word the vocabulary spells in pieces
        "grass. [SEP]": ["grass", ".", "[SEP]"],  # the prompt's end, which is not a phrase
        "dog grass": ["dog", "grass"],  # two places: no span
    }
    logits = torch.full((1, len(picks), 256), -20.0)
    for slot, chosen in enumerate(picks.values()):
        for token in chosen:
            logits[0, slot, tokens.index(token)] = 20.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * len(picks)])
    outputs = GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes)
    (found,) = processor.post_process_grounded_object_detection(
        outputs, input_ids=input_ids, threshold=0.05, text_threshold=0.25, target_sizes=[(48, 64)]
    )
    special = set(processor.tokenizer.all_special_tokens)
    spans = [label_span(caption, label, ignore=special) for label in found["text_labels"]]
    assert [caption[slice(*span)] if span else None for span in spans] == [
        "brown dog",
        "runs",
        "grass",
        None,
    ]


def test_label_span_rules():
    caption = "A Man's hat and a dog near a hotdog stand."
    assert label_span(caption, "man ' s hat") == (2, 11)
    assert label_span(caption, "dog") == (18, 21)  # a whole word, not inside "hotdog"
    assert label_span(caption, "hotdog stand . [SEP]", ignore={"[SEP]"}) == (29, 41)
    assert label_span(caption, "hat dog") is None
    assert label_span(caption, ". [SEP]", ignore={"[SEP]"}) is None
    assert label_span("un café noir", "cafe") is None  # the uncased tokenizer strips accents


# ------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
def test_bf16_on_cuda_with_a_fraction_of_the_gpu(checkpoints):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    items = inputs()
    for kind, cls in ((OWL, OWLv2Specialist), (DINO, GroundingDINOSpecialist)):
        model = checkpoints["owl" if cls is OWLv2Specialist else "dino"]
        spec = config("gpu", kind, model, dtype="bfloat16", num_gpus=0.5)
        specialist = cls(spec, vocabulary=VOCABULARY, ground_captions=True)
        specialist.setup()
        assert specialist.device == "cuda"
        assert next(specialist._model.parameters()).dtype == torch.bfloat16
        results = specialist.annotate(items)
        for item, found in zip(items, results, strict=True):
            assert_well_formed(item.record, found.regions, found.phrases, specialist.min_score)


# ------------------------------------------------------------------ in the annotate stage


def test_owlv2_runs_as_an_actor_pool_on_ingested_captions(tmp_path, checkpoints, ray_cluster):
    """The stage builds the specialist in a Ray actor from its config alone, gives it the
    captions the images came with, and stamps lineage on what it returns."""
    base = load_config("engine/configs/test.yaml")
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {f"{k}.jpg": size for k, size in enumerate(SIZES)}
    labels = []
    for k, (name, (width, height)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(width, height, seed=k)))
        if k != 1:
            labels.append({"image_id": k + 1, "caption": CAPTIONS["brief"]})
    write_coco(folder / "labels.json", sizes, labels)
    store = Store(str(tmp_path / "store"))
    run_ingest(store, base, plan_ingest([str(folder / "labels.json")], store, base.ingest))
    options = {"vocabulary": VOCABULARY, "ground_captions": True}
    spec = config("owl", OWL, checkpoints["owl"], batch_size=2, options=options)
    engine_config = base.model_copy(update={"annotate": AnnotateConfig(specialists=(spec,))})

    summary = run_annotate(store, engine_config, 0)

    assert summary.inputs == summary.outputs == len(SIZES)
    manifest = {r.image_id: r for r in records_from_table(store.read("manifest"))}
    table = store.read(round_layout(0).annotate("owl"))
    assert table.column("error").to_pylist() == [None] * len(SIZES)
    records = records_from_table(table)
    assert sorted(r.image_id for r in records) == sorted(manifest)
    for record in records:
        ingested = manifest[record.image_id]
        # Phrases point into the captions the image came with; the grounder adds none.
        assert not record.captions
        assert_well_formed(ingested, record.regions, record.phrases, min_score=0.05)
        if not ingested.captions:
            assert not record.phrases
        parts = (*record.regions, *record.phrases)
        assert all(p.source == f"owl:{spec.model}@local" and p.round == 0 for p in parts)
    assert any(record.phrases for record in records)
    assert any(r.text in VOCABULARY for record in records for r in record.regions)
