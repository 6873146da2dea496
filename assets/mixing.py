"""mixture_plan and mixed_tokens: temperature-weighted shares, then the interleaved training stream."""

import base64
from typing import Any

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets._common import counts_check_spec, publish, reuse_or_build, upstream_version
from corpus.lake import Version
from corpus.stages.mixing import (
    MIXED_CODE_VERSION,
    PLAN_CODE_VERSION,
    SHARE_TOLERANCE_PP,
    build_mixed_tokens,
    build_mixture_plan,
)
from orchestration.resources import PipelineResource

SHARE_CHECK = "realized_share_matches_plan"
LEAK_CHECK = "no_validation_document_in_training"


def share_tolerances_pp(mixture: list[dict[str, Any]], tokenized: list[Version]) -> dict[str, float]:
    """Per source, the share error the check allows: SHARE_TOLERANCE_PP, or the share of the stream one of its
    longest documents is, where that is more. A source's last, partial epoch takes whole documents, so its
    realized tokens can pass the target by up to one document (a tiny source of a few long documents)."""
    total = sum(int(r["realized_tokens"]) for r in mixture)
    longest = {
        v.partition: int(pc.max(pq.read_table(v.file("index.parquet"), columns=["length"]).column(0)).as_py() or 0)
        for v in tokenized
    }
    return {
        r["source"]: max(SHARE_TOLERANCE_PP, 100 * longest.get(r["source"], 0) / total if total else 0.0)
        for r in mixture
    }


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        deps=["tokenized_documents", "repeated_spans"],
        code_version=PLAN_CODE_VERSION,
        group_name="mixing",
        kinds={"parquet"},
        check_specs=[counts_check_spec("mixture_plan")],
    )
    def mixture_plan(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Per source: raw token share w_i, temperature weight p_i, target tokens, epochs; validation split."""
        manifest = pipeline.manifest()
        tokenized = [upstream_version(context, pipeline, "tokenized_documents", n) for n in manifest.source_names]
        spans = upstream_version(context, pipeline, "repeated_spans")
        output = reuse_or_build(
            context,
            pipeline,
            "mixture_plan",
            PLAN_CODE_VERSION,
            [*tokenized, spans],
            lambda writer: build_mixture_plan(tokenized, spans, manifest, writer),
        )
        return publish(context, pipeline, output, upstream=[*tokenized, spans])

    @dg.asset(
        deps=["mixture_plan", "tokenized_documents", "repeated_spans"],
        code_version=MIXED_CODE_VERSION,
        group_name="mixing",
        kinds={"numpy"},
        check_specs=[
            dg.AssetCheckSpec(
                SHARE_CHECK,
                asset="mixed_tokens",
                blocking=True,
                description=(
                    f"Realized share within {SHARE_TOLERANCE_PP} pp of the plan's target, or within one of the "
                    "source's documents where that is more (a part-epoch takes whole documents)."
                ),
            ),
            dg.AssetCheckSpec(
                LEAK_CHECK,
                asset="mixed_tokens",
                blocking=True,
                description="No validation document appears in the training stream.",
            ),
        ],
    )
    def mixed_tokens(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """The training order of documents, sources interleaved, with a held-out validation split."""
        manifest = pipeline.manifest()
        plan = upstream_version(context, pipeline, "mixture_plan")
        tokenized = [upstream_version(context, pipeline, "tokenized_documents", n) for n in manifest.source_names]
        spans = upstream_version(context, pipeline, "repeated_spans")
        output = reuse_or_build(
            context,
            pipeline,
            "mixed_tokens",
            MIXED_CODE_VERSION,
            [plan, *tokenized, spans],
            lambda writer: build_mixed_tokens(plan, tokenized, spans, manifest, writer),
            memo_tables=["mixture"],
        )
        png = output.version.file("shares.png").read_bytes()
        output.markdown = (
            f"![shares](data:image/png;base64,{base64.b64encode(png).decode()})\n\n"
            "| source | natural | temperature | target | realized | error (pp) | epochs |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(
                f"| {r['source']} | {r['natural_share']:.4f} | {r['temperature_share']:.4f} | "
                f"{r['target_share']:.4f} | {r['realized_share']:.4f} | {r['share_error_pp']:+.3f} | "
                f"{r['epochs']:.2f} |"
                for r in output.tables["mixture"]
            )
        )
        worst = float(output.summary["worst_share_error_pp"])
        leaks = int(output.summary["validation_leaks"])
        allowed = share_tolerances_pp(output.tables["mixture"], tokenized)
        over = [r for r in output.tables["mixture"] if abs(r["share_error_pp"]) > allowed[r["source"]]]
        checks = [
            dg.AssetCheckResult(
                check_name=SHARE_CHECK,
                passed=not over,
                metadata={"worst_error_pp": worst, "tolerance_pp": SHARE_TOLERANCE_PP, "allowed_pp": allowed},
                description=(
                    "; ".join(
                        f"{r['source']}: realized {100 * r['realized_share']:.3f}% vs target "
                        f"{100 * r['target_share']:.3f}% ({r['share_error_pp']:+.3f} pp, allowed "
                        f"{allowed[r['source']]:.3f} pp)"
                        for r in over
                    )
                    or None
                ),
            ),
            dg.AssetCheckResult(check_name=LEAK_CHECK, passed=leaks == 0, metadata={"leaked_documents": leaks}),
        ]
        return publish(context, pipeline, output, upstream=[plan], checks=checks)

    return [mixture_plan, mixed_tokens]
