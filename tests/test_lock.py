"""The store's write lease: one holder at a time, a stale lease taken over, safe without rename."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from engine.lock import LockHeld, StoreLock, read_leases


def test_a_second_holder_is_refused_with_who_and_since(store):
    first = StoreLock(store, "refine")
    held = first.acquire()
    with pytest.raises(LockHeld) as refused:
        StoreLock(store, "refine").acquire()
    message = str(refused.value)
    assert held.owner in message and held.host in message and f"pid {held.pid}" in message
    assert "since" in message
    assert [lease.owner for lease in read_leases(store, "refine")] == [held.owner]
    first.release()
    assert StoreLock(store, "refine").acquire().owner != held.owner


def test_an_expired_lease_is_taken_over_and_reported(store):
    now = time.time()
    dead = StoreLock(store, "refine", ttl_s=10, clock=lambda: now)
    dead_lease = dead.acquire()
    still_alive = StoreLock(store, "refine", ttl_s=10, clock=lambda: now + 9)
    with pytest.raises(LockHeld):
        still_alive.acquire()
    later = StoreLock(store, "refine", ttl_s=10, clock=lambda: now + 11)
    lease = later.acquire()
    assert later.taken_over == [dead_lease]
    assert [lease.owner for lease in read_leases(store, "refine")] == [lease.owner]


def test_the_heartbeat_keeps_a_held_lease_alive_past_its_ttl(store):
    with StoreLock(store, "refine", ttl_s=0.3) as holder:
        time.sleep(1.0)
        with pytest.raises(LockHeld):
            StoreLock(store, "refine", ttl_s=0.3).acquire()
        holder.check()
    assert read_leases(store, "refine") == []


def test_a_lost_lease_stops_the_holder(store):
    holder = StoreLock(store, "refine", ttl_s=0.3)
    with holder:
        holder.release()  # as if another run had taken it over
        time.sleep(0.5)
        with pytest.raises(LockHeld, match="lease lost"):
            holder.check()


def test_racing_contenders_are_never_both_admitted(store):
    def contend(barrier: threading.Barrier, admitted: list[StoreLock]) -> None:
        lock = StoreLock(store, "race")
        barrier.wait()
        try:
            lock.acquire()
            admitted.append(lock)
        except LockHeld:
            pass

    for _ in range(20):
        barrier, admitted = threading.Barrier(3), []
        threads = [threading.Thread(target=contend, args=(barrier, admitted)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(admitted) <= 1
        for lock in admitted:
            lock.release()
        assert read_leases(store, "race") == []


def test_a_damaged_claim_is_named_not_ignored(store):
    store.write_bytes("locks/refine/abc.json", b"{not json")
    with pytest.raises(LockHeld, match=r"unreadable claim .*abc\.json"):
        StoreLock(store, "refine").acquire()


def test_a_claim_whose_process_is_gone_on_this_host_is_taken_over_at_once(store):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = StoreLock(store, "write", ttl_s=3600)
    dead.acquire()
    # The claim as if that finished process had made it, still an hour from expiry.
    claim = store.path("locks", "write", f"{dead.owner}.json")
    record = json.loads(store.fs.cat_file(claim))
    store.fs.pipe_file(claim, json.dumps({**record, "pid": int(gone.stdout)}).encode())

    later = StoreLock(store, "write")
    later.acquire()
    assert [lease.owner for lease in later.taken_over] == [dead.owner]
    # A live process's claim on this host stands until it expires.
    with pytest.raises(LockHeld):
        StoreLock(store, "write").acquire()
