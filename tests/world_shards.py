"""A generated world exported as round 0 by the engine's own export code, without Ray.

The world's truth records and image files are committed as manifest units, each unit
exported by the export stage's ``export_unit``, the shard index written and the round
committed: the shards a trainer reads after ``--stage all``, made in a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine.config import ExportConfig
from engine.layout import MANIFEST, round_layout
from engine.records import records_to_table
from engine.round_state import commit_round
from engine.store import Store
from engine.world import generate_world, load_truth
from stages.export import ExportUnit, export_unit, write_shard_index
from stages.ingest_coco import HUMAN_SOURCE


def exported_world(
    root: Path, images: int, seed: int, unit: int = 16, human: int = 0, mismatched: bool = False
) -> Store:
    """A store under ``root`` whose committed round 0 is the world's export; the first
    ``human`` images (by id) carry their labels as human labels. ``mismatched``: each
    record is stored with the next record's image file (within its unit), so no label
    says anything about the pixels it comes with."""
    paths = generate_world(root / "world", images, seed=seed)
    records = sorted(load_truth(paths.truth).values(), key=lambda r: r.image_id)
    for record in records[:human]:
        for label in (*record.captions.values(), *record.regions, *record.phrases):
            label.source = HUMAN_SOURCE
    store = Store(str(root / "store"))
    layout = round_layout(0)
    for start in range(0, len(records), unit):
        chunk = records[start : start + unit]
        files = [Path(r.uri.removeprefix("file://")).read_bytes() for r in chunk]
        if mismatched:
            files = files[1:] + files[:1]
        key = f"u{start:03d}"
        store.commit_unit(key, {MANIFEST: records_to_table(chunk, files)})
        ids = tuple(r.image_id for r in chunk)
        config = ExportConfig(shard_max_samples=8)
        export_unit(ExportUnit(key, store.url, MANIFEST, ((key, ids),), layout.shards, config))
    write_shard_index(store, layout)
    commit_round(store, 0)
    return store


def shard_urls(store: Store, round_number: int = 0) -> list[str]:
    index = store.path(round_layout(round_number).shard_index)
    return json.loads(store.fs.cat_file(index))["shards"]


def refine_config(folder: Path, min_image_gain: float) -> str:
    """The test config plus the world's specialists and a tiny student."""
    config = yaml.safe_load(Path("engine/configs/test.yaml").read_text())
    config["annotate"] = {
        "specialists": [
            {"name": "shapes", "kind": "world_shapes", "num_cpus": 0.25},
            {"name": "captions", "kind": "world_captions", "num_cpus": 0.25},
        ]
    }
    config["refine"] = {
        "student": {
            "tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "image_size": 64},
            "steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
            "holdout_fraction": 0.3, "checkpoint_every": 2, "cpus_per_worker": 0.5,
            "min_image_gain": min_image_gain,
        },
        "annotate_tasks": ["<OD>"],
        "policy": {"validation_fraction": 1.0, "min_images": 1},
        "annotator": {"name": "student", "kind": "florence2", "num_cpus": 0.25,
                      "options": {"max_new_tokens": 24}},
    }  # fmt: skip
    path = folder / f"refine-{min_image_gain}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
