"""Refreshes: a cron schedule and a sensor on the raw sources, both shipped STOPPED.

A refresh is the phase jobs of `orchestration.definitions.PHASES` run in order, each run tagged
`corpus/refresh=<id>` and `corpus/phase=<job>`:
- it starts with the first phase (ingest) for some source partitions: the ones whose raw files changed
  (`refresh_sensor`) or all of them (`refresh_schedule`, cron from $CORPUS_REFRESH_CRON, default daily at
  03:00 UTC);
- `refresh_sensor` carries it on: on each tick, when every run of the refresh's latest phase succeeded, it
  requests the next phase, for every source partition when the phase is partitioned (a changed
  duplicate_clusters or reference model changes what the other sources keep). Work whose inputs did not
  change is not redone: each asset re-publishes the version its input memo names (assets._common).
- a failed or cancelled run ends its refresh; the next change or scheduled tick starts a new one.
The sensor starts nothing while a refresh is unfinished or a `corpus run` holds the lake's run lock,
and leaves its cursor alone then, so a change seen during a refresh is picked up right after it.

Change detection, per source (the files its reader reads, corpus.sources): a listing of (path, size,
mtime_ns) against the cursor; for path sources (text_files, jsonl, parquet) a file whose size or mtime
moved is re-hashed and counts as changed only if its sha256 differs from the one the cursor holds (a
`touch` requests nothing). The environment's sources (python_stdlib, pydoc_topics, installed_licenses:
thousands of files that change only when Python or a package is installed) compare the listing alone.
A source the cursor has not seen yet (first tick, new source) is changed unless the lake already holds a
raw_documents memo for its current files. A changed manifest (settings) is not a raw change: the schedule
or `corpus run` picks it up.

Switch them on in the UI (Automation -> toggle `refresh_sensor` / `refresh_schedule`) with the Dagster
daemon running (`dagster dev` runs one), or from a shell:
`dagster sensor start refresh_sensor -m orchestration.definitions` (and `dagster schedule start
refresh_schedule -m orchestration.definitions`). The schedule needs the sensor on to get past its first phase.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dagster as dg

from assets._common import build_inputs, file_stats, raw_inputs_extra
from corpus.config import SourcesManifest, SourceSpec
from corpus.lake import Lake, input_fingerprint
from corpus.sources import source_files
from corpus.stages.raw import CODE_VERSION as RAW_CODE_VERSION
from orchestration.resources import PipelineResource

ENV_CRON = "CORPUS_REFRESH_CRON"
DEFAULT_CRON = "0 3 * * *"
REFRESH_TAG = "corpus/refresh"
PHASE_TAG = "corpus/phase"
MARK_TAG = "corpus/refresh-run"  # on every refresh run, so the newest one is one query away
PATH_KINDS = frozenset({"text_files", "jsonl", "parquet"})
# A tick lists every source's files: ~2,000 stats for python_stdlib plus the installed distributions'
# RECORDs for installed_licenses: 0.7 s on 2 cores for the default corpus; once a minute is ~1% of a core.
SENSOR_INTERVAL_S = 60
HASH_CHUNK = 1 << 20


class PhaseLike(Protocol):
    @property
    def job(self) -> str: ...

    @property
    def partitioned(self) -> bool: ...


def refresh_cron() -> str:
    """The schedule's cron string: $CORPUS_REFRESH_CRON, else daily at 03:00 UTC."""
    return os.environ.get(ENV_CRON, "").strip() or DEFAULT_CRON


