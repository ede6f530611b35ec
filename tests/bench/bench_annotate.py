"""Annotate throughput: the actor pool with batching vs a naive one-image-at-a-time loop.

    .venv/bin/python tests/bench/bench_annotate.py [--images 96] [--specialists florence2 ocr]

For each specialist, on the same ingested images, in one run:
  engine  `annotate` on embedded Ray: ``pool_size`` actors, batches of ``batch_size``,
          images decoded by CPU tasks ahead of the actors (actor start-up and model
          loading included)
  naive   one process: load the same model once, then annotate one image at a time
and prints images/s for both and the ratio. florence2 is a tiny randomly initialised
Florence-2 (the real architecture and processor, built offline) asked for <CAPTION>;
ocr is RapidOCR's real PP-OCR models on images with rendered text.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parents[2]))

from engine.config import AnnotateConfig, SpecialistConfig, load_config
from engine.execution import ray_session
from engine.records import records_from_table
from engine.store import Store, manifest_view
from specialists import build_specialist
from specialists.base import SpecialistInput
from stages.annotate import run_annotate
from stages.ingest import plan_ingest, run_ingest

WORDS = ["EXIT", "STOP", "OPEN", "Main Street", "No Parking", "Platform 4", "SALE", "Coffee"]


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(count):
        width, height = int(rng.integers(192, 320)), int(rng.integers(160, 256))
        image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(120, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 30))
            draw.rectangle([x, y, x + 90, y + 26], fill=(255, 255, 255), outline=(0, 0, 0))
            draw.text((x + 6, y + 6), WORDS[int(rng.integers(len(WORDS)))], fill=(0, 0, 0))
        image.save(folder / f"{k:05d}.jpg", quality=92)


def specialist_configs(model_dir: Path, cores: int) -> dict[str, SpecialistConfig]:
    from tests.tiny_florence2 import build_florence2_processor, build_tiny_florence2_model

    build_tiny_florence2_model().save_pretrained(model_dir)
    build_florence2_processor().save_pretrained(model_dir)
    # One actor per core, each on half a CPU so that the decode tasks fit beside them.
    shared = {"num_cpus": 0.5, "pool_size": cores}
    return {
        "florence2": SpecialistConfig(
            name="florence2", kind="florence2", model=str(model_dir), batch_size=8,
            options={"task": "<CAPTION>", "max_new_tokens": 20}, **shared,
        ),
        "ocr": SpecialistConfig(name="ocr", kind="rapidocr", batch_size=8, **shared),
    }  # fmt: skip


def naive_loop(config: SpecialistConfig, store: Store) -> float:
    """Seconds to annotate every manifest image one by one in this process."""
    import io

    table = manifest_view(store.read("manifest"))
    records = records_from_table(table)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in table.column("image").to_pylist()]
    specialist = build_specialist(config)
    specialist.setup()
    started = time.perf_counter()
    for record, image in zip(records, images, strict=True):
        specialist.annotate([SpecialistInput(record, image)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Enough images that actor start-up (importing torch, loading the model) amortises,
    # as it does over a real dataset.
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--specialists", nargs="+", default=["florence2", "ocr"])
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="fld-bench-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        make_images(root / "images", args.images)
        configs = specialist_configs(root / "florence2", args.cores)
        base = load_config(
            None, [f"ray.num_cpus={args.cores}", "ingest.unit_size=64", "ray.task_cpus=0.5"]
        )
        with ray_session(base.ray):
            for name in args.specialists:
                store = Store(str(root / f"store-{name}"))
                run_ingest(store, base, plan_ingest([str(root / "images")], store, base.ingest))
                config = base.model_copy(
                    update={"annotate": AnnotateConfig(specialists=(configs[name],))}
                )
                started = time.perf_counter()
                summary = run_annotate(store, config, 0)
                engine_s = time.perf_counter() - started
                assert summary.outputs == args.images, summary.format()
                results[name] = (engine_s, naive_loop(configs[name], store))

    print(f"\n{args.images} images, {args.cores} cores")
    for name, (engine_s, naive_s) in results.items():
        engine_rate, naive_rate = args.images / engine_s, args.images / naive_s
        print(
            f"  {name:<10} engine {engine_rate:7.1f} images/s   naive loop {naive_rate:7.1f} "
            f"images/s   ratio {engine_rate / naive_rate:5.2f}"
        )


if __name__ == "__main__":
    main()
