from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corpus.lake import Lake, LakeError, Version
from corpus.loader import ShardLoader, open_packed_shards
from corpus.masks import block_causal_mask
from corpus.packing import (
    IGNORE_INDEX,
    PACKED_FILES,
    PackedDataset,
    PackedRows,
    best_fit_decreasing,
    collate_packed,
    concat_split_stats,
    fill_rows,
    open_packed,
    pack,
    pad_to_max_stats,
    plan_packing,
    save_packed,
    split_documents,
)

PAD = 50256


def documents(lengths: list[int], seed: int = 0, high: int = 50000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random token stream with the documents laid end to end (gaps of 1 token, to test doc_starts)."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lens + 1) - (lens + 1)
    stream = rng.integers(0, high, size=int((lens + 1).sum()), dtype=np.int64)
    return stream, starts, lens


def naive_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Reference BFD in O(P x R): pieces by decreasing length (stable), each into the fullest row it fits."""
    rows: list[list[int]] = []
    used: list[int] = []
    for piece in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if used[r] + lengths[piece] <= capacity]
        if fits:
            row = min(fits, key=lambda r: (capacity - used[r], r))
        else:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(piece)
        used[row] += lengths[piece]
    return rows


def piece_rows(packed: PackedRows) -> list[list[tuple[int, int, int]]]:
    """Per row, its pieces as (doc, offset in doc, length) in column order."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(packed.num_rows)]
    for row, doc, offset, length in zip(
        packed.piece_row, packed.piece_doc, packed.piece_doc_offset, packed.piece_length, strict=True
    ):
        out[int(row)].append((int(doc), int(offset), int(length)))
    return out


def reference_mask(segments: np.ndarray) -> np.ndarray:
    """Allowed (q, k): same piece and k <= q, or q == k (a pad attends to itself only)."""
    length = segments.shape[1]
    q = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    return (same & (k <= q)) | (q == k)


# --- exact values -----------------------------------------------------------------------------------


def test_bfd_hand_example_exact_rows() -> None:
    # L=10, docs 3 7 5 5 2 12 8: doc 5 splits into 10 + 2. Decreasing: 10, 8, 7, 5, 5, 3, 2, 2(doc 5 tail).
    stream, starts, lens = documents([3, 7, 5, 5, 2, 12, 8])
    packed = pack(stream, starts, lens, max_length=10)
    assert piece_rows(packed) == [
        [(5, 0, 10)],
        [(6, 0, 8), (4, 0, 2)],
        [(1, 0, 7), (0, 0, 3)],
        [(2, 0, 5), (3, 0, 5)],
        [(5, 10, 2)],
    ]
    assert packed.tokens.dtype == np.uint16 and packed.tokens.shape == (5, 10)
    assert packed.segment_ids[4].tolist() == [0, 0] + [-1] * 8
    assert packed.segment_ids[1].tolist() == [0] * 8 + [1, 1]
    assert packed.position_ids[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert packed.position_ids[4].tolist() == [0, 1] + [0] * 8
    assert packed.tokens[4].tolist() == stream[starts[5] + 10 : starts[5] + 12].tolist() + [PAD] * 8
    assert (
        packed.tokens[1].tolist()
        == stream[starts[6] : starts[6] + 8].tolist() + stream[starts[4] : starts[4] + 2].tolist()
    )
    assert packed.cu_seqlens.tolist() == [0, 10, 0, 8, 10, 0, 7, 10, 0, 5, 10, 0, 2]
    assert packed.cu_seqlens_offsets.tolist() == [0, 2, 5, 8, 11, 13]
    assert packed.row_piece_offsets.tolist() == [0, 1, 3, 5, 7, 8]
    assert packed.cu_seqlens.dtype == np.int32 and packed.segment_ids.dtype == np.int32
    assert packed.real_tokens == 42 and packed.efficiency == 0.84
    doc, offset = packed.trace(np.array([0, 1, 4, 4]), np.array([3, 9, 1, 2]))
    assert doc.tolist() == [5, 4, 5, -1] and offset.tolist() == [3, 1, 11, -1]


def test_bfd_ties_go_to_earliest_row_and_original_order() -> None:
    # Two rows end with 4 free; the 4 goes to the earlier one. Equal lengths keep input order.
    row, start, n_rows = best_fit_decreasing(np.array([6, 6, 4]), 10)
    assert (row.tolist(), start.tolist(), n_rows) == ([0, 1, 0], [0, 0, 6], 2)
    row, start, n_rows = best_fit_decreasing(np.array([3, 3, 3, 3]), 10)
    assert (row.tolist(), start.tolist(), n_rows) == ([0, 0, 0, 1], [0, 3, 6, 0], 2)
    # Best fit, not first fit: 7 opens row 0, 5 opens row 1; the 3 goes to row 0 (3 free), not row 1 (5 free).
    row, start, n_rows = best_fit_decreasing(np.array([5, 7, 3]), 10)
    assert (row.tolist(), start.tolist(), n_rows) == ([1, 0, 0], [0, 0, 7], 2)


def test_split_documents_exact() -> None:
    doc, offset, length = split_documents(np.array([0, 4, 9, 8]), 4)
    assert doc.tolist() == [1, 2, 2, 2, 3, 3]
    assert offset.tolist() == [0, 0, 4, 8, 0, 4]
    assert length.tolist() == [4, 4, 4, 1, 4, 4]


def test_baseline_stats_exact() -> None:
    lens = np.array([3, 7, 5, 5, 2, 12, 8, 0])
    pad = pad_to_max_stats(lens, 10)
    assert (pad.documents, pad.rows, pad.real_tokens, pad.tokens_dropped, pad.boundary_crossings) == (7, 7, 40, 2, 0)
    assert pad.efficiency == 40 / 70
    concat = concat_split_stats(lens, 10)
    # Docs span 0-3, 3-10, 10-15, 15-20, 20-22, 22-34, 34-42: boundaries 10 and 20 fall between docs,
    # 30 cuts doc 5 and 40 cuts doc 6, so 2 cuts; 42 tokens need 5 rows.
    assert (concat.rows, concat.real_tokens, concat.tokens_dropped, concat.boundary_crossings) == (5, 42, 0, 2)
    assert concat.efficiency == 0.84
    stream, starts, doc_lens = documents(lens.tolist())
    bfd = pack(stream, starts, doc_lens, 10).stats()
    assert (bfd.documents, bfd.rows, bfd.real_tokens, bfd.tokens_dropped, bfd.boundary_crossings) == (7, 5, 42, 0, 1)
    assert bfd.to_dict()["method"] == "best_fit_decreasing"


def test_dataset_labels_and_mask_exact() -> None:
    stream, starts, lens = documents([3, 7, 5, 5, 2, 12, 8])
    packed = pack(stream, starts, lens, 10)
    batch = PackedDataset(packed, with_mask=True).__getitems__([1, 4])
    row1 = packed.tokens[1].astype(np.int64).tolist()
    assert batch["labels"][0].tolist() == [*row1[1:8], IGNORE_INDEX, row1[9], IGNORE_INDEX]
    assert batch["labels"][1].tolist() == [int(packed.tokens[4, 1])] + [IGNORE_INDEX] * 9
    assert batch["input_ids"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].shape == (2, 1, 10, 10)
    mask = batch["attention_mask"][0, 0]
    assert mask[9].tolist() == [False] * 8 + [True, True]  # second piece: only itself, causally
    assert mask[7].tolist() == [True] * 8 + [False, False]
    pad_rows = batch["attention_mask"][1, 0]
    assert pad_rows[5].tolist() == [i == 5 for i in range(10)]  # a pad sees only itself
    single = PackedDataset(packed)[-1]
    assert set(single) == {"input_ids", "position_ids", "labels", "segment_ids"}
    assert single["segment_ids"].tolist() == [0, 0] + [-1] * 8


def test_uint32_tokens_when_ids_exceed_uint16() -> None:
    packed = pack(np.array([70000, 1, 2]), np.array([0]), np.array([3]), np.int64(4), pad_id=0)  # numpy int L
    assert packed.tokens.dtype == np.uint32 and packed.tokens.tolist() == [[70000, 1, 2, 0]]


def test_empty_input_gives_no_rows() -> None:
    packed = pack(np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 8)
    assert packed.tokens.shape == (0, 8) and packed.cu_seqlens_offsets.tolist() == [0]
    assert packed.efficiency == 0.0 and len(PackedDataset(packed)) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "max_length must be a positive integer, got 0"),
        ({"doc_lengths": np.array([3, -1])}, r"doc_lengths\[1\] is negative: -1"),
        ({"doc_starts": np.array([0])}, "doc_starts and doc_lengths differ in length: 1 != 2"),
        ({"doc_lengths": np.array([3, 8])}, r"document 1 ends at 11 .* past the stream's 10 tokens"),
        ({"stream": np.arange(10.0)}, "stream must be a 1-D integer array"),
        ({"pad_id": -5}, "pad_id must be a non-negative integer, got -5"),
    ],
)
def test_bad_input_is_value_error(kwargs: dict, message: str) -> None:
    args = {"stream": np.arange(10), "doc_starts": np.array([0, 3]), "doc_lengths": np.array([3, 7]), "max_length": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pack(**args)


def test_out_of_range_index_is_index_error() -> None:
    stream, starts, lens = documents([3, 4])
    dataset = PackedDataset(pack(stream, starts, lens, 8))
    with pytest.raises(IndexError, match="row index 1 out of range for 1 packed rows"):
        dataset.__getitems__([0, 1])
    with pytest.raises(IndexError, match="row out of range"):
        dataset.shards[0].trace(3, 0)


# --- properties ---------------------------------------------------------------------------------------


@st.composite
def corpora(draw: st.DrawFn) -> tuple[list[int], int, int]:
    max_length = draw(st.integers(1, 24))
    lengths = draw(st.lists(st.integers(0, 3 * max_length + 1), max_size=30))
    return lengths, max_length, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora())
