"""Hostile local inputs: names that are not UTF-8, FIFOs and sockets, links and COCO
file names that lead out of what the user named. Each is ingested by its bytes or
quarantined with a reason, and the rest of its folder, tar or COCO file goes on."""

import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest

from engine.config import load_config
from engine.records import records_from_table
from engine.store import Store
from stages.ingest import plan_ingest, run_ingest
from tests.inputs import encode, photo, write_coco, write_tar

CONFIG = load_config("engine/configs/test.yaml")


def ingest(store: Store, *inputs: str):
    return run_ingest(store, CONFIG, plan_ingest(list(inputs), store, CONFIG.ingest))


def stored(store: Store, root: Path) -> tuple[set[str], dict[str, str]]:
    """Names (relative to ``root``) in the manifest, and quarantine reason by name."""
    prefix = f"file://{root}/"
    kept = {r.uri.removeprefix(prefix) for r in records_from_table(store.read("manifest"))}
    quarantine = store.read("quarantine")
    rows = quarantine.to_pylist() if quarantine is not None else []
    return kept, {row["uri"].removeprefix(prefix): row["reason"] for row in rows}


def test_file_names_that_are_not_utf8_are_ingested_by_their_bytes(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(encode(photo(seed=31)))
    (folder / "plain.jpg").write_bytes(encode(photo(seed=32)))
    store = Store(str(tmp_path / "store"))
    ingest(store, str(folder))

    # Each undecodable byte is recorded as %XX: a valid, stable URI for the record.
    assert stored(store, folder) == ({"caf%E9.jpg", "plain.jpg"}, {})
    rows = store.read("manifest").num_rows
    again = ingest(store, str(folder))
    assert again.units_run == 0 and store.read("manifest").num_rows == rows


def test_tar_member_names_that_are_not_utf8_are_ingested(tmp_path, ray_cluster):
    member = os.fsdecode(b"\xff\xfe.jpg")
    write_tar(tmp_path / "shard.tar", {member: encode(photo(seed=33)), "ok.jpg": encode(photo())})
    store = Store(str(tmp_path / "store"))
    ingest(store, str(tmp_path / "shard.tar"))

    assert stored(store, tmp_path) == ({"shard.tar#%FF%FE.jpg", "shard.tar#ok.jpg"}, {})


@contextlib.contextmanager
def writer_poking(fifo: Path):
    """Keep opening and closing ``fifo``'s write end, so that a reader blocked on it
    (the fault under test) is released and the test fails instead of hanging."""
    done = threading.Event()

    def poke() -> None:
        while not done.wait(0.5):
            with contextlib.suppress(OSError):  # no reader: nothing to release
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=poke, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("pattern", ["", "*.jpg"])
def test_fifos_and_sockets_are_quarantined_never_read(tmp_path, ray_cluster, pattern):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(encode(photo(seed=41)))
    os.mkfifo(folder / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(folder / "sock.jpg"))
    store = Store(str(tmp_path / "store"))
    with writer_poking(folder / "pipe.jpg"):
        ingest(store, str(folder / pattern))

    kept, reasons = stored(store, folder)
    assert kept == {"good.jpg"}
    assert reasons == {"pipe.jpg": "not a regular file", "sock.jpg": "not a regular file"}


def test_links_are_followed_only_inside_the_input_folder(tmp_path, ray_cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "outside.jpg").write_bytes(encode(photo(seed=51)))
    (folder / ".hidden.jpg").write_bytes(encode(photo(seed=52)))  # reached only by its link
    (folder / "inside.jpg").symlink_to(folder / ".hidden.jpg")
    (folder / "outside.jpg").symlink_to(tmp_path / "outside.jpg")
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    (folder / "etc").symlink_to("/etc")
    (folder / "loop").symlink_to(folder)
    store = Store(str(tmp_path / "store"))
    ingest(store, str(folder))

    kept, reasons = stored(store, folder)
    assert kept == {"inside.jpg"}
    assert reasons == {
        "outside.jpg": "outside input root",
        "passwd.jpg": "outside input root",
        "etc": "outside input root",
        "loop": "not a regular file",
    }
    # Nothing outside was read: no hash of it is stored.
    assert all(row["sha256"] is None for row in store.read("quarantine").to_pylist())


def test_coco_file_names_cannot_leave_the_coco_folder(tmp_path, ray_cluster):
    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(photo(seed=61)))
    (tmp_path / "up.jpg").write_bytes(encode(photo(seed=62)))
    (tmp_path / "absolute.jpg").write_bytes(encode(photo(seed=63)))
    images = {
        "a.jpg": (64, 48),
        "../up.jpg": (64, 48),
        str(tmp_path / "absolute.jpg"): (64, 48),
        "../" * 30 + "etc/passwd": (1, 1),
    }
    write_coco(
        folder / "labels.json", images, [{"image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    )
    store = Store(str(tmp_path / "store"))
    ingest(store, str(folder / "labels.json"))

    kept, reasons = stored(store, tmp_path)
    assert kept == {"coco/a.jpg"}
    assert reasons == {
        "up.jpg": "outside input root",
        "absolute.jpg": "outside input root",
        "file:///etc/passwd": "outside input root",
    }
    assert all(row["sha256"] is None for row in store.read("quarantine").to_pylist())
