"""repeated_spans: spans of >= span_length tokens a document shares with an earlier document, all sources.

All sources' tokens in priority order; a document sharing >= span_length tokens with an earlier document is
flagged with each span (corpus.spans.find_repeated_spans). DedupConfig.span_policy says what the training
stream does with it: "flag" (nothing), "drop" (the document) or "remove_span" (the shared tokens);
`span_policy_view` gives mixed_tokens the rows and token ranges that stay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.config import SourcesManifest
from corpus.lake import Version, VersionWriter
from corpus.spans import find_repeated_spans
from corpus.stages import StageOutput
from corpus.stages.dedup import SPAN_FIELDS
from corpus.stages.io import read_tokens, write_rows

SPANS_CODE_VERSION = "repeated_spans/1"
SPAN_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("doc_id", pa.string()),
        ("start", pa.int64()),
        ("length", pa.int64()),
        ("earlier_source", pa.string()),
        ("earlier_row", pa.int64()),
        ("earlier_doc_id", pa.string()),
        ("earlier_start", pa.int64()),
    ]
)
SPAN_DOCUMENT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("doc_id", pa.string()),
        ("tokens", pa.int64()),  # without the trailing <|endoftext|>
        ("span_tokens", pa.int64()),  # union of the document's shared spans
        ("action", pa.string()),  # flag | drop | remove_span
    ]
)


def _document_tokens(
    tokenized: Sequence[Version], manifest: SourcesManifest
) -> tuple[list[np.ndarray], list[tuple[str, int, str]]]:
    """Every document's tokens without its trailing <|endoftext|>, sources by priority, rows in order."""
    arrays: list[np.ndarray] = []
    meta: list[tuple[str, int, str]] = []
    for version in sorted(tokenized, key=lambda v: manifest.source(v.partition).priority):
        index = pq.read_table(version.file("index.parquet"), columns=["doc_id", "start", "length"])
        tokens = read_tokens(version.file("tokens.bin"))
        starts = index.column("start").to_numpy()
        lengths = index.column("length").to_numpy()
        for row, (doc_id, start, length) in enumerate(
            zip(index.column("doc_id").to_pylist(), starts.tolist(), lengths.tolist(), strict=True)
        ):
            arrays.append(tokens[start : start + length - 1])
            meta.append((version.partition, row, doc_id))
    return arrays, meta