def test_packing_properties(corpus: tuple[list[int], int, int]) -> None:
    lengths, max_length, seed = corpus
    stream, starts, lens = documents(lengths, seed)
    packed = pack(stream, starts, lens, max_length)
    n_rows = packed.num_rows

    # Every token of every document appears exactly once and in order.
    for doc, length in enumerate(lengths):
        mine = np.flatnonzero(packed.piece_doc == doc)
        mine = mine[np.argsort(packed.piece_doc_offset[mine])]
        rebuilt = np.concatenate(
            [
                packed.tokens[
                    packed.piece_row[p], packed.piece_start[p] : packed.piece_start[p] + packed.piece_length[p]
                ]
                for p in mine
            ]
            + [np.zeros(0, dtype=packed.tokens.dtype)]
        )
        assert rebuilt.tolist() == stream[starts[doc] : starts[doc] + length].tolist(), f"doc {doc}"
        assert packed.piece_doc_offset[mine].tolist() == list(range(0, length, max_length))
    covered = np.zeros((n_rows, max_length), dtype=np.int64)
    for row, start, length in zip(packed.piece_row, packed.piece_start, packed.piece_length, strict=True):
        covered[row, start : start + length] += 1
    assert covered.max(initial=0) <= 1
    assert int(covered.sum()) == sum(lengths) == packed.real_tokens
    assert ((packed.segment_ids >= 0) == (covered == 1)).all()
    assert (packed.tokens[covered == 0] == PAD).all()

    # Rows never overflow; pieces fill each row from column 0 without gaps, pads only at the end.
    for r in range(n_rows):
        bounds = packed.cu_seqlens[packed.cu_seqlens_offsets[r] : packed.cu_seqlens_offsets[r + 1]].tolist()
        assert bounds[0] == 0 and bounds[-1] <= max_length and bounds == sorted(bounds)
        assert len(bounds) >= 2 and all(b > a for a, b in itertools.pairwise(bounds))
        seg = packed.segment_ids[r]
        assert (seg[: bounds[-1]] >= 0).all() and (seg[bounds[-1] :] == -1).all()
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            assert (seg[lo:hi] == k).all()
            assert packed.position_ids[r, lo:hi].tolist() == list(range(hi - lo))  # restart per piece
        assert (packed.position_ids[r, bounds[-1] :] == 0).all()

    # Agrees with the O(P x R) reference BFD, row by row.
    _, _, piece_lengths = split_documents(lens, max_length)
    expected = naive_bfd(piece_lengths.tolist(), max_length)
    assert [[p[2] for p in row] for row in piece_rows(packed)] == [
        [int(piece_lengths[i]) for i in row] for row in expected
    ]
    assert n_rows == len(expected)

    # Tracing maps every real token to (doc, offset) and pads to (-1, -1).
    if n_rows:
        rr, cc = np.meshgrid(np.arange(n_rows), np.arange(max_length), indexing="ij")
        doc, offset = packed.trace(rr, cc)
        real = packed.segment_ids >= 0
        assert (stream[starts[doc[real]] + offset[real]] == packed.tokens[real]).all()
        assert (doc[~real] == -1).all() and (offset[~real] == -1).all()

    # Labels never cross a piece boundary; the mask is same-piece causal, pads see themselves only.
    if n_rows:
        dataset = PackedDataset(packed, with_mask=True)
        batch = dataset.__getitems__(list(range(n_rows)))
        seg = packed.segment_ids.astype(np.int64)
        labels = batch["labels"].numpy()
        nxt_same = np.zeros_like(seg, dtype=bool)
        nxt_same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
        assert (labels[~nxt_same] == IGNORE_INDEX).all()
        assert (labels[:, :-1][nxt_same[:, :-1]] == packed.tokens[:, 1:][nxt_same[:, :-1]]).all()
        expected_mask = reference_mask(seg)
        assert np.array_equal(batch["attention_mask"][:, 0].numpy(), expected_mask)
        assert np.array_equal(block_causal_mask(batch["segment_ids"])[:, 0].numpy(), expected_mask)
        assert batch["position_ids"].tolist() == packed.position_ids.tolist()

    # Deterministic.
    again = pack(stream.copy(), starts.copy(), lens.copy(), max_length)
    for name, array in packed.arrays().items():
        assert np.array_equal(array, getattr(again, name)) and array.dtype == getattr(again, name).dtype, name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora(), st.integers(1, 7), st.integers(0, 2**16))
