"""The command line end to end, on embedded Ray, as a user runs it."""

import hashlib
import json
import re
import subprocess
import sys
import time

import duckdb
import pytest
import webdataset as wds

from engine.config import load_config
from engine.layout import MANIFEST, WRITE_LOCK
from engine.lock import StoreLock
from engine.manifest import manifest_view
from engine.records import ImageRecord, records_to_table
from engine.round_state import commit_round, record_step
from engine.run import UsageError, main, resolve_round
from engine.store import Store
from tests.inputs import encode, messy_input_folder, photo
from tests.processes import REPO, kill_process_tree, ray_temp_dir, start_cli

CONFIG = "engine/configs/test.yaml"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


EXPORT = ["--stage", "export", "--config", CONFIG, "--store", "S"]
INGEST = ["--stage", "ingest", "--config", CONFIG, "--store", "S"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "nope"], "invalid choice"),
        (["--stage", "export", "--config", "missing.yaml", "--store", "S"], "cannot read config"),
        ([*EXPORT, "ingest.colour=1"], "colour"),
        (
            [*EXPORT, "filter.regon.min_score=1"],
            "filter.regon: unknown key; did you mean 'region'?",
        ),
        (EXPORT, "holds no images yet: run --stage ingest first"),
        ([*EXPORT, "ingest.unit_size=-3"], "unit_size"),
        ([*EXPORT, "--round", "last"], "--round"),
        (["--stage", "export", "--config", CONFIG, "--store", "memory://x"], "not shared"),
        (["--stage", "export", "--config", CONFIG], "no store"),
        (INGEST, "needs at least one --input"),
        ([*INGEST, "--input", "nowhere/"], "does not exist"),
    ],
)
def test_bad_invocations_fail_with_one_line_before_any_work(tmp_path, capsys, args, message):
    args = [str(tmp_path / a) if a in ("S", "nowhere/") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "S" / "manifest").exists()


def test_unwritable_store_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    store = str(tmp_path / "file" / "store")
    assert main(["--stage", "export", "--config", CONFIG, "--store", store]) == 2
    assert "not writable" in capsys.readouterr().err


def ingested(path) -> Store:
    """A store with one committed manifest unit of two images."""
    store = Store(str(path))
    records = [ImageRecord(f"i{k}", f"mem://{k}", "test", 24, 16, "0" * 64) for k in range(2)]
    images = [encode(photo(24, 16, seed=k)) for k in range(2)]
    store.commit_unit("u0", {MANIFEST: records_to_table(records, images)})
    return store


def test_a_round_that_does_not_exist_is_refused_before_any_folder_is_made(tmp_path, capsys):
    """A mistyped --round made rounds/r005 (and its shards), which later defaults followed."""
    store = ingested(tmp_path / "store")
    record_step(store, 0, "annotate", "digest")  # round 0 is in progress
    for wanted in ("5", "1"):
        args = ["--stage", "export", "--config", CONFIG, "--store", store.url, "--round", wanted]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "export works on a round that has started" in err and len(err.splitlines()) == 1
    datasets = sorted(p.name for p in (tmp_path / "store").iterdir() if p.name[0] != "_")
    assert datasets == ["manifest", "rounds"]
    assert [p.name for p in (tmp_path / "store/rounds").iterdir()] == ["r000"]


def test_only_started_rounds_and_the_one_a_stage_starts_are_accepted(tmp_path):
    store = Store(str(tmp_path / "store"))
    # A fresh store: round 0 is the default and the one annotate (or all) starts.
    assert resolve_round(None, store, "export") == resolve_round("0", store, "export") == 0
    assert resolve_round("next", store, "annotate") == 0
    record_step(store, 0, "annotate", "d")
    commit_round(store, 0)
    # A stray folder, as a mistyped --round left behind before, is no round.
    (tmp_path / "store/rounds/r005/merged").mkdir(parents=True)
    assert resolve_round(None, store, "export") == 0
    assert resolve_round("next", store, "refine") == resolve_round("1", store, "annotate") == 1
    refused = [("5", "export"), ("1", "export"), ("next", "report"), ("2", "annotate")]
    for value, stage in refused:
        with pytest.raises(UsageError, match="the store has no round"):
            resolve_round(value, store, stage)
    record_step(store, 1, "train", "d", parent=0)  # refine has started round 1
    assert resolve_round("1", store, "export") == 1 and resolve_round(None, store, "merge") == 0
    with pytest.raises(UsageError, match=r"running: \[1\]\); annotate can start round 1 only"):
        resolve_round("2", store, "annotate")


