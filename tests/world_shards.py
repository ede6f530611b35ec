"""A generated world exported as round 0 by the engine's own export code, without Ray.

The world's truth records and image files are committed as manifest units, each unit
exported by the export stage's ``export_unit``, the shard index written and the round
committed: the shards a trainer reads after ``--stage all``, made in a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import ExportConfig
from engine.layout import MANIFEST, round_layout
from engine.records import records_to_table
from engine.round_state import commit_round
from engine.store import Store
from engine.world import generate_world, load_truth
from stages.export import ExportUnit, export_unit, write_shard_index


def exported_world(root: Path, images: int, seed: int, unit: int = 16) -> Store:
    """A store under ``root`` whose committed round 0 is the world's export."""
    paths = generate_world(root / "world", images, seed=seed)
    records = sorted(load_truth(paths.truth).values(), key=lambda r: r.image_id)
    store = Store(str(root / "store"))
    layout = round_layout(0)
    for start in range(0, len(records), unit):
        chunk = records[start : start + unit]
        files = [Path(r.uri.removeprefix("file://")).read_bytes() for r in chunk]
        key = f"u{start:03d}"
        store.commit_unit(key, {MANIFEST: records_to_table(chunk, files)})
        ids = tuple(r.image_id for r in chunk)
        config = ExportConfig(shard_max_samples=8)
        export_unit(ExportUnit(key, store.url, MANIFEST, ids, layout.shards, config))
    write_shard_index(store, layout)
    commit_round(store, 0)
    return store


def shard_urls(store: Store, round_number: int = 0) -> list[str]:
    index = store.path(round_layout(round_number).shard_index)
    return json.loads(store.fs.cat_file(index))["shards"]
