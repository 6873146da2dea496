"""What every asset does the same way: find upstream versions, skip unchanged work, record metrics, report.

Skipping unchanged work (`reuse_or_build`): before building, an asset fingerprints its inputs (code
version, the manifest's whole `pipeline` section plus the specs of the sources it reads, the upstream
version ids it reads, library versions, and for raw_documents the raw files' (path, size, mtime_ns)). When
the lake holds a memo for that fingerprint naming a complete version, the asset re-publishes that version
(same DataVersion, `reused: true`) and builds nothing. Taking the whole `pipeline` section is the simple,
safe choice: any setting change recomputes every stage but raw_documents once (the unchanged ones give
their old version ids back), and no stage can miss a setting it reads. NOTE: a code change must bump the
stage's code version (as for Dagster's own staleness), or the memo hands back the old output.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from corpus.config import SourcesManifest, SourceSpec
from corpus.lake import (
    UNPARTITIONED,
    LakeError,
    Recall,
    Version,
    VersionWriter,
    fingerprint_libraries,
    input_fingerprint,
)
from corpus.metrics import MetricsError
from corpus.reconcile import reconcile
from corpus.sources import source_files
from corpus.stages import StageOutput
from orchestration.resources import PipelineResource

COUNTS_CHECK = "counts_reconcile"


@dataclass
class AssetOutput(StageOutput):
    """A stage's output as an asset publishes it; `reused` when the version came from an input memo."""

    reused: bool = False


def file_stats(paths: Sequence[Path]) -> list[list[Any]]:
    """[path, size, mtime_ns] per file; a missing file is [path, -1, -1] (its reader will say what is wrong)."""
    out: list[list[Any]] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append([str(path), -1, -1])
            continue
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def training_device() -> dict[str, str]:
    """The device smoke training would pick: its weights differ by device, so it is part of the inputs."""
    from corpus.train import device_name, resolve_device

    dev = resolve_device(None, require_gpu=False)
    return {"type": dev.type, "name": device_name(dev)}


def build_inputs(
    manifest: SourcesManifest,
    asset: str,
    partition: str | None,
    code_version: str,
    upstream: Sequence[Version],
    extra: Mapping[str, Any] | None = None,
    reads_pipeline: bool = True,
) -> dict[str, Any]:
    """Everything a build reads, as JSON-able values; `input_fingerprint` of it keys the memo."""
    specs = [manifest.source(partition)] if partition else list(manifest.sources)
    return {
        "asset": asset,
        "partition": partition or UNPARTITIONED,
        "code_version": code_version,
        "pipeline": manifest.pipeline.to_dict() if reads_pipeline else None,
        "sources": [spec.to_dict() for spec in specs],
        "upstream": sorted([v.asset, v.partition, v.version] for v in upstream),
        "libraries": fingerprint_libraries(),
        "extra": dict(extra or {}),
    }


def raw_inputs_extra(spec: SourceSpec) -> dict[str, Any]:
    """raw_documents has no upstream version: its input is the raw files, by path, size and mtime."""
    return {"files": file_stats(source_files(spec))}


def reuse_or_build(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    asset: str,
    code_version: str,
    upstream: Sequence[Version],
    build: Callable[[VersionWriter], StageOutput],
    extra: Mapping[str, Any] | None = None,
    memo_tables: Sequence[str] = (),
    reads_pipeline: bool = True,
) -> StageOutput:
    """The version these inputs already produced, or `build(writer)` and a memo of it for next time.

    `upstream` must hold every version `build` reads and `extra` everything else it reads that is not
    in the manifest (raw files, the training device); a missing input would let a stale version through.
    A reused output has the memo's summary and markdown, and of the metric tables only `memo_tables`
    (small ones the asset reads back, e.g. one row per source): per-document tables stay with the run
    that built the version, keyed by its version id. `reads_pipeline=False` leaves the manifest's
    `pipeline` section out, for a build that provably reads none of it (raw_documents reads its spec only).
    """
    partition = partition_of(context)
    store = pipeline.store()
    inputs = build_inputs(pipeline.manifest(), asset, partition, code_version, upstream, extra, reads_pipeline)
    fingerprint = input_fingerprint(inputs)
    where = f"{asset}[{partition or UNPARTITIONED}]"
    recall = store.recall(asset, partition, fingerprint)
    stored_tables = dict(recall.record.get("tables", {}))
    if recall.version is not None and not set(memo_tables) <= set(stored_tables):
        recall = Recall(None, recall.record, f"memo lacks tables {sorted(set(memo_tables) - set(stored_tables))}")
    if recall.version is not None:
        context.log.info(f"{where}: {recall.reason}; reused, nothing built")
        return AssetOutput(
            version=recall.version,
            counts=recall.version.counts,
            summary=dict(recall.record.get("summary", {})),
            markdown=str(recall.record.get("markdown", "")),
            tables={name: list(stored_tables[name]) for name in memo_tables},
            reused=True,
        )
    context.log.info(f"{where}: {recall.reason}; building")
    with store.writer(asset, partition) as writer:
        output = build(writer)
    version = output.version
    assert (version.asset, version.partition) == (asset, partition or UNPARTITIONED), (
        f"build for {where} committed {version.asset}[{version.partition}]"
    )
    record = {
        "summary": output.summary,
        "markdown": output.markdown,
        "tables": {name: output.tables.get(name, []) for name in memo_tables},
        "inputs": inputs,
    }
    store.remember(version, fingerprint, record)
    return output


