"""Running stages on Ray: an embedded local Ray on a laptop, the cluster under ``ray job submit``.

Stages cut their work into fixed, deterministic units; ``run_units`` runs the units not
yet committed as Ray tasks with a fractional CPU each, shows progress, and folds the
per-unit summaries into one. A plan too small to pay Ray's start-up (a few units, no Ray
up yet, no cluster named) runs in a pool of this machine's processes instead.

Ray is imported where it is first used: planning, ``--help`` and a config error answer
without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from typing import IO, Any, Protocol, TypeVar

from tqdm import tqdm

from engine.config import RayConfig
from engine.summary import StageSummary

UnitT = TypeVar("UnitT")

# Without a terminal (``ray job logs``, CI, a file) every redraw of a bar becomes a line
# of its own; a plain line this often, and one at the end, is what a log can hold.
PROGRESS_LOG_SECONDS = 30.0
# Ray logs at every start of a local cluster that it turned token authentication on for
# it: nothing for the user to act on, printed above the first progress bar.
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
# Under load a local Ray's start can time out ("The current node timed out during
# startup"); a second try usually finds the machine calmer.
RAY_START_ATTEMPTS = 2


class StageError(RuntimeError):
    pass


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@dataclass
class _Session:
    """The open ``ray_session``: its config, and whether (and where) it started a Ray."""

    config: RayConfig
    started: bool = False
    # The embedded Ray's session files, removed when the session ends.
    temp_dir: str | None = None


_open: _Session | None = None


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """A run's Ray: attached to a cluster when an address is known, else an embedded
    local Ray, started only when work first needs it (``require_ray``), so a run that
    finds every unit committed answers in seconds without paying Ray's start-up.

    The embedded Ray listens on loopback only (engine/__init__.py) and keeps its session
    files in a temp dir of this run, removed afterwards. An already initialised Ray (a
    test session, a notebook) is used as it is and left running.
    """
    global _open
    if _ray_is_up():
        yield
        return
    session = _open = _Session(config)
    try:
        yield
    finally:
        _open = None
        if session.started:
            import ray

            ray.shutdown()
            if session.temp_dir and not config.temp_dir:
                shutil.rmtree(session.temp_dir, ignore_errors=True)


def _ray_is_up() -> bool:
    """Ray is initialised in this process; answered without importing it when it is not."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def require_ray() -> None:
    """Start the open session's Ray unless Ray is up. Every stage calls it before its
    first Ray task or actor; outside a session a stage needs Ray already running."""
    import ray

    if ray.is_initialized():
        return
    if _open is None:
        raise StageError("Ray is not running: run stages inside engine.execution.ray_session")
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            _start_ray(_open)
            break
        except Exception as exc:  # a start that timed out raises one of several types
            ray.shutdown()
            if attempt == RAY_START_ATTEMPTS:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise StageError(
                    f"Ray did not start ({type(exc).__name__}: {reason}), {attempt} tries; "
                    "a loaded machine can make its start time out: run again, or keep one "
                    "Ray up for every run (README: Local cluster)"
                ) from None
    _open.started = True


def _start_ray(session: _Session) -> None:
    import ray

    config = session.config
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        session.temp_dir = config.temp_dir or tempfile.mkdtemp(prefix="fld-ray-")
        # Only the notice that auth is on is dropped: auth stays on, and any other warning
        # of that logger (auth off, a token missing) still shows.
        notice = _DropMessage(_TOKEN_AUTH_NOTICE)
        auth_logger = logging.getLogger(_TOKEN_AUTH_LOGGER)
        auth_logger.addFilter(notice)
        try:
            # address="local" never attaches to a stale cluster someone else started.
            ray.init(
                address="local",
                num_cpus=config.num_cpus,
                include_dashboard=False,
                _temp_dir=session.temp_dir,
                logging_level="WARNING",
            )
        finally:
            auth_logger.removeFilter(notice)


