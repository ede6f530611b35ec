"""Training samples for the Florence-VL trainer: conversations read from the engine's
WebDataset shards (and LLaVA-style JSON), tokenised with only the answers in the loss,
and batched.

``read_conversations`` is a chain of small generator stages; what the iterator holds
after each one:

1. sources: shard URLs (and, in stage 2, pieces of the LLaVA file), in an order shuffled
   per epoch;
2. ``{"url", "stream"}``: each shard opened with fsspec (local paths, ``file://``,
   ``memory://``, ``s3://`` ... like the engine's store);
3. ``{"__key__", "__url__", "jpg", "json"}``: tar members grouped into samples by
   webdataset's own ``tar_file_expander`` and ``group_by_keys``;
4. ``(record, image bytes)``: the JSON parsed into an ``ImageRecord``
   (``engine.records.record_from_sample``);
5. drafts of conversations: stage 1 one caption conversation per record, stage 2 one per
   instruction task the record supports (``engine.train.instructions``), plus the LLaVA
   entries;
6. the same, through a seeded shuffle buffer of ``data.shuffle_buffer`` conversations;
7. this rank's share: conversation ``i`` of the stream goes to rank ``i % world_size``;
8. ``Conversation``: the image loaded (LLaVA) and decoded once to prove it readable.

Error policy: a shard that cannot be opened or read (from its first error on), a sample
missing its ``.jpg`` or ``.json``, JSON that is not an object, an object that is not in
the export format, a LLaVA entry that does not fit its format and an image that does not
decode are each skipped, with a warning on this module's logger naming the shard and key
(or file and entry) and one count in ``ReadStats`` under the reason. Nothing is dropped
without both.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import braceexpand
import fsspec
import torch
from PIL import Image, ImageOps
from transformers import PreTrainedTokenizerBase
from webdataset.tariterators import group_by_keys, tar_file_expander

from engine.records import ImageRecord, record_from_sample
from engine.train.config import IMAGE_TOKEN, TrainDataConfig
from engine.train.instructions import (
    Conversation,
    Turn,
    caption_conversation,
    instruction_conversations,
)

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "EncodedSample",
    "ReadStats",
    "Turn",
    "caption_conversation",
    "collate",
    "encode_conversation",
    "instruction_conversations",
    "read_conversations",
    "read_llava",
    "with_image",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' LM loss) skips
# LLaVA entries are mixed with the shards at shard granularity: the entries, in a
# per-epoch order, are cut into pieces of this many that take places in the shuffled
# source order the way shards do; the shuffle buffer then mixes within.
LLAVA_PIECE = 1000


@dataclass
class ReadStats:
    """What a reader skipped, by reason (the warnings say which items).

    Counts are kept by the process that reads: under a multi-worker DataLoader each worker
    has its own, and the logged warnings are the complete account.
    """

    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, where: str, reason: str, detail: object = "") -> None:
        self.skipped[reason] += 1
        log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")


# ---------------------------------------------------------------- shards


def _expand_shards(patterns: Sequence[str]) -> list[str]:
    """Shard URLs from paths, ``{000..009}`` brace ranges and globs (any fsspec protocol)."""
    urls = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if any(c in url for c in "*?["):
                fs, _ = fsspec.core.url_to_fs(url)
                urls.extend(sorted(fs.unstrip_protocol(p) for p in fs.glob(url)))
            else:
                urls.append(url)
    return urls


def _rng(seed: int, epoch: int, purpose: str) -> random.Random:
    # String seeds hash with SHA-512: stable across processes and Python runs, unlike hash().
    return random.Random(f"{seed}:{epoch}:{purpose}")


@dataclass(frozen=True)
class _Draft:
    """A conversation before its image is checked; LLaVA images are still a path."""

    where: str  # shard#key or file#entry, for warnings
    image: bytes | str
    turns: tuple[Turn, ...]
    image_id: str
    task: str


def read_conversations(
    shards: Sequence[str],
    stage: Literal["stage1", "stage2"],
    data: TrainDataConfig,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    stats: ReadStats | None = None,
) -> Iterator[Conversation]:
    """One epoch of conversations from the engine's shards (stage 2: and LLaVA JSON).

    ``shards``: URLs, paths, brace ranges or globs. Stage 1 yields one caption conversation
    per record with a caption; stage 2 one conversation per task of
    ``data.instruction_tasks`` each record supports, plus the entries of
    ``data.llava_json`` (images under ``data.llava_images``) when it is set.

    The stream is a function of ``(seed, epoch)`` and the data alone: the source order,
    the shuffle buffer and the prompts drawn for each record all come from generators
    seeded with them, so a resumed run can rebuild an epoch and skip what it consumed.
    ``data.shuffle_buffer`` 0 keeps the sources in the given order and the samples in
    shard order.

    Ranks: conversation ``i`` of the shuffled stream goes to rank ``i % world_size``, so
    the ranks' shares are disjoint, together make the whole epoch and differ in size by at
    most one (data-parallel steps stay in lockstep), however many shards there are. The
    price: every rank reads every shard and parses every record; only images are decoded
    by their own rank. A DataLoader with several workers splits the same way with
    ``rank = rank * num_workers + worker_id`` and ``world_size = world_size * num_workers``.
    Images that fail to decode are found after the split, so they can make shares differ
    by more than one; each is warned about and counted in ``stats``.
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    stats = stats if stats is not None else ReadStats()
    shuffle = data.shuffle_buffer > 0
    sources: list[str | list[_Draft]] = list(_expand_shards(shards))
    if stage == "stage2" and data.llava_json:
        if not data.llava_images:
            raise ValueError("data.llava_json is set but data.llava_images is not")
        entries = _llava_drafts(data.llava_json, data.llava_images, stats)
        if shuffle:
            _rng(seed, epoch, "llava").shuffle(entries)
        sources += [entries[i : i + LLAVA_PIECE] for i in range(0, len(entries), LLAVA_PIECE)]
    if shuffle:
        _rng(seed, epoch, "sources").shuffle(sources)

    drafts = _drafts(sources, stage, data, seed, epoch, stats)
    if shuffle:
        drafts = _shuffle_buffer(drafts, data.shuffle_buffer, _rng(seed, epoch, "buffer"))
    mine = (d for i, d in enumerate(drafts) if i % world_size == rank)
    return _with_images(mine, stats)