def test_a_damaged_part_is_named_in_one_line(tmp_path, ray_cluster, capsys):
    store = ingested(tmp_path / "store")
    part = tmp_path / "store/manifest/part-u0.parquet"
    part.write_bytes(part.read_bytes()[:100])  # a disk that filled after the commit
    args = ["--stage", "export", "--config", CONFIG, "--store", store.url]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert str(part) in err and "run the stage that writes it again" in err
    assert len(err.splitlines()) == 1


def test_a_folder_of_other_files_is_no_store_unless_told(tmp_path, capsys):
    """store=/etc was accepted and got a manifest/ beside passwd."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0\n")
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.jpg").write_bytes(encode(photo()))
    ingest = ["--stage", "ingest", "--config", CONFIG, "--input", str(images)]
    assert main([*ingest, "--store", str(etc)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no store" in err and "--allow-nonempty-store" in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in etc.iterdir()] == ["passwd"]
    status = ["--stage", "status", "--store"]
    assert main([*status, str(etc), "--allow-nonempty-store"]) == 0
    # A store, an empty folder, a new one, and one a killed write probe left are all fine.
    (tmp_path / "empty").mkdir()
    (tmp_path / "probed").mkdir()
    (tmp_path / "probed/.write-probe").write_bytes(b"ok")
    store = ingested(tmp_path / "store")
    (tmp_path / "store/notes.txt").write_text("a store may hold a note")
    for root in (store.url, tmp_path / "empty", tmp_path / "new", tmp_path / "probed"):
        assert main([*status, str(root)]) == 0, capsys.readouterr().err


def test_all_stages_on_a_messy_folder(tmp_path, ray_cluster, capsys):
    """The demo config on good photos, broken files, bombs, non-images and a hostile tar."""
    demo = "engine/configs/demo.yaml"
    truth = messy_input_folder(tmp_path / "in", load_config(demo).ingest.max_image_pixels)
    store_url = str(tmp_path / "store")
    args = ["--config", demo, "--stage", "all", "--store", store_url]
    code = main([*args, "--input", str(tmp_path / "in"), "export.shard_max_samples=5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[ingest]" in out and "[export]" in out and "[report]" in out

    store = Store(store_url)
    index = json.loads((tmp_path / "store/exports/r000/_index.json").read_text())
    samples = list(wds.WebDataset(index["shards"], shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys))
    # Every good unique image is exported once, or set aside whole by the filter with a reason.
    dropped = store.read("rounds/r000/dropped").to_pylist()
    dropped_images = {row["image_id"] for row in dropped if row["reason"].startswith("image:")}
    manifest_ids = set(manifest_view(store.read("manifest")).column("image_id").to_pylist())
    assert len(manifest_ids) == truth["unique_good"]
    assert set(keys) | dropped_images == manifest_ids and not set(keys) & dropped_images
    assert all(s["jpg"][:3] == b"\xff\xd8\xff" for s in samples)
    assert len(index["shards"]) > 1
    assert (tmp_path / "store/reports/r000/index.html").exists()
    quarantine = {row["uri"]: row["reason"] for row in store.read("quarantine").to_pylist()}
    for name, reason in truth["reasons"].items():
        assert quarantine[f"file://{tmp_path}/in/{name}"] == reason


def tree_digest(store: Store) -> dict[str, list[str]]:
    """Row hashes of every dataset that ingest and export write, sorted."""
    digest = {}
    for dataset in ("manifest", "quarantine"):
        rows = store.read(dataset).to_pylist()
        digest[dataset] = sorted(
            hashlib.sha256(repr(sorted(r.items())).encode()).hexdigest() for r in rows
        )
    return digest


def test_killed_run_resumes_to_the_same_rows(tmp_path):
    """Kill ingest after some parts are committed; the rerun ends exactly like a clean run."""
    images = tmp_path / "in"
    images.mkdir()
    # Noise PNGs: slow enough to decode and re-encode that the kill lands midway.
    for k in range(120):
        (images / f"{k:04d}.png").write_bytes(encode(photo(384, 384, seed=k), "PNG"))
    (images / "0000-copy.png").write_bytes((images / "0000.png").read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 10)
    args = ["--config", CONFIG, "--stage", "ingest", "--input", str(images), "ray.task_cpus=0.5"]

    killed = tmp_path / "killed"
    ray_dir = ray_temp_dir()
    process = start_cli([*args, "--store", str(killed)], ray_dir)
    markers = killed / "_committed" / "manifest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(markers.glob("*.json"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    committed_at_kill = len(list(markers.glob("*.json")))
    kill_process_tree(process, ray_dir)
    assert 3 <= committed_at_kill < 31, "the kill should land midway through the 31 units"
    # A reader of the manifest's folder that knows nothing of markers counts what the
    # engine counts, mid-stage as after it.
    assert parquet_rows(killed / "manifest") == Store(str(killed)).committed_rows("manifest")

    resumed = run_cli(*args, "--store", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    # The files of committed units (of four; one may lack its second marker, the last
    # holds two) are not read again.
    read = re.search(r"files read by an earlier run, not read again: (\d+)", resumed.stdout)
    assert 4 * (committed_at_kill - 2) <= int(read.group(1)) < 122, resumed.stdout
    clean = run_cli(*args, "--store", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr

    assert tree_digest(Store(str(killed))) == tree_digest(Store(str(tmp_path / "clean")))
    # 121 files, one a copy: the manifest holds each image once, for every reader.
    assert Store(str(killed)).read("manifest").num_rows == 120
    assert parquet_rows(killed / "manifest") == 120
    assert not (killed / "_staging").exists()


def parquet_rows(folder) -> int:
    """``SELECT count(*)`` over a dataset's documented glob, in DuckDB."""
    if not list(folder.glob("*.parquet")):
        return 0
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall()[0][0]


