"""raw_documents: a Parquet snapshot of one source, with unreadable records quarantined."""

import dagster as dg

from assets._common import counts_check_spec, publish, raw_inputs_extra, reuse_or_build
from corpus.sources import SourceError
from corpus.stages.raw import CODE_VERSION, build_raw_documents
from orchestration.resources import PipelineResource


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=partitions,
        code_version=CODE_VERSION,
        group_name="ingest",
        kinds={"parquet"},
        check_specs=[counts_check_spec("raw_documents")],
    )
    def raw_documents(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """One Parquet snapshot of the source: doc_id, uri, position, raw file sha256, text; bad records quarantined."""
        spec = pipeline.manifest().source(context.partition_key)
        try:
            output = reuse_or_build(
                context,
                pipeline,
                "raw_documents",
                CODE_VERSION,
                [],
                lambda writer: build_raw_documents(spec, writer),
                extra=raw_inputs_extra(spec),
                reads_pipeline=False,  # the reader takes the source spec only
            )
        except SourceError as exc:
            raise dg.Failure(str(exc)) from exc
        return publish(context, pipeline, output)

    return [raw_documents]
