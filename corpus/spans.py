"""Token-span pass: maximal spans of >= n tokens that a document shares with an earlier document.

Used by the repeated_spans asset (corpus.stages.spans): across all sources in priority order, a document
that repeats a long exact token span of an earlier one is flagged with each span, and DedupConfig.span_policy
says whether training keeps it, drops the document, or removes the span.

What is found. For every n-token window w of a document, src(w) is the earliest position (documents in
order) holding the same n tokens; w is a hit when src(w) lies in an earlier document, and hits at
consecutive positions with consecutive sources merge into maximal spans (`SpanHit`). Every reported span is
checked token by token; a hash collision only costs a slower window-by-window search.

How, in bounded memory. Hashing every window and sorting the hashes holds ~30 B per corpus token (3.6 GB
at 1 GB of text). Instead, winnowing (Schleimer, Wilkerson & Aiken 2003): k-grams of k = ceil(n / 4)
tokens are hashed, and a window's fingerprint is the minimum hash of its W = n - k + 1 k-grams. Those
k-grams are exactly the window's tokens, so the fingerprint depends only on the window's content: every
occurrence of the same n tokens has the same fingerprint. Pass 1 streams the documents in batches of
_SPAN_BATCH tokens and keeps a fingerprint only where it changes along a document (a run: value, first
window, count). On text without structure a new minimum enters about every (W + 1) / 2 windows, so runs
cover ~2 / (W + 1) of positions: 2% at n = 128, 20 B each, ~0.4 B per corpus token. A window repeated in
two documents has a fingerprint seen in both, so only runs whose fingerprint occurs in >= 2 documents
hold candidates; pass 2 reads just the documents holding candidates, hashes those windows (polynomial
hash mod 2^64), and groups them by hash exactly as the all-windows pass did. Every occurrence of a window
that repeats across documents is a candidate, so the spans are the same as hashing every window
(tests/test_spans.py keeps that implementation as the reference and asserts equality).

Memory: the runs (~0.4 B per token at n = 128), ~50 B per candidate window (the shared text plus up to
n windows around each shared stretch; 1 - 5% of tokens on real corpora), and one batch's temporaries
(~50 B per token of _SPAN_BATCH, 50 MB). Documents are read through `TokenDocuments.read`, so a reader
over token files never holds the corpus.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from corpus.minhash import PowerTable, fmix64

# Tokens hashed per step in the span pass: ~50 bytes of uint64 temporaries per token, 50 MB per step.
_SPAN_BATCH = 1 << 20
# Whole documents kept for checking spans token by token (sources are re-read in stream order mostly).
_CACHE_TOKENS = 1 << 22
_MAX_U64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SpanHit:
    """Tokens [start, start + length) of `doc` equal tokens [source_start, ...) of the earlier `source_doc`."""

    doc: int
    start: int
    length: int
    source_doc: int
    source_start: int


@runtime_checkable
class TokenDocuments(Protocol):
    """Documents' tokens read on demand: `lengths` per document, `read(a, b)` documents a..b-1 back to back."""

    @property
    def lengths(self) -> np.ndarray: ...

    def read(self, first: int, stop: int) -> np.ndarray: ...


