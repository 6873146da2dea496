"""dataset_release: one Merkle root over every file of every version behind the final shards."""

import dagster as dg

from assets._common import publish, reuse_or_build, upstream_version
from corpus.lake import LakeError
from corpus.release import CODE_VERSION, build_release, latest_release, point_latest
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
        store = pipeline.store()
        output = reuse_or_build(
            context,
            pipeline,
            "dataset_release",
            CODE_VERSION,
            finals,
            lambda writer: build_release(store, finals, writer),
        )
        try:
            current = latest_release(store.root).version
        except LakeError:
            current = None
        if current != output.version.version:  # a reused release may be older than the one LATEST names
            point_latest(store, output.version)
        return publish(context, pipeline, output, upstream=finals)

    return [dataset_release]
