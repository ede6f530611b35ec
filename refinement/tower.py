"""Dense pretraining of a Florence-2 student's vision tower on a round's own object boxes.

A small Florence-2 trained from scratch learns the grammar of its targets and ignores
the image: the decoder can lower its loss faster from the text than from random visual
features. Offline there are no pretrained weights, so ``pretrain_tower`` gives the
DaViT tower a reason to encode where the objects are before the student trains: a
CenterNet-style head (Zhou et al., "Objects as Points", 2019) on the tower's last
feature map, the one Florence-2's projector turns into visual tokens, learns from the
round's ``object`` regions

- a class-agnostic centre heatmap (focal loss against Gaussian peaks),
- each object's width and height (L1) and the sub-cell offset of its centre (L1).

Only the tower and the head train; the head is thrown away afterwards, so the model
leaves with a changed tower and an untouched projector and language model.

Images go through the processor's own image processor, so the tower learns on the
pixels (size, resize, normalisation) the student will give it. The held-out images
(``engine.train.stream.is_held_out``, the same hash as the student's image check) are
never trained on; the head's decoded peaks on them are scored with class-agnostic box
AP50 (``refinement.metrics.evaluate``) before and after, as a health figure: a tower
whose head cannot find the objects has learnt nothing the student could use.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.config import TowerConfig
from engine.geometry import all_finite
from engine.records import ImageRecord, Region
from engine.train.data import ReadStats, shard_records
from engine.train.stream import is_held_out
from refinement.metrics import evaluate
from refinement.student_data import is_validation

if TYPE_CHECKING:
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

# Images read ahead and drawn from at random: shards are written in unit order, so
# neighbours share a unit.
SHUFFLE_BUFFER = 256
# CenterNet's loss weights: sizes are in feature cells, so their L1 is large next to the
# focal loss and is scaled down; offsets lie in [0, 1) and keep weight 1.
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0
# The IoU at which a box of the Gaussian's radius still overlaps the true box
# (CenterNet's ``gaussian_radius``): negatives near a centre are penalised less.
GAUSSIAN_MIN_OVERLAP = 0.7
# Peaks kept per image: COCO's AP looks at 100 detections per image.
MAX_DETECTIONS = 100
# Sigmoid of this bias is 0.1: a new heatmap starts near the background rate, so the
# focal loss does not begin with a burst of confident false positives (CenterNet).
HEATMAP_PRIOR_BIAS = -2.19


@dataclass
class TowerReport:
    """What a tower pretraining did; AP50s are class-agnostic, on held-out images."""

    steps: int
    seconds: float
    samples_per_s: float
    first_loss: float
    # Mean over the last ``log_every`` steps: one step's loss is too noisy to compare.
    final_loss: float
    heldout_images: int
    ap50: float | None
    untrained_ap50: float | None


# ---------------------------------------------------------------- data


def shard_images(urls: Sequence[str], stats: ReadStats) -> Iterator[tuple[bytes, ImageRecord]]:
    """``(image bytes, record)`` of every sample of the shards, in shard order."""
    for url in urls:
        for _, _, record, image in shard_records(url, stats):
            yield image, record


def object_boxes(record: ImageRecord) -> list[tuple[float, ...]]:
    """The record's object boxes that have an area, in pixels of the record's image."""
    boxes = [r.box for r in record.regions if r.kind == "object" and all_finite(r.box)]
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


def preprocess(processor: Florence2Processor, images: Sequence[bytes]) -> torch.Tensor:
    """The images as the student's processor gives them to the model: ``(B, 3, H, W)``.

    Decoded as ``refinement.student_data.encode`` decodes them. The box targets assume
    a plain resize to ``H x W``; a processor that crops would cut boxes it does not know
    of, so it is refused.
    """
    image_processor = processor.image_processor
    if getattr(image_processor, "do_center_crop", False):
        raise ValueError("tower pretraining needs an image processor that resizes, not crops")
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    return image_processor(images=decoded, return_tensors="pt")["pixel_values"]


def _training_stream(
    urls: Sequence[str], config: TowerConfig, stats: ReadStats, validation_fraction: float
) -> Iterator[tuple[bytes, ImageRecord]]:
    """Endless training images: each epoch reads the shards in a seeded order through a
    shuffle buffer, skipping held-out images and the merge policy's validation images."""
    epoch = 0
    while True:
        rng = random.Random(f"tower/{config.seed}/{epoch}")
        buffer: list[tuple[bytes, ImageRecord]] = []
        read = 0
        for item in shard_images(rng.sample(list(urls), len(urls)), stats):
            record = item[1]
            if is_held_out(record.image_id, config.holdout_fraction) or is_validation(
                record, validation_fraction
            ):
                continue
            read += 1
            buffer.append(item)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
        if read == 0:
            raise ValueError(f"no training images in {len(urls)} shard(s): all held out?")
        epoch += 1


