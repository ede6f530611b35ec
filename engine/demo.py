"""The embedded demo: a generated world with exact truth, and real photos, through the engine.

A world of coloured shapes and signs (``engine/world/``) is drawn with its exact
truth kept apart; the engine ingests only the images. CPU specialists that need no
weights annotate them (and RapidOCR reads the signs), and the round is scored against
the truth after annotation, merge and filter (``refinement/evaluation.py``).

Writes the photos that scikit-image ships into an input folder: a COCO file that
labels some of them (boxes, polygons, captions), a WebDataset shard with more photos
and a duplicate, and a few broken files a real folder would have. Then runs the steps
of ``--stage all`` (``engine/pipeline.py``) on embedded Ray with the evaluation before
the report, and says where the shards and report are.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from engine.config import load_config
from engine.execution import StageError
from engine.layout import round_layout
from engine.pipeline import ROUND, STEPS, Request, execute, plan
from engine.store import Store
from engine.world import generate_world
from refinement.evaluation import evaluate_step, quality_table

# name -> (caption, [(category, [x0, y0, x1, y1])]) in the photo's own pixels.
LABELLED = {
    "astronaut": (
        "An astronaut in an orange suit poses in front of a flag.",
        [
            ("person", [18, 8, 512, 512]),
            ("flag", [0, 0, 170, 230]),
            ("helmet", [280, 290, 470, 510]),
        ],
    ),
    "chelsea": ("A ginger cat looks to the side.", [("cat", [0, 0, 451, 300])]),
    "coffee": ("A cup of coffee on a saucer.", [("cup", [90, 20, 500, 360])]),
    "rocket": ("A rocket stands on its launch pad.", [("rocket", [225, 40, 335, 400])]),
}
# Photos that arrive as a WebDataset shard instead (plus a copy of one labelled photo).
IN_SHARD = ("moon", "colorwheel")
UNLABELLED = (
    "camera",
    "page",
    "coins",
    "text",
    "clock",
    "immunohistochemistry",
    "logo",
    "hubble_deep_field",
)


def write_inputs(folder: Path) -> None:
    from skimage import data  # demo-only dependency

    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for number, name in enumerate([*LABELLED, *UNLABELLED], start=1):
        pixels = np.asarray(getattr(data, name)())
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels - pixels.min()) / max(np.ptp(pixels), 1)).astype(np.uint8)
        image = Image.fromarray(pixels)
        # Greyscale and RGBA photos stay PNG: ingest normalises them to RGB.
        file_name = f"{name}.jpg" if image.mode == "RGB" else f"{name}.png"
        image.save(folder / file_name)
        images.append(
            {"id": number, "file_name": file_name, "width": image.width, "height": image.height}
        )
        if name in LABELLED:
            caption, boxes = LABELLED[name]
            annotations.append({"image_id": number, "caption": caption})
            for category, (x0, y0, x1, y1) in boxes:
                annotations.append(
                    {
                        "image_id": number,
                        "category_id": category,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    }
                )
    categories = sorted({a["category_id"] for a in annotations if "category_id" in a})
    ids = {name: i for i, name in enumerate(categories, start=1)}
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
        if "category_id" in annotation:
            annotation["category_id"] = ids[annotation["category_id"]]
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in ids.items()],
    }
    (folder / "labels.json").write_text(json.dumps(coco, indent=1))
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for key, name in enumerate([*IN_SHARD, "astronaut"]):
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").save(buffer, "JPEG")
            if name == "astronaut":  # the very same bytes as the labelled file
                buffer = io.BytesIO((folder / "astronaut.jpg").read_bytes())
            info = tarfile.TarInfo(f"{key:06d}.jpg")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    # What a real folder also holds: these end in quarantine/ with their reasons.
    broken = folder / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "truncated.jpg").write_bytes((folder / "coffee.jpg").read_bytes()[:2000])
    (broken / "notes.txt").write_text("not an image\n")
    (broken / "empty.png").write_bytes(b"")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__)
    parser.add_argument("--out", default="out/demo", help="folder for inputs and the store")
    parser.add_argument("--world-images", type=int, default=300, help="generated images")
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "demo.yaml"))
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    inputs, store = out / "inputs", Store(str(out / "store"))
    # A fresh store each time: the demo shows a whole run, not a resume.
    shutil.rmtree(out, ignore_errors=True)
    write_inputs(inputs)
    world = generate_world(out / "world", args.world_images, seed=0)
    config = load_config(args.config)
    sources = (world.ingest, inputs / "labels.json", inputs / "shard-000000.tar", inputs / "broken")
    request = Request(config, store, 0, tuple(str(s) for s in sources), alone=False)
    # Round 0 as --stage all makes it, scored against the world's truth before the report,
    # so the report leads with the quality table.
    steps = [STEPS[name] for name in ROUND]
    steps.insert(steps.index(STEPS["report"]), evaluate_step(world.truth))
    try:
        execute(plan(steps, request), request)
    except StageError as exc:
        print(f"engine.demo: error: {exc}", file=sys.stderr)
        return 1
    layout = round_layout(0)
    quality = store.read_json(layout.quality)
    print(f"\nquality against the world's truth ({args.world_images} images):")
    print(quality_table(quality))
    print(f"\nshards: {store.path(layout.shards)}")
    print(f"report: {store.path(layout.report, 'index.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
