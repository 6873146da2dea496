"""minhash_signatures -> duplicate_clusters -> deduplicated_documents.

Signatures are computed per source (in parallel partitions); clusters need every source at once, so
`duplicate_clusters` is the one cross-source step; `deduplicated_documents` then filters each source
by its rows of the cluster decisions. Exact duplicates (same normalized text) and near-duplicates
(MinHash LSH, see corpus.minhash) are decided together; which copy is kept, and why, is recorded.

Clustering (DedupConfig.cluster): "star" (default) or "transitive", see corpus.dedup.

Confirmation (DedupConfig.confirm): "exact" confirms candidates by the exact Jaccard of their hashed
shingle sets. The texts of the documents that share a band key with another document are read once,
batch by batch (from the documents version each signature version names as its upstream), and their
shingle sets written to an unnamed temporary file beside the lake version being written (8 bytes per
shingle); a block of pairs reads back only its documents' sets (`_ShingleSpill`). So memory holds one
batch of texts or one block of sets, never the corpus (on disk: <= ~0.7 bytes per byte of text here).
Past `max_exact_pairs` pairs it warns and falls back to the signature estimate. The confirmation used
is in the manifest (`confirm`).

Incremental runs: each version holds its LSH index (`index/`, corpus.dedup.save_index) with every pair
similarity the clustering asked for. Given the previous version, documents whose (source, doc_id) the
index holds, with unchanged signatures, are matched to it and the clustering reruns over all signatures
with those similarities (find_duplicates_incremental), so only pairs with new documents need shingle
sets. The result is mapped back to the canonical order (sources by priority, rows in order), cluster ids
renumbered by their smallest member there and pairs by canonical index, so every file is byte-identical
to a full recomputation, and so is the version id: whether the run was incremental is run-specific, like
its time, and goes to DuckDB (`duplicate_index`) and the Dagster metadata, never into the manifest. Any
mismatch (config, confirmation mode, a stored document gone or changed, an unreadable index) means a
full recomputation, and says why.

The token-span pass repeated_spans lives in corpus.stages.spans.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.charts import new_chart, png_bytes
from corpus.config import DedupConfig, SourcesManifest
from corpus.dedup import (
    EXACT,
    LSH_FIELDS,
    NEAR,
    DedupResult,
    ExactBudgetExceeded,
    ExactJaccard,
    LshIndex,
    exact_representatives,
    find_duplicates,
    find_duplicates_incremental,
    load_index,
    near_duplicate_flags,
    save_index,
)
from corpus.lake import Lake, LakeError, Version, VersionWriter
from corpus.minhash import MinHasher
from corpus.stages import StageOutput
from corpus.stages.io import DOCUMENT_SCHEMA, ParquetSink, iter_batches, write_rows

SIGNATURES_CODE_VERSION = "minhash_signatures/2"
CLUSTERS_CODE_VERSION = "duplicate_clusters/3"  # /3: star clusters by default, pairs in the index
DEDUPLICATED_CODE_VERSION = "deduplicated_documents/1"
INDEX_DIR = "index"
# Documents read and shingled per step when spilling shingle sets (~16 KB of text each in benchmarks/scale.py:
# ~4 MB of text, ~40 MB of hashing intermediates, per step).
_SPILL_BATCH_ROWS = 256
SIGNATURE_FIELDS = ("shingle_size", "num_perm", "seed", "scheme")  # what a signature depends on
SPAN_FIELDS = ("span_length", "span_policy")  # read by repeated_spans (corpus.stages.spans), not by duplicate_clusters

KEYS_SCHEMA = pa.schema([("doc_id", pa.string()), ("exact_key", pa.string()), ("quality", pa.float64())])
DECISION_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("doc_id", pa.string()),
        ("cluster_id", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("similarity", pa.float64()),
        ("kept_source", pa.string()),
        ("kept_doc_id", pa.string()),
    ]
)
CLUSTER_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int64()),
        ("size", pa.int64()),
        ("kept_source", pa.string()),
        ("kept_doc_id", pa.string()),
        ("sources", pa.string()),
        ("n_exact", pa.int64()),
        ("n_near", pa.int64()),
        ("min_similarity", pa.float64()),
        ("preview", pa.string()),
    ]
)
# Cluster-size histogram bins: [lo, hi] member counts.
SIZE_BINS = ((2, 2), (3, 3), (4, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 1 << 62))


def build_minhash_signatures(filtered: Version, writer: VersionWriter, cfg: DedupConfig) -> StageOutput:
    """Signatures of every filtered document, row-aligned with its documents.parquet."""
    hasher = MinHasher(cfg)
    docs_path = filtered.file("documents.parquet")
    n_docs = pq.ParquetFile(docs_path).metadata.num_rows
    signatures = np.lib.format.open_memmap(
        writer.path("signatures.npy"), mode="w+", dtype=np.uint64, shape=(n_docs, cfg.num_perm)
    )
    row = 0
    n_bytes = 0
    with ParquetSink(writer.path("keys.parquet"), KEYS_SCHEMA) as keys:
        for batch in iter_batches(docs_path, ["doc_id", "text", "quality"]):
            texts = batch.column("text").to_pylist()
            exact, signatures[row : row + len(texts)] = hasher.keys_and_signatures(texts)
            for doc_id, key, quality in zip(
                batch.column("doc_id").to_pylist(), exact, batch.column("quality").to_pylist(), strict=True
            ):
                keys.add({"doc_id": doc_id, "exact_key": key, "quality": quality})
            row += len(texts)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    assert row == n_docs, f"{docs_path}: footer says {n_docs} rows, read {row}"
    signatures.flush()
    del signatures
    counts = {"in": n_docs, "out": n_docs, "dropped": {}, "documents": n_docs, "bytes_in": n_bytes}
    version = writer.commit(
        code_version=SIGNATURES_CODE_VERSION,
        # Only what a signature depends on: a new threshold or span setting keeps the signatures' version.
        config={"dedup": {f: getattr(cfg, f) for f in SIGNATURE_FIELDS}},
        upstream=[filtered.ref()],
        counts=counts,
        extra={"out_file": "keys.parquet", "in_from": [filtered.asset], "num_perm": cfg.num_perm},
    )
    return StageOutput(version=version, counts=counts, summary={"documents": n_docs, "num_perm": cfg.num_perm})


def documents_of(signatures: Version) -> Version:
    """The documents version a minhash_signatures version was made from (its recorded upstream)."""
    names = set(signatures.extra.get("in_from", []))
    refs = [r for r in signatures.upstream if r.asset in names]
    assert len(refs) == 1, f"{signatures.manifest_path}: expected one documents upstream in {names}, got {refs}"
    return Lake(signatures.root).open_ref(refs[0])


@dataclasses.dataclass
class _Corpus:
    """Every document of every source in canonical order: sources by priority, rows in order."""

    sources: list[str]
    rows: np.ndarray
    doc_ids: list[str]
    keys: list[str]
    quality: np.ndarray
    priority: np.ndarray
    signatures: np.ndarray
    documents: dict[str, Version]  # source -> the documents version its rows index
    offsets: dict[str, int]  # source -> canonical index of its row 0
    sizes: dict[str, int]  # source -> its number of documents

    def __len__(self) -> int:
        return len(self.doc_ids)

    def key_columns(self) -> dict[str, Any]:
        return {
            "source": self.sources,
            "doc_id": self.doc_ids,
            "exact_key": self.keys,
            "quality": self.quality,
            "priority": self.priority,
        }


def _read_corpus(signatures: Sequence[Version], manifest: SourcesManifest) -> _Corpus:
    cfg = manifest.pipeline.dedup
    sources: list[str] = []
    rows: list[np.ndarray] = []
    doc_ids: list[str] = []
    keys: list[str] = []
    quality: list[float] = []
    priority: list[int] = []
    blocks: list[np.ndarray] = []
    documents: dict[str, Version] = {}
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for version in sorted(signatures, key=lambda v: manifest.source(v.partition).priority):
        table = pq.read_table(version.file("keys.parquet"))
        n = table.num_rows
        offsets[version.partition] = len(doc_ids)
        sizes[version.partition] = n
        documents[version.partition] = documents_of(version)
        sources.extend([version.partition] * n)
        rows.append(np.arange(n, dtype=np.int64))
        doc_ids.extend(table.column("doc_id").to_pylist())
        keys.extend(table.column("exact_key").to_pylist())
        quality.extend(float(q or 0.0) for q in table.column("quality").to_pylist())
        priority.extend([manifest.source(version.partition).priority] * n)
        blocks.append(np.load(version.file("signatures.npy"), mmap_mode="r"))
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, cfg.num_perm), dtype=np.uint64)
    return _Corpus(
        sources=sources,
        rows=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        doc_ids=doc_ids,
        keys=keys,
        quality=np.asarray(quality, dtype=np.float64),
        priority=np.asarray(priority, dtype=np.int64),
        signatures=matrix,
        documents=documents,
        offsets=offsets,
        sizes=sizes,
    )


def _texts(corpus: _Corpus, canonical: np.ndarray, limit: int) -> list[str]:
    """The first `limit` characters of the documents at these canonical indices, in that order (one pass
    per source file; only one whole text is held at a time)."""
    out: list[str] = [""] * len(canonical)
    for source, start in corpus.offsets.items():
        size = corpus.sizes[source]
        mine = np.flatnonzero((canonical >= start) & (canonical < start + size))
        if len(mine) == 0:
            continue
        wanted = {int(canonical[k]) - start: k for k in mine.tolist()}
        row = 0
        path = corpus.documents[source].file("documents.parquet")
        for batch in iter_batches(path, ["text"], batch_rows=_SPILL_BATCH_ROWS):
            hits = [r for r in range(row, row + batch.num_rows) if r in wanted]
            if hits:
                column = batch.column("text")
                for r in hits:
                    out[wanted[r]] = column[r - row].as_py()[:limit]
            row += batch.num_rows
        assert row == size, f"{source}: documents hold {row} rows, its signatures {size}"
    return out


class _ShingleSpill:
    """Shingle sets of documents, computed in one streaming pass and kept in an unnamed temporary file.

    Library index g is canonical document perm[g]. `ensure` computes the sets of the documents not yet
    spilled, one Parquet batch of texts at a time (one pass per source holding any); `load` reads sets
    back with one pread each. Memory: 16 bytes per document of offsets, plus one batch.
    """

    def __init__(self, corpus: _Corpus, hasher: MinHasher, perm: np.ndarray, directory: Path) -> None:
        self.corpus = corpus
        self.hasher = hasher
        self.perm = perm
        self.offset = np.full(len(corpus), -1, dtype=np.int64)  # in shingles, by canonical index
        self.length = np.zeros(len(corpus), dtype=np.int64)
        self.documents = 0  # sets computed
        self.shingles = 0  # shingles written
        self.passes = 0  # passes over a source's texts
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".shingles-")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _ShingleSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure(self, indices: np.ndarray) -> None:
        """Compute and spill the sets of these library indices that are not spilled yet."""
        canonical = np.unique(self.perm[np.asarray(indices, dtype=np.int64)])
        missing = canonical[self.offset[canonical] < 0]
        if len(missing) == 0:
            return
        self._file.seek(0, os.SEEK_END)
        for source, start in self.corpus.offsets.items():
            size = self.corpus.sizes[source]
            rows = missing[(missing >= start) & (missing < start + size)] - start
            if len(rows) == 0:
                continue
            self.passes += 1
            row = 0
            path = self.corpus.documents[source].file("documents.parquet")
            for batch in iter_batches(path, ["text"], batch_rows=_SPILL_BATCH_ROWS):
                lo, hi = np.searchsorted(rows, [row, row + batch.num_rows])
                if hi > lo:
                    local = rows[lo:hi] - row
                    texts = batch.column("text").take(pa.array(local)).to_pylist()
                    for r, values in zip((rows[lo:hi] + start).tolist(), self.hasher.shingle_sets(texts), strict=True):
                        self.offset[r] = self.shingles
                        self.length[r] = len(values)
                        self._file.write(np.ascontiguousarray(values, dtype="<u8").data)
                        self.shingles += len(values)
                        self.documents += 1
                row += batch.num_rows
            assert row == size, f"{source}: documents hold {row} rows, its signatures {size}"
        self._file.flush()
        # Arrow's allocator keeps the decoded row groups' pages (~150 MB) for reuse; give them back.
        pa.default_memory_pool().release_unused()

    def load(self, indices: np.ndarray) -> list[np.ndarray]:
        """The sets of these library indices (spilling any missing first)."""
        self.ensure(indices)
        fd = self._file.fileno()
        out = []
        for c in self.perm[np.asarray(indices, dtype=np.int64)].tolist():
            n = int(self.length[c])
            data = os.pread(fd, 8 * n, 8 * int(self.offset[c])) if n else b""
            assert len(data) == 8 * n, f"shingle spill: read {len(data)} of {8 * n} bytes for document {c}"
            out.append(np.frombuffer(data, dtype="<u8").astype(np.uint64, copy=False))
        return out


@dataclasses.dataclass
class _Plan:
    """How this run clusters: incremental against a stored index, or full, and why."""

    index: LshIndex | None
    stored: np.ndarray  # canonical index of each stored document, in the index's order
    previous: str | None
    reason: str


def _plan(previous: Version | None, corpus: _Corpus, cfg: DedupConfig) -> _Plan:
    none = np.zeros(0, dtype=np.int64)
    if previous is None:
        return _Plan(None, none, None, "full: no previous duplicate_clusters materialization")
    where = previous.version[:12]
    if f"{INDEX_DIR}/index.json" not in previous.files:
        return _Plan(None, none, previous.version, f"full: previous version {where} holds no LSH index")
    try:
        previous.verify_files([f"{INDEX_DIR}/index.json"])
        index = load_index(previous.path / INDEX_DIR)
    except (LakeError, ValueError, OSError) as exc:
        return _Plan(None, none, previous.version, f"full: previous index {where} unreadable: {exc}")
    changed = [f for f in LSH_FIELDS if getattr(index.cfg, f) != getattr(cfg, f)]
    if changed:
        return _Plan(None, none, previous.version, f"full: dedup config changed in {changed} since {where}")
    if index.confirm != cfg.confirm:
        return _Plan(
            None, none, previous.version, f"full: {where} was confirmed by {index.confirm}, this run by {cfg.confirm}"
        )
    # (source, doc_id, k-th occurrence) -> canonical index: equal doc_ids in one source are equal texts.
    position: dict[tuple[str, str, int], int] = {}
    seen: Counter[tuple[str, str]] = Counter()
    for i, (source, doc_id) in enumerate(zip(corpus.sources, corpus.doc_ids, strict=True)):
        position[(source, doc_id, seen[(source, doc_id)])] = i
        seen[(source, doc_id)] += 1
    stored = np.empty(len(index), dtype=np.int64)
    seen.clear()
    for j, (source, doc_id) in enumerate(zip(index.source, index.doc_id, strict=True)):
        stored[j] = position.get((source, doc_id, seen[(source, doc_id)]), -1)
        seen[(source, doc_id)] += 1
    gone = int(np.count_nonzero(stored < 0))
    if gone:
        # A removed document can split a stored cluster; only a full run knows the new components.
        return _Plan(None, none, previous.version, f"full: {gone} of {len(index)} documents of {where} are gone")
    same_keys = all(index.exact_key[j] == corpus.keys[i] for j, i in enumerate(stored.tolist()))
    if not same_keys or not np.array_equal(index.signatures, corpus.signatures[stored]):
        return _Plan(None, none, previous.version, f"full: stored documents of {where} changed text or signature")
    return _Plan(index, stored, previous.version, f"incremental against {where}")


@dataclasses.dataclass
class _Decisions:
    """A clustering result in canonical order, cluster ids renumbered by their smallest member."""

    cluster_id: np.ndarray
    kept: np.ndarray
    kept_index: np.ndarray
    reason: list[str | None]
    similarity: np.ndarray


def _canonical(result: DedupResult, perm: np.ndarray) -> _Decisions:
    """Map a result whose index g is canonical document perm[g] back to canonical order."""
    n = len(perm)
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n)
    raw = result.cluster_id[inv]
    cluster_id = np.full(n, -1, dtype=np.int64)
    clustered = np.flatnonzero(raw >= 0)
    if len(clustered):
        first = np.full(int(raw.max()) + 1, n, dtype=np.int64)
        np.minimum.at(first, raw[clustered], clustered)
        # Clusters numbered by their smallest canonical member, as find_duplicates numbers them.
        order = np.argsort(first[first < n], kind="stable")
        renumber = np.full(len(first), -1, dtype=np.int64)
        renumber[np.flatnonzero(first < n)[order]] = np.arange(len(order))
        cluster_id[clustered] = renumber[raw[clustered]]
    return _Decisions(
        cluster_id=cluster_id,
        kept=result.kept[inv],
        kept_index=perm[result.kept_index[inv]],
        reason=[result.reason[g] for g in inv.tolist()],
        similarity=result.similarity[inv],
    )


@dataclasses.dataclass
class _Exact:
    """What exact confirmation did in one run (for the run record)."""

    pairs: int = 0
    documents: int = 0
    shingles: int = 0
    passes: int = 0


def _cluster(
    corpus: _Corpus, cfg: DedupConfig, plan: _Plan, exact: bool, spill_dir: Path
) -> tuple[DedupResult, np.ndarray, _Exact]:
    """Run find_duplicates (or its incremental form); returns the result, its perm and the exact figures."""
    hasher = MinHasher(cfg)
    n = len(corpus)
    if plan.index is not None:
        is_new = np.ones(n, dtype=bool)
        is_new[plan.stored] = False
        new = np.flatnonzero(is_new)
        perm = np.concatenate((plan.stored, new))
    else:
        new = np.zeros(0, dtype=np.int64)
        perm = np.arange(n, dtype=np.int64)
    with _ShingleSpill(corpus, hasher, perm, spill_dir) as spill:
        checker = ExactJaccard(spill.load, cfg.max_exact_pairs, prefetch=spill.ensure) if exact else None
        result = _run(corpus, cfg, plan, perm, new, checker)
        figures = _Exact(
            pairs=checker.pairs if checker else 0,
            documents=spill.documents,
            shingles=checker.shingles if checker else 0,
            passes=spill.passes,
        )
    return result, perm, figures


def _run(
    corpus: _Corpus, cfg: DedupConfig, plan: _Plan, perm: np.ndarray, new: np.ndarray, checker: ExactJaccard | None
) -> DedupResult:
    if plan.index is not None:
        # Current quality and priority: a source moved in the manifest changes which member is kept.
        index = dataclasses.replace(
            plan.index, quality=corpus.quality[plan.stored], priority=corpus.priority[plan.stored]
        )
        return find_duplicates_incremental(
            index,
            [corpus.sources[i] for i in new.tolist()],
            [corpus.doc_ids[i] for i in new.tolist()],
            [corpus.keys[i] for i in new.tolist()],
            corpus.signatures[new],
            corpus.quality[new],
            corpus.priority[new],
            cfg,
            exact=checker,
        )
    return find_duplicates(
        corpus.sources, corpus.doc_ids, corpus.keys, corpus.signatures, corpus.quality, corpus.priority, cfg, checker
    )


def _canonical_pairs(corpus: _Corpus, result: DedupResult, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The result's pair similarities in canonical indices, (i, j) i < j, sorted: the index's order.

    The library pairs exact-group representatives by its own order (stored documents first in an
    incremental run), so each end is moved to its group's first canonical document.
    """
    rep = exact_representatives(corpus.keys, corpus.signatures)
    mapped = rep[perm[result.pairs]] if len(result.pairs) else np.zeros((0, 2), dtype=np.int64)
    lo, hi = np.minimum(mapped[:, 0], mapped[:, 1]), np.maximum(mapped[:, 0], mapped[:, 1])
    order = np.lexsort((hi, lo))
    return np.stack((lo[order], hi[order]), axis=1), result.pair_similarity[order]


