"""The specialist contract: a model wrapper that runs inside a Ray actor.

A specialist's constructor stores only picklable settings, so the driver can build
and check it without a model; ``setup()`` loads the model inside the actor, on the
device it was given. ``annotate()`` takes a batch of images with what the engine
already knows about them and returns, per image, only the annotations this
specialist made, with scores. The annotate stage stamps lineage (``source`` =
specialist name + model revision, ``round``) on everything returned.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from engine.config import SpecialistConfig
from engine.records import Caption, ImageRecord, Phrase, Region

if TYPE_CHECKING:
    import torch

# What a specialist can produce, and so what another one can need. ``region_text`` is a
# text for regions another specialist found: merge writes it onto those regions instead
# of adding boxes (stages/merge.py).
PRODUCTS = frozenset({"captions", "objects", "polygons", "ocr", "grounding", "region_text"})


def revision_label(model: str, revision: str | None, commit: str | None = None) -> str:
    """How lineage names weights: ``model@commit``, else ``model@revision``, else
    ``model@local``."""
    return f"{model}@{commit or revision or 'local'}"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What ``load_pretrained`` loaded: the model in eval mode on ``device`` in ``dtype``,
    its processor, and ``model_revision``, the lineage label of the weights
    (``revision_label``: the configured model name with the commit when one is known)."""

    model: Any
    processor: Any
    device: str
    dtype: torch.dtype
    model_revision: str


