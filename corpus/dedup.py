"""Exact and near-duplicate clusters, repeated token spans, and a persisted LSH index for incremental runs.

Documents: (1) equal `exact_key` (sha256 of the normalized text) -> exact duplicates; (2) LSH banding of
the MinHash signatures (b bands x r rows, corpus.minhash states the S-curve): two documents are
candidates when some band's r values are all equal, which is exactly datasketch `MinHashLSH(threshold,
num_perm, params=(b, r))`'s rule (tested against it). The banding is done here in numpy instead: a
64-bit hash per band, one argsort per band, equal-hash runs give the pairs, and every pair is then
checked against the signatures themselves, so a band-hash collision can never make a candidate.
On 1e5 signatures it runs ~30x faster than inserting and querying LeanMinHash objects one by one, in
a quarter of the memory (benchmarks/dedup.py). Candidates are confirmed when their Jaccard similarity is
>= threshold: the exact Jaccard of their shingle sets when an `ExactJaccard` is passed (the pipeline's
default, DedupConfig.confirm = "exact"), else the signature estimate (sd 0.038 at J = 0.8 with 112
permutations, so pairs at J = 0.75 pass 11% of the time). Clusters are the connected components of
exact and confirmed pairs (union-find by min-label propagation with pointer jumping; a pair already in
one component is skipped, so a bucket of k near-identical documents costs k^2/2 label lookups but only
about one 65,536-pair chunk of signature comparisons per band), and one member per cluster is kept:
highest quality, then lowest priority (the source's position in the manifest), then smallest doc_id,
then smallest index.

Exact duplicates have identical signatures, so only one representative of each exact group enters the
LSH (a corpus with a file copied 1,000 times would otherwise yield 500,000 pairs per band). Documents
with no words (exact_key == EMPTY_KEY, all-MAX_HASH signature) are never clustered: they are for the
quality filters to drop. Transitivity means a cluster member can be below the threshold to the kept
member (A~B, B~C, A!~C); `similarity` reports the Jaccard (exact or estimated, as confirmed) to the
kept member so this is visible.

Span pass (`find_repeated_spans`): a polynomial hash mod 2^64 of every n-token window (tokens mapped
through the 64-bit MurmurHash3 finalizer first), computed for all windows at once from prefix sums,
one argsort finds the windows whose hash repeats (most occur once), and each of those whose earliest
occurrence lies in an earlier document is a hit. Hits at consecutive offsets in both documents merge
into maximal spans, and every span is checked against the tokens, so a hash collision can only cost
time, never a false hit. Measured: ~8M tokens/s, ~31 bytes per token at peak (benchmarks/dedup.py).

Exact confirmation (`ExactJaccard`): sets of 64-bit shingle hashes (corpus.minhash `shingle_sets`; two
distinct shingles collide with probability 2^-64), loaded once for the documents that share a band key
with another document and kept as uint32 ranks; a chunk of pairs is intersected by one searchsorted of
one side's (pair, rank) keys in the other's (no sort, no Python call per pair). With confirmation by
exact Jaccard every link is a true pair (J >= threshold), so clusters lie inside the components of the
true pairs; transitivity can still put two members below the threshold in one cluster (measured in
tests/test_dedup_stage.py).

Incremental refresh (`save_index` / `load_index` / `find_duplicates_incremental`): the index stores the
documents' keys, signatures and cluster ids, and which confirmation made them. New documents are
compared with the stored ones and with each other only; stored pairs are not recomputed, because stored
clusters already are the components of the stored pairs. The result equals `find_duplicates` on the
union (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.config import DedupConfig
from corpus.minhash import EMPTY_KEY, MAX_HASH, fmix64

EXACT = "exact_duplicate"
NEAR = "near_duplicate"
INDEX_FORMAT = "corpus.dedup.lsh_index/2"  # /2: index.json records the confirmation used
INDEX_FILES = ("documents.parquet", "signatures.npy")

# Fixed odd multipliers that fold a band's r 32-bit values into one 64-bit key (splitmix64 outputs).
_BAND_MULT = np.array(
    [
        0x9E3779B97F4A7C15,
        0xBF58476D1CE4E5B9,
        0x94D049BB133111EB,
        0xD6E8FEB86659FD93,
        0xA0761D6478BD642F,
        0xE7037ED1A0B428DB,
        0x8EBC6AF09C88C6E3,
        0x589965CC75374CC3,
    ],
    dtype=np.uint64,
)
# Pairs handled per step when confirming (x num_perm values compared): 2^16 x 112 = 7.3M bools.
_PAIR_CHUNK = 1 << 16
# Shingles intersected per step in exact confirmation: keys, segment ids and positions, 8 bytes each,
# ~100 MB per step.
_EXACT_CHUNK = 1 << 22


@dataclass(frozen=True)
class DedupResult:
    """Per-document decisions (arrays in input order) and one row per cluster."""

    cluster_id: np.ndarray  # int64; -1 for documents without duplicates
    kept: np.ndarray  # bool
    kept_index: np.ndarray  # int64; the kept member of the document's cluster (itself when kept)
    reason: list[str | None]  # None (kept), "exact_duplicate" or "near_duplicate"
    similarity: np.ndarray  # float64; estimated Jaccard to the kept member (1.0 for exact and for kept)
    clusters: pa.Table  # cluster_id, size, kept_index, kept_source, kept_doc_id, members, n_exact, ...
    candidate_pairs: int = 0  # LSH candidate pairs examined
    confirmed_pairs: int = 0  # of which Jaccard (exact or estimated, see `confirm`) >= threshold
    confirm: str = "estimate"  # "exact" (shingle sets) or "estimate" (signatures): what confirmed the pairs

    def __len__(self) -> int:
        return len(self.kept)

    def counts(self) -> dict[str, int]:
        return {
            "documents": len(self.kept),
            "kept": int(self.kept.sum()),
            EXACT: sum(r == EXACT for r in self.reason),
            NEAR: sum(r == NEAR for r in self.reason),
            "clusters": self.clusters.num_rows,
            "candidate_pairs": self.candidate_pairs,
            "confirmed_pairs": self.confirmed_pairs,
        }

    def duplicate_ratio(self, signatures: np.ndarray, cfg: DedupConfig) -> float:
        """`duplicate_ratio` over the kept documents' signatures (0.0 when nothing is kept)."""
        return duplicate_ratio(np.asarray(signatures)[self.kept], cfg)


