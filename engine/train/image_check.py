"""Does the model read the images? The end-of-stage check, and its verdict.

A falling loss does not show that a vision-language model looks at the image: on data
whose texts follow a template (the generated world's captions are mostly "This image
shows ... shapes on a ... background. A large ... is on the left."), a language model
alone gets most of the way. The check scores held-out samples twice, with their own
images and with every text paired with another sample's image (the images rolled by one
within each batch), and compares the per-token losses. It also measures how much the
projected visual tokens vary across images: a tower or projector whose output has
collapsed to one vector for every image (``feature_spread`` near 0) gives the LM nothing
to read, whatever the training budget.

The verdict is ``train.image_check``: a stage whose shuffled loss is below ``min_ratio``
times its true-image loss fails the run, or with ``on_fail: warn`` is logged loudly; the
stage's checkpoint carries the check in its ``COMMITTED`` marker either way
(``engine.train.checkpoint.read_marker``), so a reader of the checkpoint can tell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from engine.train.data import IGNORE_INDEX, Conversation
from engine.train.model import FlorenceVL

Encode = Callable[[Sequence[Conversation], int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ImageCheck:
    """Held-out loss with the true images and with the images shuffled across each batch.

    ``feature_spread``: the projector output's standard deviation across images (per
    visual token and channel, averaged), divided by its overall standard deviation. 0 =
    the same visual tokens for every image; a random tiny tower starts near 0.25.
    ``passed`` is the verdict against ``min_ratio``.
    """

    stage: str
    samples: int
    true_images: float
    shuffled_images: float
    feature_spread: float
    min_ratio: float
    passed: bool

    @property
    def ratio(self) -> float:
        return self.shuffled_images / self.true_images if self.true_images > 0 else float("inf")

    def line(self) -> str:
        return (
            f"{self.stage} image check on {self.samples} held-out samples: loss "
            f"{self.true_images:.4f} with their images, {self.shuffled_images:.4f} with the "
            f"images shuffled (gap {self.shuffled_images - self.true_images:+.4f}, ratio "
            f"{self.ratio:.3f}, needed {self.min_ratio:g}); visual feature spread across "
            f"images {self.feature_spread:.3f}"
        )


@torch.no_grad()
def score_image_reliance(
    model: FlorenceVL,
    encode: Encode,
    conversations: Sequence[Conversation],
    stage: str,
    batch_size: int,
    min_ratio: float,
    autocast: Callable[[], AbstractContextManager],
) -> ImageCheck:
    """Score ``conversations`` (each of a different image) with true and rolled images.

    Batches of ``batch_size`` (at least 2, so that rolling changes every image; a last
    batch of one joins the one before). Losses are per answer token over all samples,
    whatever the batches. The model is left in the mode it was in.
    """
    size = max(2, batch_size)
    starts = list(range(0, len(conversations), size))
    if len(starts) > 1 and len(conversations) - starts[-1] < 2:
        starts.pop()
    bounds = [*starts[1:], len(conversations)]
    was_training = model.training
    model.eval()
    true_sum = shuffled_sum = tokens = 0.0
    visual = []
    for start, stop in zip(starts, bounds, strict=True):
        batch = encode(conversations[start:stop], stop - start)
        # The model's loss is a mean over the batch's answer tokens: weight it back.
        count = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with autocast():
            visual.append(model.projector(model.vision_tower(batch["pixel_values"])).float())
            true_sum += model(**batch).loss.item() * count
            batch["pixel_values"] = batch["pixel_values"].roll(1, dims=0)
            shuffled_sum += model(**batch).loss.item() * count
        tokens += count
    model.train(was_training)
    features = torch.cat(visual)
    spread = (features.std(dim=0).mean() / features.std().clamp_min(1e-12)).item()
    true_loss, shuffled_loss = true_sum / tokens, shuffled_sum / tokens
    return ImageCheck(
        stage=stage,
        samples=len(conversations),
        true_images=true_loss,
        shuffled_images=shuffled_loss,
        feature_spread=spread,
        min_ratio=min_ratio,
        passed=shuffled_loss >= min_ratio * true_loss,
    )