class LineProgress:
    """Progress for a log rather than a terminal: a plain line every ``interval`` seconds
    and one when it closes, so an hour-long stage under ``ray job logs`` leaves about 120
    lines, not one per redraw (tqdm's carriage returns each end a line in a file). It
    takes the calls of the tqdm bar it stands in for: ``update``, ``set_postfix``."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "unit",
        file: IO[str] | None = None,
        interval: float = PROGRESS_LOG_SECONDS,
        disable: bool = False,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file or sys.stderr
        self.interval, self.disable = interval, disable
        self.n = 0
        self.postfix: dict[str, object] = {}
        self._started = self._last = time.monotonic()
        self._printed_n = -1

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def set_postfix(self, **values: object) -> None:
        # Shown with the next line, not printed on its own.
        self.postfix = values

    def close(self) -> None:
        if self._printed_n != self.n:
            self._print()

    def _print(self) -> None:
        if self.disable:
            return
        self._last = time.monotonic()
        self._printed_n = self.n
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {key}={value}" for key, value in self.postfix.items())
        elapsed = self._last - self._started
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit}s{percent}{extra} {elapsed:.0f}s",
            file=self.file,
            flush=True,
        )

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int, desc: str, *, unit: str = "unit", disable: bool = False, file: IO[str] | None = None
) -> tqdm | LineProgress:
    """A tqdm bar on ``file`` (stderr) when it is a terminal, else a ``LineProgress``.

    Every stage's progress goes through here, so a run under ``ray job submit`` or with
    stderr sent to a file logs progress at a bounded rate."""
    file = file or sys.stderr
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=file, disable=disable)
    return LineProgress(total, desc, unit=unit, file=file, disable=disable)


def fits(cpus: float, gpus: float) -> bool:
    """Whether actors and tasks holding ``cpus`` and ``gpus`` can all run at once: on
    this machine's embedded Ray, against what it has; on a cluster (RAY_ADDRESS set),
    always, since its autoscaler may add nodes on demand."""
    import ray

    require_ray()
    if os.environ.get("RAY_ADDRESS"):
        return True
    available = ray.cluster_resources()
    return cpus <= available.get("CPU", 0.0) + 1e-9 and gpus <= available.get("GPU", 0.0) + 1e-9


def check_fits(stage: str, cpus: float, gpus: float) -> None:
    """Refuse work an embedded Ray can never schedule, instead of waiting on it forever.

    Actors that hold every CPU leave none for the tasks that feed them, and Ray then
    waits without a word. A cluster (RAY_ADDRESS set) may add nodes on demand, so there
    the request is left to its autoscaler.
    """
    if fits(cpus, gpus):
        return
    import ray

    available = ray.cluster_resources()
    have_cpus, have_gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    raise StageError(
        f"{stage}: needs {cpus:g} CPUs and {gpus:g} GPUs at once but this machine's Ray "
        f"has {have_cpus:g} CPUs and {have_gpus:g} GPUs; lower num_cpus, num_gpus or "
        "pool_size of the specialists, or ray.task_cpus"
    )


def run_units(
    stage: str,
    work: Callable[[UnitT], StageSummary],
    units: Sequence[UnitT],
    *,
    done: Callable[[UnitT], bool],
    num_cpus: float,
    max_in_flight: int = 64,
    committed: Callable[[UnitT], bool] | None = None,
) -> StageSummary:
    """Run ``work`` on every unit that is not ``done`` yet, as Ray tasks.

    ``committed`` (optional) tells a unit committed from other inputs (not ``done``,
    since what it was computed from changed) from one never committed: the first are
    counted in the summary as redone, so a user sees that a changed setting or an
    upstream rerun reached them.

    ``work`` commits its own output and returns that unit's summary. A unit that raises
    is reported and the others go on; the stage then fails, naming the units, and a
    rerun redoes only those. ``max_in_flight`` bounds the tasks submitted at once, so a
    million units do not become a million pending objects on the driver.
    """
    started = time.perf_counter()
    summary = StageSummary(stage)
    todo = [unit for unit in units if not done(unit)]
    summary.units_skipped = len(units) - len(todo)
    if committed is not None:
        redone = sum(1 for unit in todo if committed(unit))
        if redone:
            summary.notes["units redone: what they are computed from changed"] += redone
    failures: list[str] = []
    if todo:
        with _runner(work, len(todo), num_cpus) as runner:
            _run_all(stage, runner, todo, summary, failures, max_in_flight)
    summary.seconds = time.perf_counter() - started
    if failures:
        raise StageError(
            f"{stage}: {len(failures)} of {len(todo)} units failed (rerun to retry them): "
            + "; ".join(failures[:3])
        )
    return summary


def _run_all(
    stage: str,
    runner: _Runner[UnitT],
    todo: Sequence[UnitT],
    summary: StageSummary,
    failures: list[str],
    max_in_flight: int,
) -> None:
    pending: dict[Any, UnitT] = {}
    queue = iter(todo)
    with progress_bar(len(todo), stage) as bar:
        while True:
            for unit in queue:
                pending[runner.submit(unit)] = unit
                if len(pending) >= max_in_flight:
                    break
            if not pending:
                break
            handle = runner.next_done(list(pending))
            unit = pending.pop(handle)
            try:
                summary.add(runner.result(handle))
                summary.units_run += 1
            except Exception as exc:
                # A RayTaskError wraps the unit's own exception with a remote traceback.
                cause = getattr(exc, "cause", None) or exc
                failures.append(f"{getattr(unit, 'key', unit)}: {type(cause).__name__}: {cause}")
            bar.update(1)
            bar.set_postfix(items=summary.inputs)


class _Runner(Protocol[UnitT]):
    """Where units run: submit one, wait for the next that is done, take its result."""

    def submit(self, unit: UnitT) -> Any: ...

    def next_done(self, handles: list[Any]) -> Any: ...

    def result(self, handle: Any) -> StageSummary: ...


class _RayTasks:
    """Units as Ray tasks of ``num_cpus`` each."""

    def __init__(self, work: Callable[[UnitT], StageSummary], num_cpus: float) -> None:
        import ray

        require_ray()
        self._ray = ray
        self._remote = ray.remote(num_cpus=num_cpus, max_retries=2)(work)

    def submit(self, unit: UnitT) -> Any:
        return self._remote.remote(unit)

    def next_done(self, handles: list[Any]) -> Any:
        ready, _ = self._ray.wait(handles, num_returns=1)
        return ready[0]

    def result(self, handle: Any) -> StageSummary:
        return self._ray.get(handle)


class _LocalProcesses:
    """Units in a pool of this machine's processes. Spawned, not forked: the driver runs
    threads (the store lease's renewal) that a fork would copy in the middle of a step."""

    def __init__(self, work: Callable[[UnitT], StageSummary], pool: futures.Executor) -> None:
        self._work, self._pool = work, pool

    def submit(self, unit: UnitT) -> Any:
        return self._pool.submit(self._work, unit)

    def next_done(self, handles: list[Any]) -> Any:
        done, _ = futures.wait(handles, return_when=futures.FIRST_COMPLETED)
        return next(handle for handle in handles if handle in done)

    def result(self, handle: Any) -> StageSummary:
        return handle.result()


@contextmanager
def _runner(
    work: Callable[[UnitT], StageSummary], units: int, num_cpus: float
) -> Iterator[_Runner[UnitT]]:
    """Ray tasks, or local processes for a plan too small to pay Ray's start-up: at most
    ``RayConfig.local_max_units`` units, no Ray up yet, no cluster named (RAY_ADDRESS),
    inside a run's session. As many processes at once as Ray would run tasks."""
    session = _open
    local = (
        session is not None
        and units <= session.config.local_max_units
        and not _ray_is_up()
        and not os.environ.get("RAY_ADDRESS")
    )
    if not local:
        yield _RayTasks(work, num_cpus)
        return
    cores = session.config.num_cpus or os.cpu_count() or 1
    processes = max(1, min(units, int(cores / num_cpus)))
    with futures.ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        yield _LocalProcesses(work, pool)
