"""Tower pretraining on a generated world: held-out AP50 against minutes, and what it does
for a tiny student's ``<OD>``.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_tower.py --part tower --minutes 1 3 5
    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_tower.py --part student --minutes 3
    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_tower.py --part student \
        --config engine/configs/flywheel.yaml --images 1000 --seed 5 --holdout 0.1 \
        --variants tower tower+ovd --curve 1000 2000 3000 \
        [--set refine.student.tiny.vision_stride=16]

Generates and exports a fresh world of ``--images`` images (``tests/world_shards.py``) and
builds the student's tiny Florence-2 (``--image-size``, ``--hidden``; the demo's student
by default).

- ``--part tower``: for each of ``--minutes``, a fresh model's tower pretrained for as
  many steps as that many minutes hold at the throughput of a short probe run (each run
  has its own warmup and cosine schedule, as a real budget would). Prints steps, seconds,
  images/s, final loss and the head's class-agnostic AP50 on held-out images, untrained
  and trained.
- ``--part student``: ``<OD>`` students (``refinement.student.StudentTraining``, same
  seed, same batches), one per ``--variants``: ``random-tower`` (no pretraining),
  ``tower`` (the tower pretrained first, for the first of ``--minutes`` or as
  ``--config`` sets it), ``tower+ordinal`` (and the ``<loc_i>`` embeddings, which
  Florence-2 ties to its output layer, set to a smooth code of the bin) and ``tower+ovd``
  (and ``<OPEN_VOCABULARY_DETECTION>`` trained beside ``<OD>``: given a label, its boxes)
  and ``tower+frozen`` (the pretrained tower frozen while the student trains);
  ``+aug`` adds the box-moving crops and mirrors of ``refine.student.augment``
  (``AugmentConfig``'s defaults).
  At each of ``--curve`` steps, prints the image check on held-out examples and the AP50
  of greedy ``<OD>`` on held-out images (parsed by ``processor.post_process_generation``,
  scored by ``refinement.metrics.evaluate``), class-agnostic and by category, and for
  ``tower+ovd`` the AP50 of ``<OPEN_VOCABULARY_DETECTION>`` asked once per true label.
  ``--config engine/configs/flywheel.yaml`` takes the student and tower of that config's
  ``refine.student`` (the flywheel's recipe), trained on ``<OD>``.

Tower and students hold out the same images (the same hash and fraction), so no score
is on an image either of them trained on.

Measured with the flywheel's recipe (``--config engine/configs/flywheel.yaml --images
1000 --seed 5 --holdout 0.1``: 128 px, hidden 128, 2+2 layers, tower pretrained 600
steps to held-out AP50 0.388, students of batch 16 at lr 5e-4), one thread each, two
runs side by side on two cores; 119 held-out images, ``boxes``: boxes parsed:

  student        steps     s    loss  true  shuffled   gain  feat var  OD AP50  boxes  OVD AP50
  tower+ovd       1000   410   2.271 2.799     2.799  1.000    0.0487    0.000      0     0.000
  tower+frozen    1000   305   2.383 2.786     2.826  1.014    0.7903    0.000      0         -
  tower+frozen    2000   612   2.062 2.951     3.042  1.031    0.8367    0.000     15         -
  tower+frozen    3000   907   1.957 3.048     3.147  1.033    0.8384    0.000     19         -

Trained with its tower (OVD beside OD) the image pathway collapses (feature spread 0.05)
and the student is image-blind; with the tower frozen the features stay alive (0.84)
but the decoder barely reads them (gain 1.03), and its held-out loss rises while its
training loss falls: it learns the targets' language, not where the objects are.

The box-moving crops and mirrors (``+aug``), measured the same way (``tower`` and
``tower+aug`` side by side, then ``tower+frozen+aug`` alone):

  student           steps     s    loss  true  shuffled   gain  feat var  OD AP50  boxes
  tower              1000   384   2.364 2.792     2.792  1.000    0.0488    0.000      0
  tower+aug          1000   393   2.686 2.662     2.662  1.000    0.0469    0.000      0
  tower+frozen+aug   1000   251   2.693 2.662     2.691  1.011    0.7597    0.000      0
  tower+frozen+aug   2000   510   2.604 2.617     2.673  1.022    0.7924    0.000    354
  tower+frozen+aug   3000   768   2.575 2.601     2.669  1.026    0.8011    0.000    196

They end the learning by heart (held-out loss 2.60 at 3,000 steps against the frozen
student's 3.05; training and held-out loss now fall together) but not the collapse of
a tower trained with the student, and the frozen student's boxes are still nowhere near
the objects (AP50 0.000, class-agnostic too): the decoder's coordinates are the
bottleneck, as before.

A DaViT of stride 16 (``--set refine.student.tiny.vision_stride=16``: an 8x8 grid, 65
visual tokens) gives the tower's own head held-out AP50 0.675 in the same 600 steps
(0.388 at stride 32), but not the student (``tower+frozen+aug``, run alone):

  student           steps     s    loss  true  shuffled   gain  feat var  OD AP50  boxes
  stride 16          1000   295   2.686 2.662     2.668  1.002    0.6299    0.000      0
  stride 16          2000   585   2.598 2.612     2.672  1.023    0.7305    0.000    382
  stride 16          3000   881   2.564 2.591     2.670  1.030    0.7348    0.000     55
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

from engine.config import AugmentConfig, StudentConfig, TowerConfig, load_config
from engine.records import ImageRecord, Region
from engine.train.config import TinyModelConfig
from engine.train.data import ReadStats
from engine.train.stream import is_held_out
from refinement.metrics import evaluate
from refinement.student import StudentTraining, load_student
from refinement.student_data import held_out_examples
from refinement.tower import pretrain_tower, shard_images
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


def _object_labels(record: ImageRecord) -> list[str]:
    return sorted({r.text for r in record.regions if r.kind == "object"})


def predictions(
    training: StudentTraining,
    images: list[tuple[bytes, ImageRecord]],
    max_new_tokens: int,
    task: str = "<OD>",
) -> list[ImageRecord]:
    """Greedy ``task`` of the student on ``images``, parsed into records. ``<OD>`` asks
    once per image; ``<OPEN_VOCABULARY_DETECTION>`` once per label of the image's truth
    (where the label's objects are, given the label)."""
    model, processor = training.model, training.processor
    model.eval()
    asks = [
        (index, label)
        for index, (_, record) in enumerate(images)
        for label in ([None] if task == "<OD>" else _object_labels(record))
    ]
    found: list[list[Region]] = [[] for _ in images]
    for start in range(0, len(asks), 16):
        chunk = asks[start : start + 16]
        pictures = [Image.open(io.BytesIO(images[i][0])).convert("RGB") for i, _ in chunk]
        prompts = [task + (label or "") for _, label in chunk]
        inputs = processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        texts = processor.batch_decode(tokens, skip_special_tokens=False)
        for (index, label), text in zip(chunk, texts, strict=True):
            record = images[index][1]
            parsed = processor.post_process_generation(
                text, task=task, image_size=(record.width, record.height)
            )[task]
            labels = parsed.get("labels") or parsed.get("bboxes_labels") or []
            found[index] += [
                Region(box, label or name, "object", "student")
                for box, name in zip(parsed["bboxes"], labels, strict=False)
                if box[2] > box[0] and box[3] > box[1]
            ]
    model.train()
    return [
        dataclasses.replace(record, uri=record.image_id, regions=regions)
        for (_, record), regions in zip(images, found, strict=True)
    ]


VARIANTS = (
    "random-tower", "tower", "tower+ordinal", "tower+ovd", "tower+frozen", "tower+aug",
    "tower+frozen+aug",
)  # fmt: skip
# What each variant trains on, beside <OD>.
EXTRA_TASKS = {"tower+ovd": ["<OPEN_VOCABULARY_DETECTION>"]}
OVD = "<OPEN_VOCABULARY_DETECTION>"


def ordinal_loc_embeddings(model: torch.nn.Module, processor: object) -> None:
    """Give ``<loc_0>``..``<loc_999>`` embeddings that vary smoothly with the bin: sines
    and cosines of the bin at periods from 2,000 bins down to 20, at the scale of the
    other rows. Florence-2 ties its output layer to them, so a hidden state near one
    bin's row scores the neighbouring bins high too and a target teaches its neighbours."""
    weight = model.get_input_embeddings().weight
    assert weight.data_ptr() == model.get_output_embeddings().weight.data_ptr(), "untied"
    ids = processor.tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(1000)])
    width = weight.shape[1]
    cycles = torch.logspace(-0.3, 1.7, width // 2)  # 0.5 to 50 cycles over the range
    phase = torch.arange(1000, dtype=torch.float32)[:, None] / 1000 * cycles * 2 * torch.pi
    rows = torch.cat([phase.sin(), phase.cos()], dim=1)
    rows = rows / rows.norm(dim=1, keepdim=True) * weight.norm(dim=1).mean()
    with torch.no_grad():
        weight[ids, : rows.shape[1]] = rows
        weight[ids, rows.shape[1] :] = 0


def student_part(
    shards: list[str],
    student: StudentConfig,
    tower: TowerConfig,
    variants: list[str],
    curve: list[int],
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
    student = student.model_copy(update={"steps": max(curve)})
    for variant in variants:
        tasks = student.tasks + EXTRA_TASKS.get(variant, [])
        parts = variant.split("+")
        augment = AugmentConfig() if "aug" in parts else None
        config = student.model_copy(
            update={"tasks": tasks, "freeze_vision": "frozen" in parts, "augment": augment}
        )
        training = StudentTraining(config, shards, "tiny")
        if variant != "random-tower":
            # In place, before the first student step: the student's optimizer holds the
            # same parameters and no state yet, and pretraining leaves the global random
            # state as it was, so every student sees the same batches.
            report = pretrain_tower(training.model, training.processor, shards, tower, print)
            print(f"{variant}: tower AP50 {_value(report.untrained_ap50)} -> {_value(report.ap50)}")
        if variant == "tower+ordinal":
            ordinal_loc_embeddings(training.model, training.processor)
        started = time.perf_counter()
        while training.step < max(curve):
            loss = training.train_step()
            if training.step % 250 == 0:
                print(f"{variant}: student step {training.step}: loss {loss:.4f}", flush=True)
            if training.step in curve:
                seconds = time.perf_counter() - started
                check = training.image_check(examples)
                scores = evaluate(predictions(training, held_out, max_new_tokens), truth)
                ovd = None
                if OVD in tasks:
                    ovd = evaluate(predictions(training, held_out, max_new_tokens, OVD), truth)
                recent = training.losses[-50:]
                loss = sum(recent) / len(recent)
                rows.append((variant, training.step, seconds, loss, check, scores, ovd))
                print(_row(rows[-1]), flush=True)
                started = time.perf_counter() - seconds
    print(
        f"\nstudents: batches of {student.batch_size}, lr {student.lr}; {len(held_out)} held-out "
        f"images, {len(examples)} image-check examples"
    )
    columns = f"{'student':<22}{'steps':>6}{'s':>6}{'loss':>8}{'true':>8}{'shuffled':>9}{'gain':>7}"
    print(columns + f"{'feat var':>9}{'OD AP50 any':>12}{'OD AP50':>9}{'boxes':>7}{'OVD AP50':>9}")
    for row in rows:
        print(_row(row))


def _row(row: tuple) -> str:
    variant, steps, seconds, loss, check, scores, ovd = row
    return (
        f"{variant:<22}{steps:>6}{seconds:>6.0f}{loss:>8.3f}{check.true_loss:>8.3f}"
        f"{check.shuffled_loss:>9.3f}{check.gain:>7.3f}{check.feature_variation:>9.4f}"
        f"{_value(scores.box_agnostic.ap50):>12}{_value(scores.box.ap50):>9}"
        f"{scores.box_matching.predicted:>7}{_value(ovd and ovd.box.ap50):>9}"
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
    parser.add_argument(
        "--config", help="student and tower from this config's refine.student (tasks: <OD>)"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="overrides of --config, e.g. refine.student.tiny.vision_stride=16",
    )  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:2]))
    parser.add_argument(
        "--curve", type=int, nargs="+", help="student steps to score at (default --student-steps)"
    )
    args = parser.parse_args()
    # Two cores shared with other work: one thread is faster than two spinning on each other.
    torch.set_num_threads(1)

    if args.config:
        configured = load_config(args.config, args.set).refine.student
        student = configured.model_copy(
            update={"tasks": ["<OD>"], "holdout_fraction": args.holdout}
        )
        tower = configured.tower.model_copy(
            update={"holdout_fraction": args.holdout, "eval_images": args.images}
        )
    else:
        tiny = TinyModelConfig(
            hidden_size=args.hidden, layers=1, heads=4, image_size=args.image_size
        )
        student = StudentConfig(
            tiny=tiny, tasks=["<OD>"], steps=args.student_steps, batch_size=8, lr=1e-3,
            warmup_steps=10, holdout_fraction=args.holdout,
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
            if not args.config:
                steps = steps_for(args.minutes[0], shards, student, tower)
                tower = tower.model_copy(update={"steps": steps})
            curve = args.curve or [args.student_steps]
            student_part(shards, student, tower, args.variants, curve, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
