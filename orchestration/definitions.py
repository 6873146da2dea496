"""Dagster Definitions: the asset graph, partitioned by the sources named in the sources manifest.

The graph goes per source (ingest: raw -> filtered -> signatures), across sources (duplicate clusters),
per source again (deduplicated -> tokenized) and across sources (mixing -> shards -> smoke training).
Asset jobs follow those phases; `corpus run` executes them in order, one run per source partition
for the partitioned phases, so every run shows in the UI. The UI's "Materialize all" launches the same
graph as a backfill.

The manifest and lake come from $CORPUS_SOURCES and $CORPUS_LAKE (defaults: data/sources.yaml and
data/lake); a bad manifest fails here, at load time, with the manifest's own error message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from assets import dedup, mixing, quality, raw, release, shards, tokens, training
from corpus.config import load_manifest
from orchestration.automation import build_automation
from orchestration.resources import PipelineResource, default_lake, default_sources


@dataclass(frozen=True)
class Phase:
    job: str
    assets: tuple[str, ...]
    partitioned: bool
    description: str


PHASES = (
    Phase("ingest", ("raw_documents", "heuristic_documents"), True, "read, apply the quality rules"),
    Phase("reference", ("reference_model",), False, "train the reference n-gram models"),
    Phase("score", ("filtered_documents", "minhash_signatures"), True, "perplexity filter, sign"),
    Phase("cluster", ("duplicate_clusters",), False, "cluster duplicates across sources"),
    Phase("tokenize", ("deduplicated_documents", "tokenized_documents"), True, "deduplicate, tokenize"),
    Phase(
        "mix",
        ("repeated_spans", "mixture_plan", "mixed_tokens"),
        False,
        "find token spans shared across documents, plan the mixture, lay out the stream",
    ),
    Phase("shard", ("training_windows", "packed_sequences", "dataset_release"), False, "windows, packing, release"),
    Phase("train", ("smoke_training",), False, "smoke-train a tiny GPT on both shard kinds"),
    Phase("scan", ("poisoning_scan",), False, "gradient-similarity scan for odd samples"),
)


def build_definitions(sources: Path | None = None, lake: Path | None = None) -> dg.Definitions:
    sources = sources or default_sources()
    lake = lake or default_lake()
    manifest = load_manifest(sources)
    partitions = dg.StaticPartitionsDefinition(manifest.source_names)
    modules = (raw, quality, dedup, tokens, mixing, shards, release, training)
    assets = [asset for module in modules for asset in module.build(partitions)]
    jobs = [
        dg.define_asset_job(
            phase.job,
            selection=list(phase.assets),
            description=phase.description,
        )
        for phase in PHASES
    ]
    schedules, sensors = build_automation(PHASES, jobs)  # refreshes; both STOPPED until switched on
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        resources={"pipeline": PipelineResource(sources=str(manifest.path), lake=str(lake))},
        executor=dg.in_process_executor,
    )


defs = build_definitions()
