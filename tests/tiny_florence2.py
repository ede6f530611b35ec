"""The tiny Florence-2 the specialist, target and export tests share.

The builders are the engine's (``engine/train/tiny.py``); this module fixes the size the
tests were tuned for (a one-layer BART of width 32 on 64-pixel images, 5 visual tokens)
and shares one processor per test process.
"""

from __future__ import annotations

import functools

from transformers import Florence2ForConditionalGeneration, Florence2Processor

from engine.train.config import TinyModelConfig
from engine.train.tiny import build_tiny_florence2, build_tiny_florence2_processor

TINY_FLORENCE2 = TinyModelConfig(hidden_size=32, layers=1, heads=2, image_size=64)


@functools.lru_cache(maxsize=1)
def build_florence2_processor() -> Florence2Processor:
    """The tiny processor; built once per process and shared, so callers must not mutate it."""
    return build_tiny_florence2_processor(TINY_FLORENCE2.image_size)


def build_tiny_florence2_model(seed: int = 0) -> Florence2ForConditionalGeneration:
    """A randomly initialised ``Florence2ForConditionalGeneration`` that fits the processor."""
    model, _ = build_tiny_florence2(TINY_FLORENCE2.model_copy(update={"seed": seed}))
    return model