def test_rows_filled_shard_by_shard_equal_the_whole(
    corpus: tuple[list[int], int, int], per_shard: int, seed: int
) -> None:
    """fill_rows over consecutive ranges gives the rows of one pack(); a dataset over the shards serves the same
    batches and traces as one over the whole."""
    lengths, max_length, stream_seed = corpus
    stream, starts, lens = documents(lengths, stream_seed)
    whole = pack(stream, starts, lens, max_length)
    plan = plan_packing(stream, starts, lens, max_length)
    assert plan.num_rows == whole.num_rows and plan.stats() == whole.stats()
    shards = [
        fill_rows(plan, stream, lo, min(lo + per_shard, plan.num_rows)) for lo in range(0, plan.num_rows, per_shard)
    ]
    if not shards:
        assert whole.num_rows == 0
        return
    for name in ("tokens", "segment_ids", "position_ids"):
        assert np.array_equal(np.concatenate([getattr(s, name) for s in shards]), getattr(whole, name)), name
    firsts = np.cumsum([0] + [s.num_rows for s in shards])
    assert np.array_equal(
        np.concatenate([s.piece_row + f for s, f in zip(shards, firsts, strict=False)]), whole.piece_row
    )
    for name in ("piece_start", "piece_length", "piece_doc", "piece_doc_offset"):
        assert np.array_equal(np.concatenate([getattr(s, name) for s in shards]), getattr(whole, name)), name
    for s in shards:  # each shard stands alone: its cu_seqlens describe its own rows
        assert s.cu_seqlens_offsets[0] == 0 and s.cu_seqlens_offsets[-1] == s.num_pieces + s.num_rows
    assert sum(s.real_tokens for s in shards) == whole.real_tokens
    rng = np.random.default_rng(seed)
    one, many = PackedDataset(whole), PackedDataset(shards)
    assert len(many) == len(one) == whole.num_rows
    for _ in range(3):
        idx = rng.integers(-len(one), len(one), size=int(rng.integers(1, 9)))
        a, b = one.__getitems__(idx), many.__getitems__(idx)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        cols = rng.integers(0, max_length, size=idx.size)
        assert all(
            np.array_equal(x, y) for x, y in zip(whole.trace(idx % len(one), cols), many.trace(idx, cols), strict=True)
        )
    assert many.locate(len(many) - 1) == (len(shards) - 1, shards[-1].num_rows - 1)


