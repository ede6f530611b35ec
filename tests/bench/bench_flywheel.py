"""The flywheel measured on a generated world: round 0 from the specialists, then refine
rounds, each scored against the truth of the images that came without labels.

    .venv/bin/python tests/bench/bench_flywheel.py [--images 1000] [--seed 2027] \\
        [--rounds 3] [--human 0.1] [--config engine/configs/flywheel.yaml] [--work out/flywheel]

A fresh world of ``--images`` images of world ``--seed`` (never a seed the student
recipe was tuned on: those are 0 and 5). ``--human`` of its images (every image whose
hash falls there) are ingested with their true boxes and brief caption as a COCO file:
the human labels, of which the merge policy validates on ``refine.policy.
validation_fraction`` and the student never trains on those. The rest are ingested bare.

Round 0 is ``--stage all`` with the config's specialists; then ``--rounds`` refine
rounds, each with the config's fixed training budget (``refine.student.steps``). Every
round is scored against the truth of the images without human labels (the human ones
are what the round was given, not what it made), written to its ``quality.json`` and
drawn in its report (quality against round).

Prints, per round: the headline quality, what the policy took from the student (with its
figures), churn, the student's image check and the wall time of each step, then a
markdown table of the same; writes them all to ``<work>/flywheel.json``. The spread
line is each metric's difference between the two halves of the scored images in round
0 (split by a hash of the file name): a change smaller than it is noise.
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.config import CONFIG_DIR, EngineConfig, load_config
from engine.layout import round_layout
from engine.pipeline import ROUND, STEPS, Request, execute, plan
from engine.records import records_from_table
from engine.round_state import read_round_state
from engine.store import Store
from engine.world import generate_world, load_truth
from refinement.evaluation import evaluate_step, quality_rows
from refinement.metrics import evaluate, format_value

HUMAN_SEED = "human"


def in_share(name: str, share: float, salt: str) -> bool:
    digest = hashlib.sha256(f"{salt}/{name}".encode()).hexdigest()[:8]
    return int(digest, 16) < share * 2**32


def split_world(truth_path: Path, share: float) -> tuple[Path, Path, Path, int]:
    """Write, beside ``truth.json``: the human labels (COCO: boxes, polygons, the brief
    caption) of ``share`` of the world's images, the ingest file of the others (images
    only) and their truth. Returns the three paths and the number of labelled images."""
    truth = json.loads(truth_path.read_text())
    labelled = {i["id"] for i in truth["images"] if in_share(i["file_name"], share, HUMAN_SEED)}
    human = {
        "images": [
            {k: i[k] for k in ("id", "file_name", "width", "height")}
            for i in truth["images"]
            if i["id"] in labelled
        ],
        "annotations": [
            {k: a[k] for k in ("id", "image_id", "category_id", "bbox", "segmentation")}
            for a in truth["annotations"]
            if a["image_id"] in labelled
        ],
        "categories": truth["categories"],
    }
    next_id = max((a["id"] for a in truth["annotations"]), default=0) + 1
    for offset, image in enumerate(i for i in truth["images"] if i["id"] in labelled):
        human["annotations"].append(
            {"id": next_id + offset, "image_id": image["id"], "caption": image["captions"]["brief"]}
        )
    rest = {
        **truth,
        "images": [i for i in truth["images"] if i["id"] not in labelled],
        "annotations": [a for a in truth["annotations"] if a["image_id"] not in labelled],
    }
    bare = {
        "images": [
            {k: i[k] for k in ("id", "file_name", "width", "height")} for i in rest["images"]
        ],
        "annotations": [],
        "categories": [],
    }
    paths = [truth_path.parent / name for name in ("human.json", "bare.json", "truth_bare.json")]
    for path, content in zip(paths, (human, bare, rest), strict=True):
        path.write_text(json.dumps(content))
    return *paths, len(labelled)


def round_started(work: Path, number: int) -> float | None:
    """When this benchmark first started round ``number`` in ``work`` (kept across
    ``--resume``, so a round carried on after a kill is timed from its real start);
    None for a round some other command made."""
    path = work / "round_starts.json"
    starts = json.loads(path.read_text()) if path.exists() else {}
    return starts.get(str(number))


def note_round_start(work: Path, number: int) -> None:
    path = work / "round_starts.json"
    starts = json.loads(path.read_text()) if path.exists() else {}
    starts.setdefault(str(number), time.time())
    path.write_text(json.dumps(starts))


def step_seconds(store: Store, number: int, started: float | None) -> dict[str, float | None]:
    """Wall time of each recorded step of a round: from the end of the step before it in
    time (steps record when they end), the first from ``started`` (None if unknown)."""
    state = read_round_state(store, number)
    ends = sorted(
        ((calendar.timegm(time.strptime(done["at"], "%Y-%m-%dT%H:%M:%SZ")), step)
         for step, done in (state.steps.items() if state else ())),
        key=lambda end: end[0],  # steps that ended in the same second keep their order
    )  # fmt: skip
    seconds: dict[str, float | None] = {}
    previous = started
    for at, step in ends:
        seconds[step] = None if previous is None else at - previous
        previous = at
    return seconds


def spread(store: Store, truth_path: Path, config: EngineConfig) -> dict[str, float]:
    """Per metric of the table: round 0's difference between two halves of the scored
    images."""
    from filters.text import load_pipeline

    truth = load_truth(truth_path)
    nlp = load_pipeline(config.filter.spacy_model)
    records = records_from_table(store.read(round_layout(0).filtered))
    halves = [
        {name: r for name, r in truth.items() if in_share(name, 0.5, "half") == side}
        for side in (True, False)
    ]
    evaluations = [evaluate(records, half, nlp) for half in halves]
    rows = quality_rows({str(i): e for i, e in enumerate(evaluations)})
    first, second = (caption_kinds(e.to_dict()["captions"]) for e in evaluations)
    rows += [(name, first[name], second[name]) for name in first]
    return {name: abs(float(a) - float(b)) for name, a, b in rows if "-" not in (a, b)}


def caption_kinds(captions: dict[str, dict]) -> dict[str, str]:
    """Object precision and recall of each caption kind (an evaluation's ``captions``):
    the headline rows score the detailed caption alone."""
    return {
        f"{kind} caption obj {side}": format_value(scores[f"object_{name}"])
        for kind, scores in captions.items()
        for side, name in (("P", "precision"), ("R", "recall"))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2027)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--human", type=float, default=0.1)
    parser.add_argument("--config", default=str(CONFIG_DIR / "flywheel.yaml"))
    parser.add_argument("--work", default="out/flywheel")
    parser.add_argument(
        "--resume", action="store_true", help="carry on in --work: committed rounds are kept"
    )
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    truth = work / "world" / "truth.json"
    if not truth.exists():
        truth = generate_world(work / "world", args.images, seed=args.seed, workers=2).truth
    human, bare, scored_truth, labelled = split_world(truth, args.human)
    config = load_config(args.config)
    store = Store(str(work / "store"))
    print(f"world {args.seed}: {args.images} images, {labelled} with human labels", flush=True)

    results = []
    for number in range(args.rounds + 1):
        state = read_round_state(store, number)
        if state is not None and state.committed:
            print(f"r{number:03d}: committed by an earlier run", flush=True)
        elif number == 0:
            note_round_start(work, number)
            inputs = (str(bare), str(human))
            request = Request(config, store, 0, inputs, alone=False)
            steps = [STEPS[name] for name in ROUND]
            steps.insert(steps.index(STEPS["report"]), evaluate_step(scored_truth))
            execute(plan(steps, request), request)
        else:
            note_round_start(work, number)
            request = Request(config, store, number)
            # Refine holds the store's lease itself, between its steps; the steps after
            # it run under the lease of a run of their own, as a second command would.
            execute(plan([STEPS["refine"]], request), request)
            steps = [evaluate_step(scored_truth), STEPS["report"]]
            execute(plan(steps, request), request)
        layout = round_layout(number)
        quality = store.read_json(layout.quality)
        kinds = caption_kinds(quality["evaluations"]["filtered"]["captions"])
        results.append(
            {
                "round": number,
                "quality": {**{row[0]: row[-1] for row in quality["rows"]}, **kinds},
                "policy": store.read_json(layout.policy),
                "churn": store.read_json(layout.churn),
                "student": store.read_json(layout.student_report),
                "seconds": step_seconds(store, number, round_started(work, number)),
            }
        )
        print(json.dumps(results[-1], indent=1), flush=True)

    noise = spread(store, scored_truth, config)
    (work / "flywheel.json").write_text(json.dumps({"rounds": results, "spread": noise}))
    print_table(results, noise)
    return 0


def print_table(results: list[dict], noise: dict[str, float]) -> None:
    metrics = list(results[0]["quality"])
    print("\n| metric | " + " | ".join(f"r{r['round']:03d}" for r in results) + " | spread |")
    print("|---" * (len(results) + 2) + "|")
    for name in metrics:
        values = " | ".join(r["quality"][name] for r in results)
        print(f"| {name} | {values} | {noise.get(name, float('nan')):.3f} |")
    for r in results[1:]:
        policy = r["policy"] or {"families": {}}
        taken = {
            f: f"{'accepted' if d['accepted'] else 'refused'} ({d['reason']})"
            for f, d in policy["families"].items()
        }
        check = (r["student"] or {}).get("image_check") or {}
        churn = r["churn"] or {}
        print(
            f"r{r['round']:03d}: student {(r['student'] or {}).get('reason')}; "
            f"image check true {check.get('true_loss')}, shuffled {check.get('shuffled_loss')}; "
            f"policy {taken}; churn added {churn.get('added')}, changed {churn.get('changed')}, "
            f"retired {churn.get('retired')}; seconds {r['seconds']}"
        )


if __name__ == "__main__":
    sys.exit(main())
