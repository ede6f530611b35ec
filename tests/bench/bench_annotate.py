"""Annotate throughput: the actor pool with batching vs a naive one-image-at-a-time loop.

    .venv/bin/python tests/bench/bench_annotate.py [--images 96] [--specialists florence2 ocr]
        [--pools 1 2] [--unit-size 64]

For each specialist, on the same ingested images, in one run:
  engine  `annotate` on embedded Ray: ``pool_size`` actors (one per core, or each of
          ``--pools``), batches of ``batch_size``, images decoded by CPU tasks ahead of
          the actors (actor start-up and model loading included)
  naive   one process: load the same model once, then annotate one image at a time
and prints images/s for both and the ratio; with several ``--pools``, also each pool's
rate against the first (``--images 64 --unit-size 64 --pools 1 2``: one unit, does the
second actor help?). florence2 is a tiny randomly initialised
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
from engine.manifest import manifest_view
from engine.records import records_from_table
from engine.store import Store
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


def specialist_configs(model_dir: Path, pool_size: int) -> dict[str, SpecialistConfig]:
    from tests.tiny_florence2 import build_florence2_processor, build_tiny_florence2_model

    if not model_dir.exists():
        build_tiny_florence2_model().save_pretrained(model_dir)
        build_florence2_processor().save_pretrained(model_dir)
    # Each actor on half a CPU so that the decode tasks fit beside them.
    shared = {"num_cpus": 0.5, "pool_size": pool_size}
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
    parser.add_argument("--pools", type=int, nargs="+", help="pool sizes (default: --cores)")
    parser.add_argument("--unit-size", type=int, default=64)
    args = parser.parse_args()
    pools = args.pools or [args.cores]

    results = {}
    with tempfile.TemporaryDirectory(prefix="fld-bench-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        make_images(root / "images", args.images)
        base = load_config(
            None,
            [
                f"ray.num_cpus={args.cores}",
                f"ingest.unit_size={args.unit_size}",
                "ray.task_cpus=0.5",
            ],
        )
        with ray_session(base.ray):
            for name in args.specialists:
                for pool in pools:
                    spec = specialist_configs(root / "florence2", pool)[name]
                    store = Store(str(root / f"store-{name}-{pool}"))
                    plan = plan_ingest([str(root / "images")], store, base.ingest)
                    run_ingest(store, base, plan)
                    config = base.model_copy(
                        update={"annotate": AnnotateConfig(specialists=(spec,))}
                    )
                    started = time.perf_counter()
                    summary = run_annotate(store, config, 0)
                    engine_s = time.perf_counter() - started
                    assert summary.outputs == args.images, summary.format()
                    results[name, pool] = engine_s
                results[name, "naive"] = naive_loop(spec, store)

    print(f"\n{args.images} images in units of {args.unit_size}, {args.cores} cores")
    for name in args.specialists:
        naive_rate = args.images / results[name, "naive"]
        first_rate = args.images / results[name, pools[0]]
        for pool in pools:
            rate = args.images / results[name, pool]
            print(
                f"  {name:<10} pool {pool}: engine {rate:7.1f} images/s   naive loop "
                f"{naive_rate:7.1f} images/s   ratio {rate / naive_rate:5.2f}   "
                f"vs pool {pools[0]} {rate / first_rate:5.2f}"
            )


if __name__ == "__main__":
    main()