# --- model level --------------------------------------------------------------------------------------


class TinyAttention(torch.nn.Module):
    """One attention layer: token + position embeddings, learned q/k/v/out, scaled_dot_product_attention."""

    def __init__(self, vocab: int, max_positions: int, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_positions, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(ids) + self.pos(positions)
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        if mask is None:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def test_packed_attention_equals_per_document_attention() -> None:
    torch.manual_seed(0)
    vocab, max_length = 64, 32
    stream, starts, lens = documents([9, 14, 5, 20, 3, 11, 7, 32], seed=3, high=vocab)
    packed = pack(stream, starts, lens, max_length, pad_id=0)
    assert packed.num_rows < len(lens) and (packed.segment_ids == -1).any()  # packing and padding both occur
    model = TinyAttention(vocab, max_length).eval()
    batch = PackedDataset(packed, with_mask=True).__getitems__(list(range(packed.num_rows)))
    with torch.no_grad():
        packed_out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        assert torch.isfinite(packed_out).all()  # pads attend to themselves: no NaN
        for doc in range(len(lens)):
            alone_ids = torch.from_numpy(stream[starts[doc] : starts[doc] + lens[doc]]).long()[None]
            alone = model(alone_ids, torch.arange(int(lens[doc]))[None])[0]
            (piece,) = np.flatnonzero(packed.piece_doc == doc)
            row, lo = int(packed.piece_row[piece]), int(packed.piece_start[piece])
            together = packed_out[row, lo : lo + int(lens[doc])]
            assert torch.allclose(together, alone, atol=1e-5), f"doc {doc}: {(together - alone).abs().max()}"
        # Without the mask the same rows give different outputs: the mask is what isolates documents.
        leaky = model(batch["input_ids"], batch["position_ids"])
        assert not torch.allclose(leaky[packed.segment_ids >= 0], packed_out[packed.segment_ids >= 0], atol=1e-3)


# --- save / load ----------------------------------------------------------------------------------------


def test_open_packed_shards_concatenates_and_pickles_as_paths(tmp_path) -> None:
    stream, starts, lens = documents([30, 2, 17, 9, 64, 1, 40, 5, 5, 12], seed=8)
    plan = plan_packing(stream, starts, lens, 16)
    dirs = []
    for number, lo in enumerate(range(0, plan.num_rows, 4)):
        dirs.append(tmp_path / f"{number:05d}")
        save_packed(dirs[-1], fill_rows(plan, stream, lo, min(lo + 4, plan.num_rows)))
    assert len(dirs) >= 3
    dataset = open_packed(dirs)
    whole = PackedDataset(pack(stream, starts, lens, 16))
    rows = list(range(len(whole)))[::-1]
    expected = whole.__getitems__(rows)
    for candidate in (dataset, pickle.loads(pickle.dumps(dataset))):
        assert len(candidate) == len(whole) and all(isinstance(s.tokens, np.memmap) for s in candidate.shards)
        got = candidate.__getitems__(rows)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert len(pickle.dumps(dataset)) < 4096  # paths, not arrays
    with pytest.raises(ValueError, match="no packed shards"):
        open_packed([])
    with pytest.raises(ValueError, match=r"holds \d+ shard directories \(00000, ...\): pass them as a list"):
        open_packed(tmp_path)  # the split's directory, not its shards


def test_dataset_over_shards_of_different_token_dtypes_and_broadcast_trace() -> None:
    small = pack(*documents([5, 9, 3], seed=1), 8)
    wide = pack(*documents([7, 2, 11], seed=2, high=70000), 8)
    assert (small.tokens.dtype, wide.tokens.dtype) == (np.uint16, np.uint32)
    dataset = PackedDataset([small, wide])
    rows = [0, small.num_rows, small.num_rows + 1, 1]  # one batch across both shards
    batch = dataset.__getitems__(rows)
    expected = np.concatenate([small.tokens, wide.tokens]).astype(np.int64)[rows]
    assert batch["input_ids"].dtype == torch.int64 and np.array_equal(batch["input_ids"].numpy(), expected)
    # One row against every column, as PackedRows.trace allows; shapes broadcast and are kept.
    doc, offset = dataset.trace(small.num_rows, np.arange(8))
    assert doc.shape == offset.shape == (8,)
    assert all(np.array_equal(a, b) for a, b in zip((doc, offset), wide.trace(0, np.arange(8)), strict=True))
    doc, offset = dataset.trace(np.array([[0], [small.num_rows]]), np.arange(3))
    assert doc.shape == (2, 3)


def test_save_open_roundtrip_is_deterministic_and_memmapped(tmp_path) -> None:
    stream, starts, lens = documents([30, 2, 17, 9, 64, 1, 40], seed=5)
    packed = pack(stream, starts, lens, 32)
    first = tmp_path / "a"
    written = save_packed(first, packed)
    assert sorted(written) == sorted(PACKED_FILES)
    save_packed(tmp_path / "b", packed)
    for name in PACKED_FILES:
        assert (first / f"{name}.npy").read_bytes() == (tmp_path / "b" / f"{name}.npy").read_bytes(), name
    dataset = open_packed(first, with_mask=True)
    assert isinstance(dataset.shards[0].tokens, np.memmap)
    for name, array in packed.arrays().items():
        assert np.array_equal(getattr(dataset.shards[0], name), array), name
    direct = PackedDataset(packed, with_mask=True).__getitems__([2, 0])
    loaded = dataset.__getitems__([2, 0])
    assert all(torch.equal(direct[key], loaded[key]) for key in direct)
    # A DataLoader worker gets the file paths, not a copy of the rows.
    blob = pickle.dumps(dataset)
    assert packed.tokens.tobytes() not in blob and packed.segment_ids.tobytes() not in blob
    revived = pickle.loads(blob).__getitems__([2, 0])
    assert all(torch.equal(direct[key], revived[key]) for key in direct)


def test_save_into_lake_version_and_open_from_manifest(tmp_path) -> None:
    stream, starts, lens = documents([5, 6, 7], seed=1)
    packed = pack(stream, starts, lens, 8)
    ids = []
    for _ in range(2):
        with Lake(tmp_path).writer("packed_sequences") as writer:
            save_packed(writer.path, packed)
            version = writer.commit(code_version="1", config={"max_length": 8})
        ids.append(version.version)
    assert ids[0] == ids[1]  # byte-identical files, same version id
    version.verify_files()
    dataset = open_packed({name: version.file(name) for name in version.files})
    assert dataset.shards[0].tokens.tolist() == packed.tokens.tolist()


def test_open_packed_rejects_inconsistent_files(tmp_path) -> None:
    stream, starts, lens = documents([5, 6, 7], seed=1)
    save_packed(tmp_path, pack(stream, starts, lens, 8))
    np.save(tmp_path / "segment_ids.npy", np.zeros((3, 8), dtype=np.int64))
    with pytest.raises(ValueError, match=r"packed array 'segment_ids' .*expected \(3, 8\) int32, got \(3, 8\) int64"):
        open_packed(tmp_path)
    with pytest.raises(ValueError, match="packed arrays missing from paths: position_ids"):
        open_packed({name: tmp_path / f"{name}.npy" for name in PACKED_FILES if name != "position_ids"})


def _loader_batches(loader: ShardLoader) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in loader]  # type: ignore[arg-type]


