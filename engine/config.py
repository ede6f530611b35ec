"""Typed configuration: YAML files in ``engine/configs/`` map onto these classes.

Unknown keys are errors, so a typo fails before any work starts. ``key=value``
overrides from the command line address any field by its dotted path
(``ingest.unit_size=64``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.train.config import TinyModelConfig, TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(_Section):
    """Ray resources. Where Ray runs is not configured here: with RAY_ADDRESS set (as
    ``ray job submit`` does) the engine attaches to that cluster, else it starts an
    embedded one (see engine/__init__.py)."""

    # CPUs the embedded Ray may use; None = all of this machine's.
    num_cpus: int | None = Field(default=None, ge=1)
    # CPU share of one ingest or export task. Their work is decoding and encoding, so one
    # task per core is fastest: more tasks than cores only add worker start-up and
    # switching. Lower it when actors of the same run need CPU too (stages with
    # specialists), or for object stores, where tasks wait on the network.
    task_cpus: float = Field(default=1.0, gt=0)
    # A stage with at most this many units to run, when no Ray is up yet and no cluster is
    # named (RAY_ADDRESS), runs them in local processes: a local Ray's start-up (5-30 s)
    # costs more than ingest or export of a few hundred units (2,000 images: 28 s on
    # Ray, 6 s locally, tests/bench/bench_ingest_export.py). A stage with more starts
    # Ray, as do specialists (actors) and any stage once Ray is up. 0 = always Ray.
    local_max_units: int = Field(default=256, ge=0)
    # Where an embedded Ray keeps its session files; None = a fresh temp dir per run.
    temp_dir: str | None = None


class IngestConfig(_Section):
    # Inputs per committed part: a rerun redoes at most one unit per worker.
    unit_size: int = Field(default=256, ge=1)
    # Larger images are refused; this is also PIL's decompression-bomb limit.
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # COCO annotations naming one image; past it the image is quarantined with all its
    # labels. COCO itself has under 100 per image and dense sets a few hundred; a count
    # far beyond is a broken or hostile file, and every later stage (merge, filter,
    # export, a student's target text) grows with the labels of an image.
    max_labels_per_image: int = Field(default=2000, ge=1)
    # Quality for images that must be re-encoded (EXIF rotation, non-RGB, non-JPEG).
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    image_extensions: tuple[str, ...] = (
        ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    )  # fmt: skip


class SpecialistConfig(_Section):
    """One specialist of the annotate stage: which model, where it runs, how it batches."""

    # Unique name: its output goes to rounds/rNNN/annotate/<name>/.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # A registered kind (specialists/__init__.py) or "package.module:Class".
    kind: str
    # Hub id or local path of the checkpoint; None for specialists that ship their model.
    model: str | None = None
    revision: str | None = None
    # auto: cuda when the actor was given GPUs and one is visible, else cpu.
    device: str = "auto"
    # bfloat16 halves memory and doubles matmul speed on GPUs that have it; CPUs want float32.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(default=8, ge=1)
    # A batch with no answer after this long is given up on: the actor is restarted and
    # the unit narrowed down to the image that hangs it (stages/annotate.py). Generous,
    # as a first batch may compile kernels or a large model may run on a CPU.
    batch_timeout_s: float = Field(default=900.0, gt=0)
    # Resources of one actor. Fractions pack several small models on one GPU; a fractional
    # CPU keeps actors from starving the decode and write tasks on small machines.
    num_cpus: float = Field(default=0.5, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    pool_size: int = Field(default=1, ge=1)
    trust_remote_code: bool = False
    # Keyword arguments of the specialist class's constructor, checked against its signature.
    options: dict[str, Any] = Field(default_factory=dict)


class AnnotateConfig(_Section):
    specialists: tuple[SpecialistConfig, ...] = ()
    # Packages (dotted names) besides ``specialists`` whose "module:Class" kinds this
    # config may import: importing runs a module's code, so a config is code.
    allowed_modules: tuple[str, ...] = ()
    # Decoded units queued per actor: enough to keep a GPU busy, few enough to bound memory.
    prefetch_units: int = Field(default=2, ge=1)
    # Images on which one specialist may take its process down (crash, exit, hang) in one
    # stage, each recorded with the cause; one more and the stage stops, since by then the
    # model or its machine, not the images, is the likely fault.
    max_crashed_images: int = Field(default=10, ge=0)

    @field_validator("specialists")
    @classmethod
    def _unique_names(
        cls, specialists: tuple[SpecialistConfig, ...]
    ) -> tuple[SpecialistConfig, ...]:
        names = [s.name for s in specialists]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"specialist names must be unique: {duplicates}")
        return specialists


class MergeConfig(_Section):
    # Regions of one kind overlapping this much are one object (stages/merge.py).
    iou: float = Field(default=0.7, gt=0, le=1)
    # Move a kept specialist box to the score-weighted mean of its duplicates (weighted box
    # fusion). Off by default, as nothing measured it better yet: on the demo world every
    # quality figure is equal with and without it to 3 decimals, since the world's object
    # specialists share one segmentation and their duplicates are the same box
    # (tests/bench/bench_merge_fusion.py). It is for boxes of independent detectors.
    fuse_boxes: bool = False


# Filter defaults are measured against exact truth: tests/bench/bench_filter_sweep.py on a
# generated world of 1,000 images (6,581 true regions) with the demo's CPU specialists.
# Boxes: precision / recall at IoU 0.5 over every kept box; captions: object precision /
# recall of the more detailed caption. This table is the only copy: filters/, the bench
# and the README point here, so update it here when the sweep is run again.
#
#   setting                      box P   box R   caption P  caption R
#   merged, unfiltered           0.760   0.829   0.641      0.681
#   region.min_score 0.3         0.771   0.826                          (grounding off)
#   region.min_score 0.4         0.803   0.818
#   region.min_score 0.5         0.849   0.791                          <- default
#   region.min_score 0.6         0.892   0.740
#   region.min_score 0.7         0.912   0.607
#   grounding.min_score 0.5      0.849   0.791                          <- default
#   grounding.min_score 0.65     0.903   0.685                          (GRIT's value)
#   grounding.min_score 0.8      0.932   0.421
#   region.nms_iou 0.3 .. 0.7, None: no change (merge has joined duplicates at 0.7)
#   text.max_objects 12          (whole captions go)     0.805      0.150
#   text.max_objects 8                                   0.896      0.053
#   text.min_object_complexity 2.5                       0.636      0.662
# 0.5 gives the best box F1 (0.819 vs 0.793 unfiltered): precision +8.9 points for
# recall -3.8. Every caption limit costs recall far more than it buys precision, so none
# is set by default. The world's detector is not every detector: give a model with
# another score calibration its own threshold in min_score_by_source.


class TextFilterConfig(_Section):
    """Caption thresholds per kind (brief, detailed, more_detailed); a kind left out is
    not tested. FLD-5B publishes no values (its means are in FLD_REFERENCE §1); none is
    set by default, as measured above."""

    max_objects: dict[str, int] = Field(default_factory=dict)
    min_object_complexity: dict[str, float] = Field(default_factory=dict)
    min_action_complexity: dict[str, float] = Field(default_factory=dict)


class RegionFilterConfig(_Section):
    # Object regions under this score are dropped: the best box F1 measured above.
    min_score: float = Field(default=0.5, ge=0, le=1)
    # RapidOCR's own text_score default.
    min_score_ocr: float = Field(default=0.5, ge=0, le=1)
    # A proposal's score ranks boxes but does not judge them.
    min_score_proposal: float = Field(default=0.0, ge=0, le=1)
    # Per specialist (its name, or name:model) thresholds, over the per-kind ones.
    min_score_by_source: dict[str, float] = Field(default_factory=dict)
    # Class-aware NMS across specialists; null turns it off. torchvision's detection
    # models' box_nms_thresh (no effect in the sweep above).
    nms_iou: float | None = Field(default=0.5, gt=0, le=1)
    # An image with more object regions than this after NMS is dropped: COCO evaluation's
    # maxDets. 100 objects of about 6 tokens each (4 locations and a short label) also
    # keep an <OD> target well inside Florence-2's 1024-token decoder.
    max_objects: int | None = Field(default=100, ge=1)
    # A box (clipped to the image) thinner than a pixel covers no pixel.
    min_side: float = Field(default=1.0, ge=0)
    min_area: float = Field(default=0.0, ge=0)

    @property
    def min_score_by_kind(self) -> dict[str, float]:
        """The per-kind thresholds as ``filters.regions.decide_regions`` takes them."""
        return {
            "object": self.min_score,
            "ocr": self.min_score_ocr,
            "proposal": self.min_score_proposal,
        }


class GroundingFilterConfig(_Section):
    # A phrase's link to a box under this score is cut (measured above; Kosmos-2 GRIT
    # published 0.65 for its grounder).
    min_score: float = Field(default=0.5, ge=0, le=1)
    # NMS over the boxes of one caption's phrases; GRIT publishes no IoU: torchvision's
    # detection default.
    nms_iou: float | None = Field(default=0.5, gt=0, le=1)
    # Drop an image whose phrases all lost their boxes (GRIT does); images that never had
    # phrases are not judged by this filter.
    drop_image_without_grounding: bool = True


class FilterConfig(_Section):
    spacy_model: str = "en_core_web_sm"
    text: TextFilterConfig = TextFilterConfig()
    region: RegionFilterConfig = RegionFilterConfig()
    grounding: GroundingFilterConfig = GroundingFilterConfig()


class ExportConfig(_Section):
    shard_max_samples: int = Field(default=1000, ge=1)
    shard_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    coco: bool = True


class TowerConfig(_Section):
    """Dense pretraining of a new student's vision tower on the round's object boxes
    before the student trains (refinement/tower.py): a small Florence-2 trained from
    scratch learns its targets' language and ignores random visual features.

    ``output_stride``: pixels of the processed image per heatmap cell; the head upsamples
    the tower's last map (stride 32) to it. ``lr`` suits a tower trained from scratch.
    ``flip``: mirror half the images, the one augmentation that changes no label.
    """

    steps: int = Field(default=500, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    output_stride: int = Field(default=4, ge=1)
    head_channels: int = Field(default=64, ge=1)
    flip: bool = True
    # Images held out (by a hash of the id) and scored for the health figure; a student
    # sets this to its own image check's share, so both hold out the same images.
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1)
    eval_images: int = Field(default=64, ge=1)
    seed: int = 0
    # A progress line every this many steps.
    log_every: int = Field(default=50, ge=1)


class AugmentConfig(_Section):
    """Random crops (each holding every object whole) and mirrors of the images of the
    student's ``<OD>`` and ``<REGION_PROPOSAL>`` examples, the boxes moved with them
    (refinement/augment.py): on a round of a thousand images a small student otherwise
    learns its box targets by heart.

    ``probability``: of an example being moved; ``min_scale``: the crop's shortest side
    as a share of the image's (where the objects leave room for it); ``flip``: mirror
    half of the moved images."""

    probability: float = Field(default=0.8, ge=0, le=1)
    min_scale: float = Field(default=0.6, gt=0, le=1)
    flip: bool = True


class StudentConfig(_Section):
    """The Florence-2 student a refinement round trains on the previous round's shards
    (refinement/student.py). Initialised from the previous round's model when there is
    one, else from ``checkpoint``, else from ``tiny`` (a random model for tests and demo)."""

    # Production: a Florence-2-base/large checkpoint with its revision pinned.
    checkpoint: str | None = None
    revision: str | None = None
    tiny: TinyModelConfig | None = None
    # A tiny student's tower is first pretrained on the round's boxes when this is set.
    tower: TowerConfig | None = None
    # Box tasks' images cropped and mirrored, their boxes moved with them, when set.
    augment: AugmentConfig | None = None
    # Florence-2 tasks to train on (refinement/targets.py writes their targets).
    tasks: list[str] = ["<OD>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"]
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=8, ge=1)
    # Fine-tuning a pretrained Florence-2 wants 1e-6 to 5e-6; a tiny random one far more.
    lr: float = Field(default=5e-6, gt=0)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    # Box quality needs the vision encoder trained with the rest.
    freeze_vision: bool = False
    # Images (by a hash of the id) kept out of training for the image check.
    holdout_fraction: float = Field(default=0.05, gt=0, lt=1)
    image_check_samples: int = Field(default=64, ge=2)
    # The student is refused unless its held-out loss with the images shuffled across
    # the batch is at least this many times its loss with the true images: a model that
    # learnt the targets' language alone scores the same on both. 0 accepts any student
    # (a smoke run of the loop, never a nightly round).
    min_image_gain: float = Field(default=1.1, ge=0)
    checkpoint_every: int = Field(default=200, ge=1)
    # Ray Train: workers, their resources, restarts after a worker dies.
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=2, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if self.checkpoint is not None and self.tiny is not None:
            raise ValueError("give the student a checkpoint or a tiny model, not both")
        if self.tower is not None and self.tiny is None:
            raise ValueError("tower pretrains a tiny student's tower; a checkpoint's is trained")
        return self


class RefinePolicyConfig(_Section):
    """Which of the student's task families a round merges (refinement/policy.py)."""

    # Human-labelled images (by a hash of the id) the student never trains on: the
    # policy measures the student against round N on them.
    validation_fraction: float = Field(default=0.5, gt=0, le=1)
    # A family with fewer validation images that have its truth is refused: no evidence.
    min_images: int = Field(default=20, ge=1)
    # Accepted only when the student raises the family's figure by at least this much,
    # and does so in at least ``confidence`` of ``bootstrap`` resamples of the images (0:
    # no resampling): on a few dozen images a gain of a few points can be luck.
    min_gain: float = Field(default=0.01, gt=0)
    bootstrap: int = Field(default=100, ge=0)
    confidence: float = Field(default=0.9, gt=0, le=1)
    # A student region scoring under this is not added (only confident ones are).
    min_score: float = Field(default=0.3, ge=0, le=1)