def _held_out(
    urls: Sequence[str], config: TowerConfig, stats: ReadStats
) -> list[tuple[bytes, ImageRecord]]:
    images = []
    for item in shard_images(urls, stats):
        if is_held_out(item[1].image_id, config.holdout_fraction):
            images.append(item)
            if len(images) == config.eval_images:
                break
    return images


# ---------------------------------------------------------------- targets


def gaussian_radius(
    height: float, width: float, min_overlap: float = GAUSSIAN_MIN_OVERLAP
) -> float:
    """CenterNet's radius: the largest corner shift that keeps a box of this size at
    ``min_overlap`` IoU with the true one (the smallest of its three cases)."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
    sigma = (2 * radius + 1) / 6
    ys, xs = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    gaussian = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    window = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    patch = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    # Overlapping objects keep the higher value, so each centre stays exactly 1.
    np.maximum(window, patch, out=window)


@dataclass
class _Targets:
    heatmap: torch.Tensor  # (B, 1, h, w), 1 at each object's centre cell
    index: torch.Tensor  # (B, M) flat cell of each object's centre
    size: torch.Tensor  # (B, M, 2) width, height in cells
    offset: torch.Tensor  # (B, M, 2) centre minus its cell, in [0, 1)
    mask: torch.Tensor  # (B, M) 1 for real objects, 0 for padding


def _targets(boxes: Sequence[np.ndarray], grid: tuple[int, int]) -> _Targets:
    """CenterNet targets for boxes given in heatmap cells, one ``(N, 4)`` array per image."""
    h, w = grid
    count = max(1, max(len(b) for b in boxes))
    heatmap = np.zeros((len(boxes), 1, h, w), np.float32)
    index = np.zeros((len(boxes), count), np.int64)
    size = np.zeros((len(boxes), count, 2), np.float32)
    offset = np.zeros((len(boxes), count, 2), np.float32)
    mask = np.zeros((len(boxes), count), np.float32)
    for i, image_boxes in enumerate(boxes):
        for j, (x0, y0, x1, y1) in enumerate(image_boxes):
            bw, bh = x1 - x0, y1 - y0
            centre = ((x0 + x1) / 2, (y0 + y1) / 2)
            cx, cy = min(int(centre[0]), w - 1), min(int(centre[1]), h - 1)
            radius = max(0, int(gaussian_radius(math.ceil(bh), math.ceil(bw))))
            _draw_gaussian(heatmap[i, 0], cx, cy, radius)
            index[i, j] = cy * w + cx
            size[i, j] = (bw, bh)
            offset[i, j] = (centre[0] - cx, centre[1] - cy)
            mask[i, j] = 1
    return _Targets(*(torch.from_numpy(a) for a in (heatmap, index, size, offset, mask)))


# ---------------------------------------------------------------- head and loss


class CenterHead(nn.Module):
    """Upsampling neck and three CenterNet outputs on a ``(B, C, h, w)`` feature map.

    Each upsampling stage is a bilinear x2 then a 3x3 convolution (no transposed-conv
    checkerboard); GroupNorm, because a batch of a few images gives BatchNorm poor
    statistics. Outputs: heatmap logits ``(B, 1)``, sizes ``(B, 2)``, offsets ``(B, 2)``.
    """

    def __init__(self, in_channels: int, channels: int, upsamplings: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(upsamplings):
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(width, channels, 3, padding=1),
                nn.GroupNorm(min(8, channels), channels),
                nn.ReLU(inplace=True),
            ]
            width = channels
        self.neck = nn.Sequential(*layers)
        self.heatmap, self.size, self.offset = (self._output(width, channels, n) for n in (1, 2, 2))
        nn.init.constant_(self.heatmap[-1].bias, HEATMAP_PRIOR_BIAS)

    @staticmethod
    def _output(width: int, channels: int, out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(width, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out, 1),
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.neck(features)
        return self.heatmap(x), self.size(x), self.offset(x)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), per object."""
    positive = target.eq(1).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    positive_loss = (log_p * (1 - p) ** 2 * positive).sum()
    negative_loss = (log_not_p * p**2 * (1 - target) ** 4 * (1 - positive)).sum()
    return -(positive_loss + negative_loss) / positive.sum().clamp(min=1)


