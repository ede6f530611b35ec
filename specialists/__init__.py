"""Specialists: model wrappers that run inside Ray actors (see specialists/base.py).

A config names a specialist by a registered ``kind`` below, or by
``package.module:Class`` for one that lives outside this package. Modules are imported
only when a specialist of their kind is used, so the driver never imports a model
library it does not need.

Importing a module runs its code, so a config is code: a ``module:Class`` kind outside
this package must be in a package the config lists in ``annotate.allowed_modules``.
``engine.config.check_kind_allowed`` decides that from the name alone, when the config
is loaded, before anything is imported.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import SpecialistConfig
    from specialists.base import Specialist

KINDS = {
    "captioner": "specialists.captioner:CaptionerSpecialist",
    "florence2": "specialists.florence2:Florence2Specialist",
    "grounding_dino": "specialists.grounding_dino:GroundingDINOSpecialist",
    "owlv2": "specialists.owlv2:OWLv2Specialist",
    "rapidocr": "specialists.rapidocr:RapidOCRSpecialist",
    "region_text": "specialists.region_text:RegionTextSpecialist",
    "sam": "specialists.sam:SAMSpecialist",
    # CPU specialists for the generated demo world (engine/world/): no weights.
    "world_captions": "specialists.world_text:TemplateCaptioner",
    "world_grounding": "specialists.world_text:PhraseGrounder",
    "world_polygons": "specialists.world:BoxPolygonMaker",
    "world_shapes": "specialists.world:ShapeDetector",
}


def specialist_class(kind: str) -> type[Specialist]:
    """The class for a registered kind or a ``module:Class`` path; ValueError if unknown."""
    from specialists.base import Specialist

    target = KINDS.get(kind, kind)
    module_name, sep, class_name = target.partition(":")
    if not sep:
        raise ValueError(f"unknown specialist kind {kind!r}; known: {sorted(KINDS)}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"specialist kind {kind!r} cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Specialist)):
        raise ValueError(f"specialist kind {kind!r} is not a Specialist subclass")
    return cls


def check_specialist(config: SpecialistConfig) -> type[Specialist]:
    """Validate a specialist entry without building it: kind, needs, options vs signature."""
    cls = specialist_class(config.kind)
    try:
        inspect.signature(cls).bind(config, **config.options)
    except TypeError as exc:
        raise ValueError(
            f"specialist {config.name!r}: options do not fit {cls.__name__}: {exc}"
        ) from exc
    return cls


def build_specialist(config: SpecialistConfig) -> Specialist:
    """A specialist from its config entry: ``options`` are its constructor's keywords."""
    return check_specialist(config)(config, **config.options)