class RefineConfig(_Section):
    student: StudentConfig = StudentConfig()
    policy: RefinePolicyConfig = RefinePolicyConfig()
    # What an accepted student annotates, each task as a florence2 specialist; the
    # annotator entry gives their resources and batching (model and task are the round's).
    annotate_tasks: list[str] = ["<OD>", "<MORE_DETAILED_CAPTION>"]
    annotator: SpecialistConfig = SpecialistConfig(name="student", kind="florence2")


class ReportConfig(_Section):
    gallery_size: int = Field(default=24, ge=0)
    # spaCy pipeline for the text statistics table (FLD-5B Table 3).
    spacy_model: str = "en_core_web_sm"


class EngineConfig(_Section):
    store: str | None = None
    # A run that stops renewing its lease on the store (engine/lock.py) for this long is
    # taken over by the next; on its own host, a run whose process is gone at once.
    lock_ttl_s: float = Field(default=300.0, gt=0)
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    merge: MergeConfig = MergeConfig()
    filter: FilterConfig = FilterConfig()
    export: ExportConfig = ExportConfig()
    report: ReportConfig = ReportConfig()
    # The Florence-VL trainer (--stage train).
    train: TrainConfig = TrainConfig()
    # Refinement rounds: the Florence-2 student.
    refine: RefineConfig = RefineConfig()

    # Kinds are checked from their names alone when a config is read, before any module
    # is imported (check_kind_allowed); refine's annotator is allowed by the same
    # annotate.allowed_modules.
    @field_validator("annotate")
    @classmethod
    def _annotate_kinds_allowed(cls, annotate: AnnotateConfig) -> AnnotateConfig:
        for spec in annotate.specialists:
            check_kind_allowed(spec.kind, annotate.allowed_modules)
        return annotate

    @field_validator("refine")
    @classmethod
    def _annotator_kind_allowed(cls, refine: RefineConfig, info: ValidationInfo) -> RefineConfig:
        annotate = info.data.get("annotate")  # absent when it failed its own validation
        if annotate is not None:
            check_kind_allowed(refine.annotator.kind, annotate.allowed_modules)
        return refine


