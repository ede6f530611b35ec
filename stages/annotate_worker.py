"""The worker side of annotate: decoding a unit, and the actor that holds one specialist.

A decode task reads one unit's images and attaches what the specialist needs from
earlier specialists; the actor annotates the decoded unit in batches and commits
``rounds/rNNN/annotate/<name>/part-<unit>.parquet``. An image that makes the model raise
is recorded with its error and the rest of the batch goes on; a CUDA out-of-memory error
retries the batch at half the size. The model runs on a thread of its own, so a batch
that hangs is given up on after the specialist's ``batch_timeout_s`` (BatchTimedOut);
what happens then, and when the process dies outright, is the driver's part
(stages/annotate.py): it restarts the actor and narrows the unit down to the image.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
from PIL import Image

from engine.config import SpecialistConfig
from engine.layout import MANIFEST, round_layout
from engine.manifest import keeps
from engine.records import (
    ANNOTATION_SCHEMA,
    IMAGE_COLUMN,
    RECORD_SCHEMA,
    ImageRecord,
    records_from_table,
    records_to_table,
)
from engine.store import Store
from engine.summary import StageSummary
from specialists import build_specialist
from specialists.base import Annotations, SpecialistInput

# Per image: its annotations, or None and the error it caused ("Type: message").
Result = tuple[Annotations | None, str | None]


class BatchTimedOut(RuntimeError):
    """A batch gave no answer within the specialist's ``batch_timeout_s``. The model's
    thread cannot be stopped, so the actor holding it must be restarted."""


@dataclass(frozen=True, slots=True)
class PreparedUnit:
    unit: str
    records: list[ImageRecord]
    # Decoded RGB pixels, one array per record: numpy travels through Ray's object store
    # without a copy into the actor.
    pixels: list[np.ndarray]


def prepare_unit(
    store_url: str, unit: str, image_ids: Sequence[str] | None, upstream: Sequence[str]
) -> PreparedUnit:
    """Read and decode one unit's images (``image_ids`` of them; None: all) and attach the
    upstream specialists' output."""
    store = Store(store_url)
    table = store.read_unit(MANIFEST, unit, columns=[*RECORD_SCHEMA.names, IMAGE_COLUMN])
    wanted = None if image_ids is None else set(image_ids)
    records, pixels = [], []
    by_id = {}
    for record, jpeg in zip(
        records_from_table(table), table.column(IMAGE_COLUMN).to_pylist(), strict=True
    ):
        if keeps(wanted, record.image_id) and record.image_id not in by_id:
            by_id[record.image_id] = record
            records.append(record)
            with Image.open(io.BytesIO(jpeg)) as image:
                pixels.append(np.asarray(image.convert("RGB")))
    for dataset in upstream:
        if not store.is_committed(dataset, unit):
            continue
        for extra in records_from_table(store.read_unit(dataset, unit)):
            if extra.image_id in by_id:
                attach(by_id[extra.image_id], extra)
    return PreparedUnit(unit, records, pixels)


def attach(record: ImageRecord, extra: ImageRecord) -> None:
    """Add another source's annotations to a record: captions fill missing kinds only
    (the labels an image came with come first), regions and phrases are appended."""
    for kind, caption in extra.captions.items():
        record.captions.setdefault(kind, caption)
    offset = len(record.regions)
    record.regions.extend(extra.regions)
    for phrase in extra.phrases:
        phrase.regions = [offset + index for index in phrase.regions]
        record.phrases.append(phrase)


