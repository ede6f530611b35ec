"""A store written before markers left the datasets' folders is moved to today's layout
by the first command on it, its committed work kept."""

import json
import posixpath

import pyarrow as pa

from engine.layout import MANIFEST, round_layout
from engine.run import main
from engine.store import Store
from engine.upgrade import upgrade_layout


def old_layout(store: Store, dataset: str) -> None:
    """Put a dataset's markers where the earlier layout kept them."""
    store.fs.makedirs(store.path(dataset, "_committed"), exist_ok=True)
    for unit in store.committed_units(dataset):
        old = store.path(dataset, "_committed", f"{unit}.json")
        store.fs.mv(store.marker_path(dataset, unit), old)


def test_markers_and_export_files_move_and_every_unit_stays_committed(tmp_path):
    store = Store(str(tmp_path / "store"))
    layout = round_layout(0)
    datasets = [MANIFEST, layout.merged, layout.annotate("ocr")]
    for dataset in datasets:
        store.commit_unit("u1", {dataset: pa.table({"image_id": ["a", "b"]})})
    store.write_bytes(posixpath.join(layout.shards, "u1-00000.tar"), b"tar")
    store.write_marker(layout.shards, "u1", {"shards": [{"name": "u1-00000.tar"}]})
    index = {"shards": ["u1-00000.tar"]}
    store.write_bytes(posixpath.join(layout.shards, "_index.json"), json.dumps(index).encode())
    for dataset in [*datasets, layout.shards]:
        old_layout(store, dataset)
        assert not store.committed_units(dataset)

    moved = upgrade_layout(store, lock_ttl_s=60)

    assert sorted(moved) == sorted([*datasets, layout.shards])
    for dataset in datasets:
        assert store.is_committed(dataset, "u1") and store.read(dataset).num_rows == 2
        assert not store.fs.exists(store.path(dataset, "_committed"))
    assert store.is_committed(layout.shards, "u1")
    assert store.fs.ls(store.path(layout.shards), detail=False) == [
        store.path(layout.shards, "u1-00000.tar")
    ]
    assert store.read_json(layout.shard_index) == index
    assert not store.exists("locks/write") or not store.fs.ls(store.path("locks/write"))
    assert upgrade_layout(store, lock_ttl_s=60) == []  # once


def test_the_first_command_on_an_old_store_moves_it_before_planning(tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    store.commit_unit("u1", {MANIFEST: pa.table({"image_id": ["a"]})})
    old_layout(store, MANIFEST)
    # A later stage checks that the store holds images: it must see the moved markers.
    assert main(["--stage", "status", "--store", store.url]) == 0
    assert "moved the markers of 1 datasets" in capsys.readouterr().out
    assert store.is_committed(MANIFEST, "u1")
