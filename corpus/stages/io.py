"""Deterministic Parquet and token-array I/O shared by the stages.

Parquet files are written with fixed settings (zstd, fixed row-group size, no pandas metadata), so the
same rows give the same bytes; that is what makes version ids reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 2048
BATCH_ROWS = 1024
TOKEN_DTYPE = np.uint16  # GPT-2's largest id is 50256 < 2**16: two bytes per token, range-checked on write

DOCUMENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("uri", pa.string()),
        ("position", pa.int64()),
        ("byte_offset", pa.int64()),
        ("byte_length", pa.int64()),
        ("raw_sha256", pa.string()),
        ("text", pa.large_string()),
    ]
)


class ParquetSink:
    """Append rows in bounded batches to one Parquet file with deterministic settings."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self._writer = pq.ParquetWriter(
            path, schema, compression="zstd", use_dictionary=True, write_statistics=True, store_schema=False
        )

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append Arrow rows directly (columns selected and cast to the sink's schema)."""
        self.flush()
        if batch.num_rows:
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            table = table.select(self.schema.names).cast(self.schema)
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self.count += table.num_rows

    def flush(self) -> None:
        if self.rows:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
            self.count += len(self.rows)
            self.rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_table(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS, store_schema=False)


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> None:
    write_table(path, pa.Table.from_pylist([dict(r) for r in rows], schema=schema))


def iter_batches(
    path: Path, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(path)
    yield from parquet.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None)


def read_columns(path: Path, columns: Sequence[str]) -> pa.Table:
    return pq.read_table(path, columns=list(columns))


def write_tokens(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write a flat token array as little-endian uint16 after checking every id is in the vocabulary."""
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        assert low >= 0 and high < vocab_size, f"token ids out of range [0, {vocab_size}): min {low}, max {high}"
    assert vocab_size <= np.iinfo(TOKEN_DTYPE).max + 1, f"vocab {vocab_size} does not fit {TOKEN_DTYPE}"
    # Not ndarray.tofile: numpy ignores a failed flush at close (a small write to a full disk "succeeds"
    # and leaves a short file); Python's file object raises it.
    with open(path, "wb") as handle:
        handle.write(np.ascontiguousarray(tokens, dtype="<u2").data)


def read_tokens(path: Path) -> np.ndarray:
    """Memory-map a token file written by `write_tokens` (empty files give an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype="<u2", mode="r")
