"""Quality filtering in two steps: heuristic_documents (rules, language, PII) then filtered_documents (perplexity).

heuristic_documents: kept documents carry their normalized (and redacted) text and a quality score;
every document, kept or not, gets a row in decisions.parquet with its reason code and the feature
values the rules compared, and every PII/secret detection a row in detections.parquet (kind, span,
action, never the value). The manifest config is `QualityFilter.settings()`: the resolved thresholds
and the versions of the libraries that decide, so a changed default changes the version id.

filtered_documents: the heuristic-kept documents of a scored source (profile in
`filters.perplexity_profiles`) get a log-perplexity under the cross-fitted reference model
(corpus.stages.perplexity); those above the source's cut-off (mean + n_std * std, or with
`filters.perplexity_cutoff: median_mad` median + n_std * 1.4826 * MAD) are dropped with
`perplexity_too_high`, their value and the cut-off in the decision's features. Its decisions.parquet
holds every document of the source, heuristic drops copied over (column `stage` says which step
decided), so it alone answers "why was this document dropped". Kept rows pass through unchanged.

Tokens lost per reason are exact GPT-2 counts of the dropped documents' (normalized) text, except for
documents over `TOKEN_COUNT_MAX_CHARS`, estimated at 4 characters per token (GPT-2's rough rate on
English prose) so that a 50 MB `too_long` line is never tokenized; `estimated_documents` counts those.
"""

from __future__ import annotations

import base64
import heapq
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from corpus.config import FilterConfig, SourceSpec
from corpus.filters import QualityFilter
from corpus.filters.perplexity import flag_perplexity, perplexity_cutoff
from corpus.filters.quality import Decision
from corpus.lake import Version, VersionWriter
from corpus.stages import StageOutput
from corpus.stages.io import DOCUMENT_SCHEMA, ParquetSink, iter_batches
from corpus.stages.perplexity import FoldModels, histogram_png, min_documents_for_a_drop, tokenize

