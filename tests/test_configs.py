"""Every shipped config loads and validates; bad configs and overrides fail with ConfigError."""

import inspect
import re

import pytest

from engine.config import (
    CONFIG_DIR,
    ConfigError,
    EngineConfig,
    GroundingFilterConfig,
    RegionFilterConfig,
    load_config,
)
from engine.pipeline import check_specialists
from filters.grounding import decide_grounding
from filters.regions import decide_regions

CONFIG_FILES = sorted([*CONFIG_DIR.rglob("*.yaml"), *CONFIG_DIR.rglob("*.yml")])


def test_config_dir_is_found():
    names = {path.name for path in CONFIG_FILES}
    assert "demo.yaml" in names, f"no demo.yaml among {sorted(names)}"


@pytest.mark.parametrize(
    "path", CONFIG_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES]
)
def test_shipped_config_validates(path):
    # Validation checks types and names only: no model is loaded, nothing is downloaded.
    config = load_config(path)
    assert isinstance(config, EngineConfig)


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ overrides


def test_override_is_applied_as_a_yaml_scalar():
    config = load_config(CONFIG_DIR / "demo.yaml", ["ingest.unit_size=8"])
    assert config.ingest.unit_size == 8
    assert type(config.ingest.unit_size) is int


@pytest.mark.parametrize(
    ("override", "section", "field", "expected"),
    [
        ("ray.task_cpus=0.25", "ray", "task_cpus", 0.25),
        ("export.coco=false", "export", "coco", False),
        ("ray.temp_dir=null", "ray", "temp_dir", None),
        ("report.spacy_model=en_core_web_md", "report", "spacy_model", "en_core_web_md"),
    ],
)
def test_override_values_are_parsed(override, section, field, expected):
    config = load_config(None, [override])
    assert getattr(getattr(config, section), field) == expected


def test_later_override_wins_and_file_values_are_kept(tmp_path):
    path = write(tmp_path, "ingest:\n  unit_size: 32\n  jpeg_quality: 80\n")
    config = load_config(path, ["ingest.unit_size=4", "ingest.unit_size=8"])
    assert config.ingest.unit_size == 8
    assert config.ingest.jpeg_quality == 80


@pytest.mark.parametrize("override", ["ingest.unit_size", "unit_size 8", "=8"])
def test_override_without_key_and_equals_is_an_error(override):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [override])


def test_override_below_a_value_is_an_error():
    with pytest.raises(ConfigError, match="unit_size"):
        load_config(None, ["ingest.unit_size.extra=1"])


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus: 1\n", "bogus"),
        ("ingest:\n  unit_sise: 8\n", "unit_sise"),
        ("ray:\n  adress: auto\n", "adress"),
    ],
)
def test_unknown_key_in_file_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(("override", "key"), [("bogus=1", "bogus"), ("export.shards=3", "shards")])
def test_unknown_key_in_override_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "override",
    [
        "ingest.unit_size=abc",
        "ingest.unit_size=[1, 2]",
        "ingest.unit_size=",  # YAML reads an empty value as null
        "ingest.unit_size=0",  # below the minimum
        "ray.task_cpus=-1",
        "export.coco=maybe",
    ],
)
def test_bad_value_is_an_error(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_section_that_is_not_a_mapping_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="ingest"):
        load_config(write(tmp_path, "ingest: 5\n"))


# ------------------------------------------------------------------ unreadable files


def test_missing_file_is_an_error(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_folder_instead_of_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["ingest: [unclosed\n", "ingest:\n  unit_size: 8\n bad: 1\n"])
def test_invalid_yaml_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(write(tmp_path, text))
    assert "\n" not in str(error.value)


def test_top_level_that_is_not_a_mapping_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- ingest\n- export\n"))


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == EngineConfig()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_names_specialists_that_exist_with_fitting_options(path):
    """Kinds import, options bind to the constructors, needs form no cycle; no model loads."""
    check_specialists(load_config(path))


def test_a_specialist_that_loads_weights_without_a_model_is_refused_when_checked(tmp_path):
    """Before any actor starts, not in its setup()."""
    text = "annotate:\n  specialists:\n    - {name: caption_brief, kind: captioner}\n"
    with pytest.raises(ConfigError, match="'caption_brief': CaptionerSpecialist needs `model`"):
        check_specialists(load_config(write(tmp_path, text)))


# ------------------------------------------------------------------ filter thresholds


@pytest.mark.parametrize(
    ("decide", "config"),
    [(decide_regions, RegionFilterConfig()), (decide_grounding, GroundingFilterConfig())],
    ids=["region", "grounding"],
)
def test_filter_thresholds_have_their_defaults_only_in_the_config(decide, config):
    # A default in the filter's signature would be a second copy that can drift.
    thresholds = list(inspect.signature(decide).parameters.values())[1:]
    assert thresholds
    for parameter in thresholds:
        assert parameter.default is inspect.Parameter.empty, parameter.name
        assert hasattr(config, parameter.name), parameter.name


def test_region_thresholds_per_kind():
    config = RegionFilterConfig(min_score=0.7, min_score_ocr=0.2, min_score_proposal=0.1)
    assert config.min_score_by_kind == {"object": 0.7, "ocr": 0.2, "proposal": 0.1}
