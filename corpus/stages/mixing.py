"""mixture_plan and mixed_tokens: the per-source token plan, then the interleaved training stream.

Both read the documents through repeated_spans' policy (corpus.stages.spans.span_policy_view): under
`drop` a flagged document is absent (from the plan's token counts, the validation split and both
streams), under `remove_span` its shared ranges are, so the plan counts exactly the tokens the stream can
hold and realized shares still match it. The validation split is taken by document in `mixture_plan`
(before any mixing), stored in split.parquet, and `mixed_tokens` re-derives the same plan from the same
inputs (asserting equality), realizes it with corpus.mixing and gathers the token stream from each
source's tokens.bin.

The stream index (stream_index.parquet) has one row per contiguous piece of a tokenized document in the
stream: stream_start and length in the split's stream, `offset` where the piece starts in the tokenized
document (its tokens plus <|endoftext|>), and source, doc_id, row, epoch, uri, position. A document is
one piece (offset 0) unless remove_span cut it: then each stretch between cuts is its own row, so stream
position x maps to document token offset + (x - stream_start) exactly, and a window straddling a cut
traces to two pieces of one document with their own offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.charts import new_chart, png_bytes
from corpus.config import SourcesManifest
from corpus.lake import Version, VersionWriter
from corpus.mixing import (
    MixedLayout,
    MixturePlan,
    SourceInput,
    interleaving_stats,
    layout_validation,
    plan_mixture,
    realize,
    split_sources,
)
from corpus.stages import StageOutput
from corpus.stages.io import ParquetSink, read_tokens, write_rows
from corpus.stages.spans import SpanView, span_policy_view

PLAN_CODE_VERSION = "mixture_plan/3"  # 3: whole-token ceilings share their excess with the free sources; 2: span_policy
MIXED_CODE_VERSION = "mixed_tokens/2"  # 2: span_policy applied; stream index rows are pieces with `offset`
SHARE_TOLERANCE_PP = 0.5

SPLIT_SCHEMA = pa.schema(
    [("source", pa.string()), ("row", pa.int64()), ("doc_id", pa.string()), ("validation", pa.bool_())]
)
STREAM_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("stream_start", pa.int64()),
        ("length", pa.int64()),
        ("source", pa.string()),
        ("doc_id", pa.string()),
        ("row", pa.int64()),
        ("epoch", pa.int64()),
        ("uri", pa.string()),
        ("position", pa.int64()),
        ("offset", pa.int64()),  # where the piece starts in the tokenized document
    ]
)


def _check_spans(spans: Version, tokenized: Sequence[Version]) -> None:
    """repeated_spans must have been made from exactly these tokenized versions (its rows index theirs)."""
    made_from = {(u.asset, u.partition, u.version) for u in spans.upstream if u.asset == "tokenized_documents"}
    given = {(v.asset, v.partition, v.version) for v in tokenized}
    if made_from != given:
        raise ValueError(
            f"repeated_spans {spans.version[:12]} was made from tokenized versions "
            f"{sorted(m[1] + ' ' + m[2][:12] for m in made_from)}, not {sorted(g[1] + ' ' + g[2][:12] for g in given)}"
        )


def _sources(
    tokenized: Sequence[Version], spans: Version, manifest: SourcesManifest
) -> tuple[list[SourceInput], dict[str, pa.Table], dict[str, SpanView]]:
    """Each source's documents as the span policy leaves them; SourceInput index i is tokenized row views[i].rows[i]."""
    _check_spans(spans, tokenized)
    inputs = []
    indexes = {}
    views = {}
    for version in tokenized:
        index = pq.read_table(version.file("index.parquet"), columns=["doc_id", "length", "uri", "position"])
        indexes[version.partition] = index
        view = span_policy_view(spans, version.partition, index.column("length").to_numpy())
        views[version.partition] = view
        doc_ids = index.column("doc_id").to_pylist()
        spec = manifest.source(version.partition)
        inputs.append(SourceInput.from_spec(spec, view.lengths, [doc_ids[r] for r in view.rows.tolist()]))
    return inputs, indexes, views


def _plan(sources: list[SourceInput], manifest: SourcesManifest) -> tuple[list[SourceInput], MixturePlan]:
    cfg = manifest.pipeline
    split = split_sources(sources, cfg.validation_fraction, cfg.seed)
    plan = plan_mixture(split, cfg.temperature, cfg.token_budget, cfg.max_epochs)
    return split, plan


