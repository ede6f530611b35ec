"""cluster.yaml: valid for Ray's cluster launcher, and shaped the way the engine needs."""

import copy
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema():
    # The schema `ray up` itself validates against, from the installed Ray.
    return json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())


def head_type(cluster):
    return cluster["available_node_types"][cluster["head_node_type"]]


def worker_types(cluster):
    head = cluster["head_node_type"]
    return {k: v for k, v in cluster["available_node_types"].items() if k != head}


def test_matches_rays_schema(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_schema_catches_a_misspelled_key(cluster, schema):
    broken = copy.deepcopy(cluster)
    broken["max_worker"] = broken.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, schema)


def test_ray_accepts_it_after_filling_in_defaults(cluster):
    # Rules the schema cannot express: the head type exists, min_workers fit max_workers.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_has_a_gpu_worker_type_that_scales_from_zero(cluster):
    gpu_types = {k: v for k, v in worker_types(cluster).items() if v["resources"].get("GPU", 0)}
    assert gpu_types, "no worker type advertises a GPU"
    for name, node in gpu_types.items():
        assert node["resources"]["GPU"] >= 1, name
        assert node.get("min_workers", 0) == 0, f"{name} keeps idle GPU nodes running"
        assert 1 <= node["max_workers"] <= cluster["max_workers"], name


def test_head_runs_no_gpu_work(cluster):
    head = head_type(cluster)
    assert head["resources"].get("CPU", 0) >= 1, "the driver and I/O tasks need head CPUs"
    assert head["resources"].get("GPU") == 0
    assert any("--num-gpus=0" in cmd for cmd in cluster["head_start_ray_commands"])


def test_setup_installs_the_way_the_makefile_does(cluster):
    makefile = (REPO / "Makefile").read_text()
    torch_pins = re.search(r"^TORCH_PINS\s*:=\s*(.+)$", makefile, re.M).group(1).strip()
    commands = cluster["setup_commands"]
    assert any(torch_pins in cmd for cmd in commands), f"setup does not install {torch_pins}"
    lock = [cmd for cmd in commands if "-r requirements.lock" in cmd]
    assert lock, "setup does not install requirements.lock"
    assert all("--no-deps" in cmd for cmd in lock), "the lock alone must decide versions"
    assert any(re.search(r"-e \.(\s|$)", cmd) for cmd in commands), "project not installed"
    # The lock is installed from the copy of the project that file_mounts put there.
    assert any(remote in cmd for cmd in lock for remote in cluster["file_mounts"])


def test_images_match_the_locked_ray_and_python(cluster):
    lock = (REPO / "requirements.lock").read_text()
    ray_version = re.search(r"^ray==(\S+)", lock, re.M).group(1)
    major, minor = re.search(r"--python-version (\d+)\.(\d+)", lock).groups()
    docker = cluster["docker"]
    images = [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]
    assert images
    for image in images:
        assert f":{ray_version}-py{major}{minor}-" in image, image


def test_file_mounts_are_folders_of_this_repo(cluster):
    assert cluster["file_mounts"]
    for remote, local in cluster["file_mounts"].items():
        path = (REPO / local).resolve()
        assert path.is_relative_to(REPO), f"{remote}: {local} is outside the repository"
        # Docker bind-mounts file_mounts; a mounted single file would go stale on resync.
        assert path.is_dir(), f"{remote}: {local} is not a folder of the repository"
