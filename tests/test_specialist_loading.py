"""Model loading shared by the transformers specialists: folders named by URL, lineage of
pinned revisions, and configs without a model refused before any actor starts."""

import sys
import uuid
from pathlib import Path

import pytest
import torch
import transformers.utils.hub
import yaml
from huggingface_hub import ResolvedRevision
from transformers import SamModel, SamProcessor

import specialists.base
from engine.config import ConfigError, SpecialistConfig, load_config
from engine.pipeline import check_specialists
from engine.records import ImageRecord, Region
from engine.run import main
from specialists import build_specialist, specialist_class
from specialists.base import SpecialistInput, load_pretrained
from specialists.sam import SAMSpecialist
from tests.inputs import photo
from tests.tiny_vision_models import build_sam

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def sam_folder(tmp_path):
    """A tiny SAM per test: one test rewrites a file of it."""
    return build_sam(tmp_path / "sam")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The copies of URL folders go here instead of under the user's HF_HOME."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(specialists.base, "_model_cache", lambda: folder)
    return folder


def sam_config(model: str, **fields) -> SpecialistConfig:
    return SpecialistConfig(name="sam", kind="sam", model=model, **fields)


def test_a_folder_given_as_a_url_is_copied_once_and_loaded_from_the_copy(sam_folder, cache):
    url = sam_folder.as_uri()
    loaded = load_pretrained(sam_config(url), SamModel, SamProcessor)
    (copy,) = cache.iterdir()
    assert loaded.model.name_or_path == str(copy)
    assert isinstance(loaded.processor, SamProcessor)
    assert (loaded.device, loaded.dtype) == ("cpu", torch.float32)
    assert not loaded.model.training
    # Lineage names the folder as configured, not the copy.
    assert loaded.model_revision == f"{url}@local"
    saved = SamModel.from_pretrained(sam_folder)
    for (name, weight), (_, expected) in zip(
        loaded.model.state_dict().items(), saved.state_dict().items(), strict=True
    ):
        assert torch.equal(weight, expected), name

    # Another load of the same files reuses the copy; a file written anew is fetched again.
    load_pretrained(sam_config(url), SamModel, SamProcessor)
    assert list(cache.iterdir()) == [copy]
    config_file = sam_folder / "config.json"
    config_file.write_text(config_file.read_text() + "\n")
    again = load_pretrained(sam_config(url), SamModel, SamProcessor)
    assert again.model.name_or_path != str(copy) and len(list(cache.iterdir())) == 2


def test_a_url_with_no_files_is_refused(tmp_path, cache):
    url = (tmp_path / "absent").as_uri()
    with pytest.raises(FileNotFoundError, match=url):
        load_pretrained(sam_config(url), SamModel, SamProcessor)


def test_a_specialist_loads_from_a_url_and_names_the_pinned_commit(sam_folder, cache, monkeypatch):
    """A branch resolves to its commit, which lineage names. The hub cannot be reached from
    the tests, so its answer is stood in for."""
    monkeypatch.setattr(
        transformers.utils.hub,
        "resolve_revision",
        lambda model, revision: ResolvedRevision(COMMIT, initial=revision),
    )
    url = sam_folder.as_uri()
    sam = SAMSpecialist(sam_config(url, revision="main"))
    assert sam.source == f"sam:{url}@main"
    sam.setup()
    assert sam.source == f"sam:{url}@{COMMIT}"
    dog = Region((5, 5, 40, 30), "dog", "object", "human:coco")
    record = ImageRecord("id", "mem://x", "test", 64, 48, "0" * 64, regions=[dog])
    (segmented,) = sam.annotate([SpecialistInput(record, photo(64, 48))])
    assert 0 <= segmented.regions[0].score <= 1


# Each kind that loads weights, with options that build it once it has a model.
NEEDS_WEIGHTS = {
    "captioner": {},
    "florence2": {"task": "<OD>"},
    "sam": {},
    "owlv2": {"vocabulary": ["cat"]},
    "grounding_dino": {"vocabulary": ["cat"]},
    "region_text": {},
}


