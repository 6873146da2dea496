"""minhash_signatures (per source) -> duplicate_clusters (all sources) -> deduplicated_documents (per source)."""

import dagster as dg

from assets._common import counts_check_spec, publish, upstream_version
from corpus.stages.dedup import (
    CLUSTERS_CODE_VERSION,
    DEDUPLICATED_CODE_VERSION,
    SIGNATURES_CODE_VERSION,
    build_deduplicated_documents,
    build_duplicate_clusters,
    build_minhash_signatures,
)
from orchestration.resources import PipelineResource

RATIO_CHECK = "duplicate_ratio_below_limit"


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=partitions,
        deps=["filtered_documents"],
        code_version=SIGNATURES_CODE_VERSION,
        group_name="dedup",
        kinds={"numpy"},
        check_specs=[counts_check_spec("minhash_signatures")],
    )
    def minhash_signatures(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """MinHash signature per filtered document (word shingles), row-aligned with the documents."""
        filtered = upstream_version(context, pipeline, "filtered_documents", context.partition_key)
        with pipeline.store().writer("minhash_signatures", context.partition_key) as writer:
            output = build_minhash_signatures(filtered, writer, pipeline.manifest().pipeline.dedup)
        return publish(context, pipeline, output, upstream=[filtered])

    @dg.asset(
        deps=["minhash_signatures"],
        code_version=CLUSTERS_CODE_VERSION,
        group_name="dedup",
        kinds={"parquet"},
        check_specs=[
            counts_check_spec("duplicate_clusters"),
            dg.AssetCheckSpec(
                RATIO_CHECK,
                asset="duplicate_clusters",
                blocking=True,
                description="Near-duplicate ratio among kept documents is at most pipeline.dedup.max_duplicate_ratio.",
            ),
        ],
    )
    def duplicate_clusters(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Exact and near-duplicate clusters across all sources, and which member of each is kept."""
        manifest = pipeline.manifest()
        names = manifest.source_names
        signatures = [upstream_version(context, pipeline, "minhash_signatures", name) for name in names]
        filtered = [upstream_version(context, pipeline, "filtered_documents", name) for name in names]
        with pipeline.store().writer("duplicate_clusters") as writer:
            output = build_duplicate_clusters(signatures, filtered, manifest, writer)
        limit = manifest.pipeline.dedup.max_duplicate_ratio
        ratio = float(output.summary["duplicate_ratio"])
        check = dg.AssetCheckResult(
            check_name=RATIO_CHECK, passed=ratio <= limit, metadata={"duplicate_ratio": ratio, "limit": limit}
        )
        return publish(context, pipeline, output, upstream=signatures, checks=[check])

    @dg.asset(
        partitions_def=partitions,
        deps=["filtered_documents", "duplicate_clusters"],
        code_version=DEDUPLICATED_CODE_VERSION,
        group_name="dedup",
        kinds={"parquet"},
        check_specs=[counts_check_spec("deduplicated_documents")],
    )
    def deduplicated_documents(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """The source's filtered documents minus the duplicates another cluster member stands for."""
        filtered = upstream_version(context, pipeline, "filtered_documents", context.partition_key)
        clusters = upstream_version(context, pipeline, "duplicate_clusters")
        with pipeline.store().writer("deduplicated_documents", context.partition_key) as writer:
            output = build_deduplicated_documents(filtered, clusters, writer)
        return publish(context, pipeline, output, upstream=[filtered])

    return [minhash_signatures, duplicate_clusters, deduplicated_documents]