def _at_centres(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` values at flat cells ``(B, M)``: ``(B, M, C)``."""
    flat = values.flatten(2)
    return flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1)).transpose(1, 2)


def _masked_l1(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1)
    return (F.l1_loss(predicted, target, reduction="none") * weights).sum() / (
        weights.sum() * predicted.shape[-1]
    ).clamp(min=1)


def center_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: _Targets
) -> torch.Tensor:
    heatmap, size, offset = outputs
    return (
        focal_loss(heatmap, targets.heatmap)
        + SIZE_WEIGHT * _masked_l1(_at_centres(size, targets.index), targets.size, targets.mask)
        + OFFSET_WEIGHT
        * _masked_l1(_at_centres(offset, targets.index), targets.offset, targets.mask)
    )


def decode(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], top_k: int = MAX_DETECTIONS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(boxes in cells (K, 4), scores (K,))`` per image: the heatmap's local maxima
    (a 3x3 max-pool stands in for NMS, as in CenterNet), best ``top_k`` first."""
    heatmap, size, offset = outputs
    scores = heatmap.sigmoid()
    peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)
    _, _, h, w = scores.shape
    best, index = peaks.flatten(1).topk(min(top_k, h * w))
    size_at, offset_at = _at_centres(size, index), _at_centres(offset, index)
    cx = (index % w).float() + offset_at[..., 0]
    cy = (index // w).float() + offset_at[..., 1]
    half_w, half_h = size_at[..., 0].clamp(min=0) / 2, size_at[..., 1].clamp(min=0) / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
    return [(b.numpy(), s.numpy()) for b, s in zip(boxes.cpu(), best.cpu(), strict=True)]


# ---------------------------------------------------------------- pretraining


class _Pretraining:
    """The tower, its head and the pixels-to-cells geometry they share."""

    def __init__(
        self,
        model: Florence2ForConditionalGeneration,
        processor: Florence2Processor,
        config: TowerConfig,
    ) -> None:
        self.tower = model.model.vision_tower
        self.processor, self.config = processor, config
        vision = model.config.vision_config
        tower_stride = math.prod(vision.patch_stride)
        upsamplings = math.log2(tower_stride / config.output_stride)
        if upsamplings < 0 or upsamplings != int(upsamplings):
            raise ValueError(
                f"output_stride {config.output_stride} must be the tower's stride "
                f"{tower_stride} divided by a power of 2"
            )
        self.device = next(self.tower.parameters()).device
        self.head = CenterHead(vision.embed_dim[-1], config.head_channels, int(upsamplings))
        self.head.to(self.device)

    def outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.tower(pixels.to(self.device)).last_hidden_state
        return self.head(features.float())

    def cells(self, record: ImageRecord, pixels: torch.Tensor) -> tuple[float, float]:
        """Heatmap cells per pixel of the record's image, along x and y."""
        height, width = pixels.shape[-2:]
        stride = self.config.output_stride
        return width / record.width / stride, height / record.height / stride

    def batch(
        self, items: Sequence[tuple[bytes, ImageRecord]], rng: random.Random
    ) -> tuple[torch.Tensor, _Targets]:
        pixels = preprocess(self.processor, [image for image, _ in items])
        boxes = []
        for i, (_, record) in enumerate(items):
            sx, sy = self.cells(record, pixels[i])
            cells = np.asarray(object_boxes(record), np.float32).reshape(-1, 4) * (sx, sy, sx, sy)
            if self.config.flip and rng.random() < 0.5:
                pixels[i] = pixels[i].flip(-1)
                grid_width = pixels.shape[-1] / self.config.output_stride
                cells[:, [0, 2]] = grid_width - cells[:, [2, 0]]
            boxes.append(cells)
        grid = tuple(s // self.config.output_stride for s in pixels.shape[-2:])
        return pixels, _targets(boxes, grid)

    @torch.no_grad()
    def held_out_ap50(self, images: Sequence[tuple[bytes, ImageRecord]]) -> float | None:
        """Class-agnostic box AP50 of the head's peaks on ``images``."""
        if not images:
            return None
        modes = self.tower.training, self.head.training
        self.tower.eval(), self.head.eval()
        predictions = []
        for start in range(0, len(images), self.config.batch_size):
            chunk = images[start : start + self.config.batch_size]
            pixels = preprocess(self.processor, [image for image, _ in chunk])
            for (_, record), (boxes, scores), frame in zip(
                chunk, decode(self.outputs(pixels)), pixels, strict=True
            ):
                sx, sy = self.cells(record, frame)
                regions = [
                    Region(box / (sx, sy, sx, sy), "object", "object", "tower", score=float(s))
                    for box, s in zip(boxes, scores, strict=True)
                ]
                predictions.append(
                    dataclasses.replace(record, uri=record.image_id, regions=regions)
                )
        self.tower.train(modes[0]), self.head.train(modes[1])
        # Exported records carry no uri; evaluate pairs records by it, so the id stands in.
        truth = [dataclasses.replace(record, uri=record.image_id) for _, record in images]
        return evaluate(predictions, truth).box_agnostic.ap50


def _lr_factor(step: int, config: TowerConfig) -> float:
    # Linear warmup then cosine decay, the student's schedule.
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain_tower(
    model: Florence2ForConditionalGeneration,
    processor: Florence2Processor,
    shards: Sequence[str],
    config: TowerConfig,
    echo: Callable[[str], None] | None = print,
    validation_fraction: float = 0.0,
) -> TowerReport:
    """Train ``model``'s vision tower in place on the object boxes of ``shards``.

    ``validation_fraction``: of the human-labelled images, those the merge policy keeps
    for itself (``refine.policy.validation_fraction``), never trained on.

    ``model`` and ``processor``: a ``Florence2ForConditionalGeneration`` and its
    processor (``refinement.student.load_student``). Only the tower's weights change; its
    ``requires_grad`` flags and train/eval mode are restored afterwards. The result is a
    function of the model, the shards and ``config.seed``; the global random state is
    left as it was. ``echo`` gets a progress line every ``config.log_every`` steps.
    """
    stats = ReadStats()
    held_out = _held_out(shards, config, stats)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        run = _Pretraining(model, processor, config)
        untrained_ap50 = run.held_out_ap50(held_out)
        parameters = list(run.tower.parameters())
        flags, tower_mode = [p.requires_grad for p in parameters], run.tower.training
        for parameter in parameters:
            parameter.requires_grad_(True)
        run.tower.train()
        trained = parameters + list(run.head.parameters())
        optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(step, config)
        )
        rng = random.Random(f"tower/{config.seed}/flip")
        stream = _training_stream(shards, config, stats, validation_fraction)
        losses: list[float] = []
        started = time.perf_counter()
        for step in range(1, config.steps + 1):
            pixels, targets = run.batch([next(stream) for _ in range(config.batch_size)], rng)
            targets = _Targets(*(t.to(run.device) for t in dataclasses.astuple(targets)))
            loss = center_loss(run.outputs(pixels), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if echo is not None and (step % config.log_every == 0 or step == config.steps):
                seconds = time.perf_counter() - started
                recent = losses[-config.log_every :]
                echo(
                    f"tower step {step}/{config.steps}: loss {sum(recent) / len(recent):.4f} "
                    f"({step * config.batch_size / seconds:.1f} images/s)"
                )
        seconds = time.perf_counter() - started
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)
            parameter.grad = None
        ap50 = run.held_out_ap50(held_out)
        run.tower.train(tower_mode)
    recent = losses[-config.log_every :]
    return TowerReport(
        steps=config.steps,
        seconds=seconds,
        samples_per_s=config.steps * config.batch_size / seconds,
        first_loss=losses[0],
        final_loss=sum(recent) / len(recent),
        heldout_images=len(held_out),
        ap50=ap50,
        untrained_ap50=untrained_ap50,
    )