class ExactBudgetExceeded(RuntimeError):
    """Exact confirmation needed more pair comparisons than the `ExactJaccard` was allowed."""


class ExactJaccard:
    """Exact Jaccard similarity of documents' shingle sets, loaded on demand by global document index.

    `load(indices)` returns, for each index, the document's sorted unique uint64 shingle hashes
    (`corpus.minhash.MinHasher.shingle_sets`). Loaded sets are kept as uint32 ranks into the sorted
    union of all loaded values (4 bytes per shingle, order kept), so a chunk of pairs becomes two sorted
    arrays of (pair << 32 | rank) keys and one `searchsorted` counts every intersection: no sort and no
    Python call per pair. Confirming more than `max_pairs` pairs raises `ExactBudgetExceeded`, so the
    caller can fall back to the estimate.
    """

    def __init__(self, load: Callable[[np.ndarray], Sequence[np.ndarray]], max_pairs: int | None = None) -> None:
        self._load = load
        self.max_pairs = max_pairs
        self.pairs = 0  # pairs confirmed so far (what max_pairs bounds)
        self.shingles = 0  # shingles compared so far
        self._vocab = np.zeros(0, dtype=np.uint64)  # sorted union of the loaded sets' values
        self._sets: dict[int, np.ndarray] = {}  # document -> sorted uint32 ranks into _vocab

    def __len__(self) -> int:
        return len(self._sets)

    def prefetch(self, indices: np.ndarray) -> None:
        """Load the sets of these documents now (one `load` call for all that are missing)."""
        wanted = np.unique(np.asarray(indices, dtype=np.int64))
        missing = [i for i in wanted.tolist() if i not in self._sets]
        if not missing:
            return
        sets = self._load(np.asarray(missing, dtype=np.int64))
        if len(sets) != len(missing):
            raise ValueError(f"shingle-set loader returned {len(sets)} sets for {len(missing)} documents")
        arrays = []
        for i, values in zip(missing, sets, strict=True):
            arr = np.asarray(values)
            if arr.ndim != 1 or (arr.size and arr.dtype != np.uint64) or np.any(arr[1:] <= arr[:-1]):
                raise ValueError(f"shingle set of document {i} must be sorted unique uint64, got {arr.dtype} {arr[:4]}")
            arrays.append(arr.astype(np.uint64, copy=False))
        merged = np.union1d(self._vocab, np.concatenate(arrays)) if arrays else self._vocab
        assert len(merged) < 1 << 32, f"{len(merged):,} distinct shingles do not fit uint32 ranks"
        if len(merged) != len(self._vocab) and self._sets:
            remap = np.searchsorted(merged, self._vocab).astype(np.uint32)
            self._sets = {i: remap[r] for i, r in self._sets.items()}
        self._vocab = merged
        for i, arr in zip(missing, arrays, strict=True):
            self._sets[i] = np.searchsorted(merged, arr).astype(np.uint32)

    def jaccard(self, pairs: np.ndarray, budgeted: bool = True) -> np.ndarray:
        """|A & B| / |A | B| for each (i, j) row of `pairs` (0.0 when both sets are empty)."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if budgeted:
            self.pairs += len(pairs)
            if self.max_pairs is not None and self.pairs > self.max_pairs:
                raise ExactBudgetExceeded(
                    f"exact confirmation reached {self.pairs:,} pairs, over the limit of {self.max_pairs:,}"
                )
        out = np.zeros(len(pairs), dtype=np.float64)
        if len(pairs) == 0:
            return out
        self.prefetch(pairs.ravel())
        a_sets = [self._sets[i] for i in pairs[:, 0].tolist()]
        b_sets = [self._sets[i] for i in pairs[:, 1].tolist()]
        len_a = np.fromiter(map(len, a_sets), dtype=np.int64, count=len(pairs))
        len_b = np.fromiter(map(len, b_sets), dtype=np.int64, count=len(pairs))
        cost = len_a + len_b
        self.shingles += int(cost.sum())
        ends = np.cumsum(cost)
        cuts = np.searchsorted(ends, np.arange(_EXACT_CHUNK, int(ends[-1]), _EXACT_CHUNK), side="left") + 1
        for c0, c1 in itertools.pairwise([0, *np.unique(cuts[cuts < len(pairs)]).tolist(), len(pairs)]):
            # (pair << 32 | rank) is sorted over the whole chunk because each set is sorted.
            seg_a = np.repeat(np.arange(c1 - c0, dtype=np.uint64), len_a[c0:c1])
            key_a = (seg_a << np.uint64(32)) | np.concatenate(a_sets[c0:c1]).astype(np.uint64)
            seg_b = np.repeat(np.arange(c1 - c0, dtype=np.uint64), len_b[c0:c1])
            key_b = (seg_b << np.uint64(32)) | np.concatenate(b_sets[c0:c1]).astype(np.uint64)
            if len(key_b) == 0:
                continue
            pos = np.minimum(np.searchsorted(key_b, key_a), len(key_b) - 1)
            hit = key_b[pos] == key_a
            inter = np.bincount(seg_a[hit].astype(np.int64), minlength=c1 - c0)
            union = cost[c0:c1] - inter
            out[c0:c1] = np.divide(inter, union, out=np.zeros(c1 - c0), where=union > 0)
        return out


@dataclass
class LshIndex:
    """A persisted set of documents with their signatures and cluster ids (see `save_index`)."""

    cfg: DedupConfig
    source: list[str]
    doc_id: list[str]
    exact_key: list[str]
    quality: np.ndarray
    priority: np.ndarray
    signatures: np.ndarray
    cluster_id: np.ndarray
    confirm: str = "estimate"  # what confirmed the stored clusters' pairs: "exact" or "estimate"
    _bands: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.doc_id)

    def band_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(members, sorted band keys (bands, m), order (bands, m)) of the LSH representatives, cached."""
        if self._bands is None:
            members = _lsh_members(self.exact_key, self.signatures)
            keys = band_keys(self.signatures[members], self.cfg).T
            order = np.argsort(keys, axis=1, kind="stable")
            self._bands = (members, np.take_along_axis(keys, order, axis=1), order)
        return self._bands


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _Docs:
    source: list[str]
    doc_id: list[str]
    exact_key: list[str]
    signatures: np.ndarray
    quality: np.ndarray
    priority: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_id)


