"""Florence-VL training throughput: samples/s and tokens/s of the recipe's training step.

    .venv/bin/python tests/bench/bench_train.py [--steps 30] [--batch-size 8] [--threads N]
    .venv/bin/python tests/bench/bench_train.py --realistic [--steps 20] [--batch-size 8]

Tiny (default, CPU): ``engine/configs/florence_vl_tiny.yaml`` on generated images with
captions; the full recipe step (encode, forward, backward, clip, AdamW) of stage 1, after
3 warm-up steps. Tokens are the non-padding tokens the LM reads, visual tokens included.

Realistic (``--realistic``, GPU): the tiny builders at Florence-2-base's text size (a
6+6-layer d=768 BART encoder for the breadth passes; DaViT widths 192/192/384/384, one block
per stage, so lighter than base's) at 768 px (577 visual tokens), and a ~0.5B Llama-shaped
LM (30 layers, d=1024, 16 heads), random-initialised from configs, bf16 autocast, stage 1
(everything trains). Model FLOPs utilisation:
``MFU = 6 * N_lm * T_lm + 6 * N_tower * T_tower  /  time  /  peak``
with N the parameter counts, T_lm the tokens the LM reads, T_tower the tokens the tower's
encoder reads (1 + breadth passes over 577 image tokens plus prompts, per image); 6 = 2
forward + 4 backward FLOPs per parameter and token; attention FLOPs left out (small at
these lengths). Peak: the GPU's dense bf16 (H100 SXM 989 TFLOP/s, H200 the same, A100 312).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from PIL import Image, ImageDraw

from engine.config import load_config
from engine.train.data import collate, encode_conversation
from engine.train.instructions import Conversation, Turn
from engine.train.model import build_florence_vl

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}


def conversations(n: int, size: int, words: int) -> list[Conversation]:
    out = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        image = Image.new("RGB", (size, size), (128, 128, 128))
        ImageDraw.Draw(image).ellipse([size // 8, size // 8, size // 2, size // 2], COLOURS[colour])
        data = io.BytesIO()
        image.save(data, "JPEG")
        caption = " ".join([f"A {colour} circle on grey."] * max(1, words // 5))
        turns = (Turn("user", "Describe the image in detail."), Turn("assistant", caption))
        out.append(Conversation(data.getvalue(), turns, f"img{i}", "caption"))
    return out


def realistic_overrides() -> list[str]:
    return [
        "train.vision.checkpoint=null",
        "train.vision.tiny={hidden_size: 768, layers: 6, heads: 12, image_size: 768}",
        "train.language_model.checkpoint=null",
        "train.language_model.tiny={hidden_size: 1024, layers: 30, heads: 16}",
        "train.precision=bf16",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--realistic", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny mode)")
    parser.add_argument("--caption-words", type=int, default=20)
    args = parser.parse_args()

    device = torch.device("cuda" if args.realistic else "cpu")
    if args.realistic and not torch.cuda.is_available():
        sys.exit("--realistic needs a GPU")
    torch.set_num_threads(args.threads)
    overrides = realistic_overrides() if args.realistic else []
    cfg = load_config("engine/configs/florence_vl_tiny.yaml", overrides).train
    model, processor = build_florence_vl(cfg)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.realistic)
    size = cfg.vision.tiny.image_size
    pool = conversations(64, size, args.caption_words)

    def step(i: int) -> tuple[int, int]:
        chunk = [pool[(i * args.batch_size + k) % len(pool)] for k in range(args.batch_size)]
        samples = [
            encode_conversation(c, processor.tokenizer, processor.num_visual_tokens, 2048)
            for c in chunk
        ]
        batch = collate(samples, processor.tokenizer.pad_token_id, processor.pixel_values)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(chunk), int(batch["attention_mask"].sum())

    for i in range(3):  # warm-up: allocator, kernels, autotuning
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples = tokens = 0
    started = time.perf_counter()
    for i in range(args.steps):
        n, t = step(i)
        samples, tokens = samples + n, tokens + t
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{args.threads}"
    n_tower = sum(p.numel() for p in model.vision_tower.parameters())
    n_lm = sum(p.numel() for p in model.language_model.parameters())
    n_proj = sum(p.numel() for p in model.projector.parameters())
    print(f"device: {name}")
    print(
        f"parameters (M): tower {n_tower / 1e6:.1f}  projector {n_proj / 1e6:.1f}  "
        f"LM {n_lm / 1e6:.1f}"
    )
    print(
        f"visual tokens per image {processor.num_visual_tokens}; per sample {tokens / samples:.0f}"
    )
    print(f"{args.steps} steps of {args.batch_size}: {seconds:.2f}s")
    print(f"  {samples / seconds:.1f} samples/s  {tokens / seconds:.0f} tokens/s")
    if device.type == "cuda":
        tower_tokens = (
            samples * (1 + len(cfg.vision.breadth_tasks)) * (model.vision_tower.num_tokens + 16)
        )
        flops = 6 * (n_lm + n_proj) * tokens + 6 * n_tower * tower_tokens
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        achieved = flops / seconds
        mfu = f"  MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        print(f"  model FLOPs {achieved / 1e12:.1f} TFLOP/s{mfu}")
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
