"""A lease on a store: one writing run at a time, safe on object stores, taken over when
stale.

Object stores have no atomic rename and fsspec offers no conditional write, so the lock
is a set of claims: each contender writes its own file ``locks/<name>/<owner>.json``
(owner, host, pid, since, expires), then lists the folder. It holds the lock only if no
other live claim is there; otherwise it deletes its own claim and is refused. With
read-after-write consistency (local disk, S3, GCS) two contenders can both be refused,
never both admitted: whichever lists second sees the other's claim. A claim whose
``expires`` has passed belongs to a dead run; the next contender deletes it and says so.
So does a claim made on this host by a process that no longer exists: a run killed and
started again on one machine goes on at once instead of waiting out the lease.

The holder renews its lease every ``ttl / 3`` from a background thread while the lock is
held (``with lock:``), so a lease expires only when its run has stopped renewing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from engine.layout import LOCKS
from engine.store import Store

DEFAULT_TTL_S = 300.0


class LockHeld(RuntimeError):
    """Another live run holds the lock; the message names it and since when."""


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    host: str
    pid: int
    since: float  # seconds since the epoch, by the holder's clock
    expires: float

    def describe(self) -> str:
        return (
            f"{self.owner} on {self.host} (pid {self.pid}) since {_utc(self.since)}, "
            f"lease until {_utc(self.expires)}"
        )


def is_live(lease: Lease, now: float) -> bool:
    """Whether a claim may still belong to a running run: unexpired, and, when it was
    made on this host, its process still exists (a reused pid errs towards alive)."""
    if lease.expires < now:
        return False
    if lease.host != socket.gethostname():
        return True
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def lock_folder(name: str) -> str:
    return f"{LOCKS}/{name}"


def read_leases(store: Store, name: str) -> list[Lease]:
    """Every claim on the lock ``name``, live or stale, oldest first."""
    folder = store.path(lock_folder(name))
    if not store.fs.exists(folder):
        return []
    leases = []
    for path in store.fs.ls(folder, detail=False):
        if not path.endswith(".json"):
            continue
        try:
            leases.append(Lease(**json.loads(store.fs.cat_file(path))))
        except FileNotFoundError:
            continue  # released while we listed
        except (json.JSONDecodeError, TypeError) as exc:
            raise LockHeld(
                f"{name}: unreadable claim {path} ({exc}); remove it if no run holds the lock"
            ) from exc
    return sorted(leases, key=lambda lease: (lease.since, lease.owner))


class StoreLock:
    """The lease ``name`` on ``store``; ``with StoreLock(store, WRITE_LOCK):`` holds it.

    ``ttl_s``: how long a lease lives without renewal; a run that dies is taken over
    after at most that long. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.name = name
        self.ttl_s = ttl_s
        self.clock = clock
        self.owner = uuid.uuid4().hex[:12]
        self.taken_over: list[Lease] = []
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # Set by the heartbeat when renewing failed; ``check()`` raises it.
        self._lost: Exception | None = None

    @property
    def _claim(self) -> str:
        return self.store.path(lock_folder(self.name), f"{self.owner}.json")

    def _write_claim(self, since: float) -> Lease:
        now = self.clock()
        lease = Lease(self.owner, socket.gethostname(), os.getpid(), since, now + self.ttl_s)
        self.store.fs.makedirs(posixpath.dirname(self._claim), exist_ok=True)
        # Written aside and moved into place: a reader never sees half a claim (an object
        # store shows an object only once complete; a local rename is atomic).
        partial = f"{self._claim}.{uuid.uuid4().hex[:8]}.partial"
        with self.store.fs.open(partial, "w") as f:
            json.dump(asdict(lease), f)
        self.store.fs.mv(partial, self._claim)
        return lease

    def acquire(self) -> Lease:
        """Claim the lock; raises ``LockHeld`` naming the live holder when there is one."""
        now = self.clock()
        for lease in read_leases(self.store, self.name):
            if lease.owner != self.owner and not is_live(lease, now):
                self._remove(lease.owner)
                self.taken_over.append(lease)
        mine = self._write_claim(since=now)
        others = [
            lease
            for lease in read_leases(self.store, self.name)
            if lease.owner != self.owner and is_live(lease, now)
        ]
        if others:
            self._remove(self.owner)
            raise LockHeld(f"{self.name} is held by {others[0].describe()}")
        return mine

    def renew(self) -> Lease:
        """Push the lease's expiry ``ttl_s`` into the future."""
        current = [
            lease for lease in read_leases(self.store, self.name) if lease.owner == self.owner
        ]
        if not current:
            raise LockHeld(f"{self.name}: this run's lease is gone (taken over after expiry?)")
        return self._write_claim(since=current[0].since)

    def check(self) -> None:
        """Raise if the heartbeat could not renew the lease: another run may hold the lock
        now, so the work must stop before it writes more."""
        if self._lost is not None:
            raise LockHeld(f"{self.name}: lease lost: {self._lost}") from self._lost

    def release(self) -> None:
        self._remove(self.owner)

    def _remove(self, owner: str) -> None:
        path = self.store.path(lock_folder(self.name), f"{owner}.json")
        with contextlib.suppress(FileNotFoundError):  # already released or taken over
            self.store.fs.rm(path)

    def __enter__(self) -> StoreLock:
        self.acquire()
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_until_stopped, daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self.release()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as exc:  # any store error means the lease may lapse
                self._lost = exc
                return