def test_shard_loader_builds_the_mask_from_segment_ids() -> None:
    stream, starts, lens = documents([30, 2, 17, 9, 64, 1, 40, 3, 3, 12], seed=8)
    packed = pack(stream, starts, lens, 32)
    in_dataset = _loader_batches(ShardLoader(PackedDataset(packed, with_mask=True), 3, seed=4))
    in_loader = _loader_batches(ShardLoader(PackedDataset(packed), 3, seed=4, device="cpu", build_mask=True))
    assert len(in_dataset) == len(in_loader) > 1
    for a, b in zip(in_dataset, in_loader, strict=True):
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[key], b[key]) for key in a)  # block fill (numpy) == block_causal_mask (torch)


def test_shard_loader_mask_needs_segment_ids_and_cuda_needs_a_gpu() -> None:
    from corpus.windows import SlidingWindowDataset

    windows = SlidingWindowDataset(np.arange(100, dtype=np.uint16), 8, 8)
    with pytest.raises(ValueError, match="build_mask needs packed batches with 'segment_ids'"):
        next(iter(ShardLoader(windows, 2, build_mask=True)))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ShardLoader(windows, 2, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shard_loader_hands_over_on_the_gpu() -> None:
    stream, starts, lens = documents([30, 2, 17, 9, 64, 1, 40], seed=9)
    packed = pack(stream, starts, lens, 32)
    cpu = _loader_batches(ShardLoader(PackedDataset(packed, with_mask=True), 2, seed=1))
    gpu = _loader_batches(ShardLoader(PackedDataset(packed), 2, seed=1, device="cuda", build_mask=True))
    for a, b in zip(cpu, gpu, strict=True):
        assert all(b[key].device.type == "cuda" and torch.equal(a[key], b[key].cpu()) for key in a)


def _full_comparison_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    length = segment_ids.shape[1]
    column = torch.arange(length)
    seg = torch.where(segment_ids >= 0, segment_ids.long(), -1 - column)
    return ((seg[:, :, None] == seg[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril())[:, None]


def test_block_causal_mask_block_fill_equals_full_comparison() -> None:
    rng = np.random.default_rng(12)
    for trial in range(20):
        stream, starts, lens = documents(rng.integers(1, 90, size=int(rng.integers(1, 30))).tolist(), seed=trial)
        packed = pack(stream, starts, lens, 64)
        segments = torch.from_numpy(np.asarray(packed.segment_ids, dtype=np.int32))
        assert torch.equal(block_causal_mask(segments), _full_comparison_mask(segments))
    # A piece id that comes back after another piece is not a contiguous run: the full comparison decides.
    odd = torch.tensor([[0, 0, 1, 1, 0, -1]], dtype=torch.int32)
    assert torch.equal(block_causal_mask(odd), _full_comparison_mask(odd))
    assert bool(block_causal_mask(odd)[0, 0, 4, 0])  # same id, earlier position: allowed, as the comparison says


# --- a packed_sequences lake version, opened and loaded as a training run would ------------------------


def _packed_version(root: Path, per_shard: int = 4) -> tuple[Version, PackedRows]:
    """A packed_sequences-shaped version: train in shards of `per_shard` rows, validation in one shard."""
    stream, starts, lens = documents([30, 2, 17, 9, 64, 1, 40, 3, 3, 12, 25, 31, 8, 19], seed=21)
    whole = pack(stream, starts, lens, 32)
    plan = plan_packing(stream, starts, lens, 32)
    splits: dict[str, dict[str, Any]] = {"train": {"rows": plan.num_rows, "shards": []}}
    with Lake(root).writer("packed_sequences") as writer:
        for number, lo in enumerate(range(0, plan.num_rows, per_shard)):
            rows = fill_rows(plan, stream, lo, min(lo + per_shard, plan.num_rows))
            where = f"train/{number:05d}"
            save_packed(lambda name, w=where: writer.path(f"{w}/{name}"), rows)
            splits["train"]["shards"].append({"dir": where, "first_row": lo, "rows": rows.num_rows})
        val = pack(*documents([20, 9, 4], seed=22), 32)
        save_packed(lambda name: writer.path(f"validation/00000/{name}"), val)
        shard = {"dir": "validation/00000", "first_row": 0, "rows": val.num_rows}
        splits["validation"] = {"rows": val.num_rows, "shards": [shard]}
        version = writer.commit(code_version="1", config={}, extra={"max_length": 32, "splits": splits})
    return version, whole


def test_open_packed_shards_verifies_the_whole_version_and_names_the_data(tmp_path: Path) -> None:
    version, whole = _packed_version(tmp_path)
    by_path = open_packed_shards(version.manifest_path, "train")
    by_version = open_packed_shards(version, "train")
    assert len(by_path) == len(by_version) == whole.num_rows and len(by_path.shards) == 3
    batch = by_path.__getitems__([0, whole.num_rows - 1])
    assert torch.equal(batch["input_ids"], PackedDataset(whole).__getitems__([0, whole.num_rows - 1])["input_ids"])
    state = ShardLoader(by_path, 2).state_dict()
    assert state["dataset"] == f"packed_sequences/_all/{version.version}:train"
    with pytest.raises(ValueError, match=r"split 'test' has no packed rows .* \(splits with rows: train, validation\)"):
        open_packed_shards(version, "test")
    # Opening train re-hashes validation too: a version is served only when all of it is intact.
    damaged = version.path / "validation/00000/tokens.npy"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(LakeError, match=r"validation/00000/tokens\.npy"):
        open_packed_shards(version, "train")
    assert len(open_packed_shards(version, "train", verify=False)) == whole.num_rows


def test_open_packed_shards_refuses_a_manifest_of_another_kind(tmp_path: Path) -> None:
    with Lake(tmp_path).writer("training_windows") as writer:
        writer.path("x.bin").write_bytes(b"x")
        version = writer.commit(code_version="1", config={}, extra={"max_length": 8})
    with pytest.raises(LakeError, match="no 'splits' \\(not a packed_sequences manifest\\)"):
        open_packed_shards(version.manifest_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_dataloader_over_packed_rows_with_collate_packed(tmp_path: Path, workers: int) -> None:
    version, _ = _packed_version(tmp_path)
    dataset = open_packed_shards(version, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=collate_packed)
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == len(dataset)
    first = dataset.__getitems__([0, 1, 2])
    assert batches[0].keys() == first.keys() and all(torch.equal(batches[0][k], first[k]) for k in first)
    assert collate_packed([dataset[0], dataset[1]])["labels"].shape == (2, 32)  # rows from __getitem__


def test_token_masking_of_packed_rows_hides_only_real_targets(tmp_path: Path) -> None:
    version, _ = _packed_version(tmp_path)
    dataset = open_packed_shards(version, "train")
    plain = _loader_batches(ShardLoader(dataset, 4, seed=3))
    masked = _loader_batches(ShardLoader(dataset, 4, seed=3, mask_tokens=(1, 3)))
    for a, b in zip(plain, masked, strict=True):
        hidden = (b["labels"] == IGNORE_INDEX) & (a["labels"] != IGNORE_INDEX)
        assert torch.equal(b["labels"][~hidden], a["labels"][~hidden])
        real = (a["labels"] != IGNORE_INDEX).sum(dim=1)
        assert ((hidden.sum(dim=1) >= torch.clamp(real, max=1)) & (hidden.sum(dim=1) <= 3)).all()
        assert (hidden.sum(dim=1) <= real).all()


def test_loader_state_resumes_any_rank_and_refuses_other_data(tmp_path: Path) -> None:
    version, _ = _packed_version(tmp_path)
    dataset = open_packed_shards(version, "train")
    ranks = [ShardLoader(dataset, 1, seed=5, rank=r, world_size=2, drop_last=True) for r in range(2)]
    for loader in ranks:
        _loader_batches_limit(loader, 2)
    saved = json.loads(json.dumps(ranks[0].state_dict()))  # only rank 0 writes the checkpoint
    resumed = ShardLoader(dataset, 1, seed=5, rank=1, world_size=2, drop_last=True)
    resumed.load_state_dict(saved)
    rest = _loader_batches(ranks[1])
    again = _loader_batches(resumed)
    assert len(rest) == len(again) > 0
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, again, strict=True))
    other = ShardLoader(open_packed_shards(version, "validation"), 1, seed=5, rank=1, world_size=2, drop_last=True)
    with pytest.raises(ValueError, match=f"saved over packed_sequences/_all/{version.version}:train"):
        other.load_state_dict({**saved, "num_samples": other.num_samples})
    other.load_state_dict({**saved, "num_samples": other.num_samples, "dataset": None, "next_batch": 0})


def test_set_epoch_keeps_a_resumed_epoch_unless_restarted(tmp_path: Path) -> None:
    version, _ = _packed_version(tmp_path)
    dataset = open_packed_shards(version, "train")
    reference = [b["input_ids"] for b in _loader_batches(ShardLoader(dataset, 2, seed=9))]
    first = ShardLoader(dataset, 2, seed=9)
    head = [b["input_ids"] for b in _loader_batches_limit(first, 2)]
    resumed = ShardLoader(dataset, 2, seed=9)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(0)  # the DistributedSampler pattern before the epoch's loop: no replay
    tail = [b["input_ids"] for b in _loader_batches(resumed)]
    assert len(head + tail) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True))
    resumed.set_epoch(0, restart=True)
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(_loader_batches(resumed), reference, strict=True))
    # Anywhere but right after load_state_dict, set_epoch(e) starts e from its first batch, as it always did
    # (a validation loader re-read from the start before each evaluation).
    _loader_batches_limit(first, 1)
    first.set_epoch(0)
    assert torch.equal(_loader_batches_limit(first, 1)[0]["input_ids"], reference[0])
    again = ShardLoader(dataset, 2, seed=9)
    again.load_state_dict(first.state_dict())
    _loader_batches_limit(again, 1)
    again.set_epoch(0)  # a batch was served since the restore: a fresh start
    assert torch.equal(_loader_batches_limit(again, 1)[0]["input_ids"], reference[0])


