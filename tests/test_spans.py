"""corpus.spans: repeated token spans across documents, against the all-windows reference implementation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from corpus import spans as dd
from corpus.minhash import PowerTable

# ---------------------------------------------------------------------------------------------------
# Reference: the pass before winnowing (a 64-bit hash of every window, all held at once). Kept verbatim
# so that the bounded-memory pass can be checked against it on any corpus.

_REF_BATCH = 1 << 20


# The rolling hash is the library's (what differs is which windows get hashed and compared).
_ref_window_hashes = dd._window_hashes


def reference_find_repeated_spans(token_arrays: Sequence[np.ndarray], n: int = 128) -> list[dd.SpanHit]:
    """Maximal spans of >= n tokens that a document shares with an earlier document, sorted by (doc, start)."""
    if n < 1:
        raise ValueError(f"span length n must be >= 1, got {n!r}")
    arrays = [np.asarray(t) for t in token_arrays]
    for i, arr in enumerate(arrays):
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "ui"):
            raise ValueError(f"token_arrays[{i}] must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    windows = np.maximum(lengths - n + 1, 0)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)  # token offsets
    np.cumsum(lengths, out=offsets[1:])
    woff = np.zeros(len(arrays) + 1, dtype=np.int64)  # window offsets
    np.cumsum(windows, out=woff[1:])
    if woff[-1] == 0:
        return []
    flat = np.concatenate(arrays)
    h = np.empty(int(woff[-1]), dtype=np.uint64)
    powers = PowerTable()
    d = 0
    while d < len(arrays):  # batches of ~_REF_BATCH tokens; window hashes do not depend on position
        e = int(np.searchsorted(offsets, offsets[d] + _REF_BATCH, side="right")) - 1
        e = min(max(e, d + 1), len(arrays))
        doc = np.repeat(np.arange(d, e), windows[d:e])
        local = np.arange(woff[d], woff[e]) - woff[doc] + offsets[doc] - offsets[d]
        h[woff[d] : woff[e]] = _ref_window_hashes(flat[offsets[d] : offsets[e]], local, n, powers)
        d = e
    # Most windows occur once: keep only windows whose hash repeats, then order them by (hash, position).
    order = np.argsort(h)
    sorted_h = h[order]
    same = sorted_h[1:] == sorted_h[:-1]
    repeated = np.zeros(len(h), dtype=bool)
    repeated[1:] = same
    repeated[:-1] |= same
    widx = order[repeated]
    del order, sorted_h, same, repeated
    wdoc = np.searchsorted(woff, widx, side="right") - 1
    sp = widx - woff[wdoc] + offsets[wdoc]  # token position of each window
    sh = h[widx]
    by = np.lexsort((sp, sh))
    sh, sp, wdoc = sh[by], sp[by], wdoc[by]
    # The earliest occurrence of each hash is the head of its run; a window in a later document is a hit.
    run_head = np.ones(len(sh), dtype=bool)
    run_head[1:] = sh[1:] != sh[:-1]
    head = np.maximum.accumulate(np.where(run_head, np.arange(len(sh)), 0))
    hit = wdoc > wdoc[head]
    hit_pos, hit_src = sp[hit], sp[head][hit]
    by_pos = np.argsort(hit_pos, kind="stable")
    hit_pos, hit_src = hit_pos[by_pos], hit_src[by_pos]
    verified: list[tuple[int, int, int]] = []
    for p, s, length in _ref_merge_windows(hit_pos, hit_src, offsets, n):
        if np.array_equal(flat[p : p + length], flat[s : s + length]):
            verified.append((p, s, length))
        else:
            # A hash collision inside this span (~2^-64 per window pair): check window by window.
            verified.extend(_ref_verify_windows(p, s, length, n, flat, offsets, sh, sp))
    return [_ref_span_hit(p, s, length, offsets) for p, s, length in _ref_merge_spans(verified, offsets, n)]


# Merging window hits into maximal spans is the library's own (corpus.spans._merge_windows and friends): what
# the reference checks is which windows are found, every n-gram hashed against the winnowed candidates.
_ref_merge_windows = dd._merge_windows
_ref_merge_spans = dd._merge_spans
_ref_span_hit = dd._span_hit


def _ref_verify_windows(
    p: int, s: int, length: int, n: int, flat: np.ndarray, offsets: np.ndarray, sh: np.ndarray, sp: np.ndarray
) -> list[tuple[int, int, int]]:
    """Slow path after a collision: each window's true earliest occurrence in an earlier document."""
    doc_start = offsets[np.searchsorted(offsets, p, side="right") - 1]
    found: list[tuple[int, int, int]] = []
    for w in range(p, p + length - n + 1):
        rank = int(np.flatnonzero(sp == w)[0])
        lo = int(np.searchsorted(sh, sh[rank], side="left"))
        hi = int(np.searchsorted(sh, sh[rank], side="right"))
        window = flat[w : w + n]
        for cand in sorted(sp[lo:hi].tolist()):
            if cand >= doc_start:
                break
            if np.array_equal(flat[cand : cand + n], window):
                found.append((w, cand, n))
                break
    return found


