"""A rank's stream of training conversations, epoch after epoch, and the held-out images.

Both are functions of the seed and the data alone, so a resumed run rebuilds its stream
at the saved position, and every rank and every run holds out the same images.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from engine.train.config import TrainDataConfig
from engine.train.data import Conversation, read_conversations


@dataclass
class DataPosition:
    """Where a rank's stream is: the epoch and the conversations consumed in it."""

    epoch: int = 0
    consumed: int = 0


def is_held_out(image_id: str, fraction: float) -> bool:
    """The same images on every rank and run: a hash of the id, not a random draw."""
    digest = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16)
    return digest < fraction * 2**32


class ConversationStream:
    """One rank's endless stream of training conversations of a stage, epoch after epoch.

    Each epoch is ``read_conversations`` for (seed, epoch), deterministic, so a stream
    re-created at a saved position and fast-forwarded gives the same conversations as
    one that never stopped. Held-out images are skipped. ``position`` is where the
    stream is now, for a checkpoint.
    """

    def __init__(
        self,
        shards: list[str],
        stage: str,
        data: TrainDataConfig,
        seed: int,
        position: DataPosition,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shards, self.stage, self.data, self.seed = shards, stage, data, seed
        self.rank, self.world_size = rank, world_size
        self.position = DataPosition(position.epoch, position.consumed)
        self._epoch = self._open(self.position.epoch, skip=self.position.consumed)

    def _open(self, epoch: int, skip: int) -> Iterator[Conversation]:
        conversations = read_conversations(
            self.shards,
            self.stage,
            self.data,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
        )
        kept = (c for c in conversations if not is_held_out(c.image_id, self.data.holdout_fraction))
        return itertools.islice(kept, skip, None)

    def __iter__(self) -> Iterator[Conversation]:
        return self

    def __next__(self) -> Conversation:
        conversation = next(self._epoch, None)
        if conversation is None:  # the epoch is over: the next one, reshuffled
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._epoch = self._open(self.position.epoch, skip=0)
            conversation = next(self._epoch, None)
            if conversation is None:
                raise RuntimeError(
                    f"{self.stage}: no training conversations for rank {self.rank} "
                    f"in {len(self.shards)} shard(s)"
                )
        self.position.consumed += 1
        return conversation


def held_out_batch(
    shards: list[str], stage: str, data: TrainDataConfig, seed: int, size: int
) -> list[Conversation]:
    """Up to ``size`` held-out conversations of a stage, each of a different image."""
    if data.holdout_fraction == 0:
        return []
    batch: dict[str, Conversation] = {}
    for conversation in read_conversations(shards, stage, data, seed=seed, epoch=0):
        if is_held_out(conversation.image_id, data.holdout_fraction):
            batch.setdefault(conversation.image_id, conversation)
            if len(batch) == size:
                break
    return list(batch.values())
