"""What every asset does the same way: find upstream versions, record metrics, report to Dagster."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from corpus.lake import UNPARTITIONED, LakeError, Version
from corpus.reconcile import reconcile
from corpus.stages import StageOutput
from orchestration.resources import PipelineResource

COUNTS_CHECK = "counts_reconcile"


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
        return pipeline.store().open(asset, partition, str(entry.value))
    except LakeError as exc:
        raise dg.Failure(f"upstream {where}: {exc}") from exc


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
        "summary": dg.MetadataValue.md(
            (output.markdown + "\n\n" if output.markdown else "") + _markdown_counts(counts)
        ),
    }
    for name, value in output.summary.items():
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
    context.log.info(f"{version.asset}[{partition or UNPARTITIONED}] -> {version.version[:16]} {counts}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.version), metadata=metadata, check_results=check_results
    )
