"""Pack documents into fixed-length rows with document-aware attention.

Algorithm: a document longer than `max_length` L is first cut into L-sized pieces (the remainder is a
piece like any other), then the pieces are packed into rows of capacity L by best-fit decreasing (BFD):
pieces in decreasing length (ties in original order, a stable sort), each into the open row with the
least free space that still fits it (ties: the earliest opened row), else into a new row. The open rows
are kept in buckets by free space 1..L, and a segment tree over the bucket counts answers "smallest free
space >= s that has a row" in O(log L), so packing P pieces costs O(P log P) for the sort plus
O(P log L) for the placement, plus O(R L) to fill the R output rows. Full pieces (length L) skip the
search. Nothing here is quadratic in the number of documents or rows.

Trade-off: BFD wastes only the free space no remaining piece fits (99.98% of 2,048-token rows hold
real tokens on the default corpus, against 71% for pad-to-max, which also drops 83% of its tokens; see
benchmarks/packing.py), cuts a document only where it exceeds L (the minimum number of cuts, 10% fewer
than concatenate-and-split there), and never lets a token attend across documents: each row carries
`segment_ids`, `position_ids` restarting at 0 per piece, flash-attn style `cu_seqlens`, and
`PackedDataset` builds the block-diagonal causal mask on request. The costs: rows mix documents in
length order rather than corpus order (shuffle rows downstream), packing needs every document length up
front (no streaming), and a dense mask is B x L x L booleans (32 MiB per batch at B=8, L=2,048), which
costs ~97% of the loader's CPU throughput there (benchmarks/packing.py): build it on the accelerator
(corpus.masks.block_causal_mask, from position ids there), or use `cu_seqlens` with a varlen kernel.
Pad-to-max (one document per row, truncated at L) and concatenate-and-split (attention crosses
documents, and documents are cut at every row boundary) are measured beside it by `pad_to_max_stats` and
`concat_split_stats`.

Every token traces back to its source: the piece table gives (row, start in row, length, document index,
offset in document) for every piece, so `PackedRows.trace(row, col)` is (document index, token offset).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corpus.lake import Version
from corpus.layout import PACKED_FILES
from corpus.masks import block_causal_mask

EOT_ID = 50256
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
# Output rows are filled a slice at a time so that the int64 index temporaries (about five arrays of 4M
# entries, ~160 MB) stay bounded instead of growing by ~40 bytes per packed token.
_FILL_CHUNK_TOKENS = 1 << 22


@dataclass(frozen=True)
class PackingStats:
    """How well a layout uses its rows: `efficiency` = real tokens / (rows x max_length).

    `tokens_dropped` counts tokens that appear in no row (pad-to-max truncation). `boundary_crossings`
    counts row boundaries that fall inside a document, i.e. how often a document is cut.
    """

    method: str
    max_length: int
    documents: int
    rows: int
    real_tokens: int
    efficiency: float
    tokens_dropped: int
    boundary_crossings: int

    def to_dict(self) -> dict[str, int | float | str]:
        return {
            "method": self.method,
            "max_length": self.max_length,
            "documents": self.documents,
            "rows": self.rows,
            "real_tokens": self.real_tokens,
            "efficiency": self.efficiency,
            "tokens_dropped": self.tokens_dropped,
            "boundary_crossings": self.boundary_crossings,
        }


def _efficiency(real_tokens: int, rows: int, max_length: int) -> float:
    return real_tokens / (rows * max_length) if rows else 0.0


@dataclass(frozen=True)
class PackedRows:
    """Packed rows and the piece table that maps every token back to its document.

    Row arrays are [R, L]: `tokens` (uint16 when every id and the pad id are < 65,536, else uint32),
    `segment_ids` int32 (0..k-1 for the k pieces of a row in order, -1 on padding), `position_ids` int32
    (0 at each piece start, 0 on padding). `cu_seqlens` int32 holds, per row, the k+1 cumulative piece
    lengths [0, l1, l1+l2, ..., sum]; row r's entries are `cu_seqlens[cu_seqlens_offsets[r]:
    cu_seqlens_offsets[r + 1]]` (padding, after the last entry, is in no sequence). The piece table is
    sorted by (row, start): `piece_row`, `piece_start` (column in the row), `piece_length`, `piece_doc`
    (index into the input documents) and `piece_doc_offset` (token offset in that document), all int64.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    cu_seqlens_offsets: np.ndarray
    piece_row: np.ndarray
    piece_start: np.ndarray
    piece_length: np.ndarray
    piece_doc: np.ndarray
    piece_doc_offset: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_pieces(self) -> int:
        return int(self.piece_row.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(self.piece_length.sum())

    @property
    def efficiency(self) -> float:
        return _efficiency(self.real_tokens, self.num_rows, self.max_length)

    @property
    def row_piece_offsets(self) -> np.ndarray:
        """[R + 1] int64: row r's pieces are piece-table entries row_piece_offsets[r]:row_piece_offsets[r + 1]."""
        return np.asarray(self.cu_seqlens_offsets, dtype=np.int64) - np.arange(self.num_rows + 1, dtype=np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in PACKED_FILES}

    def stats(self) -> PackingStats:
        """BFD's figures; `boundary_crossings` = extra pieces of documents longer than L (the minimum)."""
        return _bfd_stats(self.piece_doc, self.num_rows, self.max_length, self.real_tokens)

    def trace(self, rows: np.ndarray | int, cols: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(document index, token offset in the document) of each (row, column); (-1, -1) on padding."""
        r = np.asarray(rows, dtype=np.int64)
        c = np.asarray(cols, dtype=np.int64)
        if np.any((r < 0) | (r >= self.num_rows)):
            raise IndexError(f"row out of range 0..{self.num_rows - 1}: {r}")
        if np.any((c < 0) | (c >= self.max_length)):
            raise IndexError(f"column out of range 0..{self.max_length - 1}: {c}")
        seg = np.asarray(self.segment_ids[r, c], dtype=np.int64)
        pad = seg < 0
        piece = self.row_piece_offsets[r] + np.where(pad, 0, seg)
        doc = np.where(pad, -1, np.asarray(self.piece_doc)[piece])
        offset = np.where(pad, -1, np.asarray(self.piece_doc_offset)[piece] + c - np.asarray(self.piece_start)[piece])
        return doc, offset


def _bfd_stats(piece_doc: np.ndarray, rows: int, max_length: int, real_tokens: int) -> PackingStats:
    documents = int(np.unique(np.asarray(piece_doc)).size)
    return PackingStats(
        method="best_fit_decreasing",
        max_length=max_length,
        documents=documents,
        rows=rows,
        real_tokens=real_tokens,
        efficiency=_efficiency(real_tokens, rows, max_length),
        tokens_dropped=0,
        boundary_crossings=int(np.asarray(piece_doc).size) - documents,
    )


def _check_max_length(max_length: int) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    return int(max_length)


def _check_documents(
    stream: np.ndarray, doc_starts: np.ndarray, doc_lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stream = np.asarray(stream)
    starts = np.asarray(doc_starts)
    lengths = np.asarray(doc_lengths)
    if stream.ndim != 1 or not (np.issubdtype(stream.dtype, np.integer) or stream.size == 0):
        raise ValueError(f"stream must be a 1-D integer array, got shape {stream.shape} dtype {stream.dtype}")
    for name, arr in (("doc_starts", starts), ("doc_lengths", lengths)):
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if starts.shape != lengths.shape:
        raise ValueError(f"doc_starts and doc_lengths differ in length: {starts.size} != {lengths.size}")
    starts = starts.astype(np.int64)
    lengths = lengths.astype(np.int64)
    if lengths.size:
        if lengths.min() < 0:
            i = int(np.argmin(lengths))
            raise ValueError(f"doc_lengths[{i}] is negative: {lengths[i]}")
        if starts.min() < 0:
            i = int(np.argmin(starts))
            raise ValueError(f"doc_starts[{i}] is negative: {starts[i]}")
        ends = starts + lengths
        if ends.max() > stream.size:
            i = int(np.argmax(ends))
            raise ValueError(
                f"document {i} ends at {ends[i]} (doc_starts[{i}]={starts[i]} + doc_lengths[{i}]={lengths[i]}), "
                f"past the stream's {stream.size} tokens"
            )
    return stream, starts, lengths


def _token_dtype(stream: np.ndarray, pad_id: int) -> type[np.unsignedinteger]:
    if isinstance(pad_id, bool) or not isinstance(pad_id, int | np.integer) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative integer, got {pad_id!r}")
    low = int(stream.min()) if stream.size else 0
    high = max(int(stream.max()) if stream.size else 0, int(pad_id))
    if low < 0:
        raise ValueError(f"stream holds a negative token id {low}")
    if high >= 2**32:
        raise ValueError(f"token id {high} does not fit uint32")
    # GPT-2's largest id is 50256 < 2**16, so its rows take 2 bytes a token.
    return np.uint16 if high < 2**16 else np.uint32


def split_documents(doc_lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into L-sized pieces plus a remainder: (piece doc index, offset in doc, length).

    Pieces come in document order, then offset order; empty documents give no piece.
    """
    max_length = _check_max_length(max_length)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    counts = -(-lengths // max_length)  # ceil; 0 for an empty document
    doc = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    index_in_doc = np.arange(doc.size, dtype=np.int64) - np.repeat(first, counts)
    offset = index_in_doc * max_length
    length = np.minimum(lengths[doc] - offset, max_length)
    return doc, offset, length


class _FreeSpaceIndex:
    """Open rows bucketed by free space 1..L; finds the smallest free space >= s in O(log L).

    A segment tree over bucket sizes: a leaf per free-space value, an inner node the sum of its children.
    Each bucket is a heap of row numbers so that ties go to the earliest opened row.
    """

    def __init__(self, max_length: int) -> None:
        self.size = 1 << max_length.bit_length()  # > max_length, so leaves 0..max_length exist
        self.tree = [0] * (2 * self.size)
        self.buckets: list[list[int]] = [[] for _ in range(max_length + 1)]

    def _add(self, free: int, delta: int) -> None:
        node = self.size + free
        tree = self.tree
        while node:
            tree[node] += delta
            node >>= 1

    def push(self, free: int, row: int) -> None:
        heapq.heappush(self.buckets[free], row)
        self._add(free, 1)

    def pop_best_fit(self, need: int) -> tuple[int, int] | None:
        """Remove and return (free space, row) of the best-fitting row for `need` tokens, or None."""
        tree = self.tree
        node = self.size + need
        if not tree[node]:
            # Climb until a right sibling holds a row: it covers the next larger free-space values.
            while node > 1 and not (node % 2 == 0 and tree[node + 1]):
                node >>= 1
            if node == 1:
                return None
            node += 1
            while node < self.size:
                node = 2 * node if tree[2 * node] else 2 * node + 1
        free = node - self.size
        row = heapq.heappop(self.buckets[free])
        self._add(free, -1)
        return free, row


def best_fit_decreasing(piece_lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Place pieces (each <= max_length) into rows: (row of each piece, start column of each piece, rows)."""
    max_length = _check_max_length(max_length)
    lengths = np.asarray(piece_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_length):
        raise ValueError(f"piece lengths must be in 1..{max_length}, got {lengths.min()}..{lengths.max()}")
    order = np.argsort(-lengths, kind="stable")
    row_of = np.empty(lengths.size, dtype=np.int64)
    start_of = np.zeros(lengths.size, dtype=np.int64)
    # Full pieces sort first and each opens its own row; only the shorter ones need the search.
    n_full = int(np.count_nonzero(lengths == max_length))
    row_of[order[:n_full]] = np.arange(n_full, dtype=np.int64)
    used: list[int] = [max_length] * n_full
    index = _FreeSpaceIndex(max_length)
    for piece, need in zip(order[n_full:].tolist(), lengths[order[n_full:]].tolist(), strict=True):
        found = index.pop_best_fit(need)
        if found is None:
            row = len(used)
            used.append(0)
        else:
            row = found[1]
        row_of[piece] = row
        start_of[piece] = used[row]
        used[row] += need
        free = max_length - used[row]
        if free:
            index.push(free, row)
    return row_of, start_of, len(used)


@dataclass(frozen=True)
class PackingPlan:
    """Where every piece goes, before any row is written: the piece table sorted by (row, start).

    `plan_packing` makes it from document lengths alone (O(P log P)); `fill_rows` writes any contiguous
    range of its rows, so a split's rows can be written shard by shard with memory bounded by the shard.
    """

    max_length: int
    pad_id: int
    dtype: type[np.unsignedinteger]
    num_rows: int
    piece_row: np.ndarray
    piece_start: np.ndarray
    piece_length: np.ndarray
    piece_doc: np.ndarray
    piece_doc_offset: np.ndarray
    source_start: np.ndarray  # the piece's first token in the stream
    row_piece_offsets: np.ndarray  # [R + 1]: row r's pieces are row_piece_offsets[r]:row_piece_offsets[r + 1]

    @property
    def real_tokens(self) -> int:
        return int(self.piece_length.sum())

    def stats(self) -> PackingStats:
        """The figures of all planned rows, as `PackedRows.stats` gives them for filled ones."""
        return _bfd_stats(self.piece_doc, self.num_rows, self.max_length, self.real_tokens)


def plan_packing(
    stream: np.ndarray,
    doc_starts: np.ndarray,
    doc_lengths: np.ndarray,
    max_length: int,
    pad_id: int = EOT_ID,
) -> PackingPlan:
    """Split documents into pieces and place them by best-fit decreasing; no row is written yet."""
    max_length = _check_max_length(max_length)
    stream, starts, lengths = _check_documents(stream, doc_starts, doc_lengths)
    dtype = _token_dtype(stream, pad_id)
    piece_doc, piece_doc_offset, piece_length = split_documents(lengths, max_length)
    row_of, start_of, n_rows = best_fit_decreasing(piece_length, max_length)
    by_row = np.lexsort((start_of, row_of))
    piece_row = row_of[by_row]
    piece_doc = piece_doc[by_row]
    piece_doc_offset = piece_doc_offset[by_row]
    assert int(piece_length.sum()) == int(lengths.sum()), (
        f"split {int(piece_length.sum())} tokens into pieces, documents hold {int(lengths.sum())}"
    )
    return PackingPlan(
        max_length=max_length,
        pad_id=int(pad_id),
        dtype=dtype,
        num_rows=n_rows,
        piece_row=piece_row,
        piece_start=start_of[by_row],
        piece_length=piece_length[by_row],
        piece_doc=piece_doc,
        piece_doc_offset=piece_doc_offset,
        source_start=starts[piece_doc] + piece_doc_offset,
        row_piece_offsets=np.searchsorted(piece_row, np.arange(n_rows + 1, dtype=np.int64)).astype(np.int64),
    )


def fill_rows(plan: PackingPlan, stream: np.ndarray, row_lo: int = 0, row_hi: int | None = None) -> PackedRows:
    """Rows row_lo..row_hi-1 of `plan` as a self-contained PackedRows (its rows and piece_row count from 0).

    `piece_doc` keeps indexing the planned documents, so rows written in several ranges still trace to the
    same documents. Memory: the range's row arrays, plus index temporaries bounded by _FILL_CHUNK_TOKENS.
    """
    row_hi = plan.num_rows if row_hi is None else row_hi
    if not 0 <= row_lo <= row_hi <= plan.num_rows:
        raise ValueError(f"row range {row_lo}..{row_hi} is not within the plan's {plan.num_rows} rows")
    max_length = plan.max_length
    stream = np.asarray(stream)
    p_lo, p_hi = int(plan.row_piece_offsets[row_lo]), int(plan.row_piece_offsets[row_hi])
    n_rows = row_hi - row_lo
    piece_row = plan.piece_row[p_lo:p_hi] - row_lo
    piece_start = plan.piece_start[p_lo:p_hi]
    piece_length = plan.piece_length[p_lo:p_hi]
    source_start = plan.source_start[p_lo:p_hi]
    n_pieces = p_hi - p_lo
    row_piece_offsets = plan.row_piece_offsets[row_lo : row_hi + 1] - p_lo
    segment_of_piece = np.arange(n_pieces, dtype=np.int64) - row_piece_offsets[piece_row]

    tokens = np.full((n_rows, max_length), plan.pad_id, dtype=plan.dtype)
    segment_ids = np.full((n_rows, max_length), -1, dtype=np.int32)
    position_ids = np.zeros((n_rows, max_length), dtype=np.int32)
    flat_tokens = tokens.reshape(-1)
    flat_segments = segment_ids.reshape(-1)
    flat_positions = position_ids.reshape(-1)
    dest_start = piece_row * max_length + piece_start
    token_end = np.cumsum(piece_length)
    lo = 0
    while lo < n_pieces:
        hi = max(int(np.searchsorted(token_end, token_end[lo] + _FILL_CHUNK_TOKENS, side="left")), lo + 1)
        hi = min(hi, n_pieces)
        lens = piece_length[lo:hi]
        within = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        dest = np.repeat(dest_start[lo:hi], lens) + within
        flat_tokens[dest] = stream[np.repeat(source_start[lo:hi], lens) + within]
        flat_segments[dest] = np.repeat(segment_of_piece[lo:hi], lens)
        flat_positions[dest] = within
        lo = hi

    # Per row: the starts of its pieces, then the row's filled length.
    cu_seqlens_offsets = row_piece_offsets + np.arange(n_rows + 1, dtype=np.int64)
    cu_seqlens = np.empty(n_pieces + n_rows, dtype=np.int32)
    cu_seqlens[np.arange(n_pieces, dtype=np.int64) + piece_row] = piece_start
    last = row_piece_offsets[1:] - 1
    row_used = piece_start[last] + piece_length[last]
    cu_seqlens[cu_seqlens_offsets[1:] - 1] = row_used
    assert n_rows == 0 or int(row_used.max()) <= max_length, f"a row holds {int(row_used.max())} > {max_length}"
    return PackedRows(
        tokens=tokens,
        segment_ids=segment_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        cu_seqlens_offsets=cu_seqlens_offsets,
        piece_row=piece_row,
        piece_start=piece_start,
        piece_length=piece_length,
        piece_doc=plan.piece_doc[p_lo:p_hi],
        piece_doc_offset=plan.piece_doc_offset[p_lo:p_hi],
    )


def pack(
    stream: np.ndarray,
    doc_starts: np.ndarray,
    doc_lengths: np.ndarray,
    max_length: int,
    pad_id: int = EOT_ID,
) -> PackedRows:
    """Pack documents `stream[doc_starts[i] : doc_starts[i] + doc_lengths[i]]` into rows of `max_length`.

    Lengths include each document's trailing <|endoftext|>. Deterministic: same input, same rows.
    """
    plan = plan_packing(stream, doc_starts, doc_lengths, max_length, pad_id)
    return fill_rows(plan, stream)


def _check_lengths(doc_lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"doc_lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"doc_lengths[{int(np.argmin(lengths))}] is negative: {lengths.min()}")
    return lengths[lengths > 0]


def pad_to_max_stats(doc_lengths: np.ndarray, max_length: int) -> PackingStats:
    """Every document in its own row, truncated at `max_length` (tokens past it are dropped)."""
    max_length = _check_max_length(max_length)
    lengths = _check_lengths(doc_lengths)
    kept = int(np.minimum(lengths, max_length).sum())
    rows = int(lengths.size)
    return PackingStats(
        method="pad_to_max",
        max_length=max_length,
        documents=rows,
        rows=rows,
        real_tokens=kept,
        efficiency=_efficiency(kept, rows, max_length),
        tokens_dropped=int(lengths.sum()) - kept,
        boundary_crossings=0,
    )


def concat_split_stats(doc_lengths: np.ndarray, max_length: int) -> PackingStats:
    """All documents concatenated and cut every `max_length` tokens; the last partial row is padded.

    `boundary_crossings` counts row boundaries strictly inside a document (attention then also crosses
    document boundaries inside a row, which this layout does not prevent).
    """
    max_length = _check_max_length(max_length)
    lengths = _check_lengths(doc_lengths)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # Boundaries at multiples of L strictly inside [start, end): floor((end - 1) / L) - floor(start / L).
    cuts = int(((ends - 1) // max_length - starts // max_length).sum())
    rows = -(-total // max_length)
    return PackingStats(
        method="concat_split",
        max_length=max_length,
        documents=int(lengths.size),
        rows=rows,
        real_tokens=total,
        efficiency=_efficiency(total, rows, max_length),
        tokens_dropped=0,
        boundary_crossings=cuts,
    )


class PackedDataset:
    """Training batches over packed rows (numpy arrays or read-only memmaps).

    `__getitems__(indices)` returns int64 `input_ids`, `position_ids`, `labels` and int32 `segment_ids`,
    each [B, L], plus a bool `attention_mask` [B, 1, L, L] when built `with_mask=True`. Labels are already
    shifted: `labels[t]` is `input_ids[t + 1]` when t + 1 is in the same piece, else -100 (also on every
    pad), so `cross_entropy(logits.view(-1, V), labels.view(-1))` with logits[t] predicting labels[t] is
    the causal LM loss and no target crosses a document or piece boundary. In the mask (True = may attend,
    as `scaled_dot_product_attention` reads a bool `attn_mask`) a pad attends only to itself, so no row of
    it is all False and SDPA returns no NaN; pads carry no label, so their outputs never reach the loss.
    """

    def __init__(self, rows: PackedRows | Sequence[PackedRows], *, with_mask: bool = False) -> None:
        shards = [rows] if isinstance(rows, PackedRows) else list(rows)
        if not shards:
            raise ValueError("PackedDataset needs at least one set of packed rows")
        widths = sorted({shard.max_length for shard in shards})
        if len(widths) > 1:
            raise ValueError(f"packed shards differ in max_length: {widths}")
        self.shards = shards
        self.max_length = widths[0]
        # offsets[k] is the dataset index of shard k's first row; offsets[-1] the total.
        self.offsets = np.cumsum([0] + [shard.num_rows for shard in shards], dtype=np.int64)
        self.with_mask = with_mask
        self._paths: list[dict[str, Path]] | None = None  # set by open_packed: pickles as paths, not arrays
        # The lake version and split the rows come from (corpus.loader.open_packed_shards sets them); they
        # name the data in a ShardLoader's state_dict.
        self.version: Version | None = None
        self.split: str | None = None
        self._set_views()

    def _set_views(self) -> None:
        """Plain ndarray views of each shard's row arrays (no copy) and the dtypes that hold them all."""
        self._views = [
            (np.asarray(s.tokens), np.asarray(s.segment_ids), np.asarray(s.position_ids)) for s in self.shards
        ]
        self._dtypes = [np.result_type(*(views[k] for views in self._views)) for k in range(3)]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"PackedDataset(shards={len(self.shards)}, rows={len(self)}, max_length={self.max_length})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._paths is not None:
            state["shards"] = None  # a DataLoader worker re-opens the memmaps instead of receiving copies
            state["_views"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._paths is not None:
            self.shards = [_open_rows(located) for located in self._paths]
            self._set_views()

    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        bad = (idx < -n) | (idx >= n)
        if np.any(bad):
            raise IndexError(f"row index {int(idx[np.argmax(bad)])} out of range for {n} packed rows")
        return np.where(idx < 0, idx + n, idx)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row within that shard) of dataset row `index`."""
        (i,) = self._indices([index]).tolist()
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return shard, i - int(self.offsets[shard])

    def trace(self, rows: np.ndarray | int, cols: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(document index, token offset in the document) of each (dataset row, column), broadcast together;
        (-1, -1) on padding."""
        r_in, c_in = np.broadcast_arrays(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))
        r = self._indices(r_in.ravel())
        c = c_in.ravel()
        which = np.searchsorted(self.offsets, r, side="right") - 1
        doc = np.empty(r.shape, dtype=np.int64)
        offset = np.empty(r.shape, dtype=np.int64)
        for shard in np.unique(which).tolist():
            sel = which == shard
            doc[sel], offset[sel] = self.shards[shard].trace(r[sel] - self.offsets[shard], c[sel])
        return doc.reshape(r_in.shape), offset.reshape(r_in.shape)

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int64, segment ids int32, position ids int64) of dataset rows `idx`.

        One batch usually touches several shards. Rows are taken shard by shard, in their stored dtypes,
        into one buffer ordered by shard (`np.take` into a slice, from plain ndarray views of the memmaps:
        a fancy index on an np.memmap costs twice as much), then put back in batch order and widened once
        per field, so the per-shard work is three small copies.
        """
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        if not len(idx) or (which == which[0]).all():  # the whole batch in one shard
            shard = int(which[0]) if len(idx) else 0
            local = idx - self.offsets[shard]
            views = self._views[shard]
            return (
                views[0][local].astype(np.int64),
                views[1][local].astype(np.int32, copy=False),
                views[2][local].astype(np.int64),
            )
        order = np.argsort(which, kind="stable")
        by_shard = which[order]
        local = idx[order] - self.offsets[by_shard]
        bounds = [0, *(np.flatnonzero(by_shard[1:] != by_shard[:-1]) + 1).tolist(), len(idx)]
        raw = [np.empty((len(idx), self.max_length), dtype=dtype) for dtype in self._dtypes]
        for lo, hi in itertools.pairwise(bounds):
            views = self._views[int(by_shard[lo])]
            for k in range(3):
                if views[k].dtype == raw[k].dtype:
                    np.take(views[k], local[lo:hi], axis=0, out=raw[k][lo:hi], mode="clip")  # indices checked
                else:  # shards of different token dtypes (uint16 and uint32): take, then widen
                    raw[k][lo:hi] = views[k].take(local[lo:hi], axis=0)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return (
            raw[0].take(back, axis=0).astype(np.int64),
            raw[1].take(back, axis=0).astype(np.int32, copy=False),
            raw[2].take(back, axis=0).astype(np.int64),
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One row: the `__getitems__` fields without the batch dimension."""
        batch = self.__getitems__([index])
        return {name: value[0] for name, value in batch.items()}

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        tokens, segments, positions = self._gather(self._indices(indices))
        labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] >= 0)
        labels[:, :-1] = np.where(same, tokens[:, 1:], IGNORE_INDEX)
        out = {
            "input_ids": torch.from_numpy(tokens),
            "position_ids": torch.from_numpy(positions),
            "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(segments),
        }
        if self.with_mask:
            out["attention_mask"] = block_causal_mask(out["segment_ids"])
        return out


def collate_packed(batch: Any) -> Any:
    """`collate_fn` for a torch DataLoader over a PackedDataset, whose `__getitems__` already stacks a batch
    (the default collate would index that dict as a list of samples); a list of `__getitem__` rows is stacked."""
    if isinstance(batch, Mapping):
        return dict(batch)
    return torch.utils.data.default_collate(batch)


def _target_paths(target: str | os.PathLike[str] | Callable[[str], Path]) -> Callable[[str], Path]:
    if callable(target):
        return target
    directory = Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    return lambda name: directory / name


def save_packed(target: str | os.PathLike[str] | Callable[[str], Path], rows: PackedRows) -> dict[str, Path]:
    """Write each array as `<name>.npy` into a directory, or to `target(file name)` (e.g. `VersionWriter.path`).

    np.save output depends only on dtype, shape and bytes, so the same rows give byte-identical files.
    """
    where = _target_paths(target)
    written: dict[str, Path] = {}
    for name, array in rows.arrays().items():
        path = Path(where(f"{name}.npy"))
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        written[name] = path
    return written


def _load(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as exc:
        shards = sorted(p.parent for p in path.parent.glob(f"*/{path.name}"))
        hint = (
            f"; {path.parent} holds {len(shards)} shard directories ({shards[0].name}, ...): pass them as a list"
            if shards
            else ""
        )
        raise ValueError(f"packed array {name!r}: {path} not found{hint}") from exc
    except ValueError as exc:
        raise ValueError(f"packed array {name!r}: {path} is not a valid .npy file: {exc}") from exc


def _check_loaded(arrays: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"packed array {name!r} ({paths[name]}): {why}")

    tokens = arrays["tokens"]
    if tokens.ndim != 2 or tokens.dtype not in (np.uint16, np.uint32):
        raise bad("tokens", f"expected [R, L] uint16/uint32, got shape {tokens.shape} dtype {tokens.dtype}")
    for name in ("segment_ids", "position_ids"):
        if arrays[name].shape != tokens.shape or arrays[name].dtype != np.int32:
            raise bad(name, f"expected {tokens.shape} int32, got {arrays[name].shape} {arrays[name].dtype}")
    n_rows = tokens.shape[0]
    offsets = arrays["cu_seqlens_offsets"]
    if offsets.shape != (n_rows + 1,) or offsets.dtype != np.int64:
        raise bad("cu_seqlens_offsets", f"expected ({n_rows + 1},) int64, got {offsets.shape} {offsets.dtype}")
    n_pieces = arrays["piece_row"].shape[0]
    if arrays["cu_seqlens"].shape != (n_pieces + n_rows,) or arrays["cu_seqlens"].dtype != np.int32:
        raise bad("cu_seqlens", f"expected ({n_pieces + n_rows},) int32, got {arrays['cu_seqlens'].shape}")
    if n_rows and (int(offsets[0]) != 0 or int(offsets[-1]) != n_pieces + n_rows):
        raise bad("cu_seqlens_offsets", f"must run from 0 to {n_pieces + n_rows}, got {offsets[0]}..{offsets[-1]}")
    for name in ("piece_row", "piece_start", "piece_length", "piece_doc", "piece_doc_offset"):
        if arrays[name].shape != (n_pieces,) or arrays[name].dtype != np.int64:
            raise bad(name, f"expected ({n_pieces},) int64, got {arrays[name].shape} {arrays[name].dtype}")


PackedPaths = str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]


def open_packed(paths: PackedPaths | Sequence[PackedPaths], *, with_mask: bool = False) -> PackedDataset:
    """Memory-map saved rows: a directory holding `<name>.npy`, or a mapping from array or file name to path,
    or a list of those (shards, concatenated in list order).

    Shapes and dtypes are checked here, content hashes are not (a directory carries none):
    `corpus.loader.open_packed_shards` opens a lake version's split after re-hashing its files.
    """
    shards = [paths] if isinstance(paths, str | os.PathLike | Mapping) else list(paths)
    if not shards:
        raise ValueError("open_packed: no packed shards given")
    located = [_locate(shard) for shard in shards]
    dataset = PackedDataset([_open_rows(one) for one in located], with_mask=with_mask)
    dataset._paths = located
    return dataset


def _locate(paths: PackedPaths) -> dict[str, Path]:
    if isinstance(paths, Mapping):
        given = {str(key).removesuffix(".npy"): Path(value) for key, value in paths.items()}
        missing = [name for name in PACKED_FILES if name not in given]
        if missing:
            raise ValueError(f"packed arrays missing from paths: {', '.join(missing)}")
        return {name: given[name] for name in PACKED_FILES}
    directory = Path(paths)
    return {name: directory / f"{name}.npy" for name in PACKED_FILES}


def _open_rows(located: dict[str, Path]) -> PackedRows:
    arrays = {name: _load(path, name) for name, path in located.items()}
    _check_loaded(arrays, located)
    return PackedRows(**arrays)