def build_repeated_spans(tokenized: Sequence[Version], manifest: SourcesManifest, writer: VersionWriter) -> StageOutput:
    """Spans of >= span_length tokens that a document shares with an earlier one, across all sources."""
    cfg = manifest.pipeline.dedup
    arrays, meta = _document_tokens(tokenized, manifest)
    hits = find_repeated_spans(arrays, cfg.span_length)
    span_rows = []
    covered: dict[int, np.ndarray] = {}
    for h in hits:
        source, row, doc_id = meta[h.doc]
        earlier_source, earlier_row, earlier_doc_id = meta[h.source_doc]
        span_rows.append(
            {
                "source": source,
                "row": row,
                "doc_id": doc_id,
                "start": h.start,
                "length": h.length,
                "earlier_source": earlier_source,
                "earlier_row": earlier_row,
                "earlier_doc_id": earlier_doc_id,
                "earlier_start": h.source_start,
            }
        )
        mask = covered.setdefault(h.doc, np.zeros(len(arrays[h.doc]), dtype=bool))
        mask[h.start : h.start + h.length] = True
    doc_rows = []
    for d, mask in sorted(covered.items()):
        source, row, doc_id = meta[d]
        span_tokens = int(mask.sum())
        # Nothing would be left of a fully covered document: removing its spans is dropping it.
        action = "drop" if cfg.span_policy == "remove_span" and span_tokens == len(mask) else cfg.span_policy
        doc_rows.append(
            {
                "source": source,
                "row": row,
                "doc_id": doc_id,
                "tokens": len(mask),
                "span_tokens": span_tokens,
                "action": action,
            }
        )
    write_rows(writer.path("spans.parquet"), span_rows, SPAN_SCHEMA)
    write_rows(writer.path("documents.parquet"), doc_rows, SPAN_DOCUMENT_SCHEMA)
    n_tokens = int(sum(len(a) for a in arrays))
    span_tokens = sum(r["span_tokens"] for r in doc_rows)
    per_source = []
    for version in sorted(tokenized, key=lambda v: manifest.source(v.partition).priority):
        mine = [r for r in doc_rows if r["source"] == version.partition]
        per_source.append(
            {
                "source": version.partition,
                "documents": int(version.counts.get("out", 0)),
                "tokens": int(version.counts.get("tokens", 0)) - int(version.counts.get("out", 0)),
                "flagged_documents": len(mine),
                "span_tokens": sum(r["span_tokens"] for r in mine),
                "dropped_documents": sum(r["action"] == "drop" for r in mine),
            }
        )
    counts = {
        "documents": len(arrays),
        "tokens": n_tokens,
        "spans": len(span_rows),
        "flagged_documents": len(doc_rows),
        "span_tokens": span_tokens,
    }
    version = writer.commit(
        code_version=SPANS_CODE_VERSION,
        config={"dedup": {f: getattr(cfg, f) for f in SPAN_FIELDS}},
        upstream=[v.ref() for v in tokenized],
        counts=counts,
        extra={"in_from": ["tokenized_documents"], "span_policy": cfg.span_policy, "per_source": per_source},
    )
    md = ["| source | documents | flagged | span tokens | share of tokens |", "| --- | --- | --- | --- | --- |"]
    md += [
        f"| {r['source']} | {r['documents']:,} | {r['flagged_documents']:,} | {r['span_tokens']:,} | "
        f"{r['span_tokens'] / max(r['tokens'], 1):.4f} |"
        for r in per_source
    ]
    longest = sorted(span_rows, key=lambda r: (-r["length"], r["source"], r["row"]))[:10]
    md += [
        "",
        "Longest shared spans:",
        "",
        "| source | row | tokens | earlier source | earlier row |",
        "| --- | --- | --- | --- | --- |",
    ]
    md += [
        f"| {r['source']} | {r['row']} | {r['length']:,} | {r['earlier_source']} | {r['earlier_row']} |"
        for r in longest
    ]
    return StageOutput(
        version=version,
        counts=counts,
        tables={"repeated_spans": span_rows, "repeated_span_sources": per_source},
        summary={
            "spans": len(span_rows),
            "flagged_documents": len(doc_rows),
            "span_tokens": span_tokens,
            "span_token_share": span_tokens / n_tokens if n_tokens else 0.0,
            "span_policy": cfg.span_policy,
        },
        markdown=f"span_length {cfg.span_length}, policy {cfg.span_policy}\n\n" + "\n".join(md),
    )


@dataclasses.dataclass(frozen=True)
class SpanView:
    """What a source's training stream keeps under the span policy (tokenized rows and token ranges)."""

    rows: np.ndarray  # tokenized rows that stay, ascending
    lengths: np.ndarray  # their lengths after removal, <|endoftext|> included
    cuts: dict[int, list[tuple[int, int]]]  # row -> (start, length) ranges removed (remove_span only)

    def tokens(self, row: int, document: np.ndarray) -> np.ndarray:
        """The row's tokens (as stored, EOT included) without its removed ranges."""
        ranges = self.cuts.get(row)
        if not ranges:
            return document
        keep = np.ones(len(document), dtype=bool)
        for start, length in ranges:
            keep[start : start + length] = False
        return document[keep]


def span_policy_view(spans: Version, source: str, lengths: np.ndarray) -> SpanView:
    """The source's rows and lengths under repeated_spans' policy: for mixed_tokens (flag keeps everything)."""
    policy = spans.extra["span_policy"]
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.arange(len(lengths), dtype=np.int64)
    if policy == "flag":
        return SpanView(rows, lengths.copy(), {})
    docs = pq.read_table(spans.file("documents.parquet"), filters=[("source", "=", source)]).to_pylist()
    drop = {int(r["row"]) for r in docs if r["action"] == "drop"}
    cuts: dict[int, list[tuple[int, int]]] = {}
    new_lengths = lengths.copy()
    if policy == "remove_span":
        trimmed = {int(r["row"]): int(r["span_tokens"]) for r in docs if r["action"] == "remove_span"}
        for r in pq.read_table(spans.file("spans.parquet"), filters=[("source", "=", source)]).to_pylist():
            if int(r["row"]) in trimmed:
                cuts.setdefault(int(r["row"]), []).append((int(r["start"]), int(r["length"])))
        for row, removed in trimmed.items():
            new_lengths[row] -= removed
    keep = np.setdiff1d(rows, np.fromiter(drop, dtype=np.int64, count=len(drop)))
    return SpanView(keep, new_lengths[keep], cuts)
