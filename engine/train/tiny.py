"""Tiny random-initialised models of the real architectures, built offline.

The tiny trainer config and the tests use these instead of checkpoints: the classes are the
ones a real run loads (``Florence2ForConditionalGeneration`` with ``Florence2Processor``,
``LlamaForCausalLM`` with a byte-level BPE tokenizer), only the sizes are small and the
weights random. Nothing is downloaded: the tokenizers are trained here on a few built-in
sentences, deterministically, so the same ``TinyModelConfig`` always gives the same
tokenizer and the same weights.

Florence-2. The tokenizer is the class Florence-2 checkpoints use (``BartTokenizer``:
byte-level BPE) plus the tokens Florence-2 adds to BART's vocabulary (``<od>``,
``<loc_0>``..``<loc_999>``, ``<poly>``, ``<sep>``, ...) and the ``<image>`` placeholder.
Task tokens such as ``<OD>`` are not in the vocabulary: the processor replaces them with
natural-language prompts before tokenising. The post-processor configuration is the one
the released checkpoints ship, so parsing behaves as with a real model. The model matches
the processor: ``text_config.vocab_size = len(tokenizer)``, ``image_token_id``, BART's
``bos/pad/eos = 0/1/2`` with ``decoder_start_token_id = 2``, and a DaViT that turns an
``image_size`` square into the number of tokens the processor makes room for.
"""

from __future__ import annotations

import functools
import json
import math

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartTokenizer,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from engine.train.config import TinyModelConfig
from filters.grounding import BANNED_GROUNDING_TOKENS

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

