"""training_windows and packed_sequences: the two kinds of training shards."""

import dagster as dg

from assets._common import publish, reuse_or_build, upstream_version
from corpus.stages.shards import (
    PACKED_CODE_VERSION,
    WINDOWS_CODE_VERSION,
    build_packed_sequences,
    build_training_windows,
)
from orchestration.resources import PipelineResource


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(deps=["mixed_tokens"], code_version=WINDOWS_CODE_VERSION, group_name="shards", kinds={"numpy"})
    def training_windows(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """(input, target) windows of max_length tokens every stride tokens, as uint16 shards per split."""
        mixed = upstream_version(context, pipeline, "mixed_tokens")
        cfg = pipeline.manifest().pipeline
        output = reuse_or_build(
            context,
            pipeline,
            "training_windows",
            WINDOWS_CODE_VERSION,
            [mixed],
            lambda writer: build_training_windows(mixed, cfg, writer),
        )
        return publish(context, pipeline, output, upstream=[mixed])

    @dg.asset(deps=["mixed_tokens"], code_version=PACKED_CODE_VERSION, group_name="shards", kinds={"numpy"})
    def packed_sequences(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Documents packed into rows of max_length (segment ids, position ids, cu_seqlens), in shards of rows."""
        mixed = upstream_version(context, pipeline, "mixed_tokens")
        cfg = pipeline.manifest().pipeline
        output = reuse_or_build(
            context,
            pipeline,
            "packed_sequences",
            PACKED_CODE_VERSION,
            [mixed],
            lambda writer: build_packed_sequences(mixed, cfg, writer),
        )
        return publish(context, pipeline, output, upstream=[mixed])

    return [training_windows, packed_sequences]