def test_a_state_at_the_end_of_an_epoch_resumes_at_the_next_one_on_every_rank() -> None:
    packed = pack(*documents([20, 25, 30, 31, 32], seed=2), 32)  # 5 rows: rank 0 gets 3, rank 1 gets 2
    dataset = PackedDataset(packed)
    make = lambda rank: ShardLoader(dataset, 1, seed=1, rank=rank, world_size=2)  # noqa: E731
    saver = make(0)
    _loader_batches(saver)
    state = saver.state_dict()
    assert (state["epoch"], state["next_batch"]) == (0, 3)
    for rank in range(2):
        resumed = make(rank)
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.next_batch) == (1, 0)  # epoch 0 is done on both ranks
        resumed.set_epoch(resumed.epoch)  # `for epoch in range(loader.epoch, ...)`: no replay
        reference = make(rank)
        reference.set_epoch(1)
        assert [b["input_ids"].tolist() for b in _loader_batches(resumed)] == [
            b["input_ids"].tolist() for b in _loader_batches(reference)
        ]
    with pytest.raises(ValueError, match=r"next_batch=4, expected 0\.\.3"):
        make(1).load_state_dict({**state, "next_batch": 4})


def test_no_rank_builds_a_loader_when_one_rank_would_get_no_batches() -> None:
    packed = pack(*documents([20, 25, 30, 31, 32], seed=2), 32)  # no two fit one row: 5 rows
    dataset = PackedDataset(packed)
    assert len(dataset) == 5
    for rank in range(8):  # not only ranks 5-7: ranks 0-4 would wait for them in every collective
        with pytest.raises(ValueError, match="no batches: 5 samples over world_size=8 ranks give rank 5 0 samples"):
            ShardLoader(dataset, 1, rank=rank, world_size=8)


def _loader_batches_limit(loader: ShardLoader, limit: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(dict(batch))  # type: ignore[arg-type]
        if len(out) == limit:
            break
    return out
