"""tokenized_documents: GPT-2 token ids per source, uint16, with a document index."""

import dagster as dg

from assets._common import counts_check_spec, publish, reuse_or_build, upstream_version
from corpus.stages.tokenized import CODE_VERSION, build_tokenized_documents
from orchestration.resources import PipelineResource


def build(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=partitions,
        deps=["deduplicated_documents"],
        code_version=CODE_VERSION,
        group_name="tokens",
        kinds={"numpy"},
        check_specs=[counts_check_spec("tokenized_documents")],
    )
    def tokenized_documents(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """GPT-2 tokens as a flat uint16 array, <|endoftext|> after each document, plus a document index."""
        documents = upstream_version(context, pipeline, "deduplicated_documents", context.partition_key)
        encoding = pipeline.manifest().pipeline.encoding
        output = reuse_or_build(
            context,
            pipeline,
            "tokenized_documents",
            CODE_VERSION,
            [documents],
            lambda writer: build_tokenized_documents(documents, writer, encoding),
        )
        return publish(context, pipeline, output, upstream=[documents])

    return [tokenized_documents]
