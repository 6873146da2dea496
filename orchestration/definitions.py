"""Dagster Definitions: the asset graph, partitioned by the sources named in the sources manifest.

The graph goes per source (ingest: raw -> filtered -> signatures), across sources (duplicate clusters),
per source again (deduplicated -> tokenized) and across sources (mixing -> shards -> smoke training).
Asset jobs follow those phases; `corpus run` executes them in order, one run per source partition
for the partitioned phases (side by side in `--workers` processes), so every run shows in the UI. The
UI's "Materialize all" launches the same graph as a backfill.

The manifest and lake come from $CORPUS_SOURCES and $CORPUS_LAKE (defaults: data/sources.yaml and
data/lake); a bad manifest fails here, at load time, with the manifest's own error message.

The executor comes from $CORPUS_EXECUTOR: `in_process` (default; every step in the run's process),
`multiprocess` (each step in its own process), or Dagster's distributed executors `celery` (dagster-celery)
and `k8s` (dagster-k8s, one Kubernetes job per step), which are imported only when chosen. Optional
executor config (YAML, e.g. deploy/executor-celery.yaml) comes from $CORPUS_EXECUTOR_CONFIG. Same
Definitions, same assets, same versions: the executor decides where steps run, never what they compute.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from assets import dedup, mixing, quality, raw, release, shards, tokens, training
from corpus.config import SourcesManifest, load_manifest
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


ENV_EXECUTOR = "CORPUS_EXECUTOR"
ENV_EXECUTOR_CONFIG = "CORPUS_EXECUTOR_CONFIG"
# name -> (module, attribute, pip requirement); the distributed ones are optional installs (deploy/README.md).
EXECUTORS: dict[str, tuple[str, str, str | None]] = {
    "in_process": ("dagster", "in_process_executor", None),
    "multiprocess": ("dagster", "multiprocess_executor", None),
    "celery": ("dagster_celery", "celery_executor", "dagster-celery==0.29.27"),
    "k8s": ("dagster_k8s", "k8s_job_executor", "dagster-k8s==0.29.27"),
}


def executor_name() -> str:
    """The executor $CORPUS_EXECUTOR names (default in_process); a clear error for anything else."""
    name = (os.environ.get(ENV_EXECUTOR) or "in_process").strip()
    if name not in EXECUTORS:
        raise ValueError(f"${ENV_EXECUTOR}={name!r} is not an executor; choose one of {', '.join(EXECUTORS)}")
    return name


def executor_config() -> dict[str, Any] | None:
    """The executor config in the YAML file $CORPUS_EXECUTOR_CONFIG names, or None when it is unset."""
    path = os.environ.get(ENV_EXECUTOR_CONFIG)
    if not path:
        return None
    file = Path(path).expanduser()
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"${ENV_EXECUTOR_CONFIG}={path}: cannot read executor config: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"${ENV_EXECUTOR_CONFIG}={path}: executor config must be a mapping, got {config!r}")
    return config


def build_executor() -> dg.ExecutorDefinition:
    """The executor $CORPUS_EXECUTOR names, configured from $CORPUS_EXECUTOR_CONFIG when that is set."""
    import importlib

    name = executor_name()
    module, attribute, requirement = EXECUTORS[name]
    try:
        executor: dg.ExecutorDefinition = getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise ValueError(
            f"${ENV_EXECUTOR}={name} needs {requirement}: pip install '{requirement}' (see deploy/README.md); {exc}"
        ) from exc
    config = executor_config()
    return executor if config is None else executor.configured(config, name=executor.name)


def settings_digest(manifest: SourcesManifest, with_pipeline: bool = True) -> str:
    """sha256 of the manifest's settings an asset reads: the source specs, and the pipeline section."""
    settings = {
        "sources": [spec.to_dict() for spec in manifest.sources],
        "pipeline": manifest.pipeline.to_dict() if with_pipeline else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def with_settings_versions(assets: list[dg.AssetsDefinition], manifest: SourcesManifest) -> list[dg.AssetsDefinition]:
    """Each asset's Dagster code version with the digest of the manifest settings it reads appended.

    Dagster's staleness compares code versions and upstream data versions; without this, editing
    sources.yaml left every asset "fresh" in the UI until something was rematerialized. After a reload of the
    code location, the assets whose settings changed show "code version changed". raw_documents reads the
    source specs only. The lake's own code versions (manifests, memo keys) are the stages' and do not change.
    """
    everything = settings_digest(manifest)[:12]
    specs_only = settings_digest(manifest, with_pipeline=False)[:12]

    def stamp(spec: dg.AssetSpec) -> dg.AssetSpec:
        digest = specs_only if spec.key == dg.AssetKey("raw_documents") else everything
        return spec.replace_attributes(code_version=f"{spec.code_version}+settings.{digest}")

    return list(dg.map_asset_specs(stamp, assets))


def build_definitions(sources: Path | None = None, lake: Path | None = None) -> dg.Definitions:
    sources = sources or default_sources()
    lake = lake or default_lake()
    manifest = load_manifest(sources)
    partitions = dg.StaticPartitionsDefinition(manifest.source_names)
    modules = (raw, quality, dedup, tokens, mixing, shards, release, training)
    assets = with_settings_versions([asset for module in modules for asset in module.build(partitions)], manifest)
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
        executor=build_executor(),
    )


def load_definitions() -> dg.Definitions:
    """Definitions for the manifest and lake the environment names now (what other processes reload).

    `corpus run` points runs on other executors here rather than at `defs`: `defs` was built when this
    module was first imported, which in a long-lived process may be before $CORPUS_SOURCES was set.
    """
    return build_definitions()


defs = build_definitions()
