"""Ask a trained Florence-VL checkpoint about an image, for a quick look at what it learned.

    python -m engine.train.inference --checkpoint DIR --image PATH --question "..."

``DIR`` is a committed checkpoint folder (``<output>/checkpoints/<stage>-step<N>``) or a
run's output, whose latest committed checkpoint is then used. The model is rebuilt from
the checkpoint's ``config.json`` (the same checkpoints, or the same tiny models, as in
training) and its weights loaded; decoding is greedy. A checkpoint whose stage failed
its image check (kept under ``image_check.on_fail: warn``) loads with a warning: its
answers come from the texts it learnt, not from the image.
"""

from __future__ import annotations

import argparse
import functools
import io
import posixpath
import sys
import warnings
from pathlib import Path

import fsspec
import torch
from PIL import Image, ImageOps

from engine.train.checkpoint import (
    MARKER,
    latest_checkpoint,
    load_config,
    load_file,
    read_marker,
)
from engine.train.data import with_image
from engine.train.model import FlorenceVL, FlorenceVLProcessor, build_florence_vl


def resolve_checkpoint(path: str) -> str:
    """A committed checkpoint folder: ``path`` itself, or the latest one under a run's output."""
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(posixpath.join(root, MARKER)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a committed checkpoint nor a run's output")
    return latest


@functools.lru_cache(maxsize=2)
def load_trained(checkpoint: str) -> tuple[FlorenceVL, FlorenceVLProcessor, torch.device]:
    """The model of a checkpoint, in eval mode on a GPU when there is one (cached)."""
    checkpoint = resolve_checkpoint(checkpoint)
    check = read_marker(checkpoint).get("image_check")
    if check is not None and not check["passed"]:
        warnings.warn(
            f"{checkpoint} failed its image check (loss {check['true_images']:.4f} with the "
            f"images, {check['shuffled_images']:.4f} shuffled): it answers from the texts "
            "it learnt, not from the image",
            stacklevel=2,
        )
    model, processor = build_florence_vl(load_config(checkpoint))
    model.load_state_dict(load_file(checkpoint, "model.pt"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor, device


def prompt_ids(processor: FlorenceVLProcessor, question: str) -> list[int]:
    """The user turn with the image in front, as training renders it, then the answer's cue.

    The image is laid out as in training (``with_image``); the chat template's generation
    prompt follows the question.
    """
    tokenizer = processor.tokenizer
    content = with_image(question, processor.num_visual_tokens)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer(
    checkpoint: str,
    image: Image.Image | str | Path,
    question: str,
    max_new_tokens: int = 128,
) -> str:
    """The model's greedy answer to ``question`` about ``image`` (a PIL image or a path/URL).

    ``checkpoint``: a checkpoint folder or a run's output (its latest checkpoint). The
    model is loaded once per checkpoint and kept for later calls.
    """
    model, processor, device = load_trained(checkpoint)
    if not isinstance(image, Image.Image):
        with fsspec.open(str(image), "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
    image = ImageOps.exif_transpose(image).convert("RGB")
    input_ids = torch.tensor([prompt_ids(processor, question)], device=device)
    generated = model.generate(
        pixel_values=processor.pixel_values([image]).to(device),
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return processor.tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.train.inference", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run output")
    parser.add_argument("--image", required=True, help="image path or URL")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    print(answer(args.checkpoint, args.image, args.question, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
