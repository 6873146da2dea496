"""Token-span pass: maximal spans of >= n tokens that a document shares with an earlier document.

Used by the repeated_spans asset (corpus.stages.spans): across all sources in priority order, a document
that repeats a long exact token span of an earlier one is flagged with each span, and DedupConfig.span_policy
says whether training keeps it, drops the document, or removes the span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corpus.minhash import PowerTable, fmix64

# Tokens hashed per step in the span pass: ~50 bytes of uint64 temporaries per token, 50 MB per step.
_SPAN_BATCH = 1 << 20


@dataclass(frozen=True)
class SpanHit:
    """Tokens [start, start + length) of `doc` equal tokens [source_start, ...) of the earlier `source_doc`."""

    doc: int
    start: int
    length: int
    source_doc: int
    source_start: int


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


def find_repeated_spans(token_arrays: Sequence[np.ndarray], n: int = 128) -> list[SpanHit]:
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
    while d < len(arrays):  # batches of ~_SPAN_BATCH tokens; window hashes do not depend on position
        e = int(np.searchsorted(offsets, offsets[d] + _SPAN_BATCH, side="right")) - 1
        e = min(max(e, d + 1), len(arrays))
        doc = np.repeat(np.arange(d, e), windows[d:e])
        local = np.arange(woff[d], woff[e]) - woff[doc] + offsets[doc] - offsets[d]
        h[woff[d] : woff[e]] = _window_hashes(flat[offsets[d] : offsets[e]], local, n, powers)
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
    for p, s, length in _merge_windows(hit_pos, hit_src, offsets, n):
        if np.array_equal(flat[p : p + length], flat[s : s + length]):
            verified.append((p, s, length))
        else:
            # A hash collision inside this span (~2^-64 per window pair): check window by window.
            verified.extend(_verify_windows(p, s, length, n, flat, offsets, sh, sp))
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
