"""The specialist contract: a model wrapper that runs inside a Ray actor.

A specialist's constructor stores only picklable settings, so the driver can build
and check it without a model; ``setup()`` loads the model inside the actor, on the
device it was given. ``annotate()`` takes a batch of images with what the engine
already knows about them and returns, per image, only the annotations this
specialist made, with scores. The annotate stage stamps lineage (``source`` =
specialist name + model revision, ``round``) on everything returned.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from engine.config import SpecialistConfig
from engine.records import Caption, ImageRecord, Phrase, Region

# What a specialist can produce, and so what another one can need. ``region_text`` is a
# text for regions another specialist found: merge writes it onto those regions instead
# of adding boxes (stages/merge.py).
PRODUCTS = frozenset({"captions", "objects", "polygons", "ocr", "grounding", "region_text"})


def pin_revision(model: str | None, revision: str | None) -> tuple[str | None, str | None]:
    """``(revision to pass to from_pretrained, the commit it names or None)`` for a model.

    A hub branch or tag resolves to its commit; a full commit hash names itself; a local
    folder, or a hub that cannot be reached, has no commit.
    """
    from transformers.utils.hub import resolve_revision

    resolved = resolve_revision(model, revision)
    commit = getattr(resolved, "resolved", None)
    if commit is None and revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    return resolved, commit


def revision_label(model: str, revision: str | None, commit: str | None) -> str:
    """How lineage names weights: ``model@commit``, else ``model@revision``, else
    ``model@local``."""
    return f"{model}@{commit or revision or 'local'}"


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

    def __init__(self, config: SpecialistConfig) -> None:
        self.config = config

    @property
    def device(self) -> str:
        """The torch device to load on: the config's, or for ``auto`` cuda when visible."""
        if self.config.device != "auto":
            return self.config.device
        import torch

        return "cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu"

    # The commit the weights were loaded from, once ``pinned_revision()`` has resolved it.
    _commit: str | None = None

    @property
    def model_revision(self) -> str:
        """What identifies the weights in lineage: the model and its commit when known."""
        return revision_label(
            self.config.model or type(self).__name__, self.config.revision, self._commit
        )

    def pinned_revision(self) -> str | None:
        """The revision to pass to every ``from_pretrained`` of this model.

        A hub branch or tag is resolved once to its commit, so the weights and the
        processor come from the same repository state and lineage names that commit; a
        local folder has none.
        """
        resolved, self._commit = pin_revision(self.config.model, self.config.revision)
        return resolved

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