def _validated(
    source: Sequence[str],
    doc_id: Sequence[str],
    exact_key: Sequence[str],
    signatures: np.ndarray,
    quality: np.ndarray | Sequence[float],
    priority: np.ndarray | Sequence[int],
    cfg: DedupConfig,
) -> _Docs:
    n = len(doc_id)
    sig = np.asarray(signatures)
    q = np.asarray(quality, dtype=np.float64)
    pr = np.asarray(priority)
    for name, length in (("source", len(source)), ("exact_key", len(exact_key)), ("quality", len(q))):
        if length != n:
            raise ValueError(f"{name} has {length} entries, doc_id has {n}")
    if len(pr) != n:
        raise ValueError(f"priority has {len(pr)} entries, doc_id has {n}")
    if sig.shape != (n, cfg.num_perm):
        raise ValueError(f"signatures must have shape ({n}, {cfg.num_perm}) (num_perm), got {sig.shape}")
    if sig.dtype.kind not in "ui":
        raise ValueError(f"signatures must be an integer array, got dtype {sig.dtype}")
    if n and (int(sig.min()) < 0 or int(sig.max()) > MAX_HASH):
        raise ValueError(f"signatures must hold 32-bit values, got range [{sig.min()}, {sig.max()}]")
    if not np.all(np.isfinite(q)):
        raise ValueError(f"quality must be finite, got {q[~np.isfinite(q)][:3].tolist()}")
    if pr.size and pr.dtype.kind not in "ui":
        raise ValueError(f"priority must be integers, got dtype {pr.dtype}")
    return _Docs(list(source), list(doc_id), list(exact_key), sig.astype(np.uint64, copy=False), q, pr.astype(np.int64))


def _digests(exact_key: Sequence[str]) -> np.ndarray:
    """exact_key hex strings -> (n, 4) uint64 (the 32 raw bytes, big-endian words)."""
    n = len(exact_key)
    bad = next((i for i, k in enumerate(exact_key) if len(k) != 64), None)
    if bad is not None:
        raise ValueError(f"exact_key[{bad}] must be a 64-digit sha256 hex digest, got {exact_key[bad]!r}")
    try:
        raw = bytes.fromhex("".join(exact_key))
    except ValueError as exc:
        raise ValueError(f"exact_key must be sha256 hex digests: {exc}") from exc
    return np.frombuffer(raw, dtype=">u8").reshape(n, 4).astype(np.uint64)


