"""SAM and captioner specialists: tiny real models through setup and annotate, the
mask-to-polygon rules on drawn masks, and both specialists in the annotate stage's pools."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.layout import round_layout
from engine.records import ImageRecord, Region, records_from_table
from engine.store import Store
from specialists.base import SpecialistInput
from specialists.captioner import CaptionerSpecialist
from specialists.sam import SAMSpecialist, checked_polygons, mask_to_polygons
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo, write_coco
from tests.tiny_vision_models import build_blip, build_blip2, build_llava, build_sam

SAM_KIND = "specialists.sam:SAMSpecialist"
CAPTIONER_KIND = "specialists.captioner:CaptionerSpecialist"
# Short captions keep generation fast; the tiny models babble anyway.
SHORT = {"brief": 6, "detailed": 8, "more_detailed": 8}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "sam": build_sam(root / "sam"),
        "blip": build_blip(root / "blip"),
        "blip_silent": build_blip(root / "blip_silent", always_stop=True),
        "blip2": build_blip2(root / "blip2"),
        "llava": build_llava(root / "llava"),
    }


def config(name: str, kind: str, model, **fields) -> SpecialistConfig:
    return SpecialistConfig(name=name, kind=kind, model=str(model), num_cpus=0.25, **fields)


def item(width: int, height: int, boxes=(), seed: int = 0) -> SpecialistInput:
    regions = [Region(box, f"thing {k}", "object", "human:coco") for k, box in enumerate(boxes)]
    # OCR lines are not objects: SAM leaves them alone.
    regions.append(Region((1, 1, 6, 4), "EXIT", "ocr", "ocr:test"))
    record = ImageRecord("id", "mem://x", "test", width, height, "0" * 64, regions=regions)
    return SpecialistInput(record, photo(width, height, seed=seed))


def assert_polygons_well_formed(polygons: list[list[float]], width: int, height: int) -> None:
    assert polygons
    for polygon in polygons:
        assert len(polygon) >= 6 and len(polygon) % 2 == 0
        assert all(isinstance(v, float) for v in polygon)
        xs, ys = polygon[0::2], polygon[1::2]
        assert min(xs) >= 0 and max(xs) <= width and min(ys) >= 0 and max(ys) <= height


def rasterised(polygons: list[list[float]], height: int, width: int) -> dict:
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def iou_with_mask(polygons: list[list[float]], mask: np.ndarray) -> float:
    drawn = rasterised(polygons, *mask.shape)
    exact = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return float(mask_utils.iou([drawn], [exact], [0])[0][0])


# ---------------------------------------------------------------- mask -> polygons


def test_filled_rectangle_is_one_quadrilateral_with_the_mask_area():
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:60] = True
    (polygon,) = mask_to_polygons(mask, tolerance=1.0)
    assert len(polygon) == 8
    assert_polygons_well_formed([polygon], 80, 60)
    # Pixel-edge coordinates: the rectangle spans x 20..60, y 10..30, within a pixel.
    xs, ys = polygon[0::2], polygon[1::2]
    assert min(xs) == pytest.approx(20, abs=1) and max(xs) == pytest.approx(60, abs=1)
    assert min(ys) == pytest.approx(10, abs=1) and max(ys) == pytest.approx(30, abs=1)
    assert mask_utils.area(rasterised([polygon], 60, 80)) == pytest.approx(800, rel=0.02)
    assert iou_with_mask([polygon], mask) > 0.97
    # Without simplification, only marching squares' corner cuts are missing.
    exact = mask_to_polygons(mask, tolerance=0)
    assert mask_utils.area(rasterised(exact, 60, 80)) == pytest.approx(800, abs=2)


def test_ring_keeps_its_hole_by_cutting_through_it():
    rows, cols = np.mgrid[:60, :80]
    distance = np.hypot(rows - 30, cols - 40)
    ring = (distance < 25) & (distance >= 10)
    polygons = mask_to_polygons(ring, tolerance=1.0)
    assert len(polygons) == 2  # the two halves either side of the cut
    assert_polygons_well_formed(polygons, 80, 60)
    drawn = mask_utils.decode(rasterised(polygons, 60, 80))
    assert drawn[30, 40] == 0 and drawn[30, 33] == 0  # the hole stays empty
    assert drawn.sum() == pytest.approx(ring.sum(), rel=0.02)
    assert iou_with_mask(polygons, ring) > 0.97
    # The halves meet on the cut (column 40, the hole's median): no gap between them.
    assert drawn[42:52, 39:41].all() and drawn[9:18, 39:41].all()


def test_small_holes_are_filled_and_specks_dropped():
    mask = np.zeros((60, 80), bool)
    mask[5:55, 5:75] = True
    mask[30, 40] = False  # a pinhole: 1 pixel of 3499
    mask[58, 78] = True  # a speck outside the object
    (polygon,) = mask_to_polygons(mask, min_area_fraction=0.01)
    drawn = mask_utils.decode(rasterised([polygon], 60, 80))
    assert drawn[30, 40] == 1 and drawn[58, 78] == 0
    # With no size limit the pinhole is cut open and the speck is a part of its own.
    assert len(mask_to_polygons(mask, tolerance=0, min_area_fraction=0)) == 3


def test_two_blobs_give_one_polygon_each():
    mask = np.zeros((60, 80), bool)
    mask[5:20, 5:20] = True
    mask[40:55, 50:75] = True
    first, second = mask_to_polygons(mask)
    assert max(first[0::2]) <= 21 and max(first[1::2]) <= 21
    assert min(second[0::2]) >= 49 and min(second[1::2]) >= 39
    assert iou_with_mask([first, second], mask) > 0.95


def test_polygons_of_a_mask_filling_the_image_stay_inside_it():
    polygons = mask_to_polygons(np.ones((20, 30), bool))
    assert_polygons_well_formed(polygons, 30, 20)
    assert iou_with_mask(polygons, np.ones((20, 30), bool)) > 0.95


def test_polygons_are_refused_when_their_area_disagrees_with_the_mask():
    # A sieve: every hole is too small to keep, so filling them all overstates the area.
    sieve = np.zeros((40, 40), bool)
    sieve[2:38, 2:38] = True
    sieve[3:37:2, 3:37:2] = False
    assert checked_polygons(sieve, 1.0, 0.01, area_tolerance=0.1) is None
    assert checked_polygons(sieve, 1.0, 0.01, area_tolerance=1.0) is not None
    assert checked_polygons(np.zeros((10, 10), bool), 1.0, 0.01, 0.1) is None


# ---------------------------------------------------------------- SAM


@pytest.mark.parametrize("multimask_output", [False, True])
def test_sam_segments_every_object_box_of_images_of_any_size(checkpoints, multimask_output):
    sam = SAMSpecialist(
        config("sam", SAM_KIND, checkpoints["sam"]), multimask_output=multimask_output
    )
    sam.setup()
    batch = [
        item(64, 48, [(5, 5, 40, 30), (-10, -10, 100, 100), (60, 40, 70, 50), (70, 0, 90, 9)]),
        item(30, 90, [], seed=1),
        item(200, 120, [(10, 10, 190, 110), (50, 20, 80, 60)], seed=2),
    ]
    first, empty, third = sam.annotate(batch)
    # The box wholly outside the image is skipped; the others are clipped.
    assert [r.box for r in first.regions] == [(5, 5, 40, 30), (0, 0, 64, 48), (60, 40, 64, 48)]
    assert [r.text for r in first.regions] == ["thing 0", "thing 1", "thing 2"]
    assert empty.regions == [] and empty.captions == {}
    assert len(third.regions) == 2
    with_polygons = 0
    for result, (width, height) in ((first, (64, 48)), (third, (200, 120))):
        for region in result.regions:
            assert region.kind == "object" and region.source == ""
            assert 0 <= region.score <= 1
            if region.polygons is not None:
                with_polygons += 1
                assert_polygons_well_formed(region.polygons, width, height)
    assert with_polygons > 0
    assert sam.model_revision == f"{checkpoints['sam']}@local"


def test_sam_names_a_pinned_commit_in_its_lineage(checkpoints):
    commit = "0123456789abcdef0123456789abcdef01234567"
    sam = SAMSpecialist(config("sam", SAM_KIND, checkpoints["sam"], revision=commit))
    sam.setup()
    assert sam.source == f"sam:{checkpoints['sam']}@{commit}"


# ---------------------------------------------------------------- captioner

CAPTIONERS = {
    # BLIP unconditional for brief, a caption prefix for detailed.
    "blip": {"kinds": ["brief", "detailed"], "prompts": {"detailed": "a picture of"}},
    # BLIP-2 (OPT, decoder-only) with a prompt, beam search.
    "blip2": {"kinds": ["brief"], "prompts": {"brief": "a photo of"}, "num_beams": 2},
    # LLaVA through its chat template, three kinds.
    "llava": {
        "kinds": ["brief", "detailed", "more_detailed"],
        "prompts": {
            "brief": "Describe the image in one sentence.",
            "detailed": "Describe the image in detail.",
            "more_detailed": "Describe the image in a paragraph.",
        },
    },
}


@pytest.mark.parametrize("model", sorted(CAPTIONERS))
def test_captioner_captions_every_image_with_a_probability_score(checkpoints, model):
    options = {**CAPTIONERS[model], "max_new_tokens": SHORT}
    captioner = CaptionerSpecialist(config(model, CAPTIONER_KIND, checkpoints[model]), **options)
    captioner.setup()
    batch = [item(64, 48), item(30, 90, seed=1), item(100, 100, seed=2)]
    results = captioner.annotate(batch)
    assert len(results) == 3
    for result in results:
        assert sorted(result.captions) == sorted(options["kinds"])
        assert result.regions == [] and result.phrases == []
        for caption in result.captions.values():
            assert isinstance(caption.text, str) and caption.text.strip() == caption.text
            assert caption.text and caption.source == ""
            assert 0 < caption.score <= 1
    assert captioner.model_revision == f"{checkpoints[model]}@local"


def test_an_empty_generation_is_no_caption(checkpoints):
    captioner = CaptionerSpecialist(
        config("blip", CAPTIONER_KIND, checkpoints["blip_silent"]), max_new_tokens=SHORT
    )
    captioner.setup()
    assert [r.captions for r in captioner.annotate([item(64, 48), item(20, 20)])] == [{}, {}]


def test_captioner_options_are_checked_before_any_model_loads():
    spec = config("c", CAPTIONER_KIND, "nowhere")
    with pytest.raises(ValueError, match="unknown caption kinds"):
        CaptionerSpecialist(spec, kinds=["short"])
    with pytest.raises(ValueError, match="unknown caption kinds"):
        CaptionerSpecialist(spec, prompts={"long": "Describe."})
    with pytest.raises(ValueError, match="at least 1"):
        CaptionerSpecialist(spec, num_beams=0)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_bfloat16_on_a_shared_gpu(checkpoints):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = {"dtype": "bfloat16", "num_gpus": 0.5}
    sam = SAMSpecialist(config("sam", SAM_KIND, checkpoints["sam"], **gpu))
    captioner = CaptionerSpecialist(
        config("blip", CAPTIONER_KIND, checkpoints["blip"], **gpu), max_new_tokens=SHORT
    )
    for specialist in (sam, captioner):
        assert specialist.device == "cuda"
        specialist.setup()
        assert specialist._model.dtype == torch.bfloat16
    (segmented,) = sam.annotate([item(64, 48, [(5, 5, 40, 30)])])
    assert 0 <= segmented.regions[0].score <= 1
    (captioned,) = captioner.annotate([item(64, 48)])
    assert 0 < captioned.captions["brief"].score <= 1


# ---------------------------------------------------------------- annotate stage


def test_sam_and_captioner_run_as_actor_pools(tmp_path, checkpoints, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {"a.jpg": (64, 48), "b.jpg": (90, 60), "c.jpg": (40, 70)}
    for k, (name, (width, height)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(width, height, seed=k)))
    boxes = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 30, 20]},
        {"image_id": 1, "category_id": 2, "bbox": [40, 20, 40, 40]},  # runs off the image
        {"image_id": 2, "category_id": 2, "bbox": [10, 10, 50, 30]},
    ]
    write_coco(folder / "labels.json", sizes, boxes)
    base = load_config("engine/configs/test.yaml")
    store = Store(str(tmp_path / "store"))
    run_ingest(store, base, plan_ingest([str(folder / "labels.json")], store, base.ingest))
    specialists = (
        config("sam", SAM_KIND, checkpoints["sam"]),
        config("blip", CAPTIONER_KIND, checkpoints["blip"], options={"max_new_tokens": SHORT}),
    )
    summary = run_annotate(
        store, base.model_copy(update={"annotate": AnnotateConfig(specialists=specialists)}), 0
    )
    assert summary.inputs == 6 and summary.outputs == 6

    segmented = store.read(round_layout(0).annotate("sam"))
    assert set(segmented.column("error").to_pylist()) == {None}
    by_size = {(r.width, r.height): r for r in records_from_table(segmented)}
    assert [len(by_size[size].regions) for size in sizes.values()] == [2, 1, 0]
    for (width, height), record in by_size.items():
        for region in record.regions:
            assert region.source == f"sam:{checkpoints['sam']}@local" and region.round == 0
            x0, y0, x1, y1 = region.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            if region.polygons is not None:
                assert_polygons_well_formed(region.polygons, width, height)
    assert by_size[(64, 48)].regions[1].box == (40, 20, 64, 48)

    captioned = records_from_table(store.read(round_layout(0).annotate("blip")))
    assert len(captioned) == 3
    for record in captioned:
        brief = record.captions["brief"]
        assert brief.text and 0 < brief.score <= 1
        assert brief.source == f"blip:{checkpoints['blip']}@local"
