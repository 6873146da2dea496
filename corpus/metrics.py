"""Quality metrics in DuckDB: one table per concern, every row keyed by asset, partition, version, run id.

Writes are idempotent per key: rows for the same (table, asset, partition, version, run_id) are replaced,
so a retried step never double-counts. Tables are created from the first rows written (DuckDB infers
the schema from Arrow) and extended BY NAME later, so a stage can add a column without a migration.

DuckDB allows one writing process per file. Parallel Dagster steps each open, write and close, and
retry on the lock with a bounded back-off (`LOCK_TIMEOUT_S`) instead of failing or waiting forever.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

LOCK_TIMEOUT_S = 120.0
KEY_COLUMNS = ("asset", "partition", "version", "run_id")
TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class MetricsError(RuntimeError):
    """The metrics database cannot be opened or written."""


@contextmanager
def connect(path: str | Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the metrics database, retrying while another process holds its write lock."""
    path = Path(path)
    if read_only and not path.exists():
        raise MetricsError(f"metrics database {path} does not exist; run `corpus run` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise MetricsError(f"cannot open {path}: {exc}") from exc
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
    try:
        yield con
    finally:
        con.close()


def _table(rows: Sequence[Mapping[str, Any]] | pa.Table) -> pa.Table:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist([dict(r) for r in rows])
    # A column that is all None infers Arrow's null type, which DuckDB cannot widen later: store text.
    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, column.name, pa.nulls(table.num_rows, type=pa.string()))
    return table


class MetricsStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(
        self,
        key: Mapping[str, str | None],
        tables: Mapping[str, Sequence[Mapping[str, Any]] | pa.Table],
    ) -> None:
        """Replace the rows of `key` in each table with the given rows, in one transaction."""
        assert set(key) == set(KEY_COLUMNS), f"metrics key must have {KEY_COLUMNS}, got {sorted(key)}"
        with connect(self.path) as con:
            con.execute("BEGIN TRANSACTION").fetchall()
            try:
                for name, rows in tables.items():
                    assert TABLE_NAME.match(name), f"bad metrics table name {name!r}"
                    data = _table(rows)
                    if data.num_rows == 0 and not self._exists(con, name):
                        continue
                    for column, value in reversed(list(key.items())):
                        if column in data.column_names:
                            data = data.drop_columns([column])
                        data = data.add_column(0, column, pa.array([value] * data.num_rows, type=pa.string()))
                    con.register("_incoming", data)
                    if not self._exists(con, name):
                        con.execute(f"CREATE TABLE {name} AS SELECT * FROM _incoming").fetchall()
                    else:
                        self._add_missing_columns(con, name, data)
                        con.execute(
                            f"DELETE FROM {name} WHERE asset = ? AND partition IS NOT DISTINCT FROM ? "
                            "AND version = ? AND run_id = ?",
                            [key["asset"], key["partition"], key["version"], key["run_id"]],
                        ).fetchall()
                        if data.num_rows:
                            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _incoming").fetchall()
                    con.unregister("_incoming")
                con.execute("COMMIT").fetchall()
            except Exception:
                con.execute("ROLLBACK").fetchall()
                raise

    @staticmethod
    def _exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
        rows = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchall()
        return bool(rows[0][0])

    @staticmethod
    def _add_missing_columns(con: duckdb.DuckDBPyConnection, name: str, data: pa.Table) -> None:
        existing = {row[0] for row in con.execute(f"DESCRIBE {name}").fetchall()}
        for column in data.column_names:
            if column not in existing:
                dtype = con.execute(f'SELECT typeof("{column}") FROM _incoming LIMIT 1').fetchall()
                con.execute(
                    f'ALTER TABLE {name} ADD COLUMN "{column}" {dtype[0][0] if dtype else "VARCHAR"}'
                ).fetchall()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with connect(self.path, read_only=True) as con:
            cursor = con.execute(sql, list(params))
            names = [d[0] for d in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def tables(self) -> list[str]:
        if not self.path.exists():
            return []
        rows = self.query("SELECT table_name FROM information_schema.tables ORDER BY table_name")
        return [r["table_name"] for r in rows]