class ArrayDocuments:
    """`TokenDocuments` over arrays already in memory (tests, small corpora)."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = [np.asarray(t) for t in arrays]
        for i, arr in enumerate(self.arrays):
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "ui"):
                raise ValueError(f"token_arrays[{i}] must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
        self._lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def read(self, first: int, stop: int) -> np.ndarray:
        if stop - first == 1:
            return self.arrays[first]
        parts = self.arrays[first:stop]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _window_hashes(tokens: np.ndarray, starts: np.ndarray, n: int, powers: PowerTable) -> np.ndarray:
    """Position-independent hash of the n-token windows of `tokens` that begin at `starts`."""
    x = tokens.astype(np.uint64)
    x += np.uint64(1)
    fmix64(x)  # token ids -> spread 64-bit values, so that small ids do not make structured sums
    powers.ensure(len(x) + 1)
    x *= powers.pow[: len(x)]
    prefix = np.zeros(len(x) + 1, dtype=np.uint64)
    np.cumsum(x, out=prefix[1:])  # wraps mod 2^64
    h = prefix[starts + n] - prefix[starts]
    h *= powers.inv[starts]
    return h


def _sliding_min(g: np.ndarray, w: int) -> np.ndarray:
    """min(g[j : j + w]) for every j (van Herk / Gil-Werman: block prefix and suffix minima, 3 passes)."""
    if w == 1 or len(g) == 0:
        return g.copy()
    if len(g) < w:
        return g[:0].copy()
    blocks = -(-len(g) // w)
    padded = np.full(blocks * w, _MAX_U64, dtype=np.uint64)
    padded[: len(g)] = g
    grid = padded.reshape(blocks, w)
    prefix = np.minimum.accumulate(grid, axis=1).ravel()
    suffix = np.minimum.accumulate(grid[:, ::-1], axis=1)[:, ::-1].ravel()
    return np.minimum(suffix[: len(g) - w + 1], prefix[w - 1 : len(g)])


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[i], starts[i] + 1, ..., starts[i] + counts[i] - 1 for every i, concatenated."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts.astype(np.int64) - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return base + np.arange(total, dtype=np.int64)


def _batches(lengths: np.ndarray, docs: np.ndarray | None = None) -> Iterator[tuple[int, int]]:
    """(first, stop) ranges of documents (of `docs`, else all) holding ~_SPAN_BATCH tokens each."""
    count = len(lengths) if docs is None else len(docs)
    sizes = lengths if docs is None else lengths[docs]
    cum = np.concatenate(([0], np.cumsum(sizes)))
    d = 0
    while d < count:
        e = int(np.searchsorted(cum, cum[d] + _SPAN_BATCH, side="right")) - 1
        yield d, min(max(e, d + 1), count)
        d = min(max(e, d + 1), count)


class _Reader:
    """Token slices at global positions, whole documents cached up to _CACHE_TOKENS (least recently used)."""

    def __init__(self, docs: TokenDocuments, offsets: np.ndarray) -> None:
        self.docs = docs
        self.offsets = offsets
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cached = 0

    def doc(self, d: int) -> np.ndarray:
        if d in self.cache:
            self.cache.move_to_end(d)
            return self.cache[d]
        tokens = np.asarray(self.docs.read(d, d + 1))
        expected = int(self.offsets[d + 1] - self.offsets[d])
        assert len(tokens) == expected, f"document {d}: read {len(tokens)} tokens, its length is {expected}"
        self.cache[d] = tokens
        self.cached += len(tokens)
        while self.cached > _CACHE_TOKENS and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cached -= len(old)
        return tokens

    def at(self, pos: int, length: int) -> np.ndarray:
        d = int(np.searchsorted(self.offsets, pos, side="right") - 1)
        begin = pos - int(self.offsets[d])
        return self.doc(d)[begin : begin + length]


def span_parameters(n: int) -> tuple[int, int]:
    """(k, w): k-gram length and winnowing window; k + w - 1 = n, so a window's k-grams are its own tokens."""
    k = max(1, -(-n // 4))
    return k, n - k + 1


def _fingerprint_runs(
    docs: TokenDocuments, lengths: np.ndarray, offsets: np.ndarray, n: int, powers: PowerTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1: (fingerprint, first window's token position, windows) of every run of equal fingerprints."""
    k, w = span_parameters(n)
    values: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for d, e in _batches(lengths):
        lens = lengths[d:e]
        windows = np.maximum(lens - n + 1, 0)
        if not windows.any():
            continue
        tokens = np.asarray(docs.read(d, e))
        base = offsets[d:e] - offsets[d]  # each document's first token in `tokens`
        assert len(tokens) == int(lens.sum()), f"documents {d}..{e - 1}: read {len(tokens)} tokens, want {lens.sum()}"
        kgrams = np.maximum(lens - k + 1, 0)
        koff = np.concatenate(([0], np.cumsum(kgrams)[:-1]))
        g = _window_hashes(tokens, _ranges(base, kgrams), k, powers)
        del tokens
        # Window t of document i has k-grams koff[i] + t .. + w - 1, all inside the document (t + n <= len).
        fingerprint = _sliding_min(g, w)[_ranges(koff, windows)]
        del g
        wdoc = np.repeat(np.arange(len(lens)), windows)
        change = np.ones(len(fingerprint), dtype=bool)
        change[1:] = (fingerprint[1:] != fingerprint[:-1]) | (wdoc[1:] != wdoc[:-1])
        heads = np.flatnonzero(change)
        local = np.arange(len(fingerprint), dtype=np.int64) - np.repeat(np.cumsum(windows) - windows, windows)
        values.append(fingerprint[heads])
        starts.append(local[heads] + base[wdoc[heads]] + offsets[d])
        counts.append(np.diff(np.append(heads, len(fingerprint))).astype(np.int32))
    if not values:
        empty = np.zeros(0, dtype=np.int64)
        return empty.astype(np.uint64), empty, empty.astype(np.int32)
    return np.concatenate(values), np.concatenate(starts), np.concatenate(counts)


def _candidates(
    values: np.ndarray, starts: np.ndarray, counts: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of the windows whose fingerprint occurs in >= 2 documents, and their documents."""
    doc = np.searchsorted(offsets, starts, side="right") - 1
    order = np.lexsort((doc, values))
    v, dv = values[order], doc[order]
    del order
    first = np.ones(len(v), dtype=bool)
    first[1:] = (v[1:] != v[:-1]) | (dv[1:] != dv[:-1])
    per_doc = v[first]  # each fingerprint once per document, sorted
    del v, dv, first
    shared = np.unique(per_doc[1:][per_doc[1:] == per_doc[:-1]])
    del per_doc
    if not len(shared):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    at = np.minimum(np.searchsorted(shared, values), len(shared) - 1)
    keep = shared[at] == values
    pos = _ranges(starts[keep], counts[keep].astype(np.int64))
    return pos, np.repeat(doc[keep], counts[keep])


def _candidate_hashes(
    docs: TokenDocuments, lengths: np.ndarray, offsets: np.ndarray, pos: np.ndarray, wdoc: np.ndarray, n: int
) -> np.ndarray:
    """Pass 2: the n-token hash of every candidate window, reading only the documents that hold one."""
    h = np.empty(len(pos), dtype=np.uint64)
    powers = PowerTable()
    holders = np.unique(wdoc)
    for a, b in _batches(lengths, holders):
        group = holders[a:b]
        # Read runs of consecutive documents with one call each.
        breaks = np.flatnonzero(np.diff(group) != 1) + 1
        parts = [np.asarray(docs.read(int(r[0]), int(r[-1]) + 1)) for r in np.split(group, breaks)]
        tokens = np.concatenate(parts) if len(parts) > 1 else parts[0]
        base = np.concatenate(([0], np.cumsum(lengths[group])[:-1]))  # each document's start in `tokens`
        lo = int(np.searchsorted(wdoc, group[0], side="left"))
        hi = int(np.searchsorted(wdoc, group[-1], side="right"))
        local = pos[lo:hi] - offsets[wdoc[lo:hi]] + base[np.searchsorted(group, wdoc[lo:hi])]
        h[lo:hi] = _window_hashes(tokens, local, n, powers)
    return h


def find_repeated_spans(token_arrays: Sequence[np.ndarray] | TokenDocuments, n: int = 128) -> list[SpanHit]:
    """Maximal spans of >= n tokens that a document shares with an earlier document, sorted by (doc, start)."""
    if n < 1:
        raise ValueError(f"span length n must be >= 1, got {n!r}")
    docs = token_arrays if isinstance(token_arrays, TokenDocuments) else ArrayDocuments(token_arrays)
    lengths = np.asarray(docs.lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # token offsets
    np.cumsum(lengths, out=offsets[1:])
    values, starts, counts = _fingerprint_runs(docs, lengths, offsets, n, PowerTable())
    sp, wdoc = _candidates(values, starts, counts, offsets)
    del values, starts, counts
    if not len(sp):
        return []
    h = _candidate_hashes(docs, lengths, offsets, sp, wdoc, n)
    # Keep only windows whose hash repeats, then order them by (hash, position).
    order = np.lexsort((sp, h))
    sh, sp, wdoc = h[order], sp[order], wdoc[order]
    del h, order
    same = sh[1:] == sh[:-1]
    repeated = np.zeros(len(sh), dtype=bool)
    repeated[1:] = same
    repeated[:-1] |= same
    sh, sp, wdoc = sh[repeated], sp[repeated], wdoc[repeated]
    del same, repeated
    # The earliest occurrence of each hash is the head of its run; a window in a later document is a hit.
    run_head = np.ones(len(sh), dtype=bool)
    run_head[1:] = sh[1:] != sh[:-1]
    head = np.maximum.accumulate(np.where(run_head, np.arange(len(sh)), 0))
    hit = wdoc > wdoc[head]
    hit_pos, hit_src = sp[hit], sp[head][hit]
    by_pos = np.argsort(hit_pos, kind="stable")
    hit_pos, hit_src = hit_pos[by_pos], hit_src[by_pos]
    reader = _Reader(docs, offsets)
    verified: list[tuple[int, int, int]] = []
    for p, s, length in _merge_windows(hit_pos, hit_src, offsets, n):
        if np.array_equal(reader.at(p, length), reader.at(s, length)):
            verified.append((p, s, length))
        else:
            # A hash collision inside this span (~2^-64 per window pair): check window by window.
            verified.extend(_verify_windows(p, s, length, n, reader, offsets, sh, sp))
    return [_span_hit(p, s, length, offsets) for p, s, length in _merge_spans(verified, offsets, n)]


def _merge_windows(pos: np.ndarray, src: np.ndarray, offsets: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """Merge windows at consecutive positions with consecutive sources into (pos, src, length) spans."""
    if len(pos) == 0:
        return []
    same_doc = np.searchsorted(offsets, pos, side="right") == np.searchsorted(offsets, pos - 1, side="right")
    cont = np.zeros(len(pos), dtype=bool)
    cont[1:] = (pos[1:] == pos[:-1] + 1) & (src[1:] == src[:-1] + 1) & same_doc[1:]
    # A source run crossing into the next document is not a continuation either.
    src_doc = np.searchsorted(offsets, src, side="right")
    cont[1:] &= src_doc[1:] == src_doc[:-1]
    heads = np.flatnonzero(~cont)
    ends = np.append(heads[1:], len(pos)) - 1
    return [(int(pos[a]), int(src[a]), int(pos[b] - pos[a]) + n) for a, b in zip(heads, ends, strict=True)]


def _merge_spans(spans: list[tuple[int, int, int]], offsets: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """Merge verified (pos, src, length) spans whose windows continue each other (after the slow path)."""
    out: list[tuple[int, int, int]] = []
    for p, s, length in sorted(spans):
        if out:
            q, t, m = out[-1]
            last = q + m - n  # the previous span's last window
            same_docs = (
                np.searchsorted(offsets, [q, t], side="right").tolist()
                == np.searchsorted(offsets, [p, s], side="right").tolist()
            )
            if p == last + 1 and s - t == p - q and same_docs:
                out[-1] = (q, t, m + length - n + 1)
                continue
        out.append((p, s, length))
    return out


def _span_hit(p: int, s: int, length: int, offsets: np.ndarray) -> SpanHit:
    doc = int(np.searchsorted(offsets, p, side="right") - 1)
    sdoc = int(np.searchsorted(offsets, s, side="right") - 1)
    return SpanHit(doc, p - int(offsets[doc]), length, sdoc, s - int(offsets[sdoc]))


def _verify_windows(
    p: int, s: int, length: int, n: int, reader: _Reader, offsets: np.ndarray, sh: np.ndarray, sp: np.ndarray
) -> list[tuple[int, int, int]]:
    """Slow path after a collision: each window's true earliest occurrence in an earlier document."""
    doc_start = offsets[np.searchsorted(offsets, p, side="right") - 1]
    found: list[tuple[int, int, int]] = []
    for w in range(p, p + length - n + 1):
        rank = int(np.flatnonzero(sp == w)[0])
        lo = int(np.searchsorted(sh, sh[rank], side="left"))
        hi = int(np.searchsorted(sh, sh[rank], side="right"))
        window = reader.at(w, n)
        for cand in sorted(sp[lo:hi].tolist()):
            if cand >= doc_start:
                break
            if np.array_equal(reader.at(cand, n), window):
                found.append((w, cand, n))
                break
    return found


def remove_spans(tokens: np.ndarray, hits: Sequence[SpanHit]) -> np.ndarray:
    """The document's tokens without the union of its hits' spans ("remove the span only" policy)."""
    arr = np.asarray(tokens)
    if not hits:
        return arr.copy()
    docs = {h.doc for h in hits}
    if len(docs) != 1:
        raise ValueError(f"remove_spans takes the hits of one document, got documents {sorted(docs)}")
    keep = np.ones(len(arr), dtype=bool)
    for h in hits:
        if h.start < 0 or h.length < 1 or h.start + h.length > len(arr):
            raise ValueError(f"span [{h.start}, {h.start + h.length}) outside the document's {len(arr)} tokens")
        keep[h.start : h.start + h.length] = False
    return arr[keep]