def _exact_groups(exact_key: Sequence[str], signatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group, rep): a group id per document and the group's smallest index; empty texts are singletons."""
    n = len(exact_key)
    digests = _digests(exact_key)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.lexsort(digests.T[::-1])  # by word 0, then 1, 2, 3: lexicographic over the 32 bytes
    sd = digests[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(sd[1:] != sd[:-1], axis=1)
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(new_group) - 1
    # Empty documents each get a group of their own: they are not duplicates of each other.
    empty = np.flatnonzero(np.array([k == EMPTY_KEY for k in exact_key], dtype=bool))
    group[empty] = group.max() + 1 + np.arange(len(empty))
    rep_of_group = np.full(int(group.max()) + 1, n, dtype=np.int64)
    np.minimum.at(rep_of_group, group, np.arange(n))
    rep = rep_of_group[group]
    mismatch = np.flatnonzero(np.any(signatures != signatures[rep], axis=1))
    if len(mismatch):
        i = int(mismatch[0])
        raise ValueError(
            f"documents {int(rep[i])} and {i} have the same exact_key {exact_key[i]} but different signatures; "
            "exact_key and signatures must come from the same normalized text and DedupConfig"
        )
    return group, rep


def _lsh_members(exact_key: Sequence[str], signatures: np.ndarray) -> np.ndarray:
    """Indices that enter the LSH: the first document of each exact group, if it has words."""
    _, rep = _exact_groups(exact_key, signatures)
    nonempty = ~np.all(signatures == MAX_HASH, axis=1)
    return np.flatnonzero((rep == np.arange(len(rep))) & nonempty)


# ---------------------------------------------------------------------------------------------------
# LSH


def band_keys(signatures: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """(n, bands) uint64: a hash of each band's r values (equal bands -> equal keys; collisions checked later)."""
    sig = np.asarray(signatures, dtype=np.uint64)
    n = len(sig)
    out = np.zeros((n, cfg.bands), dtype=np.uint64)
    mult = np.resize(_BAND_MULT, cfg.rows)
    for band in range(cfg.bands):
        block = sig[:, band * cfg.rows : (band + 1) * cfg.rows]
        acc = np.zeros(n, dtype=np.uint64)
        for k in range(cfg.rows):
            # acc = (acc + v_k) * m_k: order-dependent, every value passes through >= 1 odd multiply
            acc += block[:, k]
            acc *= mult[k]
        out[:, band] = fmix64(acc)
    return out


def _run_pairs(order: np.ndarray, sorted_keys: np.ndarray) -> Iterator[np.ndarray]:
    """All pairs (p, q), p < q, of positions whose sorted keys are equal, in chunks of ~_PAIR_CHUNK."""
    n = len(sorted_keys)
    if n < 2:
        return
    boundary = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate(([0], boundary))
    sizes = np.diff(np.concatenate((starts, [n])))
    for size in np.unique(sizes[sizes >= 2]).tolist():
        run_starts = starts[sizes == size]
        if size * (size - 1) // 2 <= _PAIR_CHUNK:
            i, j = np.triu_indices(size, 1)
            step = max(1, _PAIR_CHUNK // len(i))
            for c in range(0, len(run_starts), step):
                base = run_starts[c : c + step, None]
                yield _ordered(order[(base + i).ravel()], order[(base + j).ravel()])
            continue
        # A big bucket (k near-identical documents): k^2/2 pairs, produced a block of rows at a time.
        rows = max(1, _PAIR_CHUNK // size)
        cols = np.arange(size)
        for start in run_starts.tolist():
            run = order[start : start + size]
            for r0 in range(0, size - 1, rows):
                i, j = np.nonzero(np.arange(r0, min(r0 + rows, size))[:, None] < cols[None, :])
                yield _ordered(run[i + r0], run[j])


def _ordered(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.stack((np.minimum(p, q), np.maximum(p, q)), axis=1)


def _unique_pairs(chunks: Iterator[np.ndarray] | list[np.ndarray], n: int) -> np.ndarray:
    parts = [c[:, 0] * np.int64(n) + c[:, 1] for c in chunks]
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(parts))
    return np.stack((codes // n, codes % n), axis=1)


def candidate_pairs(signatures: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """(k, 2) int64 sorted pairs i < j sharing at least one whole band (all-MAX rows never match).

    The same pairs as querying datasketch MinHashLSH(params=(bands, rows)) with every document.
    """
    sig = np.asarray(signatures, dtype=np.uint64)
    members = np.flatnonzero(~np.all(sig == MAX_HASH, axis=1))
    pairs = _candidates_among(sig, members, cfg)
    return pairs[_share_band(sig, pairs, cfg)]


def _candidates_among(sig: np.ndarray, members: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Pairs of `members` (global indices) with an equal band key, unverified."""
    keys = band_keys(sig[members], cfg)

    def chunks() -> Iterator[np.ndarray]:
        for band in range(cfg.bands):
            order = np.argsort(keys[:, band], kind="stable")
            for local in _run_pairs(order, keys[order, band]):
                yield members[local]

    return _unique_pairs(chunks(), len(sig))


def _share_band(sig: np.ndarray, pairs: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    out = np.zeros(len(pairs), dtype=bool)
    width = cfg.bands * cfg.rows
    for c in range(0, len(pairs), _PAIR_CHUNK):
        p, q = pairs[c : c + _PAIR_CHUNK, 0], pairs[c : c + _PAIR_CHUNK, 1]
        eq = sig[p, :width] == sig[q, :width]
        out[c : c + _PAIR_CHUNK] = eq.reshape(len(p), cfg.bands, cfg.rows).all(axis=2).any(axis=1)
    return out


def _confirm(sig: np.ndarray, pairs: np.ndarray, cfg: DedupConfig, exact: ExactJaccard | None = None) -> np.ndarray:
    """The pairs that really share a band (no key collision) and have Jaccard >= threshold.

    Jaccard is the exact one of the shingle sets when `exact` is given, else the signature estimate.
    """
    keep = np.zeros(len(pairs), dtype=bool)
    width = cfg.bands * cfg.rows
    for c in range(0, len(pairs), _PAIR_CHUNK):
        p, q = pairs[c : c + _PAIR_CHUNK, 0], pairs[c : c + _PAIR_CHUNK, 1]
        eq = sig[p] == sig[q]
        band = eq[:, :width].reshape(len(p), cfg.bands, cfg.rows).all(axis=2).any(axis=1)
        if exact is None:
            band &= eq.sum(axis=1) / cfg.num_perm >= cfg.threshold
        keep[c : c + _PAIR_CHUNK] = band
    if exact is not None:
        banded = np.flatnonzero(keep)
        keep[banded] = exact.jaccard(pairs[banded]) >= cfg.threshold
    return pairs[keep]


def near_duplicate_flags(signatures: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Per document: has a near duplicate among these documents (LSH candidate, estimate >= threshold)."""
    sig = np.asarray(signatures, dtype=np.uint64)
    if len(sig) == 0:
        return np.zeros(0, dtype=bool)
    linker = _Linker(sig, cfg, np.arange(len(sig), dtype=np.int64))
    linker.link_among(np.flatnonzero(~np.all(sig == MAX_HASH, axis=1)))
    # Components are made of confirmed pairs only, so a member of one with >= 2 documents has one.
    size = np.bincount(linker.label, minlength=len(sig))
    return size[linker.label] >= 2


def duplicate_ratio(signatures: np.ndarray, cfg: DedupConfig) -> float:
    """Fraction of documents that have a confirmed near duplicate (LSH candidate, estimate >= threshold)."""
    flags = near_duplicate_flags(signatures, cfg)
    return float(np.mean(flags)) if len(flags) else 0.0


# ---------------------------------------------------------------------------------------------------
# Clusters


def _components(n: int, edges: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """Connected components: each node's label is its component's smallest index.

    `label` continues from an earlier result (every node already points at its component's minimum).
    """
    label = np.arange(n, dtype=np.int64) if label is None else label.copy()
    if len(edges) == 0:
        return label
    p, q = edges[:, 0], edges[:, 1]
    while True:
        lp, lq = label[p], label[q]
        differ = lp != lq
        if not differ.any():
            return label
        lp, lq = lp[differ], lq[differ]
        low = np.minimum(lp, lq)
        # Hook each root to the smallest root it touches (labels only decrease, so no cycles) ...
        np.minimum.at(label, lp, low)
        np.minimum.at(label, lq, low)
        # ... then jump pointers until every node points at a root.
        while True:
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt


class _Linker:
    """Components grown by confirmed candidate pairs; a pair already in one component is skipped.

    Skipping changes no component, and it keeps a bucket of k near-identical documents from costing
    k^2 / 2 signature comparisons in each of the b bands: once they are linked, a pair costs two lookups.
    """

    def __init__(self, sig: np.ndarray, cfg: DedupConfig, label: np.ndarray, exact: ExactJaccard | None = None) -> None:
        self.sig = sig
        self.cfg = cfg
        self.label = label
        self.exact = exact
        self.examined = 0
        self.confirmed = 0

    def offer(self, pairs: np.ndarray) -> None:
        pairs = pairs[self.label[pairs[:, 0]] != self.label[pairs[:, 1]]]
        if len(pairs) == 0:
            return
        self.examined += len(pairs)
        confirmed = _confirm(self.sig, pairs, self.cfg, self.exact)
        self.confirmed += len(confirmed)
        if len(confirmed):
            self.label = _components(len(self.label), confirmed, self.label)

    def link_among(self, members: np.ndarray) -> None:
        """Offer every pair of `members` (global indices) that shares a band key."""
        keys = band_keys(self.sig[members], self.cfg)
        if self.exact is not None:
            # One load of every set a pair may need: members sharing some band key with another member.
            self.exact.prefetch(members[_bucketed(keys)])
        for band in range(self.cfg.bands):
            order = np.argsort(keys[:, band], kind="stable")
            for local in _run_pairs(order, keys[order, band]):
                self.offer(members[local])


def _bucketed(keys: np.ndarray) -> np.ndarray:
    """Rows of `keys` (n, bands) that share at least one band key with another row."""
    mask = np.zeros(len(keys), dtype=bool)
    for band in range(keys.shape[1] if len(keys) else 0):
        order = np.argsort(keys[:, band])
        same = keys[order[1:], band] == keys[order[:-1], band]
        mask[order[1:][same]] = True
        mask[order[:-1][same]] = True
    return np.flatnonzero(mask)


def _covered(lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """Positions in [0, size) inside at least one [lo, hi) range (a difference array, no enumeration)."""
    marks = np.zeros(size + 1, dtype=np.int64)
    np.add.at(marks, lo, 1)
    np.add.at(marks, hi, -1)
    return np.flatnonzero(np.cumsum(marks[:-1]) > 0)


def _assemble(
    docs: _Docs,
    group: np.ndarray,
    rep: np.ndarray,
    label: np.ndarray,
    pairs: int,
    confirmed: int,
    exact: ExactJaccard | None = None,
) -> DedupResult:
    n = len(docs)
    size = np.bincount(label, minlength=n)
    clustered = np.flatnonzero(size[label] >= 2)
    cluster_id = np.full(n, -1, dtype=np.int64)
    kept = np.ones(n, dtype=bool)
    kept_index = np.arange(n, dtype=np.int64)
    similarity = np.ones(n, dtype=np.float64)
    reason: list[str | None] = [None] * n
    if len(clustered) == 0:
        confirm = "exact" if exact is not None else "estimate"
        table = _clusters_table([], docs)
        return DedupResult(cluster_id, kept, kept_index, reason, similarity, table, pairs, 0, confirm)
    # Keep rule: highest quality, lowest priority, smallest doc_id, smallest index.
    doc_rank = np.empty(len(clustered), dtype=np.int64)
    doc_rank[sorted(range(len(clustered)), key=lambda k: docs.doc_id[clustered[k]])] = np.arange(len(clustered))
    lab = label[clustered]
    order = np.lexsort((clustered, doc_rank, docs.priority[clustered], -docs.quality[clustered], lab))
    members = clustered[order]
    first = np.ones(len(members), dtype=bool)
    first[1:] = lab[order][1:] != lab[order][:-1]
    winners = members[first]
    # Cluster ids follow the smallest member index (the label), so they do not depend on the keep rule.
    roots = np.unique(lab)
    cid_of_root = np.full(n, -1, dtype=np.int64)
    cid_of_root[roots] = np.arange(len(roots))
    winner_of_root = np.full(n, -1, dtype=np.int64)
    winner_of_root[label[winners]] = winners
    cluster_id[clustered] = cid_of_root[lab]
    kept_index[clustered] = winner_of_root[lab]
    kept[clustered] = kept_index[clustered] == clustered
    dropped = clustered[~kept[clustered]]
    k = kept_index[dropped]
    is_exact = group[dropped] == group[k]
    if exact is not None:
        # Exact copies share the shingle set of their group's representative, whose set is loaded.
        near = np.flatnonzero(~is_exact)
        sim = np.ones(len(dropped), dtype=np.float64)
        sim[near] = exact.jaccard(np.stack((rep[dropped[near]], rep[k[near]]), axis=1), budgeted=False)
    else:
        sim = np.mean(docs.signatures[dropped] == docs.signatures[k], axis=1)
    similarity[dropped] = np.where(is_exact, 1.0, sim)
    for i, is_exact_i in zip(dropped.tolist(), is_exact.tolist(), strict=True):
        reason[i] = EXACT if is_exact_i else NEAR
    rows = []
    by_cluster = np.argsort(cluster_id[clustered], kind="stable")
    cl_sorted = clustered[by_cluster]
    bounds = np.flatnonzero(np.diff(cluster_id[cl_sorted])) + 1
    for group_members in np.split(cl_sorted, bounds):
        rows.append(group_members)
    table = _clusters_table(rows, docs, kept_index, similarity, reason, cluster_id)
    confirm = "exact" if exact is not None else "estimate"
    return DedupResult(cluster_id, kept, kept_index, reason, similarity, table, pairs, confirmed, confirm)


def _clusters_table(
    rows: list[np.ndarray],
    docs: _Docs,
    kept_index: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
    reason: list[str | None] | None = None,
    cluster_id: np.ndarray | None = None,
) -> pa.Table:
    cols: dict[str, list[Any]] = {
        "cluster_id": [],
        "size": [],
        "kept_index": [],
        "kept_source": [],
        "kept_doc_id": [],
        "members": [],
        "n_exact": [],
        "n_near": [],
        "max_similarity": [],
        "min_similarity": [],
    }
    for members in rows:
        assert kept_index is not None and similarity is not None and reason is not None and cluster_id is not None
        k = int(kept_index[members[0]])
        others = members[members != k]
        sims = similarity[others]
        cols["cluster_id"].append(int(cluster_id[k]))
        cols["size"].append(len(members))
        cols["kept_index"].append(k)
        cols["kept_source"].append(docs.source[k])
        cols["kept_doc_id"].append(docs.doc_id[k])
        cols["members"].append(members.tolist())
        cols["n_exact"].append(sum(reason[i] == EXACT for i in others.tolist()))
        cols["n_near"].append(sum(reason[i] == NEAR for i in others.tolist()))
        cols["max_similarity"].append(float(sims.max()))
        cols["min_similarity"].append(float(sims.min()))
    schema = pa.schema(
        [
            ("cluster_id", pa.int64()),
            ("size", pa.int64()),
            ("kept_index", pa.int64()),
            ("kept_source", pa.string()),
            ("kept_doc_id", pa.string()),
            ("members", pa.list_(pa.int64())),
            ("n_exact", pa.int64()),
            ("n_near", pa.int64()),
            ("max_similarity", pa.float64()),
            ("min_similarity", pa.float64()),
        ]
    )
    return pa.table(cols, schema=schema)


def _exact_edges(group: np.ndarray, rep: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(rep != np.arange(len(rep)))
    return np.stack((rep[idx], idx), axis=1)


def find_duplicates(
    source: Sequence[str],
    doc_id: Sequence[str],
    exact_key: Sequence[str],
    signatures: np.ndarray,
    quality: np.ndarray | Sequence[float],
    priority: np.ndarray | Sequence[int],
    cfg: DedupConfig,
    exact: ExactJaccard | None = None,
) -> DedupResult:
    """Exact and near-duplicate clusters over all documents, and which member of each is kept.

    Candidates are confirmed by exact Jaccard through `exact` (indexed like the inputs) when given,
    else by the signature estimate; `result.confirm` says which.
    """
    docs = _validated(source, doc_id, exact_key, signatures, quality, priority, cfg)
    group, rep = _exact_groups(docs.exact_key, docs.signatures)
    nonempty = ~np.all(docs.signatures == MAX_HASH, axis=1)
    members = np.flatnonzero((rep == np.arange(len(docs))) & nonempty)
    linker = _Linker(docs.signatures, cfg, _components(len(docs), _exact_edges(group, rep)), exact)
    linker.link_among(members)
    return _assemble(docs, group, rep, linker.label, linker.examined, linker.confirmed, exact)


# ---------------------------------------------------------------------------------------------------
# Persisted index


def _columns(keys: pa.Table | Mapping[str, Any]) -> dict[str, list[Any]]:
    table = keys if isinstance(keys, pa.Table) else pa.table(dict(keys))
    need = ("source", "doc_id", "exact_key", "quality", "priority")
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ValueError(f"index keys lack column(s) {missing}; need {list(need)}")
    return {c: table.column(c).to_pylist() for c in need}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_index(
    path: str | Path,
    keys: pa.Table | Mapping[str, Any],
    signatures: np.ndarray,
    cfg: DedupConfig,
    result: DedupResult | None = None,
    cluster_id: np.ndarray | None = None,
    confirm: str | None = None,
) -> Path:
    """Write an LSH index directory: documents.parquet, signatures.npy (uint32), index.json.

    `keys` has columns source, doc_id, exact_key, quality, priority. The cluster ids come from `result`
    (a `find_duplicates` result on exactly these documents), or from `cluster_id` with `confirm` (the
    confirmation that made them: "exact" or "estimate"), or are computed here by the estimate. Same
    inputs give the same bytes (no timestamps, no pickle), so the directory can be a lake version as it is.
    """
    cols = _columns(keys)
    docs = _validated(
        cols["source"], cols["doc_id"], cols["exact_key"], signatures, cols["quality"], cols["priority"], cfg
    )
    if cluster_id is not None:
        if result is not None or confirm not in ("exact", "estimate"):
            raise ValueError(f"cluster_id needs confirm='exact' or 'estimate' and no result, got confirm={confirm!r}")
        labels = np.asarray(cluster_id, dtype=np.int64)
    else:
        if result is None:
            result = find_duplicates(
                docs.source, docs.doc_id, docs.exact_key, docs.signatures, docs.quality, docs.priority, cfg
            )
        labels, confirm = result.cluster_id, result.confirm
    if len(labels) != len(docs):
        raise ValueError(f"result covers {len(labels)} documents, keys have {len(docs)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "source": pa.array(docs.source, pa.string()),
            "doc_id": pa.array(docs.doc_id, pa.string()),
            "exact_key": pa.array(docs.exact_key, pa.string()),
            "quality": pa.array(docs.quality, pa.float64()),
            "priority": pa.array(docs.priority, pa.int64()),
            "cluster_id": pa.array(labels, pa.int64()),
        }
    )
    pq.write_table(table, out / "documents.parquet", compression="zstd")
    # 32-bit values: uint32 on disk halves the file; np.save writes no timestamp.
    np.save(out / "signatures.npy", docs.signatures.astype("<u4"), allow_pickle=False)
    meta = {
        "format": INDEX_FORMAT,
        "config": dataclasses.asdict(cfg),
        # The confirmation that made the stored clusters, whatever cfg asked for (it may have fallen back).
        "confirm": confirm,
        "documents": len(docs),
        "files": {name: _sha256(out / name) for name in INDEX_FILES},
    }
    (out / "index.json").write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return out


def load_index(path: str | Path) -> LshIndex:
    """Read an index written by `save_index`, re-hashing its files; ValueError naming any bad file."""
    root = Path(path)
    meta_path = root / "index.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: no LSH index here (missing index.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
    for name in INDEX_FILES:
        actual = _sha256(root / name) if (root / name).is_file() else "missing"
        if actual != meta["files"].get(name):
            raise ValueError(f"{root / name}: sha256 {actual}, index.json says {meta['files'].get(name)}")
    known = {f.name for f in dataclasses.fields(DedupConfig)}
    cfg = DedupConfig(**{k: v for k, v in meta["config"].items() if k in known})
    table = pq.read_table(root / "documents.parquet")
    sig = np.load(root / "signatures.npy", allow_pickle=False).astype(np.uint64)
    n = meta["documents"]
    if table.num_rows != n or sig.shape != (n, cfg.num_perm):
        raise ValueError(f"{root}: {table.num_rows} rows and signatures {sig.shape}, index.json says {n} documents")
    return LshIndex(
        cfg=cfg,
        source=table.column("source").to_pylist(),
        doc_id=table.column("doc_id").to_pylist(),
        exact_key=table.column("exact_key").to_pylist(),
        quality=table.column("quality").to_numpy(),
        priority=table.column("priority").to_numpy(),
        signatures=sig,
        cluster_id=table.column("cluster_id").to_numpy(),
        confirm=meta["confirm"],
    )


LSH_FIELDS = ("shingle_size", "num_perm", "bands", "rows", "threshold", "seed", "scheme")


def find_duplicates_incremental(
    existing: LshIndex,
    source: Sequence[str],
    doc_id: Sequence[str],
    exact_key: Sequence[str],
    signatures: np.ndarray,
    quality: np.ndarray | Sequence[float],
    priority: np.ndarray | Sequence[int],
    cfg: DedupConfig | None = None,
    exact: ExactJaccard | None = None,
) -> DedupResult:
    """`find_duplicates` on existing + new documents (in that order), comparing only new signatures.

    Stored-stored pairs are not recomputed: the stored cluster ids are their components. Exact keys are
    grouped by one sort over all keys (numpy, ~0.5 s per million); signature comparisons and LSH
    lookups touch only the new documents. `exact` (indexed like existing + new) must be given exactly
    when the index was made by exact confirmation.
    """
    cfg = existing.cfg if cfg is None else cfg
    diff = [f for f in LSH_FIELDS if getattr(cfg, f) != getattr(existing.cfg, f)]
    if diff:
        raise ValueError(
            f"dedup config differs from the index's in {diff}: "
            + ", ".join(f"{f}={getattr(cfg, f)!r} vs {getattr(existing.cfg, f)!r}" for f in diff)
            + "; rebuild the index with find_duplicates"
        )
    confirm = "exact" if exact is not None else "estimate"
    if confirm != existing.confirm:
        raise ValueError(
            f"the index's clusters were confirmed by {existing.confirm!r}, this call confirms by {confirm!r}; "
            "rebuild the index with find_duplicates"
        )
    new = _validated(source, doc_id, exact_key, signatures, quality, priority, cfg)
    n_old = len(existing)
    docs = _Docs(
        existing.source + new.source,
        existing.doc_id + new.doc_id,
        existing.exact_key + new.exact_key,
        np.concatenate((existing.signatures, new.signatures)),
        np.concatenate((existing.quality, new.quality)),
        np.concatenate((existing.priority, new.priority)),
    )
    n = len(docs)
    group, rep = _exact_groups(docs.exact_key, docs.signatures)
    nonempty = ~np.all(new.signatures == MAX_HASH, axis=1)
    new_members = n_old + np.flatnonzero((rep[n_old:] == np.arange(n_old, n)) & nonempty)
    # Stored clusters as edges from their smallest member, and exact groups, give the starting components.
    old_clustered = np.flatnonzero(existing.cluster_id >= 0)
    first_of = np.full(int(existing.cluster_id.max(initial=-1)) + 1, n, dtype=np.int64)
    np.minimum.at(first_of, existing.cluster_id[old_clustered], old_clustered)
    old_edges = np.stack((first_of[existing.cluster_id[old_clustered]], old_clustered), axis=1)
    label = _components(n, np.concatenate((old_edges, _exact_edges(group, rep))))
    linker = _Linker(docs.signatures, cfg, label, exact)
    # New against stored: look each new band key up in the stored sorted keys.
    old_members, old_sorted, old_order = existing.band_table()
    new_keys = band_keys(docs.signatures[new_members], cfg)
    if exact is not None and len(new_members):
        # One load of every set a pair may need: new documents whose band key is stored or repeats among
        # the new ones, and the stored documents those keys point at.
        need = [new_members[_bucketed(new_keys)]]
        for band in range(cfg.bands):
            lo = np.searchsorted(old_sorted[band], new_keys[:, band], side="left")
            hi = np.searchsorted(old_sorted[band], new_keys[:, band], side="right")
            need.append(new_members[hi > lo])
            need.append(old_members[old_order[band, _covered(lo, hi, len(old_members))]])
        exact.prefetch(np.concatenate(need))
    for band in range(cfg.bands if len(new_members) else 0):
        lo = np.searchsorted(old_sorted[band], new_keys[:, band], side="left")
        count = np.searchsorted(old_sorted[band], new_keys[:, band], side="right") - lo
        # Bounded chunks of ~_PAIR_CHUNK pairs (cut between new documents): a key may match many stored ones.
        ends = np.cumsum(count)
        cuts = np.unique(np.searchsorted(ends, np.arange(_PAIR_CHUNK, int(ends[-1]) + 1, _PAIR_CHUNK)) + 1)
        for c0, c1 in itertools.pairwise([0, *cuts[cuts < len(count)].tolist(), len(count)]):
            cnt = count[c0:c1]
            total = int(cnt.sum())
            if total == 0:
                continue
            which = np.repeat(np.arange(c0, c1), cnt)
            pos = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo[c0:c1], cnt)
            linker.offer(np.stack((old_members[old_order[band, pos]], new_members[which]), axis=1))
    # New against new.
    linker.link_among(new_members)
    return _assemble(docs, group, rep, linker.label, linker.examined, linker.confirmed, exact)