HEURISTIC_CODE_VERSION = "heuristic_documents/1"
CODE_VERSION = "filtered_documents/2"
TOKEN_COUNT_MAX_CHARS = 1_000_000  # the profiles' max_chars: longer documents are too_long and estimated
CHARS_PER_TOKEN = 4
PERPLEXITY_REASON = "perplexity_too_high"

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
# filtered_documents' decisions: the heuristic columns, which step dropped the document, its score.
FILTERED_DECISION_SCHEMA = DECISION_SCHEMA.append(pa.field("stage", pa.string())).append(
    pa.field("log_perplexity", pa.float64())
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


def count_tokens(texts: Sequence[str]) -> tuple[list[int], list[bool]]:
    """GPT-2 token count of each text, and whether it was estimated (over TOKEN_COUNT_MAX_CHARS)."""
    estimated = [len(t) > TOKEN_COUNT_MAX_CHARS for t in texts]
    exact = iter(tokenize([t for t, est in zip(texts, estimated, strict=True) if not est]))
    counts = [
        math.ceil(len(t) / CHARS_PER_TOKEN) if est else len(next(exact))
        for t, est in zip(texts, estimated, strict=True)
    ]
    return counts, estimated


def _loss_rows(stage: str, drops: Sequence[dict[str, Any]], n_in: int) -> list[dict[str, Any]]:
    """One row per reason: documents, raw chars and tokens lost, share of the step's input documents."""
    by_reason: dict[str, dict[str, Any]] = {}
    for row in drops:
        entry = by_reason.setdefault(
            str(row["reason"]),
            {
                "stage": stage,
                "reason": row["reason"],
                "documents": 0,
                "chars": 0,
                "tokens": 0,
                "estimated_documents": 0,
            },
        )
        entry["documents"] += 1
        entry["chars"] += int(row["chars"])
        entry["tokens"] += int(row["tokens"])
        entry["estimated_documents"] += int(row["tokens_estimated"])
    rows = [by_reason[r] for r in sorted(by_reason)]
    for row in rows:
        row["share"] = round(row["documents"] / n_in, 6) if n_in else 0.0
    return rows


def build_heuristic_documents(raw: Version, spec: SourceSpec, cfg: FilterConfig, writer: VersionWriter) -> StageOutput:
    """Normalization, the profile's rules, language ID and the PII/secret policy, every decision recorded."""
    quality_filter = QualityFilter(spec.profile, cfg, languages=spec.languages)
    reasons: Counter[str] = Counter()
    detection_kinds: Counter[str] = Counter()
    n_in = n_out = bytes_in = bytes_out = 0
    changed = 0
    drop_rows: list[dict[str, Any]] = []
    with (
        ParquetSink(writer.path("documents.parquet"), FILTERED_SCHEMA) as kept,
        ParquetSink(writer.path("decisions.parquet"), DECISION_SCHEMA) as decisions,
        ParquetSink(writer.path("detections.parquet"), DETECTION_SCHEMA) as detections,
    ):
        for batch in iter_batches(raw.file("documents.parquet")):
            rows = batch.to_pylist()
            results = quality_filter.apply_batch([row["text"] for row in rows])
            batch_drops: list[dict[str, Any]] = []
            dropped_texts: list[str] = []
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
                    batch_drops.append(record)
                    dropped_texts.append(decision.text)
            tokens, estimated = count_tokens(dropped_texts)
            for record, n_tokens, est in zip(batch_drops, tokens, estimated, strict=True):
                drop_rows.append({**record, "tokens": n_tokens, "tokens_estimated": est})
    losses = _loss_rows("heuristic", drop_rows, n_in)
    counts = {
        "in": n_in,
        "out": n_out,
        "dropped": dict(sorted(reasons.items())),
        "dropped_chars": {r["reason"]: r["chars"] for r in losses},
        "dropped_tokens": {r["reason"]: r["tokens"] for r in losses},
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "normalized": changed,
        "detections": dict(sorted(detection_kinds.items())),
    }
    version = writer.commit(
        code_version=HEURISTIC_CODE_VERSION,
        config={"filter": quality_filter.settings()},
        upstream=[raw.ref()],
        counts=counts,
        extra={"out_file": "documents.parquet", "in_from": [raw.asset]},
    )
    drop_share = (n_in - n_out) / n_in if n_in else 0.0
    return StageOutput(
        version=version,
        counts=counts,
        tables={"filter_drops": drop_rows, "quality_drops": losses},
        summary={"documents_in": n_in, "documents_out": n_out, "drop_share": round(drop_share, 4)},
    )


@dataclass
class _Decided:
    """What the decision pass found: which kept documents stay, the drops, the review candidates."""

    keep: np.ndarray
    drops: list[dict[str, Any]] = field(default_factory=list)
    review: list[tuple[tuple[float, int], dict[str, Any]]] = field(default_factory=list)
    decisions: int = 0


def _score(heuristic: Version, models: FoldModels | None) -> tuple[np.ndarray, np.ndarray]:
    """Log-perplexity and token count of every heuristic-kept document (nan: no tokens, or no model)."""
    if not models:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    parts = [
        models.score(b.column("doc_id").to_pylist(), b.column("text").to_pylist())
        for b in iter_batches(heuristic.file("documents.parquet"), ["doc_id", "text"])
    ]
    if not parts:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _decide(
    heuristic: Version, log_ppl: np.ndarray, n_tokens: np.ndarray, cutoff: float, n_review: int, sink: ParquetSink
) -> _Decided:
    """Write every decision: heuristic drops copied, kept documents run through `flag_perplexity`.

    `log_ppl` is empty for a source that is not scored; then every kept document stays and the review
    candidates are ranked by quality (lowest first) instead of log-perplexity (highest first).
    """
    scored = len(log_ppl) > 0
    out = _Decided(keep=np.ones(len(log_ppl), dtype=bool))
    kept_index = 0
    for batch in iter_batches(heuristic.file("decisions.parquet")):
        rows = batch.to_pylist()
        kept_rows = [r for r in rows if r["kept"]]
        values = log_ppl[kept_index : kept_index + len(kept_rows)] if scored else np.full(len(kept_rows), np.nan)
        assert len(values) == len(kept_rows), (
            f"{heuristic.manifest_path}: decisions.parquet has more kept rows than documents.parquet "
            f"({kept_index + len(kept_rows)} > {len(log_ppl)})"
        )
        at = [i for i, v in enumerate(values) if math.isfinite(v)]
        pending = [
            Decision(True, None, "", kept_rows[i]["quality"], features=json.loads(kept_rows[i]["features"])) for i in at
        ]
        outcome = dict(zip(at, flag_perplexity(pending, values[at], cutoff), strict=True))
        j = 0
        for row in rows:
            out.decisions += 1
            if not row["kept"]:
                sink.add({**row, "stage": "heuristic", "log_perplexity": None})
                continue
            value = float(values[j])
            record = {**row, "stage": None, "log_perplexity": value if math.isfinite(value) else None}
            decision = outcome.get(j)
            if decision is not None:
                record["features"] = json.dumps(decision.features, sort_keys=True)
                if not decision.kept:
                    record.update(kept=False, reason=decision.reason, quality=decision.quality, stage="perplexity")
                    out.keep[kept_index + j] = False
                    tokens = int(n_tokens[kept_index + j])
                    out.drops.append({**record, "tokens": tokens, "tokens_estimated": False})
            sink.add(record)
            if record["kept"] and n_review and (decision is not None or not scored):
                key = (-value, int(row["position"])) if scored else (float(row["quality"]), int(row["position"]))
                out.review.append((key, record))
            j += 1
        kept_index += len(kept_rows)
        if len(out.review) > 4 * n_review:
            out.review = heapq.nsmallest(n_review, out.review, key=lambda item: item[0])
    assert not scored or kept_index == len(log_ppl), (
        f"{heuristic.manifest_path}: {len(log_ppl)} documents but {kept_index} kept decisions"
    )
    out.review = heapq.nsmallest(n_review, out.review, key=lambda item: item[0])
    return out


def _copy_kept(heuristic: Version, keep: np.ndarray | None, sink: ParquetSink) -> tuple[int, int, int, int]:
    """Copy the kept rows unchanged; (documents in, out, bytes in, out). keep=None keeps every row."""
    n_in = n_out = bytes_in = bytes_out = 0
    for batch in iter_batches(heuristic.file("documents.parquet")):
        n = batch.num_rows
        mask = np.ones(n, dtype=bool) if keep is None else keep[n_in : n_in + n]
        sizes = [len(t.encode("utf-8")) for t in batch.column("text").to_pylist()]
        n_in += n
        n_out += int(mask.sum())
        bytes_in += sum(sizes)
        bytes_out += sum(size for size, m in zip(sizes, mask, strict=True) if m)
        sink.add_batch(batch.filter(pa.array(mask)))
    return n_in, n_out, bytes_in, bytes_out


def build_filtered_documents(
    heuristic: Version,
    reference: Version | None,
    spec: SourceSpec,
    cfg: FilterConfig,
    writer: VersionWriter,
) -> StageOutput:
    """Score the heuristic-kept documents, drop those above the source's cut-off, keep every decision.

    `reference` is None for a source that is not scored (its profile is not in `cfg.perplexity_profiles`).
    """
    models = FoldModels(reference) if reference is not None and spec.profile in cfg.perplexity_profiles else None
    scored = bool(models)
    log_ppl, n_tokens = _score(heuristic, models)
    finite = log_ppl[np.isfinite(log_ppl)]
    n_scored = len(finite)
    rule = cfg.perplexity_cutoff
    cutoff = perplexity_cutoff(finite, cfg.perplexity_n_std, rule)
    mean = float(finite.mean()) if n_scored else None
    std = float(finite.std()) if n_scored else None
    notes: list[str] = []
    if scored and rule == "median_mad" and n_scored and not math.isfinite(cutoff):
        notes.append(f"{spec.name}: the median absolute deviation of the log-perplexities is 0, so none is dropped")
        warnings.warn(notes[-1], stacklevel=2)
    if scored and rule == "mean_std" and n_scored < min_documents_for_a_drop(cfg.perplexity_n_std):
        notes.append(
            f"{spec.name}: {n_scored} scored documents; a document exceeds mean + {cfg.perplexity_n_std:g} std "
            f"only among >= {min_documents_for_a_drop(cfg.perplexity_n_std)} (z <= sqrt(n - 1)), so none is dropped"
        )
        warnings.warn(notes[-1], stacklevel=2)

    with ParquetSink(writer.path("decisions.parquet"), FILTERED_DECISION_SCHEMA) as sink:
        decided = _decide(heuristic, log_ppl, n_tokens, cutoff, cfg.review_documents, sink)
    with ParquetSink(writer.path("documents.parquet"), FILTERED_SCHEMA) as sink:
        n_in, n_out, bytes_in, bytes_out = _copy_kept(heuristic, decided.keep if scored else None, sink)

    losses = _loss_rows("perplexity", decided.drops, n_in)
    finite_cutoff = cutoff if math.isfinite(cutoff) else None
    counts = {
        "in": n_in,
        "out": n_out,
        "dropped": {PERPLEXITY_REASON: n_in - n_out} if n_out < n_in else {},
        "dropped_chars": {r["reason"]: r["chars"] for r in losses},
        "dropped_tokens": {r["reason"]: r["tokens"] for r in losses},
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "scored": n_scored,
        "unscored": n_in - n_scored,
        "decisions": decided.decisions,
    }
    config: dict[str, Any] = {"profile": spec.profile, "scored": scored}
    upstream = [heuristic.ref()]
    if scored and reference is not None:
        config["n_std"] = cfg.perplexity_n_std
        if rule != "mean_std":  # versions made under the default keep their ids
            config["cutoff"] = rule
        upstream.append(reference.ref())
    perplexity = {"mean": mean, "std": std, "cutoff": finite_cutoff, "n_std": cfg.perplexity_n_std} if scored else None
    if perplexity is not None and rule != "mean_std":
        perplexity["rule"] = rule
    version = writer.commit(
        code_version=CODE_VERSION,
        config=config,
        upstream=upstream,
        counts=counts,
        extra={"out_file": "documents.parquet", "in_from": [heuristic.asset], "perplexity": perplexity},
    )

    review_rows: list[dict[str, Any]] = []
    for rank, (_, rec) in enumerate(decided.review, start=1):
        row = {"rank": rank, **{k: rec[k] for k in ("doc_id", "uri", "position", "quality", "features")}}
        if scored:
            # Perplexity columns only where there is a score: an all-null column would be typed VARCHAR in DuckDB.
            lp = float(rec["log_perplexity"])
            row.update(log_perplexity=lp, z=(lp - mean) / std if mean is not None and std else 0.0)
        review_rows.append(row)
    quality_in = int(heuristic.counts.get("in", n_in))
    summary: dict[str, Any] = {
        "documents_in": quality_in,
        "documents_out": n_out,
        # The quality step as a whole (heuristics + perplexity), against filters.max_drop_fraction.
        "drop_share": round((quality_in - n_out) / quality_in, 4) if quality_in else 0.0,
        "perplexity_dropped": n_in - n_out,
        "scored": n_scored,
    }
    scores: list[dict[str, Any]] = []
    if scored and n_scored:
        summary.update(log_perplexity_mean=mean, log_perplexity_std=std, perplexity_cutoff=finite_cutoff)
        scores.append(
            {
                "scored": n_scored,
                "mean": mean,
                "std": std,
                "cutoff": cutoff,
                "n_std": cfg.perplexity_n_std,
                "rule": rule,
                "dropped": n_in - n_out,
                "p50": float(np.percentile(finite, 50)),
                "p99": float(np.percentile(finite, 99)),
                "max": float(finite.max()),
                "reference_model": reference.extra.get("model_sha256") if reference is not None else None,
            }
        )
    return StageOutput(
        version=version,
        counts=counts,
        tables={
            "filter_drops": decided.drops,
            "quality_drops": losses,
            "quality_review": review_rows,
            "perplexity_scores": scores,
        },
        summary=summary,
        markdown=_markdown(spec.name, scored, finite, cutoff, mean, std, review_rows, notes),
    )


def drop_reasons(heuristic: Version, filtered: Version) -> list[dict[str, Any]]:
    """Documents and tokens lost per reason over the whole quality step of one source, from the manifests."""
    quality_in = int(heuristic.counts.get("in", 0))
    rows = []
    for stage, version in (("heuristic", heuristic), ("perplexity", filtered)):
        counts = version.counts
        tokens = dict(counts.get("dropped_tokens", {}))
        for reason, n in sorted(dict(counts.get("dropped", {})).items()):
            rows.append(
                {
                    "stage": stage,
                    "reason": reason,
                    "documents": int(n),
                    "tokens": int(tokens.get(reason, 0)),
                    "share": round(int(n) / quality_in, 6) if quality_in else 0.0,
                }
            )
    return rows


def _markdown(
    source: str,
    scored: bool,
    values: np.ndarray,
    cutoff: float,
    mean: float | None,
    std: float | None,
    review: list[dict[str, Any]],
    notes: list[str],
) -> str:
    parts: list[str] = []
    if scored and mean is not None and std is not None:
        png = histogram_png(values, cutoff, f"{source}: log-perplexity of {len(values):,} documents")
        parts.append(f"![log-perplexity](data:image/png;base64,{base64.b64encode(png).decode()})")
        parts.append(
            f"log-perplexity mean {mean:.3f}, std {std:.3f}, cut-off {cutoff:.3f} nats/token "
            f"(perplexity {math.exp(min(cutoff, 700)):,.0f})"
        )
    else:
        parts.append(f"`{source}` is not scored by the perplexity filter (its profile is not in perplexity_profiles).")
    parts.extend(f"**note:** {n}" for n in notes)
    if review:
        what = "highest log-perplexity" if scored else "lowest quality"
        lines = [
            f"**{len(review)} kept documents with the {what}**",
            "",
            "| # | doc_id | uri | quality | log-ppl | z |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in review[:10]:
            lp = f"{r['log_perplexity']:.3f}" if "log_perplexity" in r else ""
            z = f"{r['z']:+.2f}" if "z" in r else ""
            lines.append(f"| {r['rank']} | `{r['doc_id'][:12]}` | {r['uri']} | {r['quality']:.3f} | {lp} | {z} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
