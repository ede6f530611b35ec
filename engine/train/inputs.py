"""What a training run reads and where it writes, resolved before any work starts.

The ``train`` section may name both; what it leaves unset comes from the store: the
shards of a committed round's export (``engine.round_state``: a round that is still
running may have half its shards) and ``<store>/florence_vl`` for the output.
"""

from __future__ import annotations

import json
import posixpath

from engine.layout import round_layout
from engine.round_state import committed_rounds
from engine.store import Store
from engine.train.config import TrainConfig

# Under the store root: the trainer's output when the config names none.
DEFAULT_OUTPUT = "florence_vl"


class TrainInputError(ValueError):
    """The shards or the output cannot be resolved; raised before any work."""


def training_inputs(
    config: TrainConfig, store: Store | None, round_number: int | None
) -> tuple[list[str], str]:
    """The shard URLs to read and the output URL, from the config or else from the store.

    Shards default to the export of ``round_number``, which must be committed and
    exported; None means the latest committed round with a shard index. The output
    defaults to ``<store>/florence_vl``. Raises TrainInputError with a one-line reason.
    """
    if store is None and (not config.data.shards or config.output is None):
        raise TrainInputError("train needs --store, or both train.data.shards and train.output")
    output = config.output or posixpath.join(store.url.rstrip("/"), DEFAULT_OUTPUT)
    if config.data.shards:
        return list(config.data.shards), output
    layout = round_layout(_round_to_train_on(store, round_number))
    with store.fs.open(store.path(layout.shard_index)) as f:
        shards = json.load(f)["shards"]
    if not shards:
        raise TrainInputError(f"round {layout.number}'s export has no shards")
    return shards, output


def _round_to_train_on(store: Store, round_number: int | None) -> int:
    committed = committed_rounds(store)
    exported = [n for n in committed if store.exists(round_layout(n).shard_index)]
    if round_number is None:
        if not exported:
            raise TrainInputError(
                f"store {store.url!r} has no exported shards of a committed round "
                f"(committed rounds: {committed}); run --stage all"
            )
        return exported[-1]
    if round_number not in committed:
        raise TrainInputError(
            f"round {round_number} is not committed (committed rounds: {committed}); "
            "a running round's shards may be incomplete"
        )
    if round_number not in exported:
        raise TrainInputError(
            f"round {round_number} has no exported shards; exported committed rounds: {exported}"
        )
    return round_number