@pytest.mark.parametrize("kind", sorted(NEEDS_WEIGHTS))
def test_a_kind_that_loads_weights_is_refused_without_a_model_when_built(kind):
    config = SpecialistConfig(name="no_weights", kind=kind, options=NEEDS_WEIGHTS[kind])
    # Named by its own class: region_text's captioner would refuse too, but as a captioner.
    refusal = f"specialist 'no_weights': {specialist_class(kind).__name__} needs `model`"
    with pytest.raises(ValueError, match=refusal):
        build_specialist(config)
    build_specialist(config.model_copy(update={"model": "org/checkpoint"}))


@pytest.mark.parametrize("kind", ["rapidocr", "world_captions", "world_shapes"])
def test_a_kind_that_ships_its_model_builds_without_one(kind):
    assert build_specialist(SpecialistConfig(name="x", kind=kind)).config.model is None


# A config is code: a "module:Class" kind is imported, running the module. One outside the
# specialists package must be in annotate.allowed_modules, checked before it is imported.
PLUGIN = """
import pathlib

from specialists.base import Specialist

pathlib.Path(__file__).with_name("imported").write_text("the module ran")


class Good(Specialist):
    produces = frozenset({"captions"})

    def setup(self):
        pass

    def annotate(self, batch):
        return []


class NotASpecialist:
    pass
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A fresh module on sys.path that leaves a file behind when it is imported."""
    name = f"plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, tmp_path / "imported"


def plugin_config(tmp_path, kind: str, allowed: list[str] | None = None) -> Path:
    annotate = {"specialists": [{"name": "plugin", "kind": kind}]}
    if allowed is not None:
        annotate["allowed_modules"] = allowed
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump({"annotate": annotate}))
    return path


def test_a_kind_outside_the_allowed_packages_is_refused_before_import(plugin, tmp_path, capsys):
    name, side_effect = plugin
    path = plugin_config(tmp_path, f"{name}:Good")
    with pytest.raises(ConfigError, match=r"annotate\.allowed_modules"):
        load_config(path)
    args = ["--stage", "annotate", "--config", str(path), "--store", str(tmp_path / "s")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"module {name!r} is outside" in err and len(err.splitlines()) == 1
    assert not side_effect.exists() and name not in sys.modules


def test_a_listed_package_is_imported_and_must_hold_a_specialist(plugin, tmp_path):
    name, side_effect = plugin
    check_specialists(load_config(plugin_config(tmp_path, f"{name}:Good", [name])))
    assert side_effect.exists()
    config = load_config(plugin_config(tmp_path, f"{name}:NotASpecialist", [name]))
    with pytest.raises(ConfigError, match="is not a Specialist subclass"):
        check_specialists(config)


@pytest.mark.parametrize(
    ("kind", "allowed"),
    [
        ("os:system", []),
        ("subprocess:Popen", ["os"]),
        ("mypkg_evil.mod:Cls", ["mypkg"]),  # a package is a dotted prefix, not a string one
        ("mypkg/../os:system", ["mypkg"]),
    ],
)
def test_kinds_outside_the_allowed_packages_are_refused_by_name(tmp_path, kind, allowed):
    with pytest.raises(ConfigError, match="specialist kind"):
        load_config(plugin_config(tmp_path, kind, allowed))


def test_registered_kinds_and_this_package_need_no_listing(tmp_path):
    for kind in ("rapidocr", "specialists.world:ShapeDetector"):
        load_config(plugin_config(tmp_path, kind))
    load_config(plugin_config(tmp_path, "mypkg.sub.mod:Cls", ["mypkg"]))
    # Refinement builds its annotator from the config too.
    with pytest.raises(ConfigError, match="refine"):
        load_config(None, ["refine.annotator={name: student, kind: 'os:system'}"])