def upstream_version(
    context: dg.AssetExecutionContext, pipeline: PipelineResource, asset: str, partition: str | None = None
) -> Version:
    """The version the upstream asset recorded in its latest materialization (never a directory listing)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    where = f"{asset}[{partition}]" if partition else asset
    if not records:
        raise dg.Failure(f"upstream {where} has never been materialized in this Dagster instance; materialize it first")
    materialization = records[0].asset_materialization
    assert materialization is not None, f"materialization record of {where} has no materialization"
    entry = materialization.metadata.get("version")
    if entry is None:
        raise dg.Failure(f"latest materialization of {where} carries no 'version' metadata")
    try:
        version = pipeline.store().open(asset, partition, str(entry.value))
    except LakeError as exc:
        raise dg.Failure(f"upstream {where}: {exc}") from exc
    try:
        failed = failed_blocking_checks(pipeline, version, records[0].run_id)
    except MetricsError as exc:  # fail closed, as a Failure callers can handle
        raise dg.Failure(f"upstream {where}: cannot read its check results: {exc}") from exc
    if failed:
        raise dg.Failure(
            f"upstream {where} version {version.version[:12]} failed its blocking check "
            + "; ".join(f"{row['check_name']} ({row['description'] or row['metadata']})" for row in failed)
            + f" in run {records[0].run_id}: fix the cause and materialize {where} again before building on it"
        )
    return version


def failed_blocking_checks(pipeline: PipelineResource, version: Version, run_id: str) -> list[dict[str, Any]]:
    """The blocking checks `version` failed when run `run_id` materialized it ([] when none, or not recorded)."""
    store = pipeline.metrics()
    if "asset_checks" not in store.tables():
        return []
    return store.query(
        "SELECT check_name, description, metadata FROM asset_checks WHERE asset = ? AND partition = ? "
        "AND version = ? AND run_id = ? AND blocking AND NOT passed ORDER BY check_name",
        [version.asset, version.partition, version.version, run_id],
    )


def partition_of(context: dg.AssetExecutionContext) -> str | None:
    return context.partition_key if context.has_partition_key else None


def counts_check_spec(asset: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        COUNTS_CHECK, asset=asset, description="Documents in = out + dropped, read back from the written files."
    )


def _markdown_counts(counts: Mapping[str, Any]) -> str:
    lines = ["| measure | value |", "| --- | --- |"]
    for key in ("in", "out"):
        if key in counts:
            lines.append(f"| {key} | {counts[key]:,} |")
    for reason, n in sorted(dict(counts.get("dropped", {})).items()):
        lines.append(f"| dropped: {reason} | {n:,} |")
    return "\n".join(lines)


def publish(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    output: StageOutput,
    upstream: Sequence[Version] = (),
    checks: Sequence[dg.AssetCheckResult] = (),
) -> dg.MaterializeResult:
    """Record the stage's metrics in DuckDB and return the Dagster result keyed by the content hash."""
    version = output.version
    partition = partition_of(context)
    reused = isinstance(output, AssetOutput) and output.reused
    counts = output.counts
    dropped = dict(counts.get("dropped", {}))
    key = {"asset": version.asset, "partition": partition or UNPARTITIONED, "version": version.version}
    key["run_id"] = context.run_id
    tables: dict[str, Any] = {
        "materializations": [
            {
                "code_version": version.manifest["code_version"],
                "manifest_path": str(version.manifest_path),
                "docs_in": counts.get("in"),
                "docs_out": counts.get("out"),
                "dropped": sum(dropped.values()),
                "tokens": counts.get("tokens"),
                "bytes_out": counts.get("bytes_out"),
                "counts": json.dumps(counts, sort_keys=True),
                "reused": reused,
                "materialized_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
            }
        ],
        "drops": [{"reason": reason, "documents": n} for reason, n in sorted(dropped.items())],
        **output.tables,
    }
    pipeline.metrics().write(key, tables)
    metadata: dict[str, Any] = {
        "version": dg.MetadataValue.text(version.version),
        "manifest": dg.MetadataValue.path(str(version.manifest_path)),
        "counts": dg.MetadataValue.json(counts),
        "reused": dg.MetadataValue.bool(reused),
        "summary": dg.MetadataValue.md(
            (output.markdown + "\n\n" if output.markdown else "") + _markdown_counts(counts)
        ),
    }
    for name, value in output.summary.items():
        if name in metadata:
            continue
        if isinstance(value, bool) or value is None:
            metadata[name] = dg.MetadataValue.text(str(value))
        elif isinstance(value, int | float):
            metadata[name] = value
        elif isinstance(value, str):
            metadata[name] = dg.MetadataValue.text(value)
        else:
            metadata[name] = dg.MetadataValue.json(value)
    check_results = list(checks)
    if any(spec.name == COUNTS_CHECK for spec in context.assets_def.check_specs):
        problems = reconcile(version, upstream)
        check_results.insert(
            0,
            dg.AssetCheckResult(
                check_name=COUNTS_CHECK,
                passed=not problems,
                metadata={"problems": dg.MetadataValue.json(problems), "counts": dg.MetadataValue.json(counts)},
            ),
        )
    # Recorded so that a downstream asset never builds on a version whose blocking check failed (Dagster
    # itself stops only the run the check failed in; a later run would read the version as the latest).
    blocking = {spec.name for spec in context.assets_def.check_specs if spec.blocking}
    pipeline.metrics().write(
        key,
        {
            "asset_checks": [
                {
                    "check_name": check.check_name,
                    "passed": bool(check.passed),
                    "blocking": check.check_name in blocking,
                    "description": check.description,
                    "metadata": json.dumps(
                        {k: getattr(v, "value", v) for k, v in (check.metadata or {}).items()}, default=str
                    ),
                }
                for check in check_results
            ]
        },
    )
    how = "reused" if reused else "built"
    context.log.info(f"{version.asset}[{partition or UNPARTITIONED}] {how} {version.version[:16]} {counts}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.version), metadata=metadata, check_results=check_results
    )