def build_mixture_plan(
    tokenized: Sequence[Version], spans: Version, manifest: SourcesManifest, writer: VersionWriter
) -> StageOutput:
    sources, indexes, views = _sources(tokenized, spans, manifest)
    split, plan = _plan(sources, manifest)
    rows = plan.to_rows()
    split_rows = [
        {"source": s.name, "row": row, "doc_id": doc_id, "validation": bool(s.validation[i])}  # type: ignore[index]
        for s in split
        for i, (row, doc_id) in enumerate(zip(views[s.name].rows.tolist(), s.doc_ids, strict=True))
    ]
    write_rows(writer.path("split.parquet"), split_rows, SPLIT_SCHEMA)
    write_rows(writer.path("plan.parquet"), rows, pa.Table.from_pylist(rows).schema)
    n_in = sum(len(index) for index in indexes.values())
    n_docs = len(split_rows)
    n_val = sum(r["validation"] for r in split_rows)
    counts = {
        "in": n_in,
        "out": n_docs,
        "dropped": {"repeated_span": n_in - n_docs} if n_in > n_docs else {},
        "train_documents": n_docs - n_val,
        "validation_documents": n_val,
        "plan_tokens": plan.total_tokens,
        "removed_span_tokens": int(
            sum(int(index.column("length").to_numpy()[views[name].rows].sum()) for name, index in indexes.items())
            - sum(int(s.lengths.sum()) for s in split)
        ),
    }
    cfg = manifest.pipeline
    version = writer.commit(
        code_version=PLAN_CODE_VERSION,
        config={
            "temperature": cfg.temperature,
            "token_budget": cfg.token_budget,
            "max_epochs": cfg.max_epochs,
            "validation_fraction": cfg.validation_fraction,
            "seed": cfg.seed,
            "span_policy": cfg.dedup.span_policy,
            "sources": [manifest.source(v.partition).to_dict() for v in tokenized],
        },
        upstream=[v.ref() for v in tokenized] + [spans.ref()],
        counts=counts,
        extra={"out_file": "split.parquet", "notes": list(plan.notes)},
    )
    md = ["| source | raw tokens | w_i | p_i | target share | target tokens | epochs | capped by |"]
    md.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        md.append(
            f"| {r['source']} | {r['raw_tokens']:,} | {r['natural_share']:.4f} | {r['temperature_share']:.4f} | "
            f"{r['target_share']:.4f} | {r['target_tokens']:,} | {r['epochs']:.2f} | {r['capped_by'] or ''} |"
        )
    notes = "\n".join(f"- {n}" for n in plan.notes)
    return StageOutput(
        version=version,
        counts=counts,
        tables={"mixture_plan": rows},
        summary={"plan_tokens": plan.total_tokens, "temperature": plan.temperature},
        markdown="\n".join(md) + (f"\n\nNotes:\n{notes}" if notes else ""),
    )


def _gather(
    layout: MixedLayout,
    sources: list[SourceInput],
    tokenized: dict[str, Version],
    indexes: dict[str, pa.Table],
    views: dict[str, SpanView],
    path: object,
    split: str,
    sink: ParquetSink,
) -> int:
    """Write the layout's tokens to `path` in stream order and one stream index row per document piece."""
    tokens = {name: read_tokens(tokenized[name].file("tokens.bin")) for name in layout.source_names}
    stored = {name: indexes[name].column("length").to_numpy() for name in layout.source_names}
    starts = {name: stored[name].cumsum() - stored[name] for name in layout.source_names}
    by_name = {s.name: s for s in sources}
    written = 0
    with open(path, "wb") as out:  # type: ignore[call-overload]
        for src, doc, epoch, start, length in zip(
            layout.source_index.tolist(),
            layout.doc_index.tolist(),
            layout.epoch.tolist(),
            layout.stream_start.tolist(),
            layout.length.tolist(),
            strict=True,
        ):
            name = layout.source_names[src]
            row = int(views[name].rows[doc])
            begin = int(starts[name][row])
            index = indexes[name]
            at = start
            for offset, piece_length in views[name].pieces(row, int(stored[name][row])):
                piece = tokens[name][begin + offset : begin + offset + piece_length]
                assert len(piece) == piece_length, (
                    f"{name} row {row}: {len(piece)} tokens at {offset}, want {piece_length}"
                )
                out.write(np.ascontiguousarray(piece, dtype="<u2").tobytes())
                sink.add(
                    {
                        "split": split,
                        "stream_start": at,
                        "length": piece_length,
                        "source": name,
                        "doc_id": by_name[name].doc_ids[doc],
                        "row": row,
                        "epoch": epoch,
                        "uri": index.column("uri")[row].as_py(),
                        "position": index.column("position")[row].as_py(),
                        "offset": offset,
                    }
                )
                at += piece_length
            assert at - start == length, f"{name} row {row}: pieces hold {at - start} tokens, the layout says {length}"
            written += length
    return written


