"""DuckDB over a store's committed Parquet parts, for the driver's whole-dataset questions
(which ids repeat, which file names clash, the report's totals): DuckDB reads only the
columns a query needs and, under ``memory_limit``, spills its hash tables and sorts to
``temp_directory``, so the driver's memory does not grow with the dataset.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import fsspec

# Working memory of a bounded connection; beyond it DuckDB spills to local disk. One
# thread: each thread adds buffers of its own, and these questions are I/O-bound.
MEMORY_LIMIT = "64MB"
THREADS = 1
# Parquet parts one DuckDB read takes at most: reading a list of files by name holds
# each one's schema, so a read of every part of a large dataset would grow with it.
PARTS_PER_READ = 64


@contextmanager
def bounded_connection(
    file_name: str | None = None, memory_limit: str = MEMORY_LIMIT
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection that works in ``memory_limit`` and spills to a temporary
    folder, removed afterwards; with ``file_name``, its tables live in a database file
    in that folder rather than in memory."""
    with tempfile.TemporaryDirectory(prefix="fld-duckdb-") as folder:
        database = ":memory:" if file_name is None else str(Path(folder) / file_name)
        con = duckdb.connect(database)
        try:
            con.execute(f"SET memory_limit = '{memory_limit}'")
            con.execute(f"SET threads = {THREADS}")
            con.execute(f"SET temp_directory = '{folder}'")
            yield con
        finally:
            con.close()


def view_parts(
    con: duckdb.DuckDBPyConnection,
    name: str,
    paths: Sequence[str],
    filesystem: fsspec.AbstractFileSystem | None,
    extra: str = "",
) -> None:
    """A view ``name`` over the Parquet files ``paths`` (read through ``filesystem``
    where DuckDB cannot read them itself). ``extra``: more ``read_parquet`` options,
    such as ``filename = true``."""
    if filesystem is not None and not _reads_natively(filesystem):
        con.register_filesystem(filesystem)
    # Parts written before a column or a struct field was added lack it: read by name.
    listed = ", ".join("'" + path.replace("'", "''") + "'" for path in paths)
    options = ", ".join(["union_by_name = true", *([extra] if extra else [])])
    con.execute(
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{listed}], {options})"
    )


def part_batches(paths: Sequence[str]) -> Iterator[Sequence[str]]:
    """``paths`` in order, ``PARTS_PER_READ`` at a time."""
    for start in range(0, len(paths), PARTS_PER_READ):
        yield paths[start : start + PARTS_PER_READ]


def _reads_natively(filesystem: fsspec.AbstractFileSystem) -> bool:
    protocols = filesystem.protocol
    return bool({"file", "local"} & set([protocols] if isinstance(protocols, str) else protocols))
