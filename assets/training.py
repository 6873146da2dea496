"""smoke_training and poisoning_scan: validate the shards by training on them, then flag odd samples."""

import base64

import dagster as dg

from assets._common import publish, reuse_or_build, training_device, upstream_version
from corpus.stages.training import SCAN_CODE_VERSION, SMOKE_CODE_VERSION, build_poisoning_scan, build_smoke_training
from corpus.train import SmokeTrainingError
from orchestration.resources import PipelineResource


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        deps=["training_windows", "packed_sequences", "dataset_release"],
        code_version=SMOKE_CODE_VERSION,
        group_name="training",
        kinds={"pytorch"},
        pool="gpu",
    )
    def smoke_training(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """A tiny GPT trained a few steps on both shard kinds, after re-hashing every shard; fails unless loss falls."""
        windows = upstream_version(context, pipeline, "training_windows")
        packed = upstream_version(context, pipeline, "packed_sequences")
        release = upstream_version(context, pipeline, "dataset_release")
        cfg = pipeline.manifest().pipeline
        try:
            output = reuse_or_build(
                context,
                pipeline,
                "smoke_training",
                SMOKE_CODE_VERSION,
                [windows, packed, release],
                lambda writer: build_smoke_training(windows, packed, release, cfg, writer)[0],
                extra={"device": training_device()},
            )
        except SmokeTrainingError as exc:
            raise dg.Failure(f"smoke training failed: {exc}") from exc
        charts = []
        for kind in ("windows", "packed"):
            png = output.version.file(f"{kind}_loss.png").read_bytes()
            charts.append(f"**{kind}**\n\n![{kind} loss](data:image/png;base64,{base64.b64encode(png).decode()})")
        output.markdown = f"Device: **{output.summary['device']}**\n\n" + "\n\n".join(charts)
        return publish(context, pipeline, output, upstream=[windows, packed])

    @dg.asset(
        deps=["smoke_training", "training_windows", "mixed_tokens"],
        code_version=SCAN_CODE_VERSION,
        group_name="training",
        kinds={"pytorch"},
        pool="gpu",
    )
    def poisoning_scan(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Per-sample gradient similarity to the mean gradient; outliers listed for review, never dropped."""
        smoke = upstream_version(context, pipeline, "smoke_training")
        windows = upstream_version(context, pipeline, "training_windows")
        mixed = upstream_version(context, pipeline, "mixed_tokens")
        cfg = pipeline.manifest().pipeline
        output = reuse_or_build(
            context,
            pipeline,
            "poisoning_scan",
            SCAN_CODE_VERSION,
            [smoke, windows, mixed],
            lambda writer: build_poisoning_scan(smoke, windows, mixed, cfg, writer),
            extra={"device": training_device()},
        )
        return publish(context, pipeline, output, upstream=[smoke])

    return [smoke_training, poisoning_scan]