def load_pretrained(
    config: SpecialistConfig,
    model_class: type,
    processor_class: type,
    *,
    model_id: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a transformers model and its processor as a specialist's config says.

    The model is ``config.model`` at ``config.revision``; ``model_id`` and ``revision``
    name another one instead (a second model of one specialist), loaded with the same
    dtype, device and ``trust_remote_code``. It may be a hub id, a local folder or an
    fsspec URL of a folder, which is copied to a local cache first (``local_model_folder``).

    A hub branch or tag is resolved once to its commit and both ``from_pretrained`` calls
    get that commit, so weights and processor come from one repository state and lineage
    names it; a full commit hash names itself; a folder, or a hub that cannot be reached,
    has no commit. Call inside the actor (``setup()``): this downloads and loads weights.
    """
    import torch
    from transformers.utils.hub import resolve_revision

    if model_id is None:
        model_id, revision = config.model, config.revision
    folder = local_model_folder(model_id)
    resolved = resolve_revision(folder, revision)
    commit = getattr(resolved, "resolved", None)
    if commit is None and revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    load = {"revision": resolved, "trust_remote_code": config.trust_remote_code}
    dtype = getattr(torch, config.dtype)
    device = _device_for(config)
    processor = processor_class.from_pretrained(folder, **load)
    model = model_class.from_pretrained(folder, dtype=dtype, **load).to(device).eval()
    return LoadedModel(model, processor, device, dtype, revision_label(model_id, revision, commit))


def local_model_folder(model: str) -> str:
    """What ``from_pretrained`` can read for ``model``: a hub id or local folder as is; a
    folder named by an fsspec URL (``s3://bucket/store/.../model``, ``file:///...``)
    copied to a local cache first.

    A copy is keyed by the URL and its files' listing (names, sizes, modification times or
    ETags), so weights rewritten at the same URL are fetched again and actors on one node
    share one copy. Copies are never removed: clear ``$HF_HOME/fld-models`` by hand.
    """
    import fsspec

    if fsspec.core.split_protocol(model)[0] is None:
        return model
    fs, root = fsspec.core.url_to_fs(model)
    listing = fs.find(root, detail=True)
    if not listing:
        raise FileNotFoundError(f"no model files under {model}")
    fingerprint = json.dumps([model, sorted(listing.items())], default=str)
    target = _model_cache() / hashlib.sha256(fingerprint.encode()).hexdigest()[:32]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copied beside the target and renamed into place, so a reader never sees half a
        # folder; when another actor renamed first, its copy is as good as this one.
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        fs.get(root, str(staging / "model"), recursive=True)
        try:
            (staging / "model").rename(target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _model_cache() -> Path:
    """Where model folders named by URL are copied: beside the Hub's own cache, on the
    disk a cluster sizes for weights (``HF_HOME``), not in a /tmp that may be RAM."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "fld-models"


def _device_for(config: SpecialistConfig) -> str:
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"


@dataclass(slots=True)
class SpecialistInput:
    """One image for a specialist: the decoded RGB image and the record so far.

    ``record`` carries the annotations of the specialists this one ``needs`` (captions
    for a grounder, boxes for a box-prompted segmenter), merged from their outputs.
    """

    record: ImageRecord
    image: Image.Image


@dataclass(slots=True)
class Annotations:
    """What one specialist made of one image. Phrase region indices point into ``regions``."""

    captions: dict[str, Caption] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    phrases: list[Phrase] = field(default_factory=list)


class Specialist(ABC):
    """Base class of every specialist.

    Subclasses set ``produces`` and ``needs`` (subsets of ``PRODUCTS``) as class
    attributes, or in ``__init__`` when they depend on options (a Florence-2 specialist
    configured for grounding needs captions; for captioning it needs nothing). The
    annotate stage builds specialists on the driver to read them, so constructors
    must stay cheap.
    """

    produces: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()
    # Kinds that load weights refuse a config without ``model`` when built on the driver,
    # before any actor starts, rather than in ``setup()`` inside one.
    requires_model: bool = False

    def __init__(self, config: SpecialistConfig) -> None:
        if self.requires_model and not config.model:
            raise ValueError(
                f"specialist {config.name!r}: {type(self).__name__} needs `model` "
                "(a hub id, local folder or store URL)"
            )
        self.config = config

    @property
    def device(self) -> str:
        """The torch device to load on: the config's, or for ``auto`` cuda when the actor
        was given GPUs and one is visible."""
        return _device_for(self.config)

    # Lineage of the weights ``setup()`` loaded (``LoadedModel.model_revision``).
    _loaded_revision: str | None = None

    @property
    def model_revision(self) -> str:
        """What identifies the weights in lineage: the model and its commit once loaded;
        before that the configured revision, which may name a branch."""
        return self._loaded_revision or revision_label(
            self.config.model or type(self).__name__, self.config.revision
        )

    @property
    def source(self) -> str:
        return f"{self.config.name}:{self.model_revision}"

    def generate_scored(
        self, model: Any, inputs: Mapping[str, Any], max_new_tokens: int, num_beams: int
    ) -> tuple[Any, Any]:
        """Greedy or beam generation, and each generated token's log-probability.

        The log-probabilities are the softmax of the model's raw logits, before
        generation's logits processors, so a score does not depend on decoding settings.
        Returns ``(tokens, log_probs)``, both (batch, generated steps): the generated
        tokens only, without any prompt or decoder start token before them.
        """
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,  # a rerun must give the same annotations
            return_dict_in_generate=True,
            output_logits=True,
        )
        log_probs = model.compute_transition_scores(
            output.sequences,
            output.logits,
            getattr(output, "beam_indices", None),
            normalize_logits=True,
        )
        return output.sequences[:, -log_probs.shape[1] :], log_probs

    @abstractmethod
    def setup(self) -> None:
        """Load the model. Runs once per actor, inside it."""

    @abstractmethod
    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        """Annotate a batch; one ``Annotations`` per input, in order.

        Raise on failure: the stage retries the batch image by image to find the one
        that fails, and halves the batch on a CUDA out-of-memory error.
        """


class OpenVocabularyDetector(Specialist):
    """A text-prompted detector (OWLv2, Grounding DINO): boxes for a category
    ``vocabulary`` (the categories become the regions' texts) and/or, with
    ``ground_captions``, for the phrases of the captions the record already has, which
    it then needs. What it produces follows from which of the two it is given."""

    requires_model = True

    def __init__(
        self, config: SpecialistConfig, vocabulary: Sequence[str], ground_captions: bool
    ) -> None:
        super().__init__(config)
        if not vocabulary and not ground_captions:
            raise ValueError(
                f"specialist {config.name!r}: give a vocabulary, ground_captions=True, or both"
            )
        if any(not isinstance(v, str) or not v.strip() for v in vocabulary):
            raise ValueError(f"specialist {config.name!r}: vocabulary entries must be non-empty")
        self.vocabulary = [v.strip() for v in vocabulary]
        self.ground_captions = ground_captions
        self.produces = frozenset({"objects"} if self.vocabulary else set()) | frozenset(
            {"grounding"} if ground_captions else set()
        )
        self.needs = frozenset({"captions"} if ground_captions else set())