def _drafts(
    sources: Iterable[str | list[_Draft]],
    stage: str,
    data: TrainDataConfig,
    seed: int,
    epoch: int,
    stats: ReadStats,
) -> Iterator[_Draft]:
    for source in sources:
        if isinstance(source, list):  # a piece of the LLaVA file
            yield from source
            continue
        for url, key, record, image in shard_records(source, stats):
            # Seeded by the record, not by its position: prompts do not depend on the order.
            rng = _rng(seed, epoch, record.image_id)
            if stage == "stage1":
                made = caption_conversation(
                    record, image, rng, data.stage1_captions, data.stage1_caption_choice
                )
                conversations = [made] if made else []
            else:
                conversations = instruction_conversations(
                    record,
                    image,
                    data.instruction_tasks,
                    rng,
                    data.stage1_captions,
                    data.stage1_caption_choice,
                )
            for c in conversations:
                yield _Draft(f"{url}#{key}", c.image, c.turns, c.image_id, c.task)


def _samples(url: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Samples of one shard, up to the first error reading it (a truncated or corrupt tar
    cannot be resynchronised): the samples before it are kept, the rest is skipped."""

    def handler(exc: Exception) -> bool:
        stats.skip(url, "unreadable shard", exc)
        return False  # webdataset's stages then stop: this chain reads this one shard

    def opened() -> Iterator[dict[str, Any]]:
        try:
            # Closed with the generator: the stream lives while its tar is read.
            stream = fsspec.open(url, "rb").open()
        except Exception as exc:  # any fsspec backend error means the same here
            handler(exc)
            return
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()

    yield from group_by_keys(tar_file_expander(opened(), handler=handler), handler=handler)


def shard_records(url: str, stats: ReadStats) -> Iterator[tuple[str, str, ImageRecord, bytes]]:
    """``(url, key, record, jpg)`` of each complete sample of the shard at ``url`` whose
    JSON is a record (the export format); everything else is skipped and counted."""
    for sample in _samples(url, stats):
        url, key = sample["__url__"], sample["__key__"]
        where = f"{url}#{key}"
        missing = [ext for ext in ("jpg", "json") if ext not in sample]
        if missing:
            stats.skip(where, "incomplete sample", f"no .{' or .'.join(missing)}")
            continue
        try:
            parsed = json.loads(sample["json"])
            if not isinstance(parsed, dict):
                raise ValueError(f"a {type(parsed).__name__}, not an object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            stats.skip(where, "bad json", exc)
            continue
        try:
            record = record_from_sample(parsed)
        except ValueError as exc:
            # JSON that parses but is not the export format: one bad record must not end
            # the epoch.
            stats.skip(where, "malformed record", exc)
            continue
        yield url, key, record, sample["jpg"]


def _shuffle_buffer(items: Iterable[_Draft], size: int, rng: random.Random) -> Iterator[_Draft]:
    """Yield a random one of the last ``size`` items read, replacing it by the next."""
    buffer: list[_Draft] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def _with_images(drafts: Iterable[_Draft], stats: ReadStats) -> Iterator[Conversation]:
    """Conversations whose image was read and decoded; the others are skipped.

    Decoding here costs a second decode (collate decodes again) but keeps a broken image
    from failing a training step, where it could no longer be skipped alone.
    """
    for draft in drafts:
        try:
            if isinstance(draft.image, str):
                with fsspec.open(draft.image, "rb") as f:
                    image = f.read()
            else:
                image = draft.image
            Image.open(io.BytesIO(image)).load()
        except Exception as exc:  # PIL and fsspec raise many types for one meaning
            stats.skip(draft.where, "unreadable image", exc)
            continue
        yield Conversation(image, draft.turns, draft.image_id, draft.task)


# ---------------------------------------------------------------- LLaVA JSON

_LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


def read_llava(
    json_path: str, image_dir: str, *, stats: ReadStats | None = None
) -> Iterator[Conversation]:
    """Conversations from a LLaVA-style instruction file, in file order.

    The file is a JSON list of ``{"id", "image": path relative to image_dir,
    "conversations": [{"from": "human" | "gpt", "value": "...<image>..."}, ...]}``. The
    ``<image>`` marker is removed from the text: ``encode_conversation`` places the image
    in front of the first user turn, which is where LLaVA data puts it. Entries with no
    image, roles other than human/gpt, turns that do not alternate starting with the human
    and ending with gpt, or an empty answer are skipped, and so are images that cannot be
    read: each with a warning and a count in ``stats``. Tasks are ``"llava"``.
    """
    stats = stats if stats is not None else ReadStats()
    return _with_images(_llava_drafts(json_path, image_dir, stats), stats)


def _llava_drafts(json_path: str, image_dir: str, stats: ReadStats) -> list[_Draft]:
    with fsspec.open(json_path, "r", encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: a LLaVA file is a JSON list of entries")
    drafts = []
    for number, entry in enumerate(entries):
        where = f"{json_path}#{entry.get('id', number) if isinstance(entry, dict) else number}"
        problem = _llava_problem(entry)
        if problem:
            stats.skip(where, "bad llava entry", problem)
            continue
        turns = tuple(
            Turn(_LLAVA_ROLES[t["from"]], " ".join(t["value"].replace(IMAGE_TOKEN, " ").split()))
            for t in entry["conversations"]
        )
        if any(t.role == "assistant" and not t.text for t in turns):
            stats.skip(where, "bad llava entry", "empty answer")
            continue
        image = posixpath.join(image_dir.rstrip("/"), entry["image"])
        drafts.append(_Draft(where, image, turns, str(entry.get("id", number)), "llava"))
    return drafts


def _llava_problem(entry: object) -> str | None:
    """Why an entry cannot be used, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    if not isinstance(entry.get("image"), str) or not entry["image"]:
        return "no image"
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no conversations"
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        return "a turn without a text value"
    roles = [t.get("from") for t in turns]
    expected = ["human", "gpt"] * (len(turns) // 2)
    if roles != expected:
        return f"turns {roles} do not alternate human, gpt"
    return None


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on the answers' tokens
    image: bytes


def with_image(text: str, num_visual_tokens: int) -> str:
    """The first user turn's content: the image (``IMAGE_TOKEN`` once per visual token),
    a newline, then ``text`` without any placeholder of its own. Training and inference
    both lay out the image this way."""
    return IMAGE_TOKEN * num_visual_tokens + "\n" + text.replace(IMAGE_TOKEN, "")


def encode_conversation(
    conversation: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    num_visual_tokens: int,
    max_length: int,
) -> EncodedSample:
    """Token ids and labels of a conversation rendered with the tokenizer's chat template.

    The first user turn starts with ``IMAGE_TOKEN`` repeated ``num_visual_tokens`` times
    and a newline (the model puts the visual features at those positions); the tokenizer
    must know ``IMAGE_TOKEN`` as one special token. Any ``IMAGE_TOKEN`` inside the turns'
    text is removed, so the image tokens are exactly one run of ``num_visual_tokens``.

    Labels are ``IGNORE_INDEX`` except on each answer's tokens and the template's text
    that closes the answer (its end-of-turn token, and end-of-sequence after the last
    answer where the template writes one), so the model learns to stop. The answer spans
    are found on the rendered text: the conversation rendered up to a question with the
    generation prompt ends where the answer begins, and the answer ends where the
    conversation rendered through it stops agreeing with the whole one. A token is an
    answer token when it lies inside such a span (offsets of a fast tokenizer); a token
    reaching past the span is the next turn's marker that merely starts alike. This
    works for any template whose rendering of a prefix of the turns is a prefix of the
    whole rendering (Phi-3, Llama 3, ChatML/Qwen...); others raise ValueError.

    Sequences longer than ``max_length`` lose their end (later answers first); one whose
    image tokens do not fit in ``max_length`` raises ValueError. A sample cut so short that
    no answer token is left has labels all ``IGNORE_INDEX``: skip it before the loss.
    """
    if num_visual_tokens < 1:
        raise ValueError(f"num_visual_tokens must be at least 1, got {num_visual_tokens}")
    if not tokenizer.is_fast:
        raise ValueError("encode_conversation needs a fast tokenizer (for token offsets)")
    turns = conversation.turns
    if not turns or turns[0].role != "user" or turns[-1].role != "assistant":
        raise ValueError(
            f"conversation {conversation.image_id}: turns must start with the user and end "
            "with the assistant"
        )
    messages = [{"role": t.role, "content": t.text.replace(IMAGE_TOKEN, "")} for t in turns]
    messages[0]["content"] = with_image(messages[0]["content"], num_visual_tokens)

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )

    whole = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(i, True)
        if not whole.startswith(prompt):
            raise ValueError(
                "the chat template renders a conversation's beginning differently from the "
                "whole conversation; the answers cannot be located"
            )
        through = render(i + 1, False)
        end = len(prompt)
        while end < min(len(through), len(whole)) and through[end] == whole[end]:
            end += 1
        spans.append((len(prompt), end))

    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(start <= begin and stop <= end for start, end in spans) else IGNORE_INDEX
        for token, (begin, stop) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    positions = [i for i, token in enumerate(input_ids) if token == image_id]
    if (
        len(positions) != num_visual_tokens
        or positions[-1] - positions[0] + 1 != num_visual_tokens
        or image_id == tokenizer.unk_token_id
    ):
        raise ValueError(
            f"the tokenizer does not encode {IMAGE_TOKEN!r} as one special token: "
            f"{num_visual_tokens} placeholders gave {len(positions)} image token ids"
        )
    if len(input_ids) > max_length:
        if positions[-1] >= max_length:
            raise ValueError(
                f"max_length {max_length} cannot hold the {num_visual_tokens} image tokens, "
                f"which end at position {positions[-1] + 1}"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return EncodedSample(input_ids, labels, conversation.image)


def collate(
    samples: Sequence[EncodedSample],
    pad_token_id: int,
    pixel_values: Callable[[list[Image.Image]], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A batch: ``pixel_values`` of the decoded RGB images (EXIF orientation applied) and
    ``input_ids``, ``attention_mask``, ``labels`` right-padded to the longest sample
    (``pad_token_id``, 0 and ``IGNORE_INDEX`` on the padding), all int64 of shape
    ``(batch, longest)``. ``pixel_values`` is the vision tower's image processor.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    longest = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    images = [
        ImageOps.exif_transpose(Image.open(io.BytesIO(s.image))).convert("RGB") for s in samples
    ]
    return {
        "pixel_values": pixel_values(images),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
