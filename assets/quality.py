"""heuristic_documents -> reference_model -> filtered_documents: quality rules, then the perplexity filter."""

from collections.abc import Sequence
from typing import Any

import dagster as dg

from assets._common import counts_check_spec, publish, reuse_or_build, upstream_version
from corpus.stages.filtered import (
    CODE_VERSION,
    HEURISTIC_CODE_VERSION,
    build_filtered_documents,
    build_heuristic_documents,
    drop_reasons,
)
from corpus.stages.perplexity import CODE_VERSION as REFERENCE_CODE_VERSION
from corpus.stages.perplexity import build_reference_model, reference_inputs, scored_sources
from orchestration.resources import PipelineResource

DROP_SHARE_CHECK = "drop_share_below_ceiling"
REASON_COLUMNS = (
    ("stage", "string"),
    ("reason", "string"),
    ("documents", "int"),
    ("tokens", "int"),
    ("share", "float"),
)
REVIEW_COLUMNS = (
    ("rank", "int"),
    ("doc_id", "string"),
    ("uri", "string"),
    ("quality", "float"),
    ("log_perplexity", "float"),
    ("features", "string"),
)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> dg.MetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({name: row.get(name) for name, _ in columns}) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns]),
    )


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=partitions,
        deps=["raw_documents"],
        code_version=HEURISTIC_CODE_VERSION,
        group_name="quality",
        kinds={"parquet"},
        check_specs=[counts_check_spec("heuristic_documents")],
    )
    def heuristic_documents(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Documents that pass the quality rules and language ID, PII redacted, secrets dropped; drops have a reason."""
        manifest = pipeline.manifest()
        spec = manifest.source(context.partition_key)
        raw = upstream_version(context, pipeline, "raw_documents", context.partition_key)
        output = reuse_or_build(
            context,
            pipeline,
            "heuristic_documents",
            HEURISTIC_CODE_VERSION,
            [raw],
            lambda writer: build_heuristic_documents(raw, spec, manifest.pipeline.filters, writer),
        )
        return publish(context, pipeline, output, upstream=[raw])

    @dg.asset(
        deps=["heuristic_documents"],
        code_version=REFERENCE_CODE_VERSION,
        group_name="quality",
        kinds={"numpy"},
        check_specs=[counts_check_spec("reference_model")],
    )
    def reference_model(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Kneser-Ney n-gram models of the reference sources' kept documents, one per cross-fitting fold."""
        manifest = pipeline.manifest()
        heuristic = [upstream_version(context, pipeline, "heuristic_documents", n) for n in reference_inputs(manifest)]
        output = reuse_or_build(
            context,
            pipeline,
            "reference_model",
            REFERENCE_CODE_VERSION,
            heuristic,
            lambda writer: build_reference_model(heuristic, manifest, writer),
        )
        return publish(context, pipeline, output, upstream=heuristic)

    @dg.asset(
        partitions_def=partitions,
        deps=["heuristic_documents", "reference_model"],
        code_version=CODE_VERSION,
        group_name="quality",
        kinds={"parquet"},
        check_specs=[
            counts_check_spec("filtered_documents"),
            dg.AssetCheckSpec(
                DROP_SHARE_CHECK,
                asset="filtered_documents",
                blocking=True,
                description="The share of documents quality filtering drops stays under filters.max_drop_fraction.",
            ),
        ],
    )
    def filtered_documents(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Heuristic-kept documents minus those whose perplexity is above the source's cut-off."""
        manifest = pipeline.manifest()
        spec = manifest.source(context.partition_key)
        heuristic = upstream_version(context, pipeline, "heuristic_documents", context.partition_key)
        scored = spec.name in scored_sources(manifest)
        reference = upstream_version(context, pipeline, "reference_model") if scored else None
        output = reuse_or_build(
            context,
            pipeline,
            "filtered_documents",
            CODE_VERSION,
            [heuristic] if reference is None else [heuristic, reference],
            lambda writer: build_filtered_documents(heuristic, reference, spec, manifest.pipeline.filters, writer),
            memo_tables=["quality_review"],
        )
        ceiling = manifest.pipeline.filters.max_drop_fraction
        share = float(output.summary["drop_share"])
        reasons = drop_reasons(heuristic, output.version)
        top = sorted(reasons, key=lambda r: -r["documents"])[:3]
        check = dg.AssetCheckResult(
            check_name=DROP_SHARE_CHECK,
            passed=share <= ceiling,
            metadata={"drop_share": share, "ceiling": ceiling},
            description=(
                f"source {spec.name!r}: quality filtering drops {share:.1%} of its documents, ceiling "
                f"filters.max_drop_fraction = {ceiling:.1%}; most dropped: "
                + (", ".join(f"{r['reason']} ({r['stage']}) {r['documents']}" for r in top) or "none")
            ),
        )
        result = publish(context, pipeline, output, upstream=[heuristic], checks=[check])
        review = output.tables.get("quality_review", [])
        return dg.MaterializeResult(
            data_version=result.data_version,
            check_results=result.check_results,
            metadata={
                **(result.metadata or {}),
                "drop_reasons": _table(reasons, REASON_COLUMNS),
                "review": _table(review, REVIEW_COLUMNS),
            },
        )

    return [heuristic_documents, reference_model, filtered_documents]