# ---------------------------------------------------------------------------------------------------
# Repeated spans


def span_docs() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    d0 = rng.integers(0, 50257, 1000)
    block = rng.integers(0, 50257, 200)
    d0[600:800] = block  # a block that repeats inside d0 only: never a hit by itself
    d0[850:1000] = block[:150]
    d1 = np.concatenate((rng.integers(0, 50257, 300), d0[100:400], rng.integers(0, 50257, 200)))
    d2 = d0[100:400].copy()  # earliest occurrence is d0, not d1
    d3 = np.concatenate((block[:130], rng.integers(0, 50257, 50)))  # matches d0 at 600 (first occurrence)
    d4 = rng.integers(0, 50257, 100)  # shorter than n
    d5 = np.concatenate((d1[250:700], d0[:5]))  # spans d1's random head + the copied part
    return [d0, d1, d2, d3, d4, d5]


def test_find_repeated_spans_exact():
    hits = dd.find_repeated_spans(span_docs(), n=128)
    # d5 = d1[250:700] + 5 tokens: windows touching d1's random parts are first seen in d1, windows inside
    # the copied part d5[50:350] = d0[100:400] are first seen in d0, so d5 splits into three spans.
    assert hits == [
        dd.SpanHit(doc=1, start=300, length=300, source_doc=0, source_start=100),
        dd.SpanHit(doc=2, start=0, length=300, source_doc=0, source_start=100),
        dd.SpanHit(doc=3, start=0, length=130, source_doc=0, source_start=600),
        dd.SpanHit(doc=5, start=0, length=177, source_doc=1, source_start=250),
        dd.SpanHit(doc=5, start=50, length=300, source_doc=0, source_start=100),
        dd.SpanHit(doc=5, start=223, length=227, source_doc=1, source_start=473),
    ]


def test_find_repeated_spans_survives_hash_collisions(monkeypatch):
    docs = span_docs()
    reference = dd.find_repeated_spans(docs, n=128)

    def colliding(tokens, starts, n, powers):  # every window of every document hashes to the same value
        return np.zeros(len(starts), dtype=np.uint64)

    monkeypatch.setattr(dd, "_window_hashes", colliding)
    assert dd.find_repeated_spans(docs, n=128) == reference


def test_find_repeated_spans_small_n_and_errors():
    docs = [np.array([1, 2, 3, 4]), np.array([9, 3, 4, 7]), np.array([], dtype=np.int64)]
    assert dd.find_repeated_spans(docs, n=2) == [dd.SpanHit(1, 1, 2, 0, 2)]
    assert dd.find_repeated_spans(docs, n=1) == [dd.SpanHit(1, 1, 2, 0, 2)]
    assert dd.find_repeated_spans([], n=4) == []
    with pytest.raises(ValueError, match="n must be >= 1"):
        dd.find_repeated_spans(docs, n=0)
    with pytest.raises(ValueError, match=r"token_arrays\[0\]"):
        dd.find_repeated_spans([np.zeros((2, 2), dtype=int)], n=1)


def test_remove_spans():
    docs = span_docs()
    hits = [h for h in dd.find_repeated_spans(docs, n=128) if h.doc == 1]
    out = dd.remove_spans(docs[1], hits)
    assert np.array_equal(out, np.concatenate((docs[1][:300], docs[1][600:])))
    overlapping = [dd.SpanHit(0, 2, 3, 0, 0), dd.SpanHit(0, 4, 2, 0, 0)]
    assert dd.remove_spans(np.arange(8), overlapping).tolist() == [0, 1, 6, 7]
    assert dd.remove_spans(np.arange(3), []).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one document"):
        dd.remove_spans(np.arange(8), [dd.SpanHit(0, 0, 1, 0, 0), dd.SpanHit(1, 0, 1, 0, 0)])
    with pytest.raises(ValueError, match="outside"):
        dd.remove_spans(np.arange(8), [dd.SpanHit(0, 6, 5, 0, 0)])


# ---------------------------------------------------------------------------------------------------
# The bounded-memory pass equals the reference


