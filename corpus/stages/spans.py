"""repeated_spans: spans of >= span_length tokens a document shares with an earlier document, all sources.

All sources' tokens in priority order; a document sharing >= span_length tokens with an earlier document is
flagged with each span (corpus.spans.find_repeated_spans). DedupConfig.span_policy says what the training
stream does with it: "flag" (nothing), "drop" (the document) or "remove_span" (the shared tokens);
`span_policy_view` gives mixed_tokens the rows and token ranges that stay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.config import SourcesManifest
from corpus.lake import Version, VersionWriter
from corpus.spans import find_repeated_spans
from corpus.stages import StageOutput
from corpus.stages.dedup import SPAN_FIELDS
from corpus.stages.io import write_rows

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


class TokenizedDocuments:
    """Every document's tokens without its trailing <|endoftext|>, sources by priority, rows in order.

    A `corpus.spans.TokenDocuments` over the tokenized versions' tokens.bin files: `read` seeks and reads
    just the documents asked for (no memory map, whose touched pages would count as resident), so the span
    pass never holds the corpus.
    """

    def __init__(self, tokenized: Sequence[Version], manifest: SourcesManifest) -> None:
        self.parts: list[tuple[Path, np.ndarray, np.ndarray]] = []  # tokens.bin, starts, lengths (EOT included)
        self.meta: list[tuple[str, list[str]]] = []  # source, doc_ids by row
        first = [0]
        for version in sorted(tokenized, key=lambda v: manifest.source(v.partition).priority):
            index = pq.read_table(version.file("index.parquet"), columns=["doc_id", "start", "length"])
            starts = index.column("start").to_numpy().astype(np.int64)
            lengths = index.column("length").to_numpy().astype(np.int64)
            path = version.file("tokens.bin")
            where = f"{version.asset}[{version.partition}] {version.version[:12]}"
            if len(lengths):
                expected = np.concatenate(([0], np.cumsum(lengths)[:-1]))
                bad = np.flatnonzero((starts != expected) | (lengths < 1))
                if bad.size:
                    row = int(bad[0])
                    raise ValueError(
                        f"{where} index.parquet row {row}: start {int(starts[row])}, length {int(lengths[row])}; "
                        f"documents must follow each other from 0 with >= 1 token (their <|endoftext|>)"
                    )
            size = path.stat().st_size
            if size != 2 * int(lengths.sum()):
                raise ValueError(f"{where} {path}: {size} bytes, index.parquet covers {int(lengths.sum())} tokens")
            self.parts.append((path, starts, lengths))
            self.meta.append((version.partition, index.column("doc_id").to_pylist()))
            first.append(first[-1] + len(lengths))
        self.first = np.array(first, dtype=np.int64)  # global index of each source's first document
        self._lengths = (
            np.concatenate([lengths - 1 for _, _, lengths in self.parts]) if self.parts else np.zeros(0, np.int64)
        )

    def __len__(self) -> int:
        return int(self.first[-1])

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def document(self, d: int) -> tuple[str, int, str]:
        """(source, tokenized row, doc_id) of the d-th document."""
        part = int(np.searchsorted(self.first, d, side="right") - 1)
        source, doc_ids = self.meta[part]
        row = d - int(self.first[part])
        return source, row, doc_ids[row]

    def read(self, first: int, stop: int) -> np.ndarray:
        pieces = []
        part = int(np.searchsorted(self.first, first, side="right") - 1)
        while first < stop:
            path, starts, lengths = self.parts[part]
            a = first - int(self.first[part])
            b = min(stop, int(self.first[part + 1])) - int(self.first[part])
            if b > a:
                lo, hi = int(starts[a]), int(starts[b - 1] + lengths[b - 1])
                tokens = np.fromfile(path, dtype="<u2", count=hi - lo, offset=2 * lo)
                pieces.append(np.delete(tokens, starts[a:b] + lengths[a:b] - 1 - lo))  # the <|endoftext|> tokens
            first = int(self.first[part]) + b
            part += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def build_repeated_spans(tokenized: Sequence[Version], manifest: SourcesManifest, writer: VersionWriter) -> StageOutput:
    """Spans of >= span_length tokens that a document shares with an earlier one, across all sources."""
    cfg = manifest.pipeline.dedup
    documents = TokenizedDocuments(tokenized, manifest)
    hits = find_repeated_spans(documents, cfg.span_length)
    span_rows = []
    covered: dict[int, np.ndarray] = {}
    for h in hits:
        source, row, doc_id = documents.document(h.doc)
        earlier_source, earlier_row, earlier_doc_id = documents.document(h.source_doc)
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
        mask = covered.setdefault(h.doc, np.zeros(int(documents.lengths[h.doc]), dtype=bool))
        mask[h.start : h.start + h.length] = True
    doc_rows = []
    for d, mask in sorted(covered.items()):
        source, row, doc_id = documents.document(d)
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
    n_tokens = int(documents.lengths.sum())
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
        "documents": len(documents),
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

    def pieces(self, row: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) of the stretches of the row's `length` stored tokens that stay, in order."""
        ranges = self.cuts.get(row)
        if not ranges:
            return [(0, length)]
        out: list[tuple[int, int]] = []
        at = 0
        for start, cut in sorted(ranges):  # overlapping cuts (spans shared with different documents) merge
            if start > at:
                out.append((at, start - at))
            at = max(at, start + cut)
        if at < length:
            out.append((at, length - at))
        return out

    def tokens(self, row: int, document: np.ndarray) -> np.ndarray:
        """The row's tokens (as stored, EOT included) without its removed ranges."""
        pieces = self.pieces(row, len(document))
        if len(pieces) == 1 and pieces[0] == (0, len(document)):
            return document
        return np.concatenate([document[a : a + n] for a, n in pieces])


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
            row, start, length = int(r["row"]), int(r["start"]), int(r["length"])
            if not 0 <= row < len(lengths) or start < 0 or length < 1 or start + length > lengths[row] - 1:
                raise ValueError(
                    f"{spans.file('spans.parquet')}: source {source!r} row {row} span [{start}, {start + length}) "
                    f"is outside the document ({int(lengths[row]) - 1 if 0 <= row < len(lengths) else 'no'} tokens "
                    f"before its <|endoftext|>)"
                )
            if row in trimmed:
                cuts.setdefault(row, []).append((start, length))
        for row, removed in trimmed.items():
            new_lengths[row] -= removed
    keep = np.setdiff1d(rows, np.fromiter(drop, dtype=np.int64, count=len(drop)))
    return SpanView(keep, new_lengths[keep], cuts)