def build_duplicate_clusters(
    signatures: Sequence[Version],
    manifest: SourcesManifest,
    writer: VersionWriter,
    previous: Version | None = None,
) -> StageOutput:
    """Exact and near-duplicate clusters across all sources, with the kept member of each.

    `previous` (the latest earlier duplicate_clusters version, or None) lets documents it already
    clustered reuse its index; the output is the same as without it.
    """
    cfg = manifest.pipeline.dedup
    corpus = _read_corpus(signatures, manifest)
    plan = _plan(previous, corpus, cfg)
    exact = cfg.confirm == "exact"
    try:
        result, perm, figures = _cluster(corpus, cfg, plan, exact, writer.tmp)
    except ExactBudgetExceeded as exc:
        warnings.warn(
            f"duplicate_clusters: {exc} (dedup.max_exact_pairs); confirming every pair by the signature estimate "
            "instead, which lets pairs below the threshold through (pair precision 0.84 on installed license texts)",
            stacklevel=2,
        )
        exact = False
        plan = dataclasses.replace(plan, index=None, reason=f"full: {exc}; fell back to the estimate")
        result, perm, figures = _cluster(corpus, cfg, plan, exact, writer.tmp)
    decided = _canonical(result, perm)
    n = len(corpus)
    decisions = []
    reasons: Counter[str] = Counter()
    for i in range(n):
        k = int(decided.kept_index[i])
        reason = decided.reason[i]
        if reason:
            reasons[reason] += 1
        decisions.append(
            {
                "source": corpus.sources[i],
                "row": int(corpus.rows[i]),
                "doc_id": corpus.doc_ids[i],
                "cluster_id": int(decided.cluster_id[i]),
                "kept": bool(decided.kept[i]),
                "reason": reason,
                "similarity": float(decided.similarity[i]),
                "kept_source": corpus.sources[k],
                "kept_doc_id": corpus.doc_ids[k],
            }
        )
    clusters = _cluster_rows(corpus, decided)
    write_rows(writer.path("decisions.parquet"), decisions, DECISION_SCHEMA)
    write_rows(writer.path("clusters.parquet"), clusters, CLUSTER_SCHEMA)
    confirm = "exact" if exact else "estimate"
    pairs, pair_similarity = _canonical_pairs(corpus, result, perm)
    save_index(
        writer.path(INDEX_DIR),
        corpus.key_columns(),
        corpus.signatures,
        cfg,
        cluster_id=decided.cluster_id,
        confirm=confirm,
        pairs=pairs,
        pair_similarity=pair_similarity,
    )
    sizes = Counter(int(c["size"]) for c in clusters)
    with open(writer.path("cluster_sizes.png"), "wb") as handle:
        handle.write(cluster_size_png(sizes))
    ratios = _ratio_rows(corpus, decided, cfg)
    overall = ratios[-1]
    kept = int(np.count_nonzero(decided.kept))
    counts = {"in": n, "out": kept, "dropped": dict(sorted(reasons.items())), "clusters": len(clusters)}
    per_source = {r["scope"]: {"in": r["documents"], "kept": r["kept"]} for r in ratios[:-1]}
    version = writer.commit(
        code_version=CLUSTERS_CODE_VERSION,
        config={"dedup": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SPAN_FIELDS}},
        upstream=[v.ref() for v in signatures],
        counts=counts,
        extra={
            "in_from": ["minhash_signatures"],
            "duplicate_ratio": overall["residual_ratio"],
            "removed_ratio": overall["ratio"],
            "per_source": per_source,
            "ratios": ratios,
            "confirm": confirm,
            "index": INDEX_DIR,
        },
    )
    run = {
        "mode": "incremental" if plan.index is not None else "full",
        "previous_version": plan.previous,
        "reason": plan.reason,
        "reused_documents": len(plan.stored) if plan.index is not None else 0,
        "new_documents": n - len(plan.stored) if plan.index is not None else n,
        "confirm": confirm,
        "candidate_pairs": result.candidate_pairs,
        "confirmed_pairs": result.confirmed_pairs,
        "exact_pairs": figures.pairs,
        "exact_documents": figures.documents,
        "exact_shingles": figures.shingles,
    }
    top = sorted(clusters, key=lambda c: (-c["size"], c["cluster_id"]))[:10]
    md = ["| cluster | size | exact | near | min J | sources | kept | preview |"]
    md.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    md += [
        f"| {c['cluster_id']} | {c['size']} | {c['n_exact']} | {c['n_near']} | {c['min_similarity']:.3f} | "
        f"{c['sources']} | {c['kept_doc_id'][:12]} | {c['preview'][:60].replace('|', '/')} |"
        for c in top
    ]
    ratio_md = [
        "| scope | documents | kept | exact | near | removed | residual |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratio_md += [
        f"| {r['scope']} | {r['documents']:,} | {r['kept']:,} | {r['exact_duplicates']:,} | {r['near_duplicates']:,} | "
        f"{r['ratio']:.4f} | {r['residual_ratio']:.4f} |"
        for r in ratios
    ]
    return StageOutput(
        version=version,
        counts=counts,
        tables={
            "duplicate_clusters": clusters,
            "duplicate_decisions": decisions,
            "duplicate_ratio": ratios,
            "duplicate_index": [run],
        },
        summary={
            "duplicate_ratio": overall["residual_ratio"],
            "removed_ratio": overall["ratio"],
            "clusters": len(clusters),
            "cluster_size_histogram": {str(k): v for k, v in sorted(sizes.items())},
            **run,
        },
        markdown=(
            f"{run['mode']} ({plan.reason}); confirmed by {confirm} Jaccard\n\n"
            + "\n".join(ratio_md)
            + "\n\nTop clusters:\n\n"
            + "\n".join(md)
        ),
    )


