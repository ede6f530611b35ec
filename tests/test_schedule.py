"""The nightly schedule: a CronJob that never overlaps rounds, submitting a RayJob that
runs the refine stage with a config and arguments the engine accepts; a crontab line
whose submission id is unique per night."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from engine.config import load_config
from engine.run import build_parser

SCHEDULE = Path(__file__).resolve().parents[1] / "refinement" / "schedule"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((SCHEDULE / "nightly.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def engine_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index("engine.run") + 1 :]


def test_the_cronjob_forbids_overlapping_rounds_and_fails_with_the_round(manifests):
    cron = manifests["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == manifests["ServiceAccount"]["metadata"]["name"]
    script = pod["containers"][0]["args"][0]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    config_map = pod["volumes"][0]["configMap"]["name"]
    assert config_map == manifests["ConfigMap"]["metadata"]["name"]
    (key,) = manifests["ConfigMap"]["data"]
    assert f"kubectl create -f {mount}/{key}" in script
    assert 'test "$result" = SUCCEEDED' in script
    verbs = manifests["Role"]["rules"][0]["verbs"]
    assert {"create", "get"} <= set(verbs)


def test_the_rayjob_runs_a_refine_the_engine_accepts(manifests):
    rayjob = yaml.safe_load(next(iter(manifests["ConfigMap"]["data"].values())))
    assert rayjob["kind"] == "RayJob" and "generateName" in rayjob["metadata"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    args = build_parser().parse_intermixed_args(engine_arguments(spec["entrypoint"]))
    assert args.stage == "refine"
    load_config(Path(__file__).resolve().parents[1] / args.config)
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"


def test_the_crontab_names_each_night_and_runs_a_refine():
    lines = [
        line
        for line in (SCHEDULE / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    (line,) = lines
    fields = line.split(maxsplit=5)
    assert fields[:5] == ["0", "2", "*", "*", "*"]
    assert re.search(r'--submission-id "fld-refine-\$\(date -u \+\\%Y\\%m\\%d\)"', line)
    command = fields[5].replace("\\%", "%")
    args = build_parser().parse_intermixed_args(engine_arguments(command.split(" -- ", 1)[1]))
    assert args.stage == "refine"
