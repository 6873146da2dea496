"""minhash_signatures -> duplicate_clusters -> deduplicated_documents.

Signatures are computed per source (in parallel partitions); clusters need every source at once, so
`duplicate_clusters` is the one cross-source step; `deduplicated_documents` then filters each source
by its rows of the cluster decisions. Exact duplicates (same normalized text) and near-duplicates
(MinHash LSH, see corpus.minhash) are decided together; which copy is kept, and why, is recorded.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.config import DedupConfig, SourcesManifest
from corpus.dedup import find_duplicates
from corpus.lake import Version, VersionWriter
from corpus.minhash import MinHasher
from corpus.stages import StageOutput
from corpus.stages.io import DOCUMENT_SCHEMA, ParquetSink, iter_batches, write_rows

SIGNATURES_CODE_VERSION = "minhash_signatures/1"
CLUSTERS_CODE_VERSION = "duplicate_clusters/1"
DEDUPLICATED_CODE_VERSION = "deduplicated_documents/1"

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
        ("min_similarity", pa.float64()),
        ("preview", pa.string()),
    ]
)


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
        config={"dedup": dataclasses.asdict(cfg)},
        upstream=[filtered.ref()],
        counts=counts,
        extra={"out_file": "keys.parquet", "in_from": [filtered.asset], "num_perm": cfg.num_perm},
    )
    return StageOutput(version=version, counts=counts, summary={"documents": n_docs, "num_perm": cfg.num_perm})


def build_duplicate_clusters(
    signatures: Sequence[Version], filtered: Sequence[Version], manifest: SourcesManifest, writer: VersionWriter
) -> StageOutput:
    """Exact and near-duplicate clusters across all sources, with the kept member of each."""
    cfg = manifest.pipeline.dedup
    by_source = {v.partition: v for v in filtered}
    sources: list[str] = []
    rows: list[int] = []
    doc_ids: list[str] = []
    keys: list[str] = []
    quality: list[float] = []
    priority: list[int] = []
    blocks: list[np.ndarray] = []
    for version in sorted(signatures, key=lambda v: manifest.source(v.partition).priority):
        table = pq.read_table(version.file("keys.parquet"))
        n = table.num_rows
        sources.extend([version.partition] * n)
        rows.extend(range(n))
        doc_ids.extend(table.column("doc_id").to_pylist())
        keys.extend(table.column("exact_key").to_pylist())
        quality.extend(float(q or 0.0) for q in table.column("quality").to_pylist())
        priority.extend([manifest.source(version.partition).priority] * n)
        blocks.append(np.load(version.file("signatures.npy"), mmap_mode="r"))
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, cfg.num_perm), dtype=np.uint64)
    result = find_duplicates(
        source=sources,
        doc_id=doc_ids,
        exact_key=keys,
        signatures=matrix,
        quality=np.asarray(quality, dtype=np.float64),
        priority=np.asarray(priority, dtype=np.int64),
        cfg=cfg,
    )
    decisions = []
    reasons: Counter[str] = Counter()
    for i in range(len(doc_ids)):
        kept_i = int(result.kept_index[i])
        reason = result.reason[i]
        if reason:
            reasons[reason] += 1
        decisions.append(
            {
                "source": sources[i],
                "row": rows[i],
                "doc_id": doc_ids[i],
                "cluster_id": int(result.cluster_id[i]),
                "kept": bool(result.kept[i]),
                "reason": reason,
                "similarity": float(result.similarity[i]),
                "kept_source": sources[kept_i],
                "kept_doc_id": doc_ids[kept_i],
            }
        )
    previews = _previews(by_source, decisions)
    clusters = []
    for cluster in result.clusters.to_pylist():
        kept_i = int(cluster["kept_index"])
        members = [int(m) for m in cluster["members"]]
        clusters.append(
            {
                "cluster_id": int(cluster["cluster_id"]),
                "size": len(members),
                "kept_source": sources[kept_i],
                "kept_doc_id": doc_ids[kept_i],
                "sources": ",".join(sorted({sources[m] for m in members})),
                "min_similarity": float(cluster["min_similarity"]),
                "preview": previews.get((sources[kept_i], rows[kept_i]), ""),
            }
        )
    write_rows(writer.path("decisions.parquet"), decisions, DECISION_SCHEMA)
    write_rows(writer.path("clusters.parquet"), clusters, CLUSTER_SCHEMA)
    n = len(doc_ids)
    kept = int(np.count_nonzero(result.kept))
    ratio = float(result.duplicate_ratio(matrix, cfg))
    counts = {"in": n, "out": kept, "dropped": dict(sorted(reasons.items())), "clusters": len(clusters)}
    per_source = {
        s: {"in": sources.count(s), "kept": sum(1 for d in decisions if d["source"] == s and d["kept"])}
        for s in dict.fromkeys(sources)
    }
    version = writer.commit(
        code_version=CLUSTERS_CODE_VERSION,
        config={"dedup": dataclasses.asdict(cfg)},
        upstream=[v.ref() for v in signatures],
        counts=counts,
        extra={"in_from": ["minhash_signatures"], "duplicate_ratio": ratio, "per_source": per_source},
    )
    sizes = Counter(c["size"] for c in clusters)
    top = sorted(clusters, key=lambda c: (-c["size"], c["cluster_id"]))[:10]
    md = ["| cluster | size | sources | kept | preview |", "| --- | --- | --- | --- | --- |"]
    md += [
        f"| {c['cluster_id']} | {c['size']} | {c['sources']} | {c['kept_doc_id'][:12]} | "
        f"{c['preview'][:60].replace('|', '/')} |"
        for c in top
    ]
    hist = ", ".join(f"{size}: {count}" for size, count in sorted(sizes.items()))
    return StageOutput(
        version=version,
        counts=counts,
        tables={
            "duplicate_clusters": clusters,
            "duplicate_decisions": decisions,
            "duplicate_ratio": [{"scope": "all", "ratio": ratio, "kept": kept, "documents": n}],
        },
        summary={"duplicate_ratio": ratio, "clusters": len(clusters), "cluster_size_histogram": dict(sizes)},
        markdown=f"Cluster sizes (size: count): {hist or 'none'}\n\nTop clusters:\n\n" + "\n".join(md),
    )


def _previews(filtered: dict[str, Version], decisions: list[dict[str, object]]) -> dict[tuple[str, int], str]:
    """First 80 characters of each kept cluster member, for the top-clusters table."""
    wanted: dict[str, set[int]] = {}
    for d in decisions:
        if d["cluster_id"] != -1 and d["kept"]:
            wanted.setdefault(str(d["source"]), set()).add(int(d["row"]))  # type: ignore[arg-type]
    out: dict[tuple[str, int], str] = {}
    for source, rows in wanted.items():
        version = filtered.get(source)
        if version is None:
            continue
        row = 0
        for batch in iter_batches(version.file("documents.parquet"), ["text"]):
            for text in batch.column("text").to_pylist():
                if row in rows:
                    out[(source, row)] = " ".join(text[:200].split())[:80]
                row += 1
    return out


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