def share_chart_png(rows: list[dict[str, object]]) -> bytes:
    """Bar chart: natural vs temperature-weighted vs realized share per source."""
    names = [str(r["source"]) for r in rows]
    x = np.arange(len(names))
    fig, ax = new_chart(6, 3)
    for offset, key, label in (
        (-0.27, "natural_share", "natural w_i"),
        (0.0, "temperature_share", "temperature p_i"),
        (0.27, "realized_share", "realized"),
    ):
        ax.bar(x + offset, [float(r[key]) for r in rows], width=0.27, label=label)  # type: ignore[arg-type]
    ax.set_xticks(x, names)
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def build_mixed_tokens(
    plan_version: Version,
    tokenized: Sequence[Version],
    spans: Version,
    manifest: SourcesManifest,
    writer: VersionWriter,
) -> StageOutput:
    sources, indexes, views = _sources(tokenized, spans, manifest)
    split, plan = _plan(sources, manifest)
    stored = pq.read_table(plan_version.file("plan.parquet"), columns=["source", "target_tokens"]).to_pylist()
    assert [(r["source"], r["target_tokens"]) for r in stored] == [(r.source, r.target_tokens) for r in plan.rows], (
        f"mixture_plan {plan_version.version[:12]} does not match the plan re-derived from its inputs"
    )
    stored_split = pq.read_table(plan_version.file("split.parquet"), columns=["source", "validation"])
    assert sum(stored_split.column("validation").to_pylist()) == sum(int(s.validation.sum()) for s in split), (  # type: ignore[union-attr]
        "validation split differs from mixture_plan's"
    )
    cfg = manifest.pipeline
    train = realize(plan, split, cfg.seed)
    validation = layout_validation(split, cfg.seed)
    by_name = {v.partition: v for v in tokenized}
    with ParquetSink(writer.path("stream_index.parquet"), STREAM_SCHEMA) as sink:
        train_tokens = _gather(train, split, by_name, indexes, views, writer.path("train.bin"), "train", sink)
        val_tokens = _gather(
            validation, split, by_name, indexes, views, writer.path("validation.bin"), "validation", sink
        )
    train_ids = set(train.doc_ids(split))
    val_ids = set(validation.doc_ids(split))
    leaked = sorted(train_ids & val_ids)
    plan_rows = {r["source"]: r for r in plan.to_rows()}
    rows = []
    for r in train.to_rows():
        p = plan_rows[r["source"]]
        rows.append(
            {
                **r,
                "raw_tokens": p["raw_tokens"],
                "natural_share": p["natural_share"],
                "temperature_share": p["temperature_share"],
                "epochs": r["realized_tokens"] / p["raw_tokens"] if p["raw_tokens"] else 0.0,
                "capped_by": p["capped_by"],
            }
        )
    worst_pp = max((abs(r["share_error_pp"]) for r in rows), default=0.0)
    interleaving = interleaving_stats(train)
    n_train_docs, n_val_docs = len(train), len(validation)
    counts = {
        "train_documents": n_train_docs,
        "validation_documents": n_val_docs,
        "train_tokens": train_tokens,
        "validation_tokens": val_tokens,
        "tokens": train_tokens + val_tokens,
    }
    chart = share_chart_png(rows)
    with open(writer.path("shares.png"), "wb") as handle:
        handle.write(chart)
    version = writer.commit(
        code_version=MIXED_CODE_VERSION,
        config={"seed": cfg.seed, "span_policy": cfg.dedup.span_policy},
        upstream=[plan_version.ref(), *(v.ref() for v in tokenized), spans.ref()],
        counts=counts,
        extra={
            "dtype": "uint16",
            "vocab_size": 50257,
            "splits": {"train": "train.bin", "validation": "validation.bin"},
            "worst_share_error_pp": worst_pp,
            "validation_leaks": len(leaked),
            "span_policy": spans.extra["span_policy"],
            "mixture": rows,
            "interleaving": interleaving,
        },
    )
    return StageOutput(
        version=version,
        counts=counts,
        tables={"mixture": rows},
        summary={
            "train_tokens": train_tokens,
            "validation_tokens": val_tokens,
            "worst_share_error_pp": worst_pp,
            "validation_leaks": len(leaked),
            "same_source_fraction": round(float(interleaving["same_source_fraction"]), 6),
            "same_source_random_expectation": round(float(interleaving["random_expectation"]), 6),
        },
    )