POST_PROCESSOR_CONFIG = {
    "ocr": {},
    # The released processor's list of phrases that phrase-grounding parsing drops.
    "phrase_grounding": {"banned_grounding_tokens": sorted(BANNED_GROUNDING_TOKENS)},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

# Enough English for merges of common words and Florence-2's prompt wording.
FLORENCE2_CORPUS = [
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
_FLORENCE2_BPE_VOCAB_SIZE = 512

# The causal LM's vocabulary: the wording of captions, questions about regions, counts and
# text in images. Every byte is in the vocabulary besides, so any text encodes.
LM_CORPUS = [
    *FLORENCE2_CORPUS,
    "Describe the image in detail. The image shows a kitchen with a white table and chairs.",
    "What is in the region? A black cat sleeps on a blue sofa near the window.",
    "Where is the person in the image? The person stands on the left, next to a bicycle.",
    "How many cars are in the image? There are 3 cars. There is 1 dog and 2 birds.",
    "What does the sign say? The sign says OPEN. The text reads: Main Street 42.",
    "Find the red umbrella. The red umbrella is at the top right of the picture.",
    "A woman in a yellow coat walks a small white dog along a busy city street at night.",
    "The photo shows a plate of food: rice, green beans and a slice of lemon on the side.",
    "Which object is the largest? The largest object is the tree in the background.",
    "Boxes are [x1, y1, x2, y2] in thousandths of the width and height: [120, 85, 640, 930].",
]
_LM_BPE_VOCAB_SIZE = 1024

# Role markers as special tokens (Phi-3's spelling), so a turn's boundaries are single
# tokens the data layer can find and the model cannot confuse with text. The end-of-turn
# marker is the eos token: generation stops when the assistant's turn ends.
LM_BOS, LM_EOS, LM_PAD = "<s>", "<|end|>", "<pad>"
LM_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
LM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_byte_level_bpe(
    corpus: list[str], special_tokens: list[str], vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE trained on ``corpus``.

    The special tokens take the first ids, in order. Training is deterministic for a fixed
    corpus, so the tokenizer is the same in every process.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        # Every byte is in the vocabulary, so any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


@functools.lru_cache(maxsize=1)
def _florence2_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Shared by every processor of the process; callers copy before handing it on.
    return train_byte_level_bpe(FLORENCE2_CORPUS, BART_SPECIAL_TOKENS, _FLORENCE2_BPE_VOCAB_SIZE)


def florence2_image_tokens(image_size: int, stride: int = 32) -> int:
    """Visual tokens Florence-2 makes of an ``image_size`` square.

    DaViT with its default patch strides (4, 2, 2, 2) downsamples by 32; the projector adds
    one pooled token to the grid (577 = 24 * 24 + 1 at the checkpoints' 768 pixels).
    """
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 (DaViT's stride), got {image_size}")
    vision_patch_strides(stride)  # one of the strides the tower can have
    return (image_size // stride) ** 2 + 1


def vision_patch_strides(stride: int) -> list[int]:
    """DaViT's per-stage patch strides for a total ``stride``: the released (4, 2, 2, 2)
    with the last stages' downsampling dropped, so every stage keeps its own width."""
    strides = [4, 2, 2, 2]
    for stage in (3, 2):
        if math.prod(strides) > stride:
            strides[stage] = 1
    if math.prod(strides) != stride:
        raise ValueError(f"a DaViT stride of {stride} is not one of 8, 16, 32")
    return strides


def build_tiny_florence2_processor(image_size: int = 64, stride: int = 32) -> Florence2Processor:
    """A real ``Florence2Processor`` for ``image_size`` squares with a locally trained BPE,
    for a tower that downsamples by ``stride``."""
    vocab, merges = _florence2_bpe()
    tokenizer = BartTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        extra_special_tokens=FLORENCE2_TOKENS,
        image_token="<image>",
    )
    # The released checkpoints' image preprocessing (resize, no crop, ImageNet statistics),
    # at a tiny size.
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=florence2_image_tokens(image_size, stride),
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def build_tiny_florence2(
    cfg: TinyModelConfig,
) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """A random-initialised ``Florence2ForConditionalGeneration`` and its processor.

    Sizes: the BART encoder-decoder has ``cfg.layers`` layers each side, width
    ``cfg.hidden_size`` and ``cfg.heads`` heads; DaViT keeps its four stages (one block each)
    with widths ``hidden_size * (1/4, 1/4, 1/2, 1/2)`` and strides making ``cfg.vision_stride``
    (``vision_patch_strides``), and projects
    to ``hidden_size``, the width of the depth and breadth features. ``hidden_size`` must be
    a multiple of ``4 * heads`` so that every stage splits evenly into heads. Dropout is off,
    so a few examples are learnt in a few dozen steps. The model is returned in eval mode;
    the global random state is left as it was.
    """
    d, heads = cfg.hidden_size, cfg.heads
    if d % (4 * heads):
        raise ValueError(f"hidden_size ({d}) must be a multiple of 4 * heads ({4 * heads})")
    processor = build_tiny_florence2_processor(cfg.image_size, cfg.vision_stride)
    tokenizer = processor.tokenizer
    stage_heads = [max(1, heads // 2)] * 2 + [heads] * 2
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[d // 4, d // 4, d // 2, d // 2],
        num_heads=stage_heads,
        num_groups=stage_heads,
        window_size=2,
        patch_stride=vision_patch_strides(cfg.vision_stride),
        # A learned position per row and column of the grid: 50 as released (768 px).
        max_position_embeddings=max(50, cfg.image_size // cfg.vision_stride),
        projection_dim=d,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=d,
        encoder_layers=cfg.layers,
        decoder_layers=cfg.layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d,
        decoder_ffn_dim=2 * d,
        # Room for the visual tokens plus a prompt of a hundred-odd tokens.
        max_position_embeddings=max(
            256, florence2_image_tokens(cfg.image_size, cfg.vision_stride) + 128
        ),
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Florence2ForConditionalGeneration(config)
    return model.eval(), processor


def build_tiny_language_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny causal LM's tokenizer: byte-level BPE with bos/eos/pad and a chat template.

    ``apply_chat_template`` renders ``<s><|user|>\\n{content}<|end|>\\n<|assistant|>\\n...``
    (Phi-3's layout); ``<|end|>`` is the eos token. No token is added by ``__call__``: the
    template writes the bos token itself.
    """
    specials = [LM_BOS, LM_EOS, LM_PAD, *LM_ROLE_TOKENS]
    vocab, merges = train_byte_level_bpe(LM_CORPUS, specials, _LM_BPE_VOCAB_SIZE)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=LM_BOS,
        eos_token=LM_EOS,
        pad_token=LM_PAD,
        extra_special_tokens=LM_ROLE_TOKENS,
    )
    tokenizer.chat_template = LM_CHAT_TEMPLATE
    return tokenizer


def build_tiny_language_model(
    cfg: TinyModelConfig,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random-initialised ``LlamaForCausalLM`` and its tokenizer.

    ``cfg.layers`` decoder layers of width ``cfg.hidden_size`` with ``cfg.heads`` heads (no
    grouped-query sharing), an MLP four times as wide, untied input and output embeddings
    as in Llama. ``cfg.image_size`` is not used. The model is returned in eval mode; the
    global random state is left as it was.
    """
    if cfg.hidden_size % cfg.heads:
        raise ValueError(f"hidden_size ({cfg.hidden_size}) must be a multiple of heads")
    tokenizer = build_tiny_language_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        # RoPE has no weights, so a long context costs nothing until it is used.
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer
