"""A store written before markers left the datasets' folders, moved to today's layout.

Such a store keeps each marker in ``<dataset>/_committed/`` and its export's index and
COCO file among the shards. The first command on it moves them to today's layout
(``engine/layout.py``), under the store's write lease and before it plans anything, so
its committed work is kept rather than redone.
"""

from __future__ import annotations

import posixpath

from engine.layout import EXPORTS, MANIFEST, MARKER_ROOT, QUARANTINE, ROUNDS, SHARDS, WRITE_LOCK
from engine.lock import LockHeld, StoreLock
from engine.store import Store, StoreError

# The earlier layout's marker folders, one pattern per shape of dataset path.
# The manifest's comes last: it is what marks a store as not yet moved, so a run killed
# while moving moves the rest on its next start.
_OLD_MARKER_FOLDERS = (
    f"{QUARANTINE}/_committed",
    f"{ROUNDS}/*/*/_committed",
    f"{ROUNDS}/*/annotate/*/_committed",
    f"{SHARDS}/*/_committed",
    f"{MANIFEST}/_committed",
)
# Files an export kept beside its shards.
_OLD_EXPORT_FILES = ("_index.json", "coco.json")


def upgrade_layout(store: Store, lock_ttl_s: float) -> list[str]:
    """Move a store of the earlier layout to today's; returns the datasets whose markers
    moved (none for a store of today's layout, found with one stat: every store of the
    earlier layout has manifest markers there)."""
    if not store.fs.exists(store.path(MANIFEST, "_committed")):
        return []
    try:
        with StoreLock(store, WRITE_LOCK, ttl_s=lock_ttl_s):
            return _move_old_markers(store)
    except LockHeld as exc:
        raise StoreError(f"the store's layout must be moved first, but: {exc}") from None


def _move_old_markers(store: Store) -> list[str]:
    moved = []
    for pattern in _OLD_MARKER_FOLDERS:
        for folder in sorted(store.fs.glob(store.path(pattern))):
            dataset = posixpath.relpath(posixpath.dirname(folder), store.root)
            target = store.path(MARKER_ROOT, dataset)
            store.fs.makedirs(target, exist_ok=True)
            for marker in store.fs.ls(folder, detail=False):
                store.fs.mv(marker, posixpath.join(target, posixpath.basename(marker)))
            store.fs.rm(folder, recursive=True)
            moved.append(dataset)
            if dataset.startswith(f"{SHARDS}/"):
                _move_export_files(store, dataset)
    return moved


def _move_export_files(store: Store, shards: str) -> None:
    export = f"{EXPORTS}/{posixpath.basename(shards)}"
    for name in _OLD_EXPORT_FILES:
        old = store.path(shards, name)
        if store.fs.exists(old):
            store.fs.makedirs(store.path(export), exist_ok=True)
            store.fs.mv(old, store.path(export, name))
