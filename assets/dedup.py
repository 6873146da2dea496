"""minhash_signatures (per source) -> duplicate_clusters (all sources) -> deduplicated_documents (per source);
repeated_spans (all sources, after tokenized_documents)."""

import base64

import dagster as dg

from assets._common import counts_check_spec, publish, reuse_or_build, upstream_version
from corpus.stages.dedup import (
    CLUSTERS_CODE_VERSION,
    DEDUPLICATED_CODE_VERSION,
    SIGNATURES_CODE_VERSION,
    build_deduplicated_documents,
    build_duplicate_clusters,
    build_minhash_signatures,
    documents_of,
)
from corpus.stages.spans import SPANS_CODE_VERSION, build_repeated_spans
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
        cfg = pipeline.manifest().pipeline.dedup
        output = reuse_or_build(
            context,
            pipeline,
            "minhash_signatures",
            SIGNATURES_CODE_VERSION,
            [filtered],
            lambda writer: build_minhash_signatures(filtered, writer, cfg),
        )
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
        documents = [documents_of(v) for v in signatures]  # texts for exact Jaccard and previews
        try:
            # The latest earlier version: its LSH index spares re-comparing the documents it holds. Not an
            # input: the result equals a full recomputation, so it stays out of the fingerprint.
            previous = upstream_version(context, pipeline, "duplicate_clusters")
        except dg.Failure as exc:
            context.log.info(f"duplicate_clusters: full run, no previous version ({exc})")
            previous = None
        output = reuse_or_build(
            context,
            pipeline,
            "duplicate_clusters",
            CLUSTERS_CODE_VERSION,
            [*signatures, *documents],
            lambda writer: build_duplicate_clusters(signatures, manifest, writer, previous),
        )
        png = output.version.file("cluster_sizes.png").read_bytes()
        output.markdown = (
            f"![cluster sizes](data:image/png;base64,{base64.b64encode(png).decode()})\n\n" + output.markdown
        )
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
        output = reuse_or_build(
            context,
            pipeline,
            "deduplicated_documents",
            DEDUPLICATED_CODE_VERSION,
            [filtered, clusters],
            lambda writer: build_deduplicated_documents(filtered, clusters, writer),
        )
        return publish(context, pipeline, output, upstream=[filtered])

    @dg.asset(
        deps=["tokenized_documents"],
        code_version=SPANS_CODE_VERSION,
        group_name="dedup",
        kinds={"parquet"},
    )
    def repeated_spans(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Token spans of >= dedup.span_length that a document shares with an earlier one, across sources."""
        manifest = pipeline.manifest()
        tokenized = [upstream_version(context, pipeline, "tokenized_documents", n) for n in manifest.source_names]
        output = reuse_or_build(
            context,
            pipeline,
            "repeated_spans",
            SPANS_CODE_VERSION,
            tokenized,
            lambda writer: build_repeated_spans(tokenized, manifest, writer),
        )
        return publish(context, pipeline, output, upstream=tokenized)

    return [minhash_signatures, duplicate_clusters, deduplicated_documents, repeated_spans]
