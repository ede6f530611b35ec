"""The annotate stage: actor pools, dependency order, failures, resume; RapidOCR for real."""

import os

import pytest
from PIL import Image
from skimage import data

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.execution import StageError
from engine.layout import round_layout
from engine.records import records_from_table
from engine.store import Store
from specialists import build_specialist
from stages.annotate import run_annotate, specialist_levels
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo, write_coco

BASE = load_config("engine/configs/test.yaml")
CAPTIONER = "tests.specialists_for_tests:SizeCaptioner"
GROUNDER = "tests.specialists_for_tests:FirstWordGrounder"
FAULTY = "tests.specialists_for_tests:FaultyCaptioner"


def with_specialists(*specs: SpecialistConfig):
    return BASE.model_copy(update={"annotate": AnnotateConfig(specialists=specs)})


def spec(name: str, kind: str, **fields) -> SpecialistConfig:
    return SpecialistConfig(**{"name": name, "kind": kind, "num_cpus": 0.25, **fields})


@pytest.fixture
def store(tmp_path, ray_cluster):
    """Six images (two units of test.yaml's four), one with a human caption."""
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {f"{k}.jpg": (40 + k, 30) for k in range(6)}
    for k, (name, (w, h)) in enumerate(sizes.items()):
        (folder / name).write_bytes(encode(photo(w, h, seed=k)))
    write_coco(
        folder / "labels.json", sizes, [{"image_id": 1, "caption": "Noise with no meaning."}]
    )
    store = Store(str(tmp_path / "store"))
    run_ingest(store, BASE, plan_ingest([str(folder / "labels.json")], store, BASE.ingest))
    return store


def read(store: Store, name: str) -> dict:
    table = store.read(round_layout(0).annotate(name))
    ids, errors = table.column("image_id").to_pylist(), table.column("error").to_pylist()
    errors = dict(zip(ids, errors, strict=True))
    return {r.image_id: (r, errors[r.image_id]) for r in records_from_table(table)}


def test_levels_follow_needs():
    specialists = {
        name: build_specialist(spec(name, kind))
        for name, kind in [("ground", GROUNDER), ("cap", CAPTIONER), ("ocr", "rapidocr")]
    }
    assert specialist_levels(specialists) == [["cap", "ocr"], ["ground"]]
    # With no captioner configured, the grounder works from the images' own captions.
    assert specialist_levels({"ground": specialists["ground"]}) == [["ground"]]


def test_unknown_kind_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown specialist kind"):
        build_specialist(spec("x", "no-such-model"))
    with pytest.raises(ValueError, match="options do not fit"):
        build_specialist(spec("x", CAPTIONER, options={"colour": "red"}))


def test_failing_image_is_recorded_and_the_rest_go_on(store):
    config = with_specialists(spec("cap", CAPTIONER, batch_size=4, options={"fail_on_width": 42}))
    summary = run_annotate(store, config, 0)
    out = read(store, "cap")
    assert len(out) == 6
    failed = [(r, e) for r, e in out.values() if e is not None]
    assert len(failed) == 1
    record, error = failed[0]
    assert record.width == 42 and "cannot read an image 42 wide" in error and not record.captions
    for record, error in out.values():
        if error is None:
            caption = record.captions["detailed"]
            assert caption.text == f"an image of {record.width} by {record.height} pixels"
            assert caption.source.startswith("cap:") and caption.round == 0
    assert summary.dropped["model failed: ValueError"] == 1


def test_out_of_memory_halves_the_batch(store):
    config = with_specialists(spec("cap", CAPTIONER, batch_size=4, options={"max_batch": 1}))
    summary = run_annotate(store, config, 0)
    assert all(error is None for _, error in read(store, "cap").values())
    assert summary.notes["batch halved after out of memory (to 2)"] == 2
    assert summary.notes["batch halved after out of memory (to 1)"] == 2


