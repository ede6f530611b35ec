"""Specialists that fail on purpose: the annotate stage's error paths cannot be reached
with a healthy model. Importable by Ray workers (tests is a package)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import torch

from engine.config import SpecialistConfig
from engine.records import Caption, Phrase, Region
from specialists.base import Annotations, Specialist, SpecialistInput


class SizeCaptioner(Specialist):
    """Captions each image with its size; fails on one width; 'runs out of memory' on
    batches larger than ``max_batch``."""

    produces = frozenset({"captions"})

    def __init__(
        self, config: SpecialistConfig, fail_on_width: int = -1, max_batch: int = 1000
    ) -> None:
        super().__init__(config)
        self.fail_on_width = fail_on_width
        self.max_batch = max_batch

    def setup(self) -> None:
        self.batches: list[int] = []

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        if len(batch) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = []
        for item in batch:
            if item.image.width == self.fail_on_width:
                raise ValueError(f"cannot read an image {item.image.width} wide")
            text = f"an image of {item.image.width} by {item.image.height} pixels"
            out.append(Annotations(captions={"detailed": Caption(text, source="", score=0.5)}))
        return out


class FirstWordGrounder(Specialist):
    """Grounds the first word of every caption it is given to the whole image."""

    produces = frozenset({"grounding"})
    needs = frozenset({"captions"})

    def setup(self) -> None:
        pass

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        out = []
        for item in batch:
            regions, phrases = [], []
            for kind, caption in sorted(item.record.captions.items()):
                word = caption.text.split()[0]
                box = (0.0, 0.0, float(item.image.width), float(item.image.height))
                regions.append(Region(box, word, "object", source=""))
                phrases.append(Phrase(kind, 0, len(word), word, [len(regions) - 1], source=""))
            out.append(Annotations(regions=regions, phrases=phrases))
        return out


class QuarterDetector(Specialist):
    """Finds one "thing" in the top-left quarter of every image, with score 0.5."""

    produces = frozenset({"objects"})

    def setup(self) -> None:
        pass

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        out = []
        for item in batch:
            box = (0.0, 0.0, item.image.width / 2, item.image.height / 2)
            out.append(Annotations(regions=[Region(box, "thing", "object", "", score=0.5)]))
        return out


class FaultyCaptioner(Specialist):
    """Captions each image with its file name and fails on purpose by name: raises on
    "raise", calls ``sys.exit`` on "exit", segfaults on "crash", hangs on "hang".

    With ``busy_file`` it appends its process id to that file as each batch starts, and
    ``seconds_per_image`` slows it down, so a test can kill the process mid-batch."""

    produces = frozenset({"captions"})

    def __init__(
        self, config: SpecialistConfig, busy_file: str = "", seconds_per_image: float = 0.0
    ) -> None:
        super().__init__(config)
        self.busy_file = busy_file
        self.seconds_per_image = seconds_per_image

    def setup(self) -> None:
        pass

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        if self.busy_file:
            with open(self.busy_file, "a") as busy:
                busy.write(f"{os.getpid()}\n")
        out = []
        for item in batch:
            name = item.record.uri.rsplit("/", 1)[-1]
            if "raise" in name:
                raise ValueError(f"cannot read {name}")
            if "exit" in name:
                sys.exit(3)
            if "crash" in name:
                ctypes.string_at(0)  # reads address 0: a segfault in native code
            if "hang" in name:
                threading.Event().wait()
            time.sleep(self.seconds_per_image)
            out.append(Annotations(captions={"brief": Caption(name, source="", score=0.5)}))
        return out
