"""What the Florence-2 student learns from: a round's exported shards as examples.

An example is one Florence-2 task of one image: the image, the prompt the processor
reads (the task token and its input) and the target sequence. Targets are computed from
each shard record with ``refinement.targets.florence2_targets``, the function export
used to write the shards' ``florence2`` entries, so both are the same by construction.

A rank reads every ``world_size``-th shard. Its stream is a function of the seed, the
epoch and the rank alone, so a stream rebuilt at a saved position and fast-forwarded
gives the same examples as one that never stopped (a resumed training sees the same
batches). Two kinds of images are never trained on, both chosen by a hash of the id:
those held out for the image check, and the human-labelled images the merge policy
validates the student on (``is_validation``; refinement/policy.py).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from engine.config import AugmentConfig
from engine.records import ImageRecord
from engine.train.data import ReadStats, shard_records
from engine.train.stream import is_held_out
from refinement.augment import augment
from refinement.targets import florence2_targets

# Examples drawn at random from this many read ahead: shards are written in unit order,
# so neighbours share a unit; the buffer mixes them.
SHUFFLE_BUFFER = 256


def is_validation(record: ImageRecord, fraction: float) -> bool:
    """A human-labelled image the merge policy keeps for itself (``fraction`` of them)."""
    return record.has_human_labels() and is_held_out(record.image_id, fraction)


@dataclass(frozen=True, slots=True)
class Example:
    image_id: str
    jpeg: bytes
    task: str
    # What the processor reads: the task token, then the task's input if it has one.
    prompt: str
    target: str
    # Held out for the merge policy (``is_validation``): never trained on.
    validation: bool = False
    # What the target was written from, so an augmentation can write it again.
    record: ImageRecord | None = None


def shard_examples(
    urls: Sequence[str], tasks: Sequence[str], stats: ReadStats, validation_fraction: float = 0.0
) -> Iterator[Example]:
    """Every example of ``tasks`` in the shards, in shard order."""
    wanted = set(tasks)
    for url in urls:
        for _, _, record, jpeg in shard_records(url, stats):
            validation = is_validation(record, validation_fraction)
            for target in florence2_targets(record):
                if target.task in wanted:
                    prompt = target.task + (target.input or "")
                    yield Example(
                        record.image_id, jpeg, target.task, prompt, target.target, validation,
                        record,
                    )  # fmt: skip


def held_out_examples(
    urls: Sequence[str], tasks: Sequence[str], fraction: float, count: int
) -> list[Example]:
    """Up to ``count`` held-out examples, one per image (the first task each has), so a
    batch rolled by one pairs every target with another image."""
    seen: set[str] = set()
    examples = []
    for example in shard_examples(urls, tasks, ReadStats()):
        if example.image_id in seen or not is_held_out(example.image_id, fraction):
            continue
        seen.add(example.image_id)
        examples.append(example)
        if len(examples) == count:
            break
    return examples


class ExampleStream:
    """One rank's endless stream of training examples, epoch after epoch.

    ``epoch`` and ``consumed`` (examples taken in that epoch) are its position; build
    it with a saved position to continue where a checkpoint left off.
    """

    def __init__(
        self,
        urls: Sequence[str],
        tasks: Sequence[str],
        holdout_fraction: float,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        consumed: int = 0,
        validation_fraction: float = 0.0,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.urls = list(urls)[rank::world_size]
        if not self.urls:
            raise ValueError(
                f"rank {rank} of {world_size} has no shard: the round has {len(urls)}; "
                "use fewer workers or smaller shards"
            )
        self.tasks, self.holdout_fraction = list(tasks), holdout_fraction
        self.validation_fraction, self.augment = validation_fraction, augment
        self.seed, self.rank = seed, rank
        self.epoch, self.consumed = epoch, 0
        self.stats = ReadStats()
        self._items = self._epoch_items()
        for _ in range(consumed):
            self._next()

    def _epoch_items(self) -> Iterator[Example]:
        rng = random.Random(f"{self.seed}/{self.rank}/{self.epoch}")
        urls = rng.sample(self.urls, len(self.urls))
        buffer: list[Example] = []
        examples = shard_examples(urls, self.tasks, self.stats, self.validation_fraction)
        for example in examples:
            if example.validation or is_held_out(example.image_id, self.holdout_fraction):
                continue
            buffer.append(example)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _next(self) -> Example:
        for _ in range(2):
            example = next(self._items, None)
            if example is not None:
                self.consumed += 1
                return example
            if self.consumed == 0:
                break
            self.epoch, self.consumed = self.epoch + 1, 0
            self._items = self._epoch_items()
        raise ValueError(
            f"no training examples of {self.tasks} in {len(self.urls)} shard(s) "
            "(every image held out, or no record has these tasks)"
        )

    def take(self, count: int) -> list[Example]:
        return [self._augmented(self._next()) for _ in range(count)]

    def _augmented(self, example: Example) -> Example:
        """The example moved by ``augment``, drawn from its place in the stream: a
        stream rebuilt at a saved position moves the next examples alike."""
        if self.augment is None or example.record is None:
            return example
        rng = random.Random(f"{self.seed}/{self.rank}/{self.epoch}/{self.consumed}/augment")
        moved = augment(example.record, example.jpeg, example.task, self.augment, rng)
        if moved is None:
            return example
        return replace(example, jpeg=moved.jpeg, target=moved.target, record=moved.record)


def encode(processor: Any, examples: Sequence[Example], max_target_tokens: int) -> dict:
    """A batch as ``Florence2ForConditionalGeneration`` takes it for a loss: prompts and
    images through the processor, targets tokenised with padding set to -100 so it does
    not count."""
    images = [Image.open(io.BytesIO(e.jpeg)).convert("RGB") for e in examples]
    inputs = processor(
        text=[e.prompt for e in examples], images=images, padding=True, return_tensors="pt"
    )
    tokenizer = processor.tokenizer
    labels = tokenizer(
        [e.target for e in examples],
        padding=True,
        truncation=True,
        max_length=max_target_tokens,
        return_tensors="pt",
        return_token_type_ids=False,
    )["input_ids"]
    labels = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"],
        "labels": labels,
    }


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}
