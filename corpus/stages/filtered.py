"""filtered_documents: quality rules, normalization and the PII/secret policy, every decision recorded.

Kept documents carry their normalized (and redacted) text and a quality score; every document, kept or
not, gets a row in decisions.parquet with its reason code and the feature values the rules compared,
and every PII/secret detection a row in detections.parquet (kind, span, action, never the value).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pyarrow as pa

from corpus.config import FilterConfig, SourceSpec
from corpus.filters import QualityFilter
from corpus.lake import Version, VersionWriter
from corpus.stages import StageOutput
from corpus.stages.io import DOCUMENT_SCHEMA, ParquetSink, iter_batches

CODE_VERSION = "filtered_documents/1"

FILTERED_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("quality", pa.float64()))
DECISION_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("uri", pa.string()),
        ("position", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("quality", pa.float64()),
        ("language", pa.string()),
        ("language_confidence", pa.float64()),
        ("normalized", pa.string()),
        ("chars", pa.int64()),
        ("features", pa.string()),
    ]
)
DETECTION_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("uri", pa.string()),
        ("position", pa.int64()),
        ("kind", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("action", pa.string()),
    ]
)


def build_filtered_documents(raw: Version, spec: SourceSpec, cfg: FilterConfig, writer: VersionWriter) -> StageOutput:
    quality_filter = QualityFilter(spec.profile, cfg, languages=spec.languages)
    reasons: Counter[str] = Counter()
    detection_kinds: Counter[str] = Counter()
    n_in = n_out = bytes_in = bytes_out = 0
    changed = 0
    drop_rows: list[dict[str, object]] = []
    with (
        ParquetSink(writer.path("documents.parquet"), FILTERED_SCHEMA) as kept,
        ParquetSink(writer.path("decisions.parquet"), DECISION_SCHEMA) as decisions,
        ParquetSink(writer.path("detections.parquet"), DETECTION_SCHEMA) as detections,
    ):
        for batch in iter_batches(raw.file("documents.parquet")):
            rows = batch.to_pylist()
            results = quality_filter.apply_batch([row["text"] for row in rows])
            for row, decision in zip(rows, results, strict=True):
                n_in += 1
                bytes_in += len(row["text"].encode("utf-8"))
                if decision.normalized:
                    changed += 1
                for det in decision.detections:
                    detection_kinds[det.kind] += 1
                    detections.add(
                        {
                            "doc_id": row["doc_id"],
                            "uri": row["uri"],
                            "position": row["position"],
                            "kind": det.kind,
                            "start": det.start,
                            "end": det.end,
                            "action": det.action,
                        }
                    )
                record = {
                    "doc_id": row["doc_id"],
                    "uri": row["uri"],
                    "position": row["position"],
                    "kept": decision.kept,
                    "reason": decision.reason,
                    "quality": float(decision.quality),
                    "language": decision.language,
                    "language_confidence": decision.language_confidence,
                    "normalized": ",".join(decision.normalized),
                    "chars": len(row["text"]),
                    "features": json.dumps(decision.features, sort_keys=True),
                }
                decisions.add(record)
                if decision.kept:
                    n_out += 1
                    bytes_out += len(decision.text.encode("utf-8"))
                    kept.add({**row, "text": decision.text, "quality": float(decision.quality)})
                else:
                    reasons[str(decision.reason)] += 1
                    drop_rows.append(record)
    counts = {
        "in": n_in,
        "out": n_out,
        "dropped": dict(sorted(reasons.items())),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "normalized": changed,
        "detections": dict(sorted(detection_kinds.items())),
    }
    version = writer.commit(
        code_version=CODE_VERSION,
        config={"profile": spec.profile, "languages": list(spec.languages), "filters": dataclasses.asdict(cfg)},
        upstream=[raw.ref()],
        counts=counts,
        extra={"out_file": "documents.parquet", "in_from": [raw.asset]},
    )
    drop_share = (n_in - n_out) / n_in if n_in else 0.0
    return StageOutput(
        version=version,
        counts=counts,
        tables={"filter_drops": drop_rows},
        summary={"documents_in": n_in, "documents_out": n_out, "drop_share": round(drop_share, 4)},
    )
