"""Tower pretraining on a generated world: held-out AP50 against minutes, and what it does
for a tiny student's ``<OD>``.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_tower.py --part tower --minutes 1 3 5
    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_tower.py --part student --minutes 3

Generates and exports a fresh world of ``--images`` images (``tests/world_shards.py``) and
builds the student's tiny Florence-2 (``--image-size``, ``--hidden``; the demo's student
by default).

- ``--part tower``: for each of ``--minutes``, a fresh model's tower pretrained for as
  many steps as that many minutes hold at the throughput of a short probe run (each run
  has its own warmup and cosine schedule, as a real budget would). Prints steps, seconds,
  images/s, final loss and the head's class-agnostic AP50 on held-out images, untrained
  and trained.
- ``--part student``: two ``<OD>`` students of ``--student-steps`` steps
  (``refinement.student.StudentTraining``, same seed, same batches), one from the random
  tower and one from the tower pretrained for the first of ``--minutes``. Prints each
  one's image check on held-out examples and the AP50 of its greedy ``<OD>`` on held-out
  images (parsed by ``processor.post_process_generation``, scored by
  ``refinement.metrics.evaluate``), class-agnostic and by category.

Tower and students hold out the same images (the same hash and fraction), so no score
is on an image either of them trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.config import StudentConfig, TowerConfig
from engine.records import ImageRecord, Region
from engine.train.config import TinyModelConfig
from engine.train.data import ReadStats
from engine.train.stream import is_held_out
from refinement.metrics import evaluate
from refinement.student import StudentTraining, load_student
from refinement.student_data import held_out_examples
from refinement.tower import TowerReport, pretrain_tower, shard_images
from tests.world_shards import exported_world, shard_urls

PROBE_STEPS = 20


def steps_for(minutes: float, shards: list[str], student: StudentConfig, tower: TowerConfig) -> int:
    """Steps that ``minutes`` hold at the images/s of a short run on a throwaway model."""
    model, processor = load_student("tiny", student)
    probe = tower.model_copy(update={"steps": PROBE_STEPS, "warmup_steps": 1, "eval_images": 1})
    report = pretrain_tower(model, processor, shards, probe, echo=None)
    return max(1, round(minutes * 60 * report.samples_per_s / tower.batch_size))


def tower_part(
    shards: list[str], student: StudentConfig, tower: TowerConfig, minutes: list[float]
) -> None:
    rows = []
    for budget in minutes:
        steps = steps_for(budget, shards, student, tower)
        model, processor = load_student("tiny", student)
        print(f"--- {budget} min: {steps} steps", flush=True)
        report = pretrain_tower(
            model, processor, shards, tower.model_copy(update={"steps": steps}), echo=print
        )
        rows.append((budget, report))
    print(f"\nheld-out images: {rows[0][1].heldout_images}")
    columns = f"{'minutes':>8}{'steps':>7}{'seconds':>9}{'img/s':>8}{'loss':>8}"
    print(columns + f"{'AP50 untrained':>16}{'AP50':>8}")
    for budget, r in rows:
        print(
            f"{budget:>8}{r.steps:>7}{r.seconds:>9.1f}{r.samples_per_s:>8.1f}{r.final_loss:>8.3f}"
            f"{_value(r.untrained_ap50):>16}{_value(r.ap50):>8}"
        )


def od_predictions(
    training: StudentTraining, images: list[tuple[bytes, ImageRecord]], max_new_tokens: int
) -> list[ImageRecord]:
    """Greedy ``<OD>`` of the student on ``images``, parsed into records."""
    model, processor = training.model, training.processor
    model.eval()
    predictions = []
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in chunk]
        inputs = processor(
            text=["<OD>"] * len(chunk), images=pictures, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            tokens = model.generate(
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        texts = processor.batch_decode(tokens, skip_special_tokens=False)
        for (_, record), text in zip(chunk, texts, strict=True):
            parsed = processor.post_process_generation(
                text, task="<OD>", image_size=(record.width, record.height)
            )["<OD>"]
            regions = [
                Region(box, label, "object", "student")
                for box, label in zip(parsed["bboxes"], parsed["labels"], strict=True)
                if box[2] > box[0] and box[3] > box[1]
            ]
            predictions.append(dataclasses.replace(record, uri=record.image_id, regions=regions))
    model.train()
    return predictions


def student_part(
    shards: list[str],
    student: StudentConfig,
    tower: TowerConfig,
    minutes: float,
    max_new_tokens: int,
) -> None:
    held_out = [
        item for item in shard_images(shards, ReadStats())
        if is_held_out(item[1].image_id, student.holdout_fraction)
    ]  # fmt: skip
    truth = [dataclasses.replace(r, uri=r.image_id) for _, r in held_out]
    examples = held_out_examples(
        shards, student.tasks, student.holdout_fraction, student.image_check_samples
    )
    rows = []
    pretrained: TowerReport | None = None
    for start in ("random tower", "pretrained tower"):
        training = StudentTraining(student, shards, "tiny")
        if start == "pretrained tower":
            steps = steps_for(minutes, shards, student, tower)
            # In place, before the first student step: the student's optimizer holds the
            # same parameters and no state yet, and pretraining leaves the global random
            # state as it was, so both students see the same batches.
            pretrained = pretrain_tower(
                training.model, training.processor, shards,
                tower.model_copy(update={'steps': steps}), echo=print,
            )  # fmt: skip
        started = time.perf_counter()
        for _ in range(student.steps):
            loss = training.train_step()
            if training.step % 250 == 0:
                print(f"{start}: student step {training.step}: loss {loss:.4f}", flush=True)
        seconds = time.perf_counter() - started
        check = training.image_check(examples)
        scores = evaluate(od_predictions(training, held_out, max_new_tokens), truth)
        recent = training.losses[-50:]
        rows.append((start, seconds, sum(recent) / len(recent), check, scores))
    assert pretrained is not None
    print(
        f"\ntower: {pretrained.steps} steps in {pretrained.seconds:.0f}s, head AP50 "
        f"{_value(pretrained.untrained_ap50)} -> {_value(pretrained.ap50)}; students: "
        f"{student.steps} steps of {student.batch_size}; {len(held_out)} held-out images, "
        f"{len(examples)} image-check examples"
    )
    columns = f"{'student from':<18}{'s':>6}{'loss':>8}{'true':>8}{'shuffled':>9}{'gain':>7}"
    print(columns + f"{'feat var':>9}{'OD AP50 any':>12}{'OD AP50':>9}{'boxes':>7}")
    for start, seconds, loss, check, scores in rows:
        print(
            f"{start:<18}{seconds:>6.0f}{loss:>8.3f}{check.true_loss:>8.3f}{check.shuffled_loss:>9.3f}"
            f"{check.gain:>7.3f}{check.feature_variation:>9.4f}"
            f"{_value(scores.box_agnostic.ap50):>12}{_value(scores.box.ap50):>9}"
            f"{scores.box_matching.predicted:>7}"
        )


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["tower", "student"], required=True)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=11, help="the world's seed")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 3, 5])
    parser.add_argument("--output-stride", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--holdout", type=float, default=0.15)
    parser.add_argument("--student-steps", type=int, default=1500)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    # Two cores shared with other work: one thread is faster than two spinning on each other.
    torch.set_num_threads(1)

    tiny = TinyModelConfig(hidden_size=args.hidden, layers=1, heads=4, image_size=args.image_size)
    student = StudentConfig(
        tiny=tiny, tasks=["<OD>"], steps=args.student_steps, batch_size=8, lr=1e-3, warmup_steps=10,
        holdout_fraction=args.holdout,
    )  # fmt: skip
    tower = TowerConfig(
        batch_size=args.batch_size, output_stride=args.output_stride,
        holdout_fraction=args.holdout, eval_images=args.images,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        store = exported_world(Path(folder), args.images, seed=args.seed)
        shards = shard_urls(store)
        print(f"world of {args.images} images exported in {time.perf_counter() - started:.1f}s")
        if args.part == "tower":
            tower_part(shards, student, tower, args.minutes)
        else:
            student_part(shards, student, tower, args.minutes[0], args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