# The package of the engine's own specialists: its kinds need no listing.
SPECIALISTS_PACKAGE = "specialists"


def check_kind_allowed(kind: str, allowed_modules: Iterable[str]) -> None:
    """ValueError unless ``kind`` is a registered name (no ``:``; an unknown one is
    refused when the specialist is built) or a ``module:Class`` whose module is in the
    specialists package or under one of ``allowed_modules`` (dotted package names).
    Imports nothing: it runs before a config's modules may be."""
    module_name, sep, _ = kind.partition(":")
    if not sep:
        return
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise ValueError(f"specialist kind {kind!r}: {module_name!r} is not a module name")
    packages = (SPECIALISTS_PACKAGE, *allowed_modules)
    if not any(module_name == p or module_name.startswith(f"{p}.") for p in packages):
        raise ValueError(
            f"specialist kind {kind!r}: module {module_name!r} is outside the packages allowed "
            f"to provide specialists {list(packages)}; a config is code: add its package to "
            "annotate.allowed_modules to run it"
        )


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to a nested dict, in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = data
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {name!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> EngineConfig:
    """Read a YAML config (None = all defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            # PyYAML's message spans lines; the problem and its position fit on one.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config {path} is not valid YAML{where}: {problem}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(first["loc"][-1]), _keys_at(first["loc"][:-1]))
            message = "unknown key" + (f"; did you mean {near[0]!r}?" if near else "")
        raise ConfigError(f"config {path or '(defaults)'}: {where}: {message}") from exc


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys valid in the config section at ``loc`` (list indices skipped)."""
    model: type[BaseModel] = EngineConfig
    for name in loc:
        if isinstance(name, int):
            continue
        field = model.model_fields.get(name)
        if field is None:
            return []
        types = [field.annotation, *get_args(field.annotation)]
        sections = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)