def test_needs_get_upstream_and_human_captions_and_rerun_skips(store):
    config = with_specialists(spec("cap", CAPTIONER), spec("ground", GROUNDER))
    run_annotate(store, config, 0)
    grounded = read(store, "ground")
    human = [r for r, _ in grounded.values() if r.width == 40]
    assert [p.text for p in human[0].phrases] == ["Noise", "an"]
    for record, _ in grounded.values():
        for phrase in record.phrases:
            caption_words = {"brief": "Noise", "detailed": "an"}
            assert phrase.text == caption_words[phrase.caption]
            assert all(0 <= i < len(record.regions) for i in phrase.regions)
    again = run_annotate(store, config, 0)
    assert again.units_run == 0 and again.units_skipped == 4

    # Resources are not inputs; a captioner's options are, and what needs its captions
    # follows it.
    faster = with_specialists(spec("cap", CAPTIONER, batch_size=2), spec("ground", GROUNDER))
    assert run_annotate(store, faster, 0).units_run == 0
    changed = with_specialists(
        spec("cap", CAPTIONER, options={"fail_on_width": 41}), spec("ground", GROUNDER)
    )
    redone = run_annotate(store, changed, 0)
    assert redone.units_run == 4
    assert redone.notes["units redone: what they are computed from changed"] == 4
    assert [e for _, e in read(store, "cap").values() if e] == [
        "ValueError: cannot read an image 41 wide"
    ]


def test_a_unit_larger_than_a_batch_is_spread_over_the_pool(store, tmp_path):
    busy = tmp_path / "busy"
    busy.touch()
    # Units of four and two images; batches of one; two actors.
    faulty = spec("cap", FAULTY, batch_size=1, pool_size=2, options={"busy_file": str(busy)})
    summary = run_annotate(store, with_specialists(faulty), 0)
    assert summary.units_run == 2 and summary.outputs == 6
    assert len(set(busy.read_text().split())) == 2  # both actors annotated
    out = read(store, "cap")
    assert all(r.captions["brief"].text == r.uri.rsplit("/", 1)[1] for r, _ in out.values())
    assert all(error is None for _, error in out.values())


def test_actors_that_cannot_fit_are_refused_before_they_hang(store):
    greedy = with_specialists(spec("cap", CAPTIONER, num_cpus=1, pool_size=2))
    with pytest.raises(StageError, match=r"needs 2\.25 CPUs and 0 GPUs at once"):
        run_annotate(store, greedy, 0)
    gpu = with_specialists(spec("cap", CAPTIONER, num_gpus=0.5))
    with pytest.raises(StageError, match="GPUs"):
        run_annotate(store, gpu, 0)


def test_rapidocr_reads_the_page_title(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "page.png").write_bytes(encode(Image.fromarray(data.page()), "PNG"))
    store = Store(str(tmp_path / "store"))
    run_ingest(store, BASE, plan_ingest([str(folder)], store, BASE.ingest))
    run_annotate(store, with_specialists(spec("ocr", "rapidocr", num_cpus=1)), 0)
    ((record, error),) = read(store, "ocr").values()
    assert error is None
    title = record.regions[0]
    assert title.text == "Region-based segmentation"
    assert title.kind == "ocr" and title.source.startswith("ocr:rapidocr@") and title.score > 0.9
    x0, y0, x1, y1 = title.box
    assert 0 <= x0 < x1 <= record.width and 0 <= y0 < y1 <= record.height
    assert len(title.quad) == 8


def test_a_specialist_starts_on_a_unit_once_its_producers_committed_that_unit(store):
    """No barrier across the manifest: the grounder commits the first unit while the
    slow captioner is still on the second."""
    slow = spec("cap", FAULTY, options={"seconds_per_image": 0.5})
    summary = run_annotate(store, with_specialists(slow, spec("ground", GROUNDER)), 0)
    assert summary.units_run == 4

    def committed_at(name: str) -> dict[str, float]:
        dataset = round_layout(0).annotate(name)
        return {
            unit: os.path.getmtime(store.marker_path(dataset, unit))
            for unit in store.committed_units(dataset)
        }

    captioned, grounded = committed_at("cap"), committed_at("ground")
    first, last = sorted(captioned, key=captioned.get)
    assert grounded[first] < captioned[last]
    assert all(grounded[unit] > captioned[unit] for unit in captioned)


def test_specialists_whose_pools_do_not_fit_together_run_level_by_level(store):
    # Each pool fits beside a decode task, the two together do not.
    big = with_specialists(spec("cap", CAPTIONER, num_cpus=1), spec("ground", GROUNDER, num_cpus=1))
    assert run_annotate(store, big, 0).units_run == 4
    assert all(r.phrases for r, _ in read(store, "ground").values())
