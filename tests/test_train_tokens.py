"""Trainer tokens: answer-only labels, truncation that keeps the image, right-padded batches."""

from __future__ import annotations

import pytest
import torch

from engine.train.config import IMAGE_TOKEN
from engine.train.data import (
    IGNORE_INDEX,
    Conversation,
    EncodedSample,
    Turn,
    collate,
    encode_conversation,
)
from engine.train.tiny import build_tiny_language_tokenizer
from tests.inputs import encode, photo

# Templates of other model families, to show the answer spans do not depend on one layout:
# Phi-3.5 (eos after the last turn only) and ChatML (Qwen: a newline after each end).
PHI35_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# What the template writes after each answer, up to the next turn (last answer: the end).
CLOSERS = {
    "tiny": ("<|end|>\n", "<|end|>\n"),
    "phi35": ("<|end|>\n", "<|end|>\n<|end|>"),  # the tiny tokenizer's eos is <|end|>
    "chatml": ("<|im_end|>\n", "<|im_end|>\n"),
}


def tokenizer_for(template: str):
    tokenizer = build_tiny_language_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if template == "phi35":
        tokenizer.chat_template = PHI35_TEMPLATE
    elif template == "chatml":
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def conversation(*texts: str) -> Conversation:
    roles = ("user", "assistant") * len(texts)
    return Conversation(
        b"jpg", tuple(Turn(r, t) for r, t in zip(roles, texts, strict=False)), "x", "region"
    )


@pytest.mark.parametrize("template", CLOSERS)
def test_only_answers_and_their_end_of_turn_are_labelled(template):
    tokenizer = tokenizer_for(template)
    turns = conversation("What is <image>in [1, 2, 3, 4]?", "A dog.", "How many?", "2")
    sample = encode_conversation(turns, tokenizer, num_visual_tokens=5, max_length=512)
    assert len(sample.labels) == len(sample.input_ids) and sample.image == b"jpg"
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    at = [i for i, t in enumerate(sample.input_ids) if t == image_id]
    assert len(at) == 5 and at == list(range(at[0], at[0] + 5))
    # The labelled tokens, run by run, are the answers with what closes them.
    runs, run = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    if run:
        runs.append(run)
    between, last = CLOSERS[template]
    assert [tokenizer.decode(r) for r in runs] == ["A dog." + between, "2" + last]


def test_long_samples_lose_their_end_but_never_image_tokens():
    tokenizer = tokenizer_for("tiny")
    turns = conversation("Q?", "A long answer about the dog and the cat.", "More?", "Yes.")
    full = encode_conversation(turns, tokenizer, num_visual_tokens=8, max_length=512)
    cut = encode_conversation(
        turns, tokenizer, num_visual_tokens=8, max_length=len(full.input_ids) - 4
    )
    assert cut.input_ids == full.input_ids[:-4] and cut.labels == full.labels[:-4]
    image_end = max(
        i for i, t in enumerate(full.input_ids) if t == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )
    just_fits = encode_conversation(turns, tokenizer, num_visual_tokens=8, max_length=image_end + 1)
    assert set(just_fits.labels) == {IGNORE_INDEX} and len(just_fits.input_ids) == image_end + 1
    with pytest.raises(ValueError, match="cannot hold the 8 image tokens"):
        encode_conversation(turns, tokenizer, num_visual_tokens=8, max_length=image_end)


def test_a_tokenizer_without_the_image_token_is_refused():
    with pytest.raises(ValueError, match="one special token"):
        encode_conversation(conversation("Q?", "A."), build_tiny_language_tokenizer(), 3, 512)


def test_collate_pads_right_and_masks_the_padding():
    images = [encode(photo(32, 24, seed=1)), encode(photo(20, 40, seed=2))]
    samples = [
        EncodedSample([5, 6, 7], [-100, 6, 7], images[0]),
        EncodedSample([8], [8], images[1]),
    ]
    seen = []

    def pixel_values(batch):
        seen.extend((image.mode, image.size) for image in batch)
        return torch.zeros(len(batch), 3, 8, 8)

    batch = collate(samples, pad_token_id=0, pixel_values=pixel_values)
    assert seen == [("RGB", (32, 24)), ("RGB", (20, 40))]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for k, t in batch.items() if k != "pixel_values")