def _cluster_rows(corpus: _Corpus, decided: _Decisions) -> list[dict[str, Any]]:
    clustered = np.flatnonzero(decided.cluster_id >= 0)
    by_cluster = clustered[np.argsort(decided.cluster_id[clustered], kind="stable")]
    bounds = np.flatnonzero(np.diff(decided.cluster_id[by_cluster])) + 1
    groups = np.split(by_cluster, bounds) if len(by_cluster) else []
    previews = _previews(corpus, [int(decided.kept_index[g[0]]) for g in groups])
    rows = []
    for members in groups:
        k = int(decided.kept_index[members[0]])
        others = members[members != k].tolist()
        rows.append(
            {
                "cluster_id": int(decided.cluster_id[k]),
                "size": len(members),
                "kept_source": corpus.sources[k],
                "kept_doc_id": corpus.doc_ids[k],
                "sources": ",".join(sorted({corpus.sources[m] for m in members.tolist()})),
                "n_exact": sum(decided.reason[m] == EXACT for m in others),
                "n_near": sum(decided.reason[m] == NEAR for m in others),
                "min_similarity": float(decided.similarity[others].min()),
                "preview": previews[k],
            }
        )
    return rows


def _previews(corpus: _Corpus, kept: list[int]) -> dict[int, str]:
    """First 80 characters of each cluster's kept member, for the top-clusters table."""
    texts = _texts(corpus, np.asarray(kept, dtype=np.int64), 200)
    pa.default_memory_pool().release_unused()
    return {k: " ".join(t.split())[:80] for k, t in zip(kept, texts, strict=True)}


