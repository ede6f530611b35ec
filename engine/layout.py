"""Where everything lives in a store: the one module that names its folders and files.

    manifest/                      ingest: one row per unique image (+ human labels)
    quarantine/                    refused inputs, with the reason
    locks/<name>/<owner>.json      lease claims (one writing run per store at a time)
    rounds/rNNN/round.json         the round's state: running | committed, steps done
    rounds/rNNN/annotate/<name>/   a specialist's raw output, with scores
    rounds/rNNN/merged/            one record per image, every source merged
    rounds/rNNN/scored/            merged records with their filter statistics
    rounds/rNNN/filtered/          kept records
    rounds/rNNN/dropped/           dropped records and annotations, with the reason
    rounds/rNNN/model/             the Florence-2 student trained for this round
    rounds/rNNN/model/student.json what its training and image check found
    rounds/rNNN/policy.json        which student task families the round merged, and why
    rounds/rNNN/validation/        the machine view of the held-out human-labelled images
    rounds/rNNN/churn.json         annotations added, changed, retired against the parent
    rounds/rNNN/quality.json       the round scored against ground truth, when there is one
    shards/rNNN/                   WebDataset export of a round: its shards and nothing else
    exports/rNNN/_index.json       the round's shards in order, with their sizes
    exports/rNNN/coco.json         the round's object regions as a COCO detection file
    reports/rNNN/                  statistics and gallery (index.html, stats.json)
    _committed/<dataset>/<unit>.json   a unit's marker: what it commits, and from what
    _committed/manifest.checked.json   the manifest ingest last found to hold each image once
    _staging/<dataset>/            files being written, before their unit's marker

Paths are relative to the store's root (``Store.path`` makes them absolute). Datasets
are folders of committed Parquet parts (``engine/store.py``) and nothing else, so any
reader pointed at one sees what the engine sees; the rest are plain files.
"""

from __future__ import annotations

from dataclasses import dataclass

MANIFEST = "manifest"
QUARANTINE = "quarantine"
LOCKS = "locks"
# The lease every writing run holds: one run writes to a store at a time.
WRITE_LOCK = "write"
# Beside a round's model: what its training and image check found.
STUDENT_REPORT = "student.json"
ROUNDS = "rounds"
SHARDS = "shards"
EXPORTS = "exports"
REPORTS = "reports"
MARKER_ROOT = "_committed"
STAGING_ROOT = "_staging"
# The manifest that ingest last checked for copies of an image (engine.store).
CHECKED_MANIFEST = f"{MARKER_ROOT}/manifest.checked.json"


def round_name(number: int) -> str:
    """``3`` -> ``"r003"``."""
    if number < 0:
        raise ValueError(f"a round number is never negative, got {number}")
    return f"r{number:03d}"


def parse_round_name(name: str) -> int | None:
    """``"r003"`` -> ``3``; None for any other folder name."""
    if len(name) >= 4 and name[0] == "r" and name[1:].isdigit():
        return int(name[1:])
    return None


@dataclass(frozen=True, slots=True)
class RoundLayout:
    """The paths of one round: its datasets, files, shards and report."""

    number: int

    @property
    def name(self) -> str:
        return round_name(self.number)

    @property
    def root(self) -> str:
        return f"{ROUNDS}/{self.name}"

    @property
    def state(self) -> str:
        return f"{self.root}/round.json"

    @property
    def annotate_root(self) -> str:
        return f"{self.root}/annotate"

    def annotate(self, specialist: str) -> str:
        return f"{self.annotate_root}/{specialist}"

    @property
    def merged(self) -> str:
        return f"{self.root}/merged"

    @property
    def scored(self) -> str:
        return f"{self.root}/scored"

    @property
    def filtered(self) -> str:
        return f"{self.root}/filtered"

    @property
    def dropped(self) -> str:
        return f"{self.root}/dropped"

    @property
    def model(self) -> str:
        return f"{self.root}/model"

    @property
    def student_report(self) -> str:
        return f"{self.model}/{STUDENT_REPORT}"

    @property
    def policy(self) -> str:
        return f"{self.root}/policy.json"

    @property
    def validation(self) -> str:
        return f"{self.root}/validation"

    @property
    def churn(self) -> str:
        return f"{self.root}/churn.json"

    @property
    def quality(self) -> str:
        return f"{self.root}/quality.json"

    @property
    def shards(self) -> str:
        return f"{SHARDS}/{self.name}"

    @property
    def export(self) -> str:
        return f"{EXPORTS}/{self.name}"

    @property
    def shard_index(self) -> str:
        return f"{self.export}/_index.json"

    @property
    def coco(self) -> str:
        return f"{self.export}/coco.json"

    @property
    def report(self) -> str:
        return f"{REPORTS}/{self.name}"


def round_layout(number: int) -> RoundLayout:
    return RoundLayout(number)
