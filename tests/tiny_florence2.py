"""A real ``Florence2Processor`` built offline, small enough for unit tests.

The tokenizer is the class Florence-2 checkpoints use (``BartTokenizer``: byte-level BPE),
trained here on a few sentences, plus the tokens Florence-2 adds to BART's vocabulary
(``<od>``, ``<loc_0>``..``<loc_999>``, ``<poly>``, ``<sep>``, ...) and the ``<image>``
placeholder. Task tokens such as ``<OD>`` are not in the vocabulary: the processor replaces
them with natural-language prompts before tokenising. The post-processor configuration is
the one the released checkpoints ship, so parsing behaves as with a real model.

A tiny ``Florence2ForConditionalGeneration`` made to match needs:
- ``text_config.vocab_size = len(processor.tokenizer)``;
- ``image_token_id = processor.tokenizer.image_token_id``;
- ``bos/pad/eos_token_id = 0/1/2`` (BART's layout, kept here) and
  ``decoder_start_token_id = 2``;
- a vision tower that turns an ``IMAGE_SIZE`` square into ``IMAGE_SEQ_LENGTH`` tokens.
"""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartTokenizer,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
)

# DaViT with its default patch strides (4, 2, 2, 2) downsamples by 32; the projector adds
# one pooled token to the grid (577 = 24 * 24 + 1 at the checkpoints' 768 pixels).
IMAGE_SIZE = 64
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // 32) ** 2 + 1

# BART's special tokens at BART's ids: <s>=0, <pad>=1, </s>=2, <unk>=3.
BART_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

# What Florence-2 adds to BART's vocabulary, in the checkpoints' order and spelling
# ("desciption" included).
FLORENCE2_TOKENS = [
    "<od>", "</od>", "<ocr>", "</ocr>",
    *(f"<loc_{i}>" for i in range(1000)),
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
    "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
    "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
]  # fmt: skip

# The released processor's list of phrases that phrase-grounding parsing drops.
_BANNED_WORDS = """
it I me mine you your yours he him his she her hers they them their theirs one oneself we us
our ours its myself yourself himself herself itself ourselves yourselves themselves this that
these those who whom whose which what all another any anybody anyone anything each everybody
everyone everything few many nobody none several some somebody someone something image
images the a an lots
"""
BANNED_GROUNDING_TOKENS = [
    *_BANNED_WORDS.split(),
    "each other",
    "one another",
    "the image",
    "a group",
    "other objects",
    "a set",
]

POST_PROCESSOR_CONFIG = {
    "ocr": {},
    "phrase_grounding": {"banned_grounding_tokens": BANNED_GROUNDING_TOKENS},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

# Enough English for merges of common words and the processor's prompt wording.
CORPUS = [
    "What does the image describe? Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image, with their descriptions.",
    "Locate the region proposals in the image. Locate the phrases in the caption:",
    "What is the text in the image, with regions? What text is in the region?",
    "What is the polygon mask of region? Locate it in the image with mask.",
    "A brown dog runs across the green grass next to a red ball and a wooden fence.",
    "Two people sit at a table with cups of coffee, a laptop and a stack of books.",
    "A street sign reads STOP at the corner of 5th Avenue; cars wait at the light.",
]
BPE_VOCAB_SIZE = 512


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE trained on ``CORPUS``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=BART_SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


@functools.lru_cache(maxsize=1)
def build_florence2_processor() -> Florence2Processor:
    """The tiny processor; built once per process and shared, so callers must not mutate it."""
    vocab, merges = _train_bpe()
    tokenizer = BartTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=FLORENCE2_TOKENS,
        image_token="<image>",
    )
    # The released checkpoints' image preprocessing (resize, no crop, ImageNet statistics),
    # at a tiny size.
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def build_tiny_florence2_model(seed: int = 0) -> Florence2ForConditionalGeneration:
    """A randomly initialised ``Florence2ForConditionalGeneration`` that fits the processor.

    DaViT keeps its four stages (one block each, a few channels) and its default strides,
    so an ``IMAGE_SIZE`` square becomes the ``IMAGE_SEQ_LENGTH`` tokens the processor makes
    room for; the language model is a one-layer BART encoder-decoder. Dropout is off, so
    training it on a few examples converges in a few dozen steps.
    """
    tokenizer = build_florence2_processor().tokenizer
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 8, 16, 16],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        # BART's default forces </s> at max_length; Florence-2 checkpoints do not.
        forced_eos_token_id=None,
    )
    config = Florence2Config(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id
    )
    torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(config).eval()