def _ratio_rows(corpus: _Corpus, decided: _Decisions, cfg: DedupConfig) -> list[dict[str, Any]]:
    """Per source and over all ("all"): documents, duplicates removed, and the residual among kept.

    `ratio` = duplicates removed / documents. `residual_ratio` = kept documents that still have a kept
    near duplicate by the signature estimate (LSH candidate, estimate >= threshold): 0 by construction
    when the estimate confirmed the clusters; with exact confirmation, the pairs that only the estimate
    calls duplicates. The check duplicate_ratio_below_limit bounds the overall residual.
    """
    kept_idx = np.flatnonzero(decided.kept)
    residual = np.zeros(len(corpus), dtype=bool)
    residual[kept_idx] = near_duplicate_flags(corpus.signatures[kept_idx], cfg)
    reasons = np.array([r or "" for r in decided.reason], dtype=object)
    sources = np.asarray(corpus.sources, dtype=object)
    rows = []
    for scope in [*corpus.offsets, "all"]:
        mask = np.ones(len(corpus), dtype=bool) if scope == "all" else sources == scope
        documents = int(mask.sum())
        kept = int((mask & decided.kept).sum())
        rows.append(
            {
                "scope": scope,
                "documents": documents,
                "kept": kept,
                "exact_duplicates": int((mask & (reasons == EXACT)).sum()),
                "near_duplicates": int((mask & (reasons == NEAR)).sum()),
                "ratio": (documents - kept) / documents if documents else 0.0,
                "residual_ratio": float((mask & residual).sum() / kept) if kept else 0.0,
            }
        )
    return rows


