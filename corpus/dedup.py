"""Exact and near-duplicate clusters, and a persisted LSH index for incremental runs.

Documents: (1) equal `exact_key` (sha256 of the normalized text) -> exact duplicates; (2) LSH banding of
the MinHash signatures (b bands x r rows, corpus.minhash states the S-curve): two documents are
candidates when some band's r values are all equal, which is exactly datasketch `MinHashLSH(threshold,
num_perm, params=(b, r))`'s rule (tested against it). The banding is done here in numpy instead: a
64-bit hash per band, one argsort per band, equal-hash runs ("buckets") give the candidates, and every
pair is then checked against the signatures themselves, so a band-hash collision can never make a
candidate. On 1e5 signatures it runs ~30x faster than inserting and querying LeanMinHash objects one by
one, in a fraction of the memory (benchmarks/dedup.py). A candidate is confirmed when its Jaccard
similarity is >= threshold: the exact Jaccard of the shingle sets when an `ExactJaccard` is passed (the
pipeline's default, DedupConfig.confirm = "exact"), else the signature estimate (sd 0.038 at J = 0.8
with 112 permutations, so pairs at J = 0.75 pass 11% of the time).

Exact duplicates have identical signatures, so only one representative of each exact group (a "node")
enters the LSH (a file copied 1,000 times would otherwise yield 500,000 pairs per band). Documents with
no words (exact_key == EMPTY_KEY, all-MAX_HASH signature) are never clustered: they are for the quality
filters to drop. The keep rule ranks documents by highest quality, then lowest priority (the source's
position in the manifest), then smallest doc_id, then smallest index; a node ranks as its best document.

Clustering (DedupConfig.cluster):
- "star" (default): greedy centres in keep-rule order. The best-ranked node not yet in a cluster becomes
  a centre; every node not yet in a cluster whose own Jaccard with it is >= threshold (confirmed
  candidate) joins it. So every member is a confirmed near duplicate of the kept document, and a node
  similar to no earlier centre stays kept. Computed lazily, in rounds, without materialising the
  candidate pairs: a free node is a sure centre when no better-ranked free node shares a bucket with it
  (only a centre's pairs are ever confirmed, so free-free pairs are all unknown); each round confirms
  the new centres' pairs with the free or not-yet-final nodes of their buckets; a claimed node is final
  once no free node ranked above its best claimant shares a bucket with it. The result is exactly the
  sequential greedy's, and a bucket of k near-identical documents costs ~k confirmations, not k^2 / 2.
  On the installed license texts: pair precision 0.97 at recall 0.96 (tests/test_dedup_stage.py).
- "transitive": connected components of confirmed pairs (union-find by min-label propagation with
  pointer jumping; a pair already in one component is skipped, so a big bucket costs about one
  65,536-pair chunk of comparisons per band). A~B, B~C puts A and C together even when J(A, C) is far
  below the threshold: recall 1.0 but pair precision 0.87 on the license texts; `similarity` reports the
  Jaccard to the kept member so this is visible.

Exact confirmation (`ExactJaccard`): sets of 64-bit shingle hashes (corpus.minhash `shingle_sets`; two
distinct shingles collide with probability 2^-64), loaded per block of pairs through a callback (the
pipeline spills them to a temporary file once and reads back only a block's documents), so memory
depends on the block, not on the corpus. A chunk of pairs is intersected by one searchsorted of one
side's (pair << 32 | top 32 bits) keys in the other's, equal keys then compared on all 64 bits: no sort,
no global vocabulary and no Python call per pair.

Incremental refresh (`save_index` / `load_index` / `find_duplicates_incremental`): the index stores the
documents' keys, signatures and cluster ids, which confirmation made them, and every pair similarity the
clustering asked for. A new document can take a centre's place (higher quality) and so reshape stored
clusters, so the clustering itself is rerun over all signatures (numpy, ~5 s per million documents);
what is reused is the stored similarities, so only pairs involving new documents (or clusters they
reshape) need shingle sets. The result and the stored pairs equal `find_duplicates` on the union (tested).
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
INDEX_FORMAT = "corpus.dedup.lsh_index/3"  # /3: pairs.parquet holds the pair similarities the clustering asked for
INDEX_FILES = ("documents.parquet", "signatures.npy", "pairs.parquet")

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
# Pairs whose shingle sets are loaded together in exact confirmation (one `load` call per block): up to
# 2,048 sets, ~40 MB at the ~2,500 shingles of an average benchmarks/scale.py document.
_EXACT_BLOCK = 1024
# Shingles intersected per step in exact confirmation: values, keys, segment ids and positions, 8 bytes
# each, ~70 MB per step.
_EXACT_CHUNK = 1 << 21
# Bucket slots enumerated per step when a round's centres look up their bucket mates (8 bytes each, x ~6).
_SLOT_CHUNK = 1 << 20
STAR = "star"
TRANSITIVE = "transitive"


@dataclass(frozen=True)
class DedupResult:
    """Per-document decisions (arrays in input order) and one row per cluster."""

    cluster_id: np.ndarray  # int64; -1 for documents without duplicates
    kept: np.ndarray  # bool
    kept_index: np.ndarray  # int64; the kept member of the document's cluster (itself when kept)
    reason: list[str | None]  # None (kept), "exact_duplicate" or "near_duplicate"
    similarity: np.ndarray  # float64; Jaccard to the kept member (1.0 for exact and for kept)
    clusters: pa.Table  # cluster_id, size, kept_index, kept_source, kept_doc_id, members, n_exact, ...
    candidate_pairs: int = 0  # LSH candidate pairs examined
    confirmed_pairs: int = 0  # of which Jaccard (exact or estimated, see `confirm`) >= threshold
    confirm: str = "estimate"  # "exact" (shingle sets) or "estimate" (signatures): what confirmed the pairs
    cluster: str = STAR  # DedupConfig.cluster
    # Every pair similarity the clustering asked for, (i, j) with i < j sorted, and its value: what
    # `save_index` stores so that a later incremental run need not compute them again.
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    pair_similarity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    computed_pairs: int = 0  # similarities computed in this call (the others came from a stored index)

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
    (`corpus.minhash.MinHasher.shingle_sets`). Nothing is kept between blocks of `_EXACT_BLOCK` pairs:
    each block loads its documents' sets once, intersects them and drops them, so memory is bounded by
    a block's sets, whatever the corpus size. `prefetch(indices)`, when given, is told up front which
    documents will be asked for (the pipeline computes their sets in one pass over the texts).
    Confirming more than `max_pairs` pairs raises `ExactBudgetExceeded`, so the caller can fall back to
    the estimate.
    """

    def __init__(
        self,
        load: Callable[[np.ndarray], Sequence[np.ndarray]],
        max_pairs: int | None = None,
        prefetch: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self._load = load
        self._prefetch = prefetch
        self.max_pairs = max_pairs
        self.pairs = 0  # pairs confirmed so far (what max_pairs bounds)
        self.shingles = 0  # shingles compared so far
        self.loads = 0  # shingle sets loaded so far (a document once per block it appears in)

    def prefetch(self, indices: np.ndarray) -> None:
        """Announce the documents whose sets will be needed (a no-op without a prefetch callback)."""
        if self._prefetch is not None:
            self._prefetch(np.unique(np.asarray(indices, dtype=np.int64)))

    def _sets(self, indices: np.ndarray) -> list[np.ndarray]:
        sets = self._load(indices)
        if len(sets) != len(indices):
            raise ValueError(f"shingle-set loader returned {len(sets)} sets for {len(indices)} documents")
        out = []
        for i, values in zip(indices.tolist(), sets, strict=True):
            arr = np.asarray(values)
            if arr.ndim != 1 or (arr.size and arr.dtype != np.uint64) or np.any(arr[1:] <= arr[:-1]):
                raise ValueError(f"shingle set of document {i} must be sorted unique uint64, got {arr.dtype} {arr[:4]}")
            out.append(arr.astype(np.uint64, copy=False))
        self.loads += len(out)
        return out

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
        for b0 in range(0, len(pairs), _EXACT_BLOCK):
            block = pairs[b0 : b0 + _EXACT_BLOCK]
            docs, inverse = np.unique(block.ravel(), return_inverse=True)
            sets = self._sets(docs)
            inverse = inverse.reshape(-1, 2)
            out[b0 : b0 + len(block)] = self._block(sets, inverse[:, 0], inverse[:, 1])
        return out

    def _block(self, sets: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sizes = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
        len_a, len_b = sizes[a], sizes[b]
        cost = len_a + len_b
        out = np.zeros(len(a), dtype=np.float64)
        if len(a) == 0:
            return out
        self.shingles += int(cost.sum())
        ends = np.cumsum(cost)
        cuts = np.searchsorted(ends, np.arange(_EXACT_CHUNK, int(ends[-1]), _EXACT_CHUNK), side="left") + 1
        for c0, c1 in itertools.pairwise([0, *np.unique(cuts[cuts < len(a)]).tolist(), len(a)]):
            inter = _intersections(
                [sets[k] for k in a[c0:c1].tolist()], [sets[k] for k in b[c0:c1].tolist()], len_a[c0:c1], len_b[c0:c1]
            )
            union = cost[c0:c1] - inter
            out[c0:c1] = np.divide(inter, union, out=np.zeros(c1 - c0), where=union > 0)
        return out


def _intersections(
    a_sets: list[np.ndarray], b_sets: list[np.ndarray], len_a: np.ndarray, len_b: np.ndarray
) -> np.ndarray:
    """|a_k & b_k| for each k, the sets sorted unique uint64, without a sort or a Python call per pair.

    Key = (k << 32 | top 32 bits of the value): sorted over the whole chunk because each set is, and equal
    values have equal keys. One searchsorted finds each a-value's first b-entry with its key, compared on
    all 64 bits; entries after it with the same key (two values of one set sharing their top 32 bits,
    ~s^2 / 2^33 per set of s) are walked for the few a-values that missed there.
    """
    k = len(a_sets)
    if k == 0 or int(len_b.sum()) == 0 or int(len_a.sum()) == 0:
        return np.zeros(k, dtype=np.int64)
    shift = np.uint64(32)
    val_a = np.concatenate(a_sets)
    val_b = np.concatenate(b_sets)
    key_a = val_a >> shift
    key_a |= np.repeat(np.arange(k, dtype=np.uint64) << shift, len_a)
    key_b = val_b >> shift
    key_b |= np.repeat(np.arange(k, dtype=np.uint64) << shift, len_b)
    last = len(key_b) - 1
    pos = np.searchsorted(key_b, key_a)
    np.minimum(pos, last, out=pos)
    same_key = key_b[pos] == key_a
    hit = same_key & (val_b[pos] == val_a)
    todo = np.flatnonzero(same_key & ~hit)
    step = 1
    while len(todo):
        p = pos[todo] + step
        inside = p <= last
        todo, p = todo[inside], p[inside]
        same = key_b[p] == key_a[todo]
        todo, p = todo[same], p[same]
        found = val_b[p] == val_a[todo]
        hit[todo[found]] = True
        todo = todo[~found]
        step += 1
    counts = np.zeros(len(hit) + 1, dtype=np.int64)
    np.cumsum(hit, out=counts[1:])
    ends = np.cumsum(len_a)
    return counts[ends] - counts[ends - len_a]


@dataclass
class LshIndex:
    """A persisted set of documents with their signatures, cluster ids and pair similarities (`save_index`)."""

    cfg: DedupConfig
    source: list[str]
    doc_id: list[str]
    exact_key: list[str]
    quality: np.ndarray
    priority: np.ndarray
    signatures: np.ndarray
    cluster_id: np.ndarray
    confirm: str = "estimate"  # what confirmed the stored pairs: "exact" or "estimate"
    # (i, j), i < j, indices into these documents, and their Jaccard (exact or estimated, as `confirm`).
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    pair_similarity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.doc_id)


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


def exact_representatives(exact_key: Sequence[str], signatures: np.ndarray) -> np.ndarray:
    """Each document's exact-group representative: the smallest index with the same exact_key."""
    return _exact_groups(exact_key, np.asarray(signatures))[1]


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


class _Similarity:
    """Jaccard of pairs of document indices: the stored value when an index holds the pair, else the exact
    Jaccard of the shingle sets (`exact`) or the signature estimate. Remembers every pair it answered
    (`asked`), which is what `save_index` stores for the next incremental run.
    """

    def __init__(
        self,
        sig: np.ndarray,
        cfg: DedupConfig,
        exact: ExactJaccard | None = None,
        stored: tuple[np.ndarray, np.ndarray] | None = None,
        record: bool = True,
    ) -> None:
        self.sig = sig
        self.cfg = cfg
        self.exact = exact
        self.n = max(len(sig), 1)
        self.record = record
        self.computed = 0
        self._codes = np.zeros(0, dtype=np.int64)
        self._values = np.zeros(0, dtype=np.float64)
        if stored is not None and len(stored[0]):
            codes = stored[0][:, 0] * np.int64(self.n) + stored[0][:, 1]
            order = np.argsort(codes, kind="stable")
            self._codes, self._values = codes[order], np.asarray(stored[1], dtype=np.float64)[order]
        self._asked: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def confirm(self) -> str:
        return "exact" if self.exact is not None else "estimate"

    def prefetch(self, indices: np.ndarray) -> None:
        if self.exact is not None and len(indices):
            self.exact.prefetch(indices)

    def __call__(self, pairs: np.ndarray, budgeted: bool = True) -> np.ndarray:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
        codes = lo * np.int64(self.n) + hi
        out = np.zeros(len(codes), dtype=np.float64)
        known = np.zeros(len(codes), dtype=bool)
        if len(self._codes) and len(codes):
            pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
            known = self._codes[pos] == codes
            out[known] = self._values[pos[known]]
        todo = np.flatnonzero(~known)
        if len(todo) and self.exact is not None:
            out[todo] = self.exact.jaccard(np.stack((lo[todo], hi[todo]), axis=1), budgeted=budgeted)
        elif len(todo):
            for c in range(0, len(todo), _PAIR_CHUNK):
                part = todo[c : c + _PAIR_CHUNK]
                same = np.count_nonzero(self.sig[lo[part]] == self.sig[hi[part]], axis=1)
                out[part] = same / self.cfg.num_perm
        self.computed += len(todo)
        if self.record and len(codes):
            self._asked.append((codes, out.copy()))
        return out

    def asked(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair answered, (i, j) with i < j sorted by (i, j), and its similarity."""
        if not self._asked:
            return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float64)
        codes = np.concatenate([c for c, _ in self._asked])
        values = np.concatenate([v for _, v in self._asked])
        unique, first = np.unique(codes, return_index=True)
        return np.stack((unique // self.n, unique % self.n), axis=1), values[first]


def _confirm(sig: np.ndarray, pairs: np.ndarray, cfg: DedupConfig, sim: _Similarity) -> tuple[np.ndarray, np.ndarray]:
    """The pairs that really share a band (no band-key collision), and their Jaccard (through `sim`)."""
    banded = pairs[_share_band(sig, pairs, cfg)]
    return banded, sim(banded)


def near_duplicate_flags(signatures: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Per document: has a near duplicate among these documents (LSH candidate, estimate >= threshold)."""
    sig = np.asarray(signatures, dtype=np.uint64)
    if len(sig) == 0:
        return np.zeros(0, dtype=bool)
    linker = _Linker(sig, cfg, np.arange(len(sig), dtype=np.int64), _Similarity(sig, cfg, record=False))
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
    """Transitive clusters: components grown by confirmed candidate pairs; a pair already in one
    component is skipped.

    Skipping changes no component, and it keeps a bucket of k near-identical documents from costing
    k^2 / 2 comparisons in each of the b bands: once they are linked, a pair costs two lookups.
    """

    def __init__(self, sig: np.ndarray, cfg: DedupConfig, label: np.ndarray, sim: _Similarity) -> None:
        self.sig = sig
        self.cfg = cfg
        self.label = label
        self.sim = sim
        self.examined = 0
        self.confirmed = 0

    def offer(self, pairs: np.ndarray) -> None:
        pairs = pairs[self.label[pairs[:, 0]] != self.label[pairs[:, 1]]]
        if len(pairs) == 0:
            return
        self.examined += len(pairs)
        banded, similarity = _confirm(self.sig, pairs, self.cfg, self.sim)
        confirmed = banded[similarity >= self.cfg.threshold]
        self.confirmed += len(confirmed)
        if len(confirmed):
            self.label = _components(len(self.label), confirmed, self.label)

    def link_among(self, members: np.ndarray, fresh: np.ndarray | None = None) -> None:
        """Offer every pair of `members` (global indices) that shares a band key."""
        keys = band_keys(self.sig[members], self.cfg)
        # One announcement of every set a pair may need: members sharing a band key with another member
        # (with `fresh`, only buckets holding a fresh document: stored pairs come from the index).
        self.sim.prefetch(members[_bucketed(keys, None if fresh is None else fresh[members])])
        for band in range(self.cfg.bands):
            order = np.argsort(keys[:, band], kind="stable")
            for local in _run_pairs(order, keys[order, band]):
                self.offer(members[local])


def _bucketed(keys: np.ndarray, fresh: np.ndarray | None = None) -> np.ndarray:
    """Rows of `keys` (n, bands) that share a band key with another row (in a bucket with a `fresh` row)."""
    mask = np.zeros(len(keys), dtype=bool)
    for band in range(keys.shape[1] if len(keys) else 0):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        new = np.ones(len(keys), dtype=bool)
        new[1:] = sorted_keys[1:] != sorted_keys[:-1]
        run = np.cumsum(new) - 1
        wanted = np.bincount(run) >= 2
        if fresh is not None:
            wanted &= np.bincount(run, weights=fresh[order]) > 0
        mask[order[wanted[run]]] = True
    return np.flatnonzero(mask)


@dataclass
class _Buckets:
    """Runs of >= 2 equal band keys among a subset of star nodes (positions = ranks).

    slots[start[b] : start[b] + count[b]] lists bucket b's positions, ascending (a stable sort of
    ascending positions); bucket[row, band] is the bucket of subset row `row` in that band, or the
    sentinel n_buckets (no slots) when its key is unique there; row_of[position] is its row (-1: none).
    """

    row_of: np.ndarray
    bucket: np.ndarray
    slots: np.ndarray
    start: np.ndarray
    count: np.ndarray
    n_buckets: int

    @classmethod
    def build(cls, sig: np.ndarray, cfg: DedupConfig, nodes: np.ndarray, subset: np.ndarray) -> _Buckets:
        k = len(subset)
        keys = band_keys(sig[nodes[subset]], cfg)
        bucket = np.empty((k, cfg.bands), dtype=np.int64)
        slot_parts: list[np.ndarray] = []
        count_parts: list[np.ndarray] = []
        n_buckets = 0
        for band in range(cfg.bands):
            order = np.argsort(keys[:, band], kind="stable")
            sorted_keys = keys[order, band]
            new = np.ones(k, dtype=bool)
            new[1:] = sorted_keys[1:] != sorted_keys[:-1]
            run = np.cumsum(new) - 1
            size = np.bincount(run)
            big = size >= 2
            in_big = big[run]
            column = np.full(k, -1, dtype=np.int64)
            column[order[in_big]] = n_buckets + (np.cumsum(big) - 1)[run[in_big]]
            bucket[:, band] = column
            slot_parts.append(subset[order[in_big]])
            count_parts.append(size[big])
            n_buckets += int(big.sum())
        bucket[bucket < 0] = n_buckets
        count = np.concatenate(count_parts).astype(np.int64) if count_parts else np.zeros(0, dtype=np.int64)
        row_of = np.full(len(nodes), -1, dtype=np.int64)
        row_of[subset] = np.arange(k)
        slots = np.concatenate(slot_parts).astype(np.int64) if slot_parts else np.zeros(0, dtype=np.int64)
        return cls(row_of, bucket, slots, np.cumsum(count) - count, count, n_buckets)


_FREE, _CLAIMED, _CENTRE, _MEMBER = 0, 1, 2, 3


def _star(
    sig: np.ndarray, cfg: DedupConfig, nodes: np.ndarray, sim: _Similarity, fresh: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Greedy star clusters over `nodes` (global indices, best-ranked first), computed in rounds.

    Returns (centre, similarity, examined, confirmed): centre[k] is the position in `nodes` of node k's
    centre (k for a centre), similarity[k] its Jaccard with it (1.0 for a centre). Sequentially: walk the
    nodes in order; an unclaimed node becomes a centre and claims every unclaimed node whose Jaccard with
    it is >= threshold among its LSH candidates. Rounds give the same answer: positions are ranks, so a
    free node is a sure centre when no free node before it shares a bucket with it (free-free pairs
    are never confirmed, only centres' pairs are); a claimed node keeps its smallest claimant, which is
    final once no free node before that claimant shares a bucket with it (such a node could still
    become a centre and claim it first). A bucket of k documents that are all below the threshold to
    each other takes k rounds (and k^2 / 2 comparisons, as sequentially); the buckets are rebuilt over
    the still-active nodes whenever those halve, so such a round costs O(k), not O(corpus).
    """
    m = len(nodes)
    centre = np.arange(m, dtype=np.int64)
    similarity = np.ones(m, dtype=np.float64)
    if m == 0:
        return centre, similarity, 0, 0
    buckets = _Buckets.build(sig, cfg, nodes, np.arange(m, dtype=np.int64))
    if fresh is None:
        sim.prefetch(nodes[np.unique(buckets.slots)])
    elif buckets.n_buckets:
        # Stored pairs come from the index: announce the documents in buckets holding a fresh one.
        slot_bucket = np.repeat(np.arange(buckets.n_buckets), buckets.count)
        has_fresh = np.zeros(buckets.n_buckets, dtype=bool)
        has_fresh[slot_bucket[fresh[nodes[buckets.slots]]]] = True
        sim.prefetch(nodes[np.unique(buckets.slots[has_fresh[slot_bucket]])])
        del slot_bucket, has_fresh

    state = np.zeros(m, dtype=np.int8)
    claim = np.full(m, m, dtype=np.int64)  # smallest confirmed centre so far (m: none)
    claim_sim = np.ones(m, dtype=np.float64)
    active = np.arange(m, dtype=np.int64)  # free or claimed
    examined = confirmed = 0
    while len(active):
        if 2 * len(active) < len(buckets.bucket) and len(buckets.bucket) > 64:
            buckets = _Buckets.build(sig, cfg, nodes, active)
        first_free = np.full(buckets.n_buckets + 1, m, dtype=np.int64)
        if buckets.n_buckets:
            free_slots = np.where(state[buckets.slots] == _FREE, buckets.slots, m)
            first_free[:-1] = np.minimum.reduceat(free_slots, buckets.start)
        # The first free node sharing a bucket with each active node (m: none).
        mate = first_free[buckets.bucket[buckets.row_of[active]]].min(axis=1)
        st = state[active]
        state[active[(st == _CLAIMED) & (mate >= claim[active])]] = _MEMBER
        centres = active[(st == _FREE) & (mate >= active)]
        state[centres] = _CENTRE
        for c, u in _centre_pairs(centres, buckets, state, claim, m):
            pairs = np.stack((nodes[c], nodes[u]), axis=1)
            real = _share_band(sig, pairs, cfg)
            c, u, pairs = c[real], u[real], pairs[real]
            values = sim(pairs)
            examined += len(pairs)
            hit = values >= cfg.threshold
            confirmed += int(hit.sum())
            c, u, values = c[hit], u[hit], values[hit]
            # Each claimed node keeps its smallest claimant (pairs come sorted by (c, u)).
            order = np.lexsort((c, u))
            c, u, values = c[order], u[order], values[order]
            first = np.ones(len(u), dtype=bool)
            first[1:] = u[1:] != u[:-1]
            c, u, values = c[first], u[first], values[first]
            better = c < claim[u]
            claim[u[better]] = c[better]
            claim_sim[u[better]] = values[better]
            state[u[state[u] == _FREE]] = _CLAIMED
        active = active[state[active] <= _CLAIMED]
    assert np.all((state == _CENTRE) | (state == _MEMBER)), f"star clustering left states {np.unique(state)}"
    member = state == _MEMBER
    centre[member] = claim[member]
    similarity[member] = claim_sim[member]
    return centre, similarity, examined, confirmed


def _centre_pairs(
    centres: np.ndarray, buckets: _Buckets, state: np.ndarray, claim: np.ndarray, m: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(c, u) position pairs, sorted and unique: u shares a bucket with centre c, comes after it, and is
    free or claimed only by centres after c. Chunks of ~_SLOT_CHUNK slots, cut between centres."""
    blocks = buckets.bucket[buckets.row_of[centres]]
    rows, cols = np.nonzero(blocks < buckets.n_buckets)  # row-major: grouped by centre, ascending
    if len(rows) == 0:
        return
    owner = centres[rows]
    which = blocks[rows, cols]
    cnt = buckets.count[which]
    ends = np.cumsum(cnt)
    cuts = np.searchsorted(ends, np.arange(_SLOT_CHUNK, int(ends[-1]), _SLOT_CHUNK), side="left") + 1
    # Move each cut to a change of centre, so one centre's buckets stay in one chunk.
    change = np.flatnonzero(owner[1:] != owner[:-1]) + 1
    cuts = np.unique(change[np.minimum(np.searchsorted(change, cuts), len(change) - 1)]) if len(change) else []
    for r0, r1 in itertools.pairwise([0, *[int(x) for x in cuts if 0 < x < len(rows)], len(rows)]):
        n_slots = cnt[r0:r1]
        total = int(n_slots.sum())
        c = np.repeat(owner[r0:r1], n_slots)
        pos = np.arange(total) + np.repeat(buckets.start[which[r0:r1]] - (np.cumsum(n_slots) - n_slots), n_slots)
        u = buckets.slots[pos]
        keep = (u > c) & (state[u] <= _CLAIMED) & (claim[u] > c)
        codes = np.unique(c[keep] * np.int64(m) + u[keep])
        if len(codes):
            yield codes // m, codes % m


def _keep_rank(docs: _Docs) -> np.ndarray:
    """Each document's place in the keep rule: highest quality, lowest priority, smallest doc_id, index."""
    n = len(docs)
    by_id = np.empty(n, dtype=np.int64)
    by_id[sorted(range(n), key=docs.doc_id.__getitem__)] = np.arange(n)
    order = np.lexsort((np.arange(n), by_id, docs.priority, -docs.quality))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def _assemble(
    docs: _Docs,
    group: np.ndarray,
    rep: np.ndarray,
    label: np.ndarray,
    rank: np.ndarray,
    to_kept: Callable[[np.ndarray, np.ndarray], np.ndarray],
    sim: _Similarity,
    cluster: str,
    pairs: int,
    confirmed: int,
) -> DedupResult:
    """Decisions from cluster labels: the best-ranked member of each label is kept.

    `to_kept(dropped, kept)` gives the Jaccard of near-duplicate members with their kept member.
    """
    n = len(docs)
    size = np.bincount(label, minlength=n)
    clustered = np.flatnonzero(size[label] >= 2)
    cluster_id = np.full(n, -1, dtype=np.int64)
    kept = np.ones(n, dtype=bool)
    kept_index = np.arange(n, dtype=np.int64)
    similarity = np.ones(n, dtype=np.float64)
    reason: list[str | None] = [None] * n
    if len(clustered):
        lab = label[clustered]
        order = np.lexsort((rank[clustered], lab))
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
        near = np.flatnonzero(~is_exact)
        values = np.ones(len(dropped), dtype=np.float64)
        values[near] = to_kept(dropped[near], k[near])
        similarity[dropped] = values
        for i, is_exact_i in zip(dropped.tolist(), is_exact.tolist(), strict=True):
            reason[i] = EXACT if is_exact_i else NEAR
    rows = []
    if len(clustered):
        by_cluster = np.argsort(cluster_id[clustered], kind="stable")
        cl_sorted = clustered[by_cluster]
        bounds = np.flatnonzero(np.diff(cluster_id[cl_sorted])) + 1
        rows = np.split(cl_sorted, bounds)
    table = _clusters_table(rows, docs, kept_index, similarity, reason, cluster_id)
    asked, asked_similarity = sim.asked()
    return DedupResult(
        cluster_id,
        kept,
        kept_index,
        reason,
        similarity,
        table,
        candidate_pairs=pairs,
        confirmed_pairs=confirmed,
        confirm=sim.confirm,
        cluster=cluster,
        pairs=asked,
        pair_similarity=asked_similarity,
        computed_pairs=sim.computed,
    )


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


def _find(docs: _Docs, cfg: DedupConfig, sim: _Similarity, fresh: np.ndarray | None = None) -> DedupResult:
    """Cluster `docs` as cfg.cluster says; `fresh` marks documents not in a stored index (None: all are)."""
    n = len(docs)
    group, rep = _exact_groups(docs.exact_key, docs.signatures)
    nonempty = ~np.all(docs.signatures == MAX_HASH, axis=1)
    members = np.flatnonzero((rep == np.arange(n)) & nonempty)
    rank = _keep_rank(docs)
    if cfg.cluster == STAR:
        best = np.full(n, n, dtype=np.int64)
        np.minimum.at(best, rep, rank)  # an exact group ranks as its best document
        nodes = members[np.argsort(best[members], kind="stable")]
        centre, node_similarity, examined, confirmed = _star(docs.signatures, cfg, nodes, sim, fresh)
        head = np.arange(n, dtype=np.int64)
        head[nodes] = nodes[centre]
        to_centre = np.ones(n, dtype=np.float64)
        to_centre[nodes] = node_similarity
        key = head[rep]  # the centre's node of each document's cluster
        label = np.full(n, n, dtype=np.int64)
        np.minimum.at(label, key, np.arange(n))
        label = label[key]

        def to_kept(dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
            # The kept document is the centre group's best; the dropped one's node was claimed by that centre.
            return to_centre[rep[dropped]]

    else:
        best = np.full(n, n, dtype=np.int64)
        np.minimum.at(best, rep, rank)
        linker = _Linker(docs.signatures, cfg, _components(n, _exact_edges(group, rep)), sim)
        # Members in keep-rule order, like star's nodes: which pairs are offered, and so stored in the
        # index, then depends on the groups only, not on the input order (incremental runs reorder).
        linker.link_among(members[np.argsort(best[members], kind="stable")], fresh)
        label, examined, confirmed = linker.label, linker.examined, linker.confirmed

        def to_kept(dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
            # Exact copies share their group representative's set, so ask for the representatives' pair.
            return sim(np.stack((rep[dropped], rep[kept]), axis=1), budgeted=False)

    return _assemble(docs, group, rep, label, rank, to_kept, sim, cfg.cluster, examined, confirmed)


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
    else by the signature estimate; `result.confirm` says which, `result.cluster` how they were clustered.
    """
    docs = _validated(source, doc_id, exact_key, signatures, quality, priority, cfg)
    return _find(docs, cfg, _Similarity(docs.signatures, cfg, exact))


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


def _checked_pairs(pairs: np.ndarray, similarity: np.ndarray, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as (k, 2) int64 with 0 <= i < j < n, sorted by (i, j) and unique; ValueError naming `where`."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    similarity = np.asarray(similarity, dtype=np.float64)
    if len(similarity) != len(pairs):
        raise ValueError(f"{where}: {len(pairs)} pairs but {len(similarity)} similarities")
    bad = np.flatnonzero((pairs[:, 0] < 0) | (pairs[:, 0] >= pairs[:, 1]) | (pairs[:, 1] >= n))
    if len(bad):
        raise ValueError(f"{where}: pair {pairs[bad[0]].tolist()} is not (i, j) with 0 <= i < j < {n} documents")
    if np.any(~np.isfinite(similarity) | (similarity < 0) | (similarity > 1)):
        raise ValueError(f"{where}: similarities must lie in [0, 1]")
    codes = pairs[:, 0] * np.int64(max(n, 1)) + pairs[:, 1]
    unique, first = np.unique(codes, return_index=True)
    if len(unique) != len(codes):
        raise ValueError(f"{where}: {len(codes) - len(unique)} pairs appear twice")
    return pairs[first], similarity[first]


def save_index(
    path: str | Path,
    keys: pa.Table | Mapping[str, Any],
    signatures: np.ndarray,
    cfg: DedupConfig,
    result: DedupResult | None = None,
    cluster_id: np.ndarray | None = None,
    confirm: str | None = None,
    pairs: np.ndarray | None = None,
    pair_similarity: np.ndarray | None = None,
) -> Path:
    """Write an LSH index directory: documents.parquet, signatures.npy (uint32), pairs.parquet, index.json.

    `keys` has columns source, doc_id, exact_key, quality, priority. The cluster ids and pair
    similarities come from `result` (a `find_duplicates` result on exactly these documents), or from
    `cluster_id` with `confirm` (the confirmation that made them: "exact" or "estimate") and optionally
    `pairs` / `pair_similarity` (indices into these documents), or are computed here by the estimate.
    Same inputs give the same bytes (no timestamps, no pickle), so the directory can be a lake version as it is.
    """
    cols = _columns(keys)
    docs = _validated(
        cols["source"], cols["doc_id"], cols["exact_key"], signatures, cols["quality"], cols["priority"], cfg
    )
    if cluster_id is not None:
        if result is not None or confirm not in ("exact", "estimate"):
            raise ValueError(f"cluster_id needs confirm='exact' or 'estimate' and no result, got confirm={confirm!r}")
        labels = np.asarray(cluster_id, dtype=np.int64)
        if pairs is None:
            pairs, pair_similarity = np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float64)
    else:
        if result is None:
            result = find_duplicates(
                docs.source, docs.doc_id, docs.exact_key, docs.signatures, docs.quality, docs.priority, cfg
            )
        labels, confirm = result.cluster_id, result.confirm
        pairs, pair_similarity = result.pairs, result.pair_similarity
    if len(labels) != len(docs):
        raise ValueError(f"result covers {len(labels)} documents, keys have {len(docs)}")
    assert pair_similarity is not None, "pairs need pair_similarity"
    pairs, pair_similarity = _checked_pairs(pairs, pair_similarity, len(docs), "save_index")
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
    pair_table = pa.table(
        {
            "i": pa.array(pairs[:, 0], pa.int64()),
            "j": pa.array(pairs[:, 1], pa.int64()),
            "similarity": pa.array(pair_similarity, pa.float64()),
        }
    )
    pq.write_table(pair_table, out / "pairs.parquet", compression="zstd")
    meta = {
        "format": INDEX_FORMAT,
        "config": dataclasses.asdict(cfg),
        # The confirmation that made the stored pairs, whatever cfg asked for (it may have fallen back).
        "confirm": confirm,
        "documents": len(docs),
        "pairs": len(pairs),
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
    pair_table = pq.read_table(root / "pairs.parquet")
    pairs = np.stack(
        (pair_table.column("i").to_numpy().astype(np.int64), pair_table.column("j").to_numpy().astype(np.int64)), axis=1
    )
    pairs, pair_similarity = _checked_pairs(
        pairs, pair_table.column("similarity").to_numpy(), n, str(root / "pairs.parquet")
    )
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
        pairs=pairs,
        pair_similarity=pair_similarity,
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
    """`find_duplicates` on existing + new documents (in that order), reusing the stored pair similarities.

    The clustering runs over all signatures (a better new document can take a stored centre's place),
    but a pair the index holds is not computed again, and only documents sharing a bucket with a new one
    are announced to `exact.prefetch`. `exact` (indexed like existing + new) must be given exactly when
    the index was made by exact confirmation. The result, its `pairs` included, equals `find_duplicates`.
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
        np.concatenate((np.asarray(existing.quality, dtype=np.float64), new.quality)),
        np.concatenate((np.asarray(existing.priority, dtype=np.int64), new.priority)),
    )
    fresh = np.zeros(len(docs), dtype=bool)
    fresh[n_old:] = True
    sim = _Similarity(docs.signatures, cfg, exact, stored=(existing.pairs, existing.pair_similarity))
    return _find(docs, cfg, sim, fresh)
