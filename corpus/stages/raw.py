"""raw_documents: one Parquet snapshot of a source, plus a quarantine table of unreadable records."""

from __future__ import annotations

import hashlib
from collections import Counter

import pyarrow as pa

from corpus.config import SourceSpec
from corpus.lake import VersionWriter
from corpus.sources import Quarantined, SourceError, read_source
from corpus.stages import StageOutput
from corpus.stages.io import DOCUMENT_SCHEMA, ParquetSink

CODE_VERSION = "raw_documents/2"  # 2: a malformed-JSON detail reads "<message>: column N"; dropped_file

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("uri", pa.string()),
        ("position", pa.int64()),
        ("byte_offset", pa.int64()),
        ("raw_sha256", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def build_raw_documents(spec: SourceSpec, writer: VersionWriter) -> StageOutput:
    """Read every record of `spec`; documents go to documents.parquet, unreadable ones to quarantine.parquet."""
    reasons: Counter[str] = Counter()
    quarantine_rows: list[dict[str, object]] = []
    n_bytes = 0
    files: set[str] = set()
    with (
        ParquetSink(writer.path("documents.parquet"), DOCUMENT_SCHEMA) as docs,
        ParquetSink(writer.path("quarantine.parquet"), QUARANTINE_SCHEMA) as quarantine,
    ):
        for item in read_source(spec):
            files.add(item.uri.split("#", 1)[0])
            if isinstance(item, Quarantined):
                reasons[item.reason] += 1
                row = {"source": spec.name, **item.__dict__}
                quarantine.add(row)
                quarantine_rows.append(row)
                continue
            data = item.text.encode("utf-8")
            n_bytes += len(data)
            docs.add(
                {
                    "doc_id": hashlib.sha256(data).hexdigest(),
                    "source": spec.name,
                    "uri": item.uri,
                    "position": item.position,
                    "byte_offset": item.byte_offset,
                    "byte_length": item.byte_length,
                    "raw_sha256": item.raw_sha256,
                    "text": item.text,
                }
            )
        n_docs = docs.count + len(docs.rows)
    if n_docs == 0:
        detail = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) or "no records at all"
        if spec.kind == "text_files" and not reasons:
            detail = f"no file matches glob {spec.glob!r}"
        where = spec.path if spec.path is not None else spec.kind
        raise SourceError(f"source {spec.name!r} ({where}) yielded no documents ({detail})")
    n_quarantined = sum(reasons.values())
    counts = {
        "in": n_docs + n_quarantined,
        "out": n_docs,
        "dropped": dict(sorted(reasons.items())),
        "documents": n_docs,
        "quarantined": n_quarantined,
        "bytes_out": n_bytes,
        "files": len(files),
    }
    version = writer.commit(
        code_version=CODE_VERSION,
        config={"source": spec.to_dict()},
        counts=counts,
        extra={"out_file": "documents.parquet", "dropped_file": "quarantine.parquet"},
    )
    return StageOutput(
        version=version,
        counts=counts,
        tables={"quarantine": quarantine_rows},
        summary={"documents": n_docs, "quarantined": n_quarantined, "bytes": n_bytes, "files": len(files)},
    )