class SpecialistActor:
    """Holds one loaded specialist; annotates units (or parts of one) and commits them."""

    def __init__(self, config: SpecialistConfig, store_url: str, round_number: int) -> None:
        self.config = config
        self.store = Store(store_url)
        self.round_number = round_number
        self.dataset = round_layout(round_number).annotate(config.name)
        self.specialist = build_specialist(config)
        # One thread runs every model call, setup included: a batch that hangs can then
        # be given up on while this process still answers, and thread-local state set up
        # by ``setup()`` (torch's grad mode, for one) is there when ``annotate`` runs.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=config.name)
        self.model_thread.submit(self.specialist.setup).result()

    def annotate_images(
        self, prepared: PreparedUnit, indices: Sequence[int]
    ) -> tuple[list[Result], Counter[str]]:
        """Annotate the images at ``indices`` of a unit without committing anything, with
        the notes of what was done (halved batches): the driver spreads a unit over the
        pool this way, and narrows one down that took the process down."""
        items = _inputs(prepared, indices)
        done = StageSummary("annotate")
        results = annotate_resilient(self._annotate_batch, items, self.config.batch_size, done)
        return results, done.notes

    def run_unit(
        self, prepared: PreparedUnit, inputs: str, known: Mapping[int, Result] | None = None
    ) -> StageSummary:
        """Annotate a unit's images, except those whose result is ``known`` (parts the
        driver already had annotated, images that killed the process), and commit it as
        computed from ``inputs``."""
        known = known or {}
        summary = StageSummary("annotate", inputs=len(prepared.records))
        todo = [i for i in range(len(prepared.records)) if i not in known]
        items = _inputs(prepared, todo)
        results = dict(known)
        results.update(
            zip(
                todo,
                annotate_resilient(self._annotate_batch, items, self.config.batch_size, summary),
                strict=True,
            )
        )
        rows = []
        for index, record in enumerate(prepared.records):
            found, error = results[index]
            annotations = found or Annotations()
            stamped = stamp(record, annotations, self.specialist.source, self.round_number)
            rows.append((stamped, error))
            if error is not None:
                summary.dropped[f"model failed: {error.partition(':')[0]}"] += 1
        self.store.commit_unit(prepared.unit, {self.dataset: annotation_table(rows)}, inputs=inputs)
        summary.outputs = sum(1 for _, error in rows if error is None)
        return summary

    def _annotate_batch(self, batch: list[SpecialistInput]) -> list[Annotations]:
        future = self.model_thread.submit(self.specialist.annotate, batch)
        try:
            out = future.result(timeout=self.config.batch_timeout_s)
        except FutureTimeout:
            raise BatchTimedOut(
                f"no answer within {self.config.batch_timeout_s:g} s (batch_timeout_s)"
            ) from None
        if len(out) != len(batch):
            name = type(self.specialist).__name__
            raise RuntimeError(f"{name} returned {len(out)} for {len(batch)}")
        return out


def _inputs(prepared: PreparedUnit, indices: Sequence[int]) -> list[SpecialistInput]:
    return [
        SpecialistInput(prepared.records[i], Image.fromarray(prepared.pixels[i])) for i in indices
    ]


def annotate_resilient(
    annotate: Callable[[list[SpecialistInput]], list[Annotations]],
    items: list[SpecialistInput],
    batch_size: int,
    summary: StageSummary,
) -> list[Result]:
    """Annotate ``items`` in batches; per item, its annotations or the error it caused.

    Out of memory: halve the batch and go on (down to one image). Any other failure
    (``SystemExit`` too: a library that exits on a bad input has failed on that input):
    rerun that batch image by image, so one bad image costs only itself. A timed-out
    batch ends the call, since the model's thread is still busy with it.
    """
    results: list[Result] = []
    start, size = 0, batch_size
    while start < len(items):
        batch = items[start : start + size]
        try:
            results.extend((a, None) for a in annotate(batch))
            start += len(batch)
        except BatchTimedOut:
            raise
        except (Exception, SystemExit) as exc:
            if _is_out_of_memory(exc) and size > 1:
                size = max(1, size // 2)
                summary.notes[f"batch halved after out of memory (to {size})"] += 1
                _free_accelerator_memory()
                continue
            for item in batch:
                try:
                    results.append((annotate([item])[0], None))
                except BatchTimedOut:
                    raise
                except (Exception, SystemExit) as single:
                    results.append((None, describe(single)))
                    _free_accelerator_memory()
            start += len(batch)
    return results


def describe(exc: BaseException) -> str:
    """An error as stored with its image: one line, its type first."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, without importing torch for specialists that have none.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def stamp(
    record: ImageRecord, annotations: Annotations, source: str, round_number: int
) -> ImageRecord:
    """A specialist's output for ``record`` as a record of its own, every annotation with
    its lineage: the specialist's ``source`` (unless it set one) and the round."""
    for part in (*annotations.captions.values(), *annotations.regions, *annotations.phrases):
        part.source = part.source or source
        part.round = round_number
    return replace(
        record,
        captions=annotations.captions,
        regions=annotations.regions,
        phrases=annotations.phrases,
    )


def annotation_table(rows: list[tuple[ImageRecord, str | None]]) -> pa.Table:
    table = records_to_table([record for record, _ in rows])
    errors = [error for _, error in rows]
    return table.append_column(ANNOTATION_SCHEMA.field("error"), pa.array(errors, pa.string()))
