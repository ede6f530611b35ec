"""coco.json's file names and ids at sizes beyond ``bench_scale``'s stores: driver peak
memory of ``stages.export_coco``'s DuckDB work alone, on synthetic uris.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_coco_names.py \\
        [--images 100000 1000000 3000000]

Two kinds of paths, each size in a fresh process: ``distinct`` (every file name its
own, half the images with a COCO id) and ``clashing`` (1,000 folders holding the same
file names, so every name needs its folder). Prints, per kind and size, the peak RSS
over the RSS before the call (``bench_scale``'s measure), and the seconds the names and
ids took. The records themselves are not involved: write_coco holds one unit of them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import _peak

UNIT = 1_000


def uris(kind: str, start: int) -> list[str]:
    if kind == "distinct":
        return [
            f"/data/photos/batch{start // UNIT:05d}/{i:09d}.jpg" for i in range(start, start + UNIT)
        ]
    return [
        f"/data/set/class{i % 1000:04d}/{i // 1000:06d}.jpg" for i in range(start, start + UNIT)
    ]


def measure(kind: str, images: int) -> None:
    from stages.export_coco import _image_table

    def name_every_image() -> None:
        with _image_table() as table:
            for start in range(0, images, UNIT):
                numbered = kind == "distinct" and (start // UNIT) % 2
                # Ids as the records store them: JSON text.
                ids = [str(i) if numbered else None for i in range(start, start + UNIT)]
                table.add(uris(kind, start), ids)
            assert sum(1 for _ in table.names_and_ids()) == images

    peak = _peak(name_every_image)
    print(f"{kind:<9}{images:>10}{peak['delta_mb']:>10.1f}{peak['seconds']:>10.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], int(args.child[1]))
        return 0
    print(f"{'paths':<9}{'images':>10}{'peak MB':>10}{'seconds':>10}", flush=True)
    for kind in ("distinct", "clashing"):
        for images in args.images:
            subprocess.run([sys.executable, __file__, "--child", kind, str(images)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