def planted_corpus(seed: int, vocab: int, docs: int = 40) -> list[np.ndarray]:
    """Random documents, with copies of earlier stretches planted (whole, edited, repeated, across docs)."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for i in range(docs):
        doc = rng.integers(0, vocab, int(rng.integers(0, 700)))
        for _ in range(int(rng.integers(0, 4))):
            if not out:
                break
            src = out[int(rng.integers(0, len(out)))]
            if len(src) < 2:
                continue
            a = int(rng.integers(0, len(src) - 1))
            piece = src[a : a + int(rng.integers(1, 400))].copy()
            if rng.random() < 0.3 and len(piece) > 10:
                piece[int(rng.integers(0, len(piece)))] = rng.integers(0, vocab)  # an edited copy
            at = int(rng.integers(0, len(doc) + 1))
            doc = np.concatenate((doc[:at], piece, doc[at:]))
        if i % 7 == 3 and out:
            doc = out[-1].copy()  # a whole document again
        out.append(doc)
    return out


class CountingDocuments:
    """A TokenDocuments that hands out copies and records what was read (as a file reader would)."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = [a.astype(np.uint16) for a in arrays]
        self.reads: list[tuple[int, int]] = []

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.arrays], dtype=np.int64)

    def read(self, first: int, stop: int) -> np.ndarray:
        self.reads.append((first, stop))
        return np.concatenate([np.zeros(0, np.uint16), *self.arrays[first:stop]])


@pytest.mark.parametrize("vocab", [2, 5, 50257])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 17, 64, 128])
def test_equals_reference_on_random_corpora(vocab: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if vocab == 2 and n < 8:
        pytest.skip("every window repeats: the reference's slow path is quadratic")
    docs = planted_corpus(vocab * 1000 + n, vocab)
    expected = reference_find_repeated_spans(docs, n)
    assert dd.find_repeated_spans(docs, n) == expected
    # Small batches and a small document cache: the same spans, and only whole documents read.
    monkeypatch.setattr(dd, "_SPAN_BATCH", 900)
    monkeypatch.setattr(dd, "_CACHE_TOKENS", 500)
    reader = CountingDocuments(docs)
    assert dd.find_repeated_spans(reader, n) == expected
    assert all(0 <= a < b <= len(docs) for a, b in reader.reads)
    if vocab == 50257 and n >= 17:
        assert expected, "the planted copies give spans"


def test_candidates_are_a_small_part_of_a_large_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 2 hashes only windows near shared text: most documents are never read a second time."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50257, 2000) for _ in range(200)]
    docs[150] = np.concatenate((docs[150][:500], docs[20][100:400], docs[150][500:]))
    seen: list[int] = []
    original = dd._candidate_hashes

    def spy(docs_, lengths, offsets, pos, wdoc, n):  # type: ignore[no-untyped-def]
        seen.append(len(pos))
        return original(docs_, lengths, offsets, pos, wdoc, n)

    monkeypatch.setattr(dd, "_candidate_hashes", spy)
    hits = dd.find_repeated_spans(docs, 128)
    assert hits == [dd.SpanHit(doc=150, start=500, length=300, source_doc=20, source_start=100)]
    assert hits == reference_find_repeated_spans(docs, 128)
    # Windows around the shared 300 tokens in docs 20 and 150 only: < 2 x (300 + 2 x 128) of 400,000.
    assert 0 < seen[0] < 2 * (300 + 2 * 128)


def test_partial_hash_collisions_give_the_reference_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = planted_corpus(11, 50257, docs=25)
    expected = reference_find_repeated_spans(docs, 32)
    original = dd._window_hashes

    def weak(tokens, starts, n, powers):  # type: ignore[no-untyped-def]
        return original(tokens, starts, n, powers) & np.uint64(0x3F)  # 64 values: collisions everywhere

    monkeypatch.setattr(dd, "_window_hashes", weak)
    assert dd.find_repeated_spans(docs, 32) == expected


def test_sliding_min_and_parameters() -> None:
    rng = np.random.default_rng(0)
    g = rng.integers(0, 1 << 62, 1000).astype(np.uint64)
    for w in (1, 2, 7, 97, 1000):
        expected = np.array([g[j : j + w].min() for j in range(len(g) - w + 1)], dtype=np.uint64)
        assert np.array_equal(dd._sliding_min(g, w), expected)
    assert len(dd._sliding_min(g[:3], 5)) == 0
    assert dd.span_parameters(128) == (32, 97)
    assert dd.span_parameters(1) == (1, 1)
    assert all(k + w - 1 == n for n in range(1, 300) for k, w in [dd.span_parameters(n)])
