"""Tiny OWLv2 and Grounding DINO checkpoints built offline, for the detection specialists.

Each builder writes a randomly initialised model of the real architecture and the real
processor class to a folder that ``from_pretrained`` loads like a hub checkpoint:

- OWLv2: a CLIP tokenizer (byte-level BPE with CLIP's ``</w>`` word ends, here without
  merges, so words are spelled letter by letter) padding every query to OWLv2's 16
  tokens with ``!`` (id 0) as the released tokenizer does; the end-of-text token has the
  highest id, because OWLv2 pools the text at ``argmax(input_ids)``.
- Grounding DINO: a BERT WordPiece tokenizer whose ``[CLS]``, ``[SEP]``, ``.`` and ``?``
  sit at bert-base-uncased's ids (101, 102, 1012, 1029): the model splits its text into
  phrases at exactly those ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    SwinConfig,
)

# OWLv2: a 64-pixel square in 16-pixel patches gives 16 candidate boxes per image.
OWL_IMAGE_SIZE = 64
OWL_QUERY_LENGTH = 16
# Grounding DINO: 24 detection slots per prompt. Images are resized to 96..144 pixels: the
# coarsest feature level (1/64 of the image) needs more than one pixel for its GroupNorm.
DINO_QUERIES = 24

# Words spelled whole in the BERT vocabulary; any other word falls back to letters.
_WORDS = ("a", "an", "the", "dog", "cat", "ball", "red", "brown", "green", "grass", "on", "in")


def _clip_tokenizer() -> CLIPTokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # "!" first, so the padding token has id 0, as in the released OWLv2 tokenizer.
    alphabet.remove("!")
    symbols = ["!", *alphabet]
    vocab = {s: i for i, s in enumerate([*symbols, *(f"{s}</w>" for s in symbols)])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=OWL_QUERY_LENGTH)


def build_owlv2(folder: Path) -> Path:
    """Save a tiny OWLv2 checkpoint with its processor under ``folder``; returns it."""
    tokenizer = _clip_tokenizer()
    config = Owlv2Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": OWL_QUERY_LENGTH,
            "pad_token_id": 0,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": OWL_IMAGE_SIZE,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    image_processor = Owlv2ImageProcessor(size={"height": OWL_IMAGE_SIZE, "width": OWL_IMAGE_SIZE})
    model = Owlv2ForObjectDetection(config).eval()
    # Random box-head weights saturate the sigmoid into zero-width boxes on the image's
    # edges; scaled down, each box stays near its patch, where OWLv2's box bias puts it.
    with torch.no_grad():
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _bert_vocab() -> dict[str, int]:
    """A WordPiece vocabulary with bert-base-uncased's ids for the tokens the model reads."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    punctuation = list(",;:!'\"-()")
    tokens = [*letters, *(f"##{c}" for c in letters), *punctuation, *_WORDS]
    fixed = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    fixed |= {".": 1012, "?": 1029}
    vocab = dict(fixed)
    free = (i for i in range(1030 + len(tokens)) if i not in fixed.values())
    for token in tokens:
        vocab[token] = next(free)
    for i in free:
        vocab[f"[unused{i}]"] = i
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def build_grounding_dino(folder: Path) -> Path:
    """Save a tiny Grounding DINO checkpoint with its processor under ``folder``; returns it."""
    tokenizer = BertTokenizer(vocab=_bert_vocab())
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=DINO_QUERIES,
    )
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 144})
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder
