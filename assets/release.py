"""dataset_release: one Merkle root over every file of every version behind the final shards."""

import dagster as dg

from assets._common import publish, upstream_version
from corpus.release import CODE_VERSION, build_release
from orchestration.resources import PipelineResource


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        deps=["training_windows", "packed_sequences"],
        code_version=CODE_VERSION,
        group_name="shards",
        kinds={"json"},
    )
    def dataset_release(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Release manifest: a Merkle root pinning the shards and their whole lineage; becomes the latest."""
        finals = [upstream_version(context, pipeline, name) for name in ("training_windows", "packed_sequences")]
        with pipeline.store().writer("dataset_release") as writer:
            output = build_release(pipeline.store(), finals, writer)
        return publish(context, pipeline, output, upstream=finals)

    return [dataset_release]
