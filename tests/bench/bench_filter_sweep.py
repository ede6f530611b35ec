"""Filter thresholds measured against exact truth: the sweep behind the filter defaults.

    .venv/bin/python tests/bench/bench_filter_sweep.py [--images 1000] [--work out/sweep]

Generates a world of ``--images`` images (engine/world/), runs ingest, annotate, merge
and the filter's scoring pass once with the demo's CPU specialists
(engine/configs/demo.yaml, less OCR: its threshold is RapidOCR's own and is not swept,
and it is most of the annotate time), then applies the filter's threshold step in this process
for each setting below and scores what it keeps against the truth
(refinement/evaluation.py). One parameter moves at a time, the others at their
defaults, except that the region score rows run with the grounding threshold off: most
object boxes are linked to a caption phrase, so a grounding threshold above the region
threshold would hide the region threshold's own curve.

  region.min_score      object score threshold (grounding.min_score = 0)
  region.nms_iou        class-aware NMS across specialists (None = off)
  grounding.min_score   grounded-box threshold
  text.max_objects      objects allowed in a detailed / more detailed caption
  text.min_object_complexity   the same captions' least object complexity

Printed per setting: box AP50, box precision and recall at IoU 0.5 over every kept box,
object precision and recall of the more detailed captions, grounding precision and
recall, and the images kept. A rerun with the same ``--work`` reuses the annotated store.
The measured table, beside the defaults it justifies, is in engine/config.py: update it there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.config import CONFIG_DIR, FilterConfig, load_config
from engine.layout import round_layout
from engine.records import records_from_table
from engine.run import main as run_engine
from engine.store import Store
from engine.world import generate_world, load_truth
from filters.text import load_pipeline, text_stats
from refinement.metrics import Evaluation, evaluate
from stages.filter import decide_record

CONFIG = CONFIG_DIR / "demo.yaml"

REGION_SCORES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
NMS_IOUS = [None, 0.3, 0.4, 0.5, 0.6, 0.7]
GROUNDING_SCORES = [0.0, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8]
MAX_OBJECTS = [None, 12, 10, 8, 6, 4]
MIN_OBJECT_COMPLEXITY = [1.0, 1.5, 2.0, 2.5]


def annotated_store(work: Path, images: int) -> tuple[Store, Path]:
    """The world and a store scored by the filter stage, made once per ``work`` folder."""
    world = generate_world(work / "world", images, seed=0)
    store = work / "store"
    config = yaml.safe_load(CONFIG.read_text())
    specialists = config["annotate"]["specialists"]
    config["annotate"]["specialists"] = [s for s in specialists if s["kind"] != "rapidocr"]
    config_path = work / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    if not Store(str(store)).committed_units(round_layout(0).scored):
        for stage in ("ingest", "annotate", "merge", "filter"):
            args = ["--config", str(config_path), "--stage", stage, "--store", str(store)]
            if stage == "ingest":
                args += ["--input", str(world.ingest)]
            if run_engine(args) != 0:
                raise SystemExit(f"{stage} failed")
    return Store(str(store)), world.truth


def variants(defaults: FilterConfig) -> list[tuple[str, FilterConfig]]:
    def with_(section: str, **values) -> FilterConfig:
        part = getattr(defaults, section).model_copy(update=values)
        return defaults.model_copy(update={section: part})

    out = [("defaults", defaults)]
    no_grounding_threshold = with_("grounding", min_score=0.0)
    for v in REGION_SCORES:
        region = defaults.region.model_copy(update={"min_score": v})
        out.append(
            (f"region.min_score={v}", no_grounding_threshold.model_copy(update={"region": region}))
        )
    out += [(f"region.nms_iou={v}", with_("region", nms_iou=v)) for v in NMS_IOUS]
    out += [(f"grounding.min_score={v}", with_("grounding", min_score=v)) for v in GROUNDING_SCORES]
    for v in MAX_OBJECTS:
        limits = {} if v is None else {"detailed": v, "more_detailed": v}
        out.append((f"text.max_objects={v}", with_("text", max_objects=limits)))
    for v in MIN_OBJECT_COMPLEXITY:
        limits = {"detailed": v, "more_detailed": v}
        out.append((f"text.min_object_cx={v}", with_("text", min_object_complexity=limits)))
    return out


def row(name: str, e: Evaluation, kept: int) -> dict:
    detailed = e.captions.get("more_detailed")
    return {
        "setting": name,
        "box AP50": e.box.ap50,
        "box P": e.box_matching.precision,
        "box R": e.box_matching.recall,
        "cap P": detailed.object_precision if detailed else None,
        "cap R": detailed.object_recall if detailed else None,
        "ground P": e.grounding_precision.value,
        "ground R": e.grounding.value,
        "images": kept,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--work", default="out/sweep")
    args = parser.parse_args()

    started = time.perf_counter()
    store, truth_path = annotated_store(Path(args.work).resolve(), args.images)
    print(f"annotated store ready in {time.perf_counter() - started:.0f}s", flush=True)
    config = load_config(CONFIG)
    truth = load_truth(truth_path)
    records = records_from_table(store.read(round_layout(0).scored))
    nlp = load_pipeline(config.filter.spacy_model)

    # Parsed once: every evaluation below reuses the truth's and the records' statistics.
    true_captions = [c for record in truth.values() for c in record.captions.values()]
    for caption, stats in zip(
        true_captions, text_stats(nlp, [c.text for c in true_captions]), strict=True
    ):
        caption.stats = stats

    columns = ["box AP50", "box P", "box R", "cap P", "cap R", "ground P", "ground R", "images"]
    print(f"\n{len(records)} images, {sum(len(t.regions) for t in truth.values())} true regions")
    print(f"{'setting':<26}" + "".join(f"{c:>10}" for c in columns), flush=True)
    rows = []
    named = [("merged (no filter)", None), *variants(config.filter)]
    for name, filter_config in named:
        kept = records
        if filter_config is not None:
            kept = [k for r in records if (k := decide_record(r, filter_config)[0]) is not None]
        rows.append(row(name, evaluate(kept, truth, nlp), len(kept)))
        cells = [
            "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
            for v in list(rows[-1].values())[1:]
        ]
        print(f"{name:<26}" + "".join(f"{c:>10}" for c in cells), flush=True)
    (Path(args.work) / "sweep.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
