"""filtered_documents: quality rules, normalization and PII/secret policy per source."""

import dagster as dg

from assets._common import counts_check_spec, publish, upstream_version
from corpus.stages.filtered import CODE_VERSION, build_filtered_documents
from orchestration.resources import PipelineResource

DROP_SHARE_CHECK = "drop_share_below_ceiling"


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=partitions,
        deps=["raw_documents"],
        code_version=CODE_VERSION,
        group_name="quality",
        kinds={"parquet"},
        check_specs=[
            counts_check_spec("filtered_documents"),
            dg.AssetCheckSpec(
                DROP_SHARE_CHECK,
                asset="filtered_documents",
                blocking=True,
                description="The share of documents dropped stays under pipeline.filters.max_drop_fraction.",
            ),
        ],
    )
    def filtered_documents(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Documents that pass the quality rules, PII redacted, secrets dropped; every drop has a reason."""
        manifest = pipeline.manifest()
        spec = manifest.source(context.partition_key)
        raw = upstream_version(context, pipeline, "raw_documents", context.partition_key)
        with pipeline.store().writer("filtered_documents", context.partition_key) as writer:
            output = build_filtered_documents(raw, spec, manifest.pipeline.filters, writer)
        ceiling = manifest.pipeline.filters.max_drop_fraction
        share = float(output.summary["drop_share"])
        check = dg.AssetCheckResult(
            check_name=DROP_SHARE_CHECK,
            passed=share <= ceiling,
            metadata={"drop_share": share, "ceiling": ceiling},
        )
        return publish(context, pipeline, output, upstream=[raw], checks=[check])

    return [filtered_documents]