def test_a_writing_run_is_refused_while_another_holds_the_store(tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.jpg").write_bytes(encode(photo(32, 24)))
    store = Store(str(tmp_path / "store"))
    holder = StoreLock(store, WRITE_LOCK)
    lease = holder.acquire()
    args = ["--stage", "ingest", "--config", CONFIG, "--store", store.url, "--input", str(images)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and lease.owner in err and "since" in err, err
    assert not store.fs.exists(store.path(MANIFEST))  # refused before any work
    # Reading is no writing: status answers while the lease is held.
    assert main(["--stage", "status", "--store", store.url]) == 0
    holder.release()


def test_a_run_with_nothing_to_do_starts_no_ray(tmp_path, ray_cluster):
    images = tmp_path / "in"
    images.mkdir()
    for k in range(3):
        (images / f"{k}.jpg").write_bytes(encode(photo(32, 24, seed=k)))
    store = str(tmp_path / "store")
    ingest = ["--stage", "ingest", "--config", CONFIG, "--store", store, "--input", str(images)]
    export = ["--stage", "export", "--config", CONFIG, "--store", store]
    assert main(ingest) == 0 and main(export) == 0
    # Again, in a process where starting Ray fails: every unit is committed.
    script = (
        "import json, sys, ray\n"
        "ray.init = lambda *a, **k: sys.exit('ray.init was called')\n"
        "from engine.run import main\n"
        "sys.exit(max(main(args) for args in json.loads(sys.argv[1])))\n"
    )
    again = subprocess.run(
        [sys.executable, "-c", script, json.dumps([ingest, export])],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("nothing to do") == 2, again.stdout