# ---------------------------------------------------------------- change detection


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def source_state(spec: SourceSpec, previous: Mapping[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """The source's state for the cursor, and whether it changed since `previous` (None: not seen yet).

    Path sources: {"files": {path: [size, mtime_ns, sha256 | None]}}; a sha256 is computed only for a file
    whose size or mtime moved (so the first sight of a source hashes nothing). Environment sources:
    {"listing": sha256 of the (path, size, mtime_ns) listing}.
    """
    stats = file_stats(source_files(spec))
    if spec.kind not in PATH_KINDS:
        listing = hashlib.sha256(json.dumps(stats, separators=(",", ":")).encode()).hexdigest()
        return {"listing": listing}, previous is not None and previous.get("listing") != listing
    before: Mapping[str, list[Any]] = dict((previous or {}).get("files", {}))
    files: dict[str, list[Any]] = {}
    changed = previous is not None and set(before) != {path for path, _, _ in stats}
    for path, size, mtime in stats:
        old = before.get(path)
        if old is not None and old[0] == size and old[1] == mtime:
            files[path] = [size, mtime, old[2]]
            continue
        digest = _sha256(Path(path)) if size >= 0 and previous is not None else None
        files[path] = [size, mtime, digest]
        if previous is not None and (old is None or old[2] is None or digest is None or digest != old[2]):
            changed = True
    return {"files": files}, changed


def raw_is_current(lake: Lake, manifest: SourcesManifest, spec: SourceSpec) -> bool:
    """Whether raw_documents of `spec` has a memo for the source's current files (a run would reuse it)."""
    inputs = build_inputs(
        manifest, "raw_documents", spec.name, RAW_CODE_VERSION, [], raw_inputs_extra(spec), reads_pipeline=False
    )
    return lake.recall("raw_documents", spec.name, input_fingerprint(inputs)).version is not None


def changed_sources(
    manifest: SourcesManifest, lake: Lake, cursor: Mapping[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """Names of the sources whose raw files changed since `cursor`, in manifest order, and the new cursor."""
    seen: Mapping[str, Any] = dict(cursor.get("sources", {}))
    changed: list[str] = []
    states: dict[str, Any] = {}
    for spec in manifest.sources:
        previous = seen.get(spec.name)
        state, moved = source_state(spec, previous)
        states[spec.name] = state
        if moved or (previous is None and not raw_is_current(lake, manifest, spec)):
            changed.append(spec.name)
    return changed, {"sources": states}


# ---------------------------------------------------------------- the refresh chain


@dataclass(frozen=True)
class ChainState:
    """Where a refresh stands: `next_phase` is the index of the phase to request now, if any."""

    next_phase: int | None
    finished: bool
    reason: str


def chain_state(phase_jobs: Sequence[str], runs: Sequence[tuple[str, str, str]]) -> ChainState:
    """From a refresh's runs as (phase job, partition, run status name), newest first: next phase, wait, or stop.

    Only the newest run of each (phase, partition) counts, so re-executing a failed run from the UI (which
    copies its tags) resumes the refresh.
    """
    newest: dict[tuple[str, str], str] = {}
    for job, partition, status in runs:
        newest.setdefault((job, partition), status)
    if not newest:
        return ChainState(None, True, "no runs")
    unknown = sorted({job for job, _ in newest if job not in phase_jobs})
    if unknown:
        return ChainState(None, True, f"ran jobs that are no phase now: {', '.join(unknown)}")
    failed = sorted({job for (job, _), status in newest.items() if status in ("FAILURE", "CANCELED")})
    if failed:
        return ChainState(None, True, f"failed in {', '.join(failed)}")
    latest = max(phase_jobs.index(job) for job, _ in newest)
    pending = [status for (job, _), status in newest.items() if job == phase_jobs[latest] and status != "SUCCESS"]
    if pending:
        return ChainState(None, False, f"{phase_jobs[latest]}: {len(pending)} run(s) not finished")
    if latest == len(phase_jobs) - 1:
        return ChainState(None, True, "complete")
    return ChainState(latest + 1, False, f"{phase_jobs[latest]} succeeded")


def _newest_refresh(instance: dg.DagsterInstance) -> str | None:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={MARK_TAG: "true"}), limit=1)
    return runs[0].tags.get(REFRESH_TAG) if runs else None


def _refresh_runs(instance: dg.DagsterInstance, refresh: str) -> list[tuple[str, str, str]]:
    """(phase job, partition, status) of every run of the refresh, newest first."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={REFRESH_TAG: refresh}))
    return [
        (run.tags.get(PHASE_TAG, run.job_name), run.tags.get("dagster/partition", ""), run.status.value) for run in runs
    ]


def run_lock_held(lake: Path) -> bool:
    """Whether a `corpus run` holds the lake's run lock right now (orchestration.cli.run_lock)."""
    path = lake / ".run.lock"
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def phase_requests(phase: PhaseLike, refresh: str, partitions: Sequence[str]) -> list[dg.RunRequest]:
    """The runs of one phase of a refresh: one per partition when it is partitioned, else one."""
    tags = {REFRESH_TAG: refresh, PHASE_TAG: phase.job, MARK_TAG: "true"}
    keys: Sequence[str | None] = list(partitions) if phase.partitioned else [None]
    return [
        dg.RunRequest(
            run_key=f"{refresh}/{phase.job}/{key or '_all'}",
            job_name=phase.job,
            partition_key=key,
            tags=tags,
        )
        for key in keys
    ]


def _busy(instance: dg.DagsterInstance, lake: Path, phase_jobs: Sequence[str]) -> tuple[str | None, ChainState]:
    """Why no new refresh may start now (None: free), and the newest refresh's state."""
    if run_lock_held(lake):
        return f"a `corpus run` holds {lake / '.run.lock'}", ChainState(None, True, "corpus run")
    refresh = _newest_refresh(instance)
    state = chain_state(phase_jobs, _refresh_runs(instance, refresh)) if refresh else ChainState(None, True, "none")
    return (None if state.finished else f"refresh {refresh} unfinished: {state.reason}"), state


def build_automation(
    phases: Sequence[PhaseLike], jobs: Sequence[dg.UnresolvedAssetJobDefinition]
) -> tuple[list[dg.ScheduleDefinition], list[dg.SensorDefinition]]:
    """`refresh_schedule` and `refresh_sensor` over the phase jobs (both STOPPED until switched on)."""
    phase_jobs = [phase.job for phase in phases]
    by_name = {job.name: job for job in jobs}
    assert phase_jobs and all(name in by_name for name in phase_jobs), (
        f"every phase needs its job: phases {phase_jobs}, jobs {sorted(by_name)}"
    )
    first = phases[0]
    assert first.partitioned, f"the first phase {first.job} must be per source: refreshes start per source"

    @dg.sensor(
        jobs=[by_name[name] for name in phase_jobs],
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Ingest the sources whose raw files changed, then carry each refresh through the later phases.",
    )
    def refresh_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource) -> dg.SensorResult:
        manifest = pipeline.manifest()
        lake = pipeline.store()
        busy, state = _busy(context.instance, lake.root, phase_jobs)
        if state.next_phase is not None:
            refresh = _newest_refresh(context.instance)
            assert refresh is not None, "a refresh with a next phase has runs"
            phase = phases[state.next_phase]
            context.log.info(f"refresh {refresh}: {state.reason}; requesting {phase.job}")
            return dg.SensorResult(run_requests=phase_requests(phase, refresh, manifest.source_names))
        if busy:
            return dg.SensorResult(skip_reason=busy)
        cursor = json.loads(context.cursor) if context.cursor else {}
        changed, new_cursor = changed_sources(manifest, lake, cursor)
        encoded = json.dumps(new_cursor, sort_keys=True, separators=(",", ":"))
        if not changed:
            return dg.SensorResult(skip_reason="no raw source changed", cursor=encoded)
        refresh = "sensor-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        context.log.info(f"refresh {refresh}: raw files changed in {', '.join(changed)}")
        return dg.SensorResult(run_requests=phase_requests(first, refresh, changed), cursor=encoded)

    cron = refresh_cron()
    try:

        @dg.schedule(
            cron_schedule=cron,
            job=by_name[first.job],
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description=f"Refresh every source ({ENV_CRON}={cron!r}); unchanged work is reused, not redone.",
        )
        def refresh_schedule(
            context: dg.ScheduleEvaluationContext, pipeline: PipelineResource
        ) -> list[dg.RunRequest] | dg.SkipReason:
            busy, _ = _busy(context.instance, pipeline.store().root, phase_jobs)
            if busy:
                return dg.SkipReason(busy)
            refresh = "schedule-" + context.scheduled_execution_time.strftime("%Y%m%dT%H%M%SZ")
            return phase_requests(first, refresh, pipeline.manifest().source_names)

    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(f"${ENV_CRON}={cron!r} is not a valid cron schedule: {exc}") from exc
    return [refresh_schedule], [refresh_sensor]