def cluster_size_png(sizes: Counter[int]) -> bytes:
    """Bar chart: number of clusters per size bin (size = members, the kept one included)."""
    labels = [str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 1 << 62 else f">={lo}") for lo, hi in SIZE_BINS]
    counts = [sum(c for s, c in sizes.items() if lo <= s <= hi) for lo, hi in SIZE_BINS]
    fig, ax = new_chart(6, 3)
    ax.bar(np.arange(len(labels)), counts, color="#4c72b0")
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_xlabel("cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title(f"{sum(sizes.values()):,} clusters, {sum(s * c for s, c in sizes.items()):,} documents", fontsize=9)
    return png_bytes(fig)


def build_deduplicated_documents(filtered: Version, clusters: Version, writer: VersionWriter) -> StageOutput:
    """The source's filtered documents minus those another cluster member stands for."""
    source = filtered.partition
    table = pq.read_table(
        clusters.file("decisions.parquet"), columns=["row", "kept", "reason"], filters=[("source", "=", source)]
    )
    kept_rows = np.zeros(pq.ParquetFile(filtered.file("documents.parquet")).metadata.num_rows, dtype=bool)
    assert table.num_rows == len(kept_rows), (
        f"duplicate_clusters {clusters.version[:12]} has {table.num_rows} rows for {source}, "
        f"filtered_documents has {len(kept_rows)}"
    )
    rows = np.asarray(table.column("row").to_numpy(), dtype=np.int64)
    kept_rows[rows] = np.asarray(table.column("kept").to_numpy(zero_copy_only=False), dtype=bool)
    reasons = Counter(r for r in table.column("reason").to_pylist() if r)
    row = 0
    columns = [f.name for f in DOCUMENT_SCHEMA] + ["quality"]
    schema = DOCUMENT_SCHEMA.append(pa.field("quality", pa.float64()))
    with ParquetSink(writer.path("documents.parquet"), schema) as out:
        for batch in iter_batches(filtered.file("documents.parquet"), columns):
            mask = kept_rows[row : row + batch.num_rows]
            out.add_batch(batch.filter(pa.array(mask)))
            row += batch.num_rows
        n_out = out.count
    counts = {"in": row, "out": n_out, "dropped": dict(sorted(reasons.items()))}
    version = writer.commit(
        code_version=DEDUPLICATED_CODE_VERSION,
        config={},
        upstream=[filtered.ref(), clusters.ref()],
        counts=counts,
        extra={"out_file": "documents.parquet", "in_from": [filtered.asset]},
    )
    return StageOutput(version=version, counts=counts, summary={"documents": n_out})
