"""Tiny, randomly initialised checkpoints of real vision architectures, built offline.

Each builder writes a model and its processor with ``save_pretrained`` into a folder,
so a specialist loads it by local path exactly as it would load a hub checkpoint.
Tokenizers are the classes the released checkpoints use, trained here on a few
sentences: WordPiece for BLIP (BERT's), byte-level BPE for the OPT and Llama language
models; CLIP's is character-level. Seeds are fixed, so a builder always writes the same
weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    GPT2Tokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SamConfig,
    SamImageProcessor,
    SamModel,
    SamProcessor,
)

from engine.train.tiny import train_byte_level_bpe

CORPUS = [
    "a dog sitting on a couch next to a red ball",
    "two cats sleeping on a bed in a sunny room",
    "a man riding a bicycle down a busy city street",
    "a plate of food with rice, beans and a fork on a wooden table",
    "describe the image in detail. what is shown in this picture?",
    "the photo shows a green field with trees and a blue sky with clouds",
]
# Vision towers see 32x32 images in 8x8 patches: 16 image tokens.
IMAGE_SIZE = 32
PATCH_SIZE = 8
# The released chat templates differ per model; this one has the parts that matter: a
# user turn holding the image placeholder and the prompt, then the assistant's cue.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
_SMALL_VISION = {
    **_SMALL,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}


def _wordpiece_vocab(special_tokens: list[str]) -> dict[str, int]:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=special_tokens, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.get_vocab()


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer over single characters: every byte-level symbol, alone and
    word-final (``</w>``), with no merges. Unlike a trained vocabulary, whose ties fall
    differently from run to run, the ids are the same in every process, so a seeded
    model embeds each text the same way every time."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [*specials, *alphabet, *(f"{c}</w>" for c in alphabet)]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    # CLIP's context is 77 tokens; 32 characters hold the short texts of the tests.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def _opt_style_tokenizer(**special: str) -> GPT2Tokenizer:
    """Byte-level BPE with OPT's special tokens at OPT's ids: <s>=0 <pad>=1 </s>=2 <unk>=3."""
    vocab, merges = train_byte_level_bpe(CORPUS, ["<s>", "<pad>", "</s>", "<unk>"], vocab_size=400)
    return GPT2Tokenizer(
        vocab=vocab, merges=merges, pad_token="<pad>", unk_token="<unk>", **special
    )


def build_sam(path: Path) -> Path:
    """SAM at 64 pixels: 8x8 image embeddings, 32x32 low-resolution masks."""
    torch.manual_seed(0)
    config = SamConfig(
        vision_config={
            "hidden_size": 32,
            "output_channels": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "window_size": 4,
            "global_attn_indexes": [1],
            # Positional features of prompts: 2 * num_pos_feats = the decoder's width.
            "num_pos_feats": 16,
            "mlp_dim": 64,
        },
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": 64,
            "patch_size": 8,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    image_processor = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamModel(config).save_pretrained(path)
    SamProcessor(image_processor).save_pretrained(path)
    return path


def build_blip(path: Path, always_stop: bool = False, always_say: str | None = None) -> Path:
    """BLIP captioning; ``always_stop`` makes the decoder end every caption at once,
    ``always_say`` (a word of ``CORPUS``) makes it write that word at every step, so a
    caption is known in advance whatever the vocabulary's training made of the ids."""
    torch.manual_seed(0)
    vocab = _wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"])
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    text = {
        **_SMALL,
        "vocab_size": len(tokenizer),
        "encoder_hidden_size": 32,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        # BLIP's layout: the decoder starts from [DEC] and stops at [SEP].
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = BlipConfig(text_config=text, vision_config=_SMALL_VISION, projection_dim=32)
    model = BlipForConditionalGeneration(config)
    bias = {tokenizer.sep_token_id: 1e4} if always_stop else {}
    if always_say is not None:
        bias[tokenizer.convert_tokens_to_ids(always_say)] = 1e4
    with torch.no_grad():
        for token, value in bias.items():
            model.text_decoder.cls.predictions.bias[token] = value
    model.save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor, tokenizer).save_pretrained(path)
    return path


def build_blip2(path: Path) -> Path:
    """BLIP-2 with an OPT language model fed by 4 Q-Former query tokens."""
    torch.manual_seed(0)
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        _opt_style_tokenizer(bos_token="</s>", eos_token="</s>"),
        num_query_tokens=4,
    )
    tokenizer = processor.tokenizer  # the processor added its <image> token
    text = {
        "model_type": "opt",
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "word_embed_proj_dim": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    qformer = {**_SMALL, "num_attention_heads": 2, "encoder_hidden_size": 32}
    config = Blip2Config(
        vision_config=_SMALL_VISION,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_llava(path: Path) -> Path:
    """LLaVA (CLIP vision tower, Llama language model) with a chat template."""
    torch.manual_seed(0)
    tokenizer = _opt_style_tokenizer(
        bos_token="<s>", eos_token="</s>", extra_special_tokens=["<image>"]
    )
    tokenizer.image_token = "<image>"
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops
    )
    text = {
        "model_type": "llama",
        **_SMALL,
        "vocab_size": len(tokenizer),
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_SMALL_VISION, "projection_dim": 32},
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_clip(path: Path) -> Path:
    """CLIP with 16-dimensional image and text embeddings; texts of up to 16 tokens."""
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    text = {
        **_SMALL,
        "num_attention_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        # The text embedding is read at the end token: its id must be the tokenizer's.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(text_config=text, vision_config=_SMALL_VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor, tokenizer).save_pretrained(path)
    return path
