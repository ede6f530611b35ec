"""Ingest + export throughput, side by side with a plain loop and with raw decoding.

    .venv/bin/python tests/bench/bench_ingest_export.py [--images 2000] [--size 512x384]

Generates JPEG photos-like images (gradients, shapes, noise), then measures on the same
files, in one run:
  engine CLI `python -m engine.run --stage ingest`, then `--stage export`, cold, as a user
             runs them: interpreter start, imports, planning, the units (in local
             processes when they are few, ``ray.local_max_units``, else on Ray), commits;
             with the default config (units of 256 images, shards of 1,000), and with
             the demo's (``engine/configs/demo.yaml``: units of 16, made for its 20
             images), whose 125 units show what a unit costs
  engine     `ingest` then `export` on embedded Ray, twice: a first run (worker processes
             start and import the stages) and a warm one (Ray start-up reported apart)
  plain loop one process: read, hash, PIL decode, tarfile write of jpg + json
  raw decode one process: PIL open + load of every file (the machine's decode ceiling)
  img2dataset the same files as file:// URLs to WebDataset, when ``img2dataset`` is on
             the PATH (it is not in the lock: ``uv pip install img2dataset``)
and prints images/s for each, the engine's images/s per core, and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.config import load_config
from engine.execution import ray_session, require_ray
from engine.store import Store
from stages.export import run_export
from stages.ingest import plan_ingest, run_ingest

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "engine/configs/demo.yaml"


def make_images(folder: Path, count: int, width: int, height: int) -> int:
    """Photo-like JPEGs: a gradient, a few shapes, mild noise. Returns total bytes."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    total = 0
    for k in range(count):
        base = np.stack(
            [(xs * (k % 7 + 1)) % 256, (ys * 3 + k) % 256, ((xs + ys) // 2 + 17 * k) % 256], -1
        )
        noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(noisy, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            size = rng.integers(20, 120)
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse([x0, y0, x0 + size, y0 + size], fill=colour)
        path = folder / f"{k:06d}.jpg"
        image.save(path, quality=90)
        total += path.stat().st_size
    return total


def raw_decode(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image.load()
    return time.perf_counter() - started


def plain_loop(files: list[Path], out: Path) -> float:
    """The same work as ingest + export, written the obvious way in one process."""
    started = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for path in files:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
            record = {"image_id": digest[:24], "width": width, "height": height, "uri": str(path)}
            for name, payload in (
                (f"{digest[:24]}.jpg", data),
                (f"{digest[:24]}.json", json.dumps(record).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return time.perf_counter() - started


def engine_cli(folder: Path, tmp: Path, cores: int, config: Path | None = None) -> float:
    """Seconds for the two commands a user types, each a fresh process, with ``config``
    (None: the defaults)."""
    store = tmp / "store"
    common = [
        *(["--config", str(config)] if config else []), "--store", str(store),
        f"ray.num_cpus={cores}", "export.shard_max_samples=1000",
    ]  # fmt: skip
    started = time.perf_counter()
    for stage in (["--stage", "ingest", "--input", str(folder)], ["--stage", "export"]):
        subprocess.run(
            [sys.executable, "-m", "engine.run", *stage, *common],
            cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
    return time.perf_counter() - started


def img2dataset(files: list[Path], tmp: Path, cores: int) -> float | None:
    """Seconds for img2dataset on the same files, or None when it is not installed."""
    command = shutil.which("img2dataset")
    if command is None:
        return None
    urls = tmp / "urls.txt"
    urls.write_text("".join(f"file://{path}\n" for path in files))
    started = time.perf_counter()
    subprocess.run(
        [command, "--url_list", str(urls), "--output_folder", str(tmp / "img2dataset"),
         "--output_format", "webdataset", "--resize_mode", "no", "--encode_format", "jpg",
         "--processes_count", str(cores), "--thread_count", "4",
         "--number_sample_per_shard", "1000", "--disable_all_reencoding", "True"],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def engine(folder: Path, tmp: Path, cores: int) -> tuple[float, float, float]:
    """Seconds for ingest + export on a cold Ray (first run: worker processes start and
    import the stages) and on a warm one (same session, a fresh store), and Ray's start."""
    config = load_config(
        DEMO_CONFIG,
        [
            f"ray.num_cpus={cores}",
            "ray.local_max_units=0",  # on Ray, however few the units
            "ingest.unit_size=100",
            "export.shard_max_samples=1000",
        ],
    )
    started = time.perf_counter()
    timings = []
    with ray_session(config.ray):
        require_ray()
        ray_ready = time.perf_counter()
        for run in ("cold", "warm"):
            begin = time.perf_counter()
            store = Store(str(tmp / f"store-{run}"))
            ingested = run_ingest(store, config, plan_ingest([str(folder)], store, config.ingest))
            exported = run_export(store, config, 0)
            timings.append(time.perf_counter() - begin)
            assert exported.outputs == ingested.outputs == len(list(folder.iterdir()))
    return timings[0], timings[1], ray_ready - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", default="512x384")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument(
        "--repeat", type=int, default=3, help="plain loop and engine CLI, interleaved (median)"
    )
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="fld-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        total_bytes = make_images(folder, args.images, width, height)
        files = sorted(folder.iterdir())
        raw_decode(files[:50])  # warm the page cache and PIL's codecs for every contender

        raw_s = raw_decode(files)
        plain, cli, cli_demo = [], [], []
        for run in range(args.repeat):
            plain.append(plain_loop(files, Path(tmp) / "plain.tar"))
            cli.append(engine_cli(folder, Path(tmp) / f"cli-{run}", args.cores))
            demo_tmp = Path(tmp) / f"cli-demo-{run}"
            cli_demo.append(engine_cli(folder, demo_tmp, args.cores, DEMO_CONFIG))
        plain_s, cli_s = statistics.median(plain), statistics.median(cli)
        demo_s = statistics.median(cli_demo)
        other_s = img2dataset(files, Path(tmp), args.cores)
        cold_s, warm_s, ray_start_s = engine(folder, Path(tmp), args.cores)

    n = args.images
    rows = {
        "raw PIL decode (1 process)": n / raw_s,
        "plain PIL + tarfile loop (1 process)": n / plain_s,
        f"engine CLI ingest + export, cold ({args.cores} cores)": n / cli_s,
        "  the same, demo config (units of 16)": n / demo_s,
        f"engine, first run (Ray, {args.cores} cores)": n / cold_s,
        f"engine, warm workers (Ray, {args.cores} cores)": n / warm_s,
    }
    print(f"\n{n} JPEGs of {width}x{height}, {total_bytes / n / 1024:.0f} KiB each")
    for name, rate in rows.items():
        print(f"  {name:<46} {rate:8.1f} images/s")
    for label, seconds in (("first run", cold_s), ("warm", warm_s)):
        per_core = n / seconds / args.cores
        print(
            f"  engine {label}: {per_core:.1f} images/s per core = "
            f"{per_core / (n / raw_s):.2f} x raw decode; {plain_s / seconds:.2f} x plain loop"
        )
    ratios = sorted(p / c for p, c in zip(plain, cli, strict=True))
    print(f"  engine CLI, cold: {plain_s / cli_s:.2f} x plain loop (median of {args.repeat}; "
          f"runs {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"demo config: {plain_s / demo_s:.2f} x")  # fmt: skip
    if other_s is not None:
        print(f"  img2dataset: {n / other_s:.1f} images/s, {plain_s / other_s:.2f} x plain loop")
    print(f"  (Ray start-up, excluded above: {ray_start_s:.1f}s)")


if __name__ == "__main__":
    main()
