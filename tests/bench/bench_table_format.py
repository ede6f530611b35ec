"""Plain Parquet with staged parts against Delta Lake and Lance: what outside readers see
after a killed commit, and what a commit costs.

    python tests/bench/bench_table_format.py [--units 40] [--rows 2000]

The engine's store (``engine/store.py``) stages a unit's part under ``_staging/``,
writes its marker under ``_committed/``, then moves the part into the dataset's folder,
so the folder holds committed parts only. This bench commits ``--units`` units the
engine's way, then leaves one more unit killed between its marker and its move (the
last moment a kill can land), and counts the rows with every reader installed: the
engine, DuckDB over the documented glob, pandas, ``pyarrow.dataset``, Hugging Face
``datasets``. Where ``deltalake`` and ``pylance`` are installed (they are not in the
lock: ``uv pip install deltalake pylance datasets``) it does the same for a Delta table
and a Lance dataset with an orphan data file, as a writer killed before its commit
leaves, and times an append per unit in each format.

Measured on the 2-core CPU machine (deltalake 1.6.6, pylance 14.0.2, datasets 5.2.0,
duckdb 2.0.0; 40 units of 2,000 rows), which is why the store stays plain Parquet:

- every Parquet reader counts the engine's rows on the engine's folders; on a Delta
  table DuckDB's glob, pandas, ``pyarrow.dataset`` and ``datasets`` also count the
  orphan file (and files a delete retired), and DuckDB reads neither Delta nor Lance
  offline (its extensions are downloaded at run time; the package-index builds are for
  another DuckDB version); pandas and DuckDB's glob cannot read Lance at all;
- a commit costs about the same in all three (milliseconds; Delta's grows with its log).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.store import Store


def unit_table(unit: int, rows: int) -> pa.Table:
    """Rows shaped like the engine's records: ids, text, and a list of scored boxes."""
    rng = np.random.default_rng(unit)
    ids = [f"u{unit}-{k}" for k in range(rows)]
    regions = [
        [
            {"text": f"thing {j}", "score": float(s), "box": [1.0, 2.0, 3.0, 4.0]}
            for j, s in enumerate(rng.random(3))
        ]
        for _ in range(rows)
    ]
    return pa.table(
        {"image_id": ids, "caption": [f"a caption {i}" for i in ids], "regions": regions}
    )


def readers() -> dict[str, Callable[[Path], int]]:
    """Each installed outside reader, as a row count of a folder."""
    import duckdb
    import pandas
    import pyarrow.dataset as pds

    found: dict[str, Callable[[Path], int]] = {
        "duckdb read_parquet('<folder>/*.parquet')": lambda folder: duckdb.sql(
            f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')"
        ).fetchall()[0][0],
        "pandas.read_parquet(<folder>)": lambda folder: len(pandas.read_parquet(folder)),
        "pyarrow.dataset.dataset(<folder>)": lambda folder: pds.dataset(folder).count_rows(),
    }
    if importlib.util.find_spec("datasets"):
        found["datasets.load_dataset(<folder>)"] = _hf_rows
    return found


def _hf_rows(folder: Path) -> int:
    import datasets

    cache = tempfile.mkdtemp()
    try:
        return len(datasets.load_dataset(str(folder), split="train", cache_dir=cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def count_all(folder: Path, committed_rows: int) -> None:
    print(f"  {'committed rows (the format itself)':45s} {committed_rows}")
    for name, count in readers().items():
        try:
            rows = count(folder)
        except Exception as exc:  # a reader that cannot read the folder is a finding
            rows = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        print(f"  {name:45s} {rows}")


def timed(commit: Callable[[int, pa.Table], object], units: list[pa.Table]) -> list[float]:
    """Seconds of each ``commit(number, table)`` of a unit, in order."""
    times = []
    for number, table in enumerate(units):
        started = time.perf_counter()
        commit(number, table)
        times.append(time.perf_counter() - started)
    return times


def engine_store(work: Path, units: list[pa.Table]) -> list[float]:
    store = Store(str(work / "store"))
    times = timed(lambda number, table: store.commit_unit(f"u{number}", {"ds": table}), units)
    # Killed between its marker and its move: the part is staged, the marker names it.
    killed = unit_table(len(units), units[0].num_rows)
    real_publish = store.publish
    store.publish = lambda dataset, names: None
    store.commit_unit("killed", {"ds": killed})
    store.publish = real_publish
    print(f"\nengine store after a commit killed before its move ({len(units)} committed units):")
    count_all(work / "store/ds", store.committed_rows("ds"))
    return times


def delta_table(work: Path, units: list[pa.Table]) -> list[float]:
    import deltalake

    folder = work / "delta"
    times = timed(lambda _, table: deltalake.write_deltalake(folder, table, mode="append"), units)
    # A writer killed after its data file, before its log entry.
    import pyarrow.parquet as pq

    pq.write_table(unit_table(len(units), units[0].num_rows), folder / "part-orphan.parquet")
    rows = deltalake.DeltaTable(folder).to_pyarrow_table(columns=["image_id"]).num_rows
    print("\ndelta table with an orphan data file:")
    count_all(folder, rows)
    return times


def lance_dataset(work: Path, units: list[pa.Table]) -> list[float]:
    import lance

    folder = work / "lance"
    times = timed(lambda _, table: lance.write_dataset(table, folder, mode="append"), units)
    print("\nlance dataset:")
    count_all(folder, lance.dataset(folder).count_rows())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=40)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    units = [unit_table(u, args.rows) for u in range(args.units)]
    work = Path(tempfile.mkdtemp(prefix="bench-format-"))
    try:
        costs = {"engine store (stage, marker, move)": engine_store(work, units)}
        if importlib.util.find_spec("deltalake"):
            costs["delta lake append"] = delta_table(work, units)
        if importlib.util.find_spec("lance"):
            costs["lance append"] = lance_dataset(work, units)
        print(f"\ncommit cost, {args.units} units of {args.rows} rows (median, last 10):")
        for name, times in costs.items():
            median, tail = statistics.median(times), statistics.median(times[-10:])
            print(f"  {name:40s} {median * 1000:6.1f} ms  {tail * 1000:6.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
