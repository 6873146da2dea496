"""Incremental refreshes: unchanged inputs never recompute, the sensor sees exactly the changed sources.

What ran is counted from the `materializations` table of metrics.duckdb: every asset publishes one row
per run with `reused` true when its input memo named a complete version and nothing was built.
"""

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from test_pipeline import tiny_manifest  # pytest's default (prepend) import mode puts tests/ on sys.path

from corpus.lake import Lake, read_version
from corpus.metrics import MetricsStore
from corpus.release import latest_release
from orchestration import automation, cli
from orchestration.automation import ChainState, chain_state
from orchestration.definitions import PHASES, build_definitions
from orchestration.resources import PipelineResource

# 4 optimizer steps of a 16-wide model: the smoke training takes ~1 s, so three runs stay quick.
TRAINING = (
    "  training: {steps: 4, batch_size: 2, d_model: 16, n_layers: 1, n_heads: 2, learning_rate: 0.02, "
    "min_loss_drop: 0.01, eval_batches: 1, scan_samples: 4, scan_chunk_size: 4}"
)
NEW_CHAT_LINE = {"text": "Note 9: The garden club planted roses along the north wall, and volunteers water them daily."}

Key = tuple[str, str]


def small_manifest(root: Path) -> Path:
    manifest = tiny_manifest(root)
    text, n = re.subn(r"(?m)^  training: \{.*\}$", TRAINING, manifest.read_text())
    assert n == 1, "tiny_manifest's training line moved; update TRAINING here"
    manifest.write_text(text)
    return manifest


def corpus_run(manifest: Path, lake: Path) -> None:
    assert cli.main(["run", "--sources", str(manifest), "--lake", str(lake)]) == 0


def materializations(lake: Path) -> list[dict[str, object]]:
    return MetricsStore(lake / "metrics.duckdb").query(
        "SELECT asset, partition, version, run_id, reused FROM materializations"
    )


def run_rows(lake: Path, before: list[dict[str, object]]) -> dict[Key, dict[str, object]]:
    """The rows the latest `corpus run` added, by (asset, partition); each asset partition publishes once."""
    old = {r["run_id"] for r in before}
    rows = [r for r in materializations(lake) if r["run_id"] not in old]
    out = {(str(r["asset"]), str(r["partition"])): r for r in rows}
    assert len(out) == len(rows), f"an asset partition published twice in one corpus run: {rows}"
    return out


def upstream_of(lake: Path, row: dict[str, object]) -> list[tuple[str, str, str]]:
    manifest = lake / str(row["asset"]) / str(row["partition"]) / str(row["version"]) / "manifest.json"
    return sorted((u.asset, u.partition, u.version) for u in read_version(manifest).upstream)


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("refresh")
    manifest = small_manifest(root)
    lake = root / "lake"
    corpus_run(manifest, lake)
    first = run_rows(lake, [])
    release_1 = latest_release(lake).version
    history_1 = (lake / "releases" / "history.jsonl").read_text().splitlines()
    before = materializations(lake)
    corpus_run(manifest, lake)
    second = run_rows(lake, before)
    release_2 = latest_release(lake).version
    history_2 = (lake / "releases" / "history.jsonl").read_text().splitlines()
    with open(root / "chat.jsonl", "a") as handle:
        handle.write(json.dumps(NEW_CHAT_LINE) + "\n")
    before = materializations(lake)
    corpus_run(manifest, lake)
    third = run_rows(lake, before)
    yield {
        "root": root,
        "manifest": manifest,
        "lake": lake,
        "runs": (first, second, third),
        "releases": (release_1, release_2, latest_release(lake).version),
        "history": (history_1, history_2),
    }


def test_first_run_builds_everything(refreshed: dict[str, object]) -> None:
    first, _, _ = refreshed["runs"]
    assert first, "the first run published nothing"
    assert [key for key, row in first.items() if row["reused"]] == []


def test_unchanged_inputs_recompute_nothing(refreshed: dict[str, object]) -> None:
    first, second, _ = refreshed["runs"]
    assert set(second) == set(first)
    assert sorted(key for key, row in second.items() if not row["reused"]) == []
    assert {key: row["version"] for key, row in second.items()} == {key: row["version"] for key, row in first.items()}
    release_1, release_2, _ = refreshed["releases"]
    assert release_2 == release_1
    history_1, history_2 = refreshed["history"]
    assert history_2 == history_1  # a reused release is not released again


def test_changed_source_recomputes_only_what_depends_on_it(refreshed: dict[str, object]) -> None:
    lake = refreshed["lake"]
    _, second, third = refreshed["runs"]
    assert set(third) == set(second)
    built = {key for key, row in third.items() if not row["reused"]}
    # The first phase is per source and reads nothing across sources: exactly the changed source rebuilds.
    for asset in PHASES[0].assets:
        assert {key for key in built if key[0] == asset} == {(asset, "chat")}
    # Everything else rebuilt exactly when one of its upstream versions changed (and then only then).
    changed_upstream = {key for key, row in third.items() if upstream_of(lake, row) != upstream_of(lake, second[key])}
    assert built == {("raw_documents", "chat")} | changed_upstream
    for key in set(third) - built:
        assert third[key]["version"] == second[key]["version"]
    # The change reaches the release and the training on it.
    assert {("dataset_release", "_all"), ("smoke_training", "_all"), ("mixed_tokens", "_all")} <= built
    _, release_2, release_3 = refreshed["releases"]
    assert release_3 != release_2


def test_reused_materialization_is_marked_in_dagster(refreshed: dict[str, object]) -> None:
    lake = refreshed["lake"]
    instance = dg.DagsterInstance.from_config(str(lake / "dagster_home"))
    try:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_documents"), asset_partitions=["docs"]), limit=3
        ).records
        flags = [r.asset_materialization.metadata["reused"].value for r in records if r.asset_materialization]
        versions = {r.asset_materialization.metadata["version"].value for r in records if r.asset_materialization}
    finally:
        instance.dispose()
    assert flags == [True, True, False]  # newest first: runs 3 and 2 reused what run 1 built
    assert len(versions) == 1


def test_memo_is_only_a_shortcut(refreshed: dict[str, object], tmp_path: Path) -> None:
    lake = Lake(refreshed["lake"])
    memos = sorted((lake.root / "raw_documents" / "docs" / ".inputs").glob("*.json"))
    assert len(memos) == 1
    record = json.loads(memos[0].read_text())
    assert record["inputs"]["asset"] == "raw_documents"
    assert record["inputs"]["pipeline"] is None  # the reader takes the source spec only
    fingerprint = memos[0].stem
    assert lake.recall("raw_documents", "docs", fingerprint).version is not None
    # A truncated file makes the memo a miss (cheap size check), never a wrong reuse.
    version = lake.open("raw_documents", "docs", record["version"])
    target = version.path / "documents.parquet"
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1])
        recall = lake.recall("raw_documents", "docs", fingerprint)
        assert recall.version is None
        assert "incomplete" in recall.reason
    finally:
        target.write_bytes(original)
    assert lake.recall("raw_documents", "docs", "0" * 64).version is None


# ---------------------------------------------------------------- the sensor and the schedule


def sensor_tick(manifest: Path, lake: Path, instance: dg.DagsterInstance, cursor: str | None) -> Any:
    defs = build_definitions(manifest, lake)
    sensor = defs.resolve_sensor_def("refresh_sensor")
    resources = {"pipeline": PipelineResource(sources=str(manifest), lake=str(lake))}
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources, definitions=defs)
    return sensor.evaluate_tick(context)


def requested(result: Any) -> list[tuple[str, str | None]]:
    return [(r.job_name, r.partition_key) for r in result.run_requests or []]


@pytest.fixture(scope="module")
def sensor_refreshed(refreshed: dict[str, object]) -> dict[str, object]:
    """What the Dagster daemon does with the sensor on: tick, launch what it asks for, tick again."""
    manifest, lake = Path(refreshed["manifest"]), Path(refreshed["lake"])
    defs = build_definitions(manifest, lake)
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    instance = dg.DagsterInstance.from_config(str(lake / "dagster_home"))
    launched: list[tuple[str, str | None]] = []
    try:
        baseline = sensor_tick(manifest, lake, instance, None)
        with open(Path(refreshed["root"]) / "chat.jsonl", "a") as handle:
            handle.write(json.dumps({"text": "Note 10: " + NEW_CHAT_LINE["text"][8:]}) + "\n")
        before = materializations(lake)
        cursor, ticks = baseline.cursor, []
        for _ in range(len(PHASES) + 2):  # one tick starts the refresh, one per later phase, one finds it done
            tick = sensor_tick(manifest, lake, instance, cursor)
            cursor = tick.cursor or cursor
            ticks.append(tick.skip_message)
            if not tick.run_requests:
                break
            for request in tick.run_requests:
                result = defs.resolve_job_def(request.job_name).execute_in_process(
                    instance=instance, partition_key=request.partition_key, tags=request.tags, run_config=quiet
                )
                assert result.success
                launched.append((request.job_name, request.partition_key))
    finally:
        instance.dispose()
    return {"baseline": baseline, "launched": launched, "ticks": ticks, "rows": run_rows(lake, before)}


def test_sensor_sees_a_materialized_lake_as_current(sensor_refreshed: dict[str, object]) -> None:
    baseline = sensor_refreshed["baseline"]
    assert requested(baseline) == []
    assert sorted(json.loads(baseline.cursor)["sources"]) == ["books", "chat", "docs", "web"]


def test_sensor_refresh_runs_the_changed_source_then_every_later_phase(
    refreshed: dict[str, object], sensor_refreshed: dict[str, object]
) -> None:
    keys = ["docs", "books", "chat", "web"]
    expected = [(PHASES[0].job, "chat")]
    for phase in PHASES[1:]:
        expected += [(phase.job, k) for k in keys] if phase.partitioned else [(phase.job, None)]
    assert sensor_refreshed["launched"] == expected
    assert sensor_refreshed["ticks"][-1] == "no raw source changed"
    lake = Path(refreshed["lake"])
    _, _, third = refreshed["runs"]
    rows = sensor_refreshed["rows"]
    assert {key for key in rows if key[0] in PHASES[0].assets} == {(a, "chat") for a in PHASES[0].assets}
    built = {key for key, row in rows.items() if not row["reused"]}
    changed_upstream = {key for key, row in rows.items() if upstream_of(lake, row) != upstream_of(lake, third[key])}
    assert built == {("raw_documents", "chat")} | changed_upstream
    assert ("dataset_release", "_all") in built
    assert latest_release(lake).version == rows[("dataset_release", "_all")]["version"]


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    (tmp_path / "texts").mkdir()
    for name in ("a", "b"):
        (tmp_path / "texts" / f"{name}.txt").write_text(f"Text {name}. " * 50)
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": "One note. " * 30}) + "\n")
    manifest = tmp_path / "sources.yaml"
    manifest.write_text(
        "sources:\n"
        "  - {name: texts, kind: text_files, path: texts}\n"
        "  - {name: notes, kind: jsonl, path: notes.jsonl}\n"
        "  - {name: topics, kind: pydoc_topics}\n"
    )
    return manifest


def test_sensor_requests_exactly_the_changed_partition(sources: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    with dg.instance_for_test() as instance:
        first = sensor_tick(sources, lake, instance, None)  # nothing built yet: every source is due
        assert requested(first) == [("ingest", "texts"), ("ingest", "notes"), ("ingest", "topics")]
        tags = first.run_requests[0].tags
        assert tags[automation.PHASE_TAG] == "ingest"
        assert tags[automation.REFRESH_TAG].startswith("sensor-")
        assert len({r.run_key for r in first.run_requests}) == 3
        assert json.loads(first.cursor)["sources"]["texts"]["files"][str(tmp_path / "texts" / "a.txt")][2] is None

        quiet = sensor_tick(sources, lake, instance, first.cursor)
        assert requested(quiet) == []
        assert quiet.skip_message == "no raw source changed"
        assert quiet.cursor == first.cursor

        changed = tmp_path / "texts" / "b.txt"
        changed.write_text(changed.read_text() + "One more sentence.")
        after_edit = sensor_tick(sources, lake, instance, quiet.cursor)
        assert requested(after_edit) == [("ingest", "texts")]
        entry = json.loads(after_edit.cursor)["sources"]["texts"]["files"][str(changed)]
        assert entry[0] == changed.stat().st_size and entry[2] is not None  # the cursor advanced
        assert json.loads(after_edit.cursor)["sources"]["notes"] == json.loads(quiet.cursor)["sources"]["notes"]

        # Same bytes, new mtime: re-hashed, equal sha256, nothing requested; the cursor takes the new mtime.
        stat = changed.stat()
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        touched = sensor_tick(sources, lake, instance, after_edit.cursor)
        assert requested(touched) == []
        assert json.loads(touched.cursor)["sources"]["texts"]["files"][str(changed)][1] == changed.stat().st_mtime_ns

        (tmp_path / "texts" / "c.txt").write_text("A new file. " * 40)
        added = sensor_tick(sources, lake, instance, touched.cursor)
        assert requested(added) == [("ingest", "texts")]

        (tmp_path / "notes.jsonl").write_text(json.dumps({"text": "Another note. " * 30}) + "\n")
        assert requested(sensor_tick(sources, lake, instance, added.cursor)) == [("ingest", "notes")]


def test_sensor_waits_while_a_corpus_run_holds_the_lake(sources: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    with dg.instance_for_test() as instance, cli.run_lock(lake, wait=False):
        result = sensor_tick(sources, lake, instance, None)
    assert requested(result) == []
    assert "corpus run" in result.skip_message
    assert result.cursor is None  # nothing consumed: the change is still seen after the run


def test_chain_state_walks_the_phases_in_order() -> None:
    jobs = [p.job for p in PHASES]
    first, second = jobs[0], jobs[1]
    assert chain_state(jobs, []) == ChainState(None, True, "no runs")
    assert chain_state(jobs, [(first, "a", "SUCCESS"), (first, "b", "STARTED")]) == ChainState(
        None, False, f"{first}: 1 run(s) not finished"
    )
    both = [(first, "a", "SUCCESS"), (first, "b", "SUCCESS")]
    assert chain_state(jobs, both) == ChainState(1, False, f"{first} succeeded")
    failed = [(second, "", "FAILURE"), *both]
    assert chain_state(jobs, failed) == ChainState(None, True, f"failed in {second}")
    # Newest first: a re-executed run that succeeded replaces its failed original.
    assert chain_state(jobs, [(second, "", "SUCCESS"), *failed]) == ChainState(2, False, f"{second} succeeded")
    assert chain_state(jobs, [("old_job", "", "SUCCESS")]) == ChainState(
        None, True, "ran jobs that are no phase now: old_job"
    )
    done = [(job, "", "SUCCESS") for job in jobs]
    assert chain_state(jobs, done) == ChainState(None, True, "complete")


def add_runs(instance: dg.DagsterInstance, refresh: str, phase: str, runs: list[tuple[str | None, str]]) -> list[str]:
    """Record finished or running runs of a refresh phase, as (partition, status), oldest first."""
    ids = []
    for partition, status in runs:
        tags = {automation.REFRESH_TAG: refresh, automation.PHASE_TAG: phase, automation.MARK_TAG: "true"}
        if partition:
            tags["dagster/partition"] = partition
        run = dg.DagsterRun(job_name=phase, tags=tags, status=dg.DagsterRunStatus(status))
        ids.append(instance.add_run(run).run_id)
    return ids


def test_sensor_carries_a_refresh_through_the_phases(sources: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    keys = ["texts", "notes", "topics"]
    with dg.instance_for_test() as instance:
        _, started = add_runs(instance, "r1", PHASES[0].job, [("texts", "SUCCESS"), ("notes", "STARTED")])
        waiting = sensor_tick(sources, lake, instance, None)
        assert requested(waiting) == []
        assert waiting.skip_message == f"refresh r1 unfinished: {PHASES[0].job}: 1 run(s) not finished"
        assert waiting.cursor is None
        for number, phase in enumerate(PHASES[:-1]):
            if number:
                add_runs(instance, "r1", phase.job, [(k, "SUCCESS") for k in (keys if phase.partitioned else [None])])
            else:  # the started run finishes: the first phase is done
                instance.delete_run(started)
                add_runs(instance, "r1", phase.job, [("notes", "SUCCESS")])
            result = sensor_tick(sources, lake, instance, None)
            nxt = PHASES[number + 1]
            assert requested(result) == ([(nxt.job, k) for k in keys] if nxt.partitioned else [(nxt.job, None)])
            assert {r.tags[automation.REFRESH_TAG] for r in result.run_requests} == {"r1"}
            assert {r.tags[automation.PHASE_TAG] for r in result.run_requests} == {nxt.job}
        add_runs(instance, "r1", PHASES[-1].job, [(None, "SUCCESS")])
        finished = sensor_tick(sources, lake, instance, None)  # the refresh is complete: back to watching files
        assert requested(finished) == [("ingest", k) for k in keys]  # nothing built in this lake yet
        add_runs(instance, "r2", PHASES[0].job, [("texts", "FAILURE")])
        after_failure = sensor_tick(sources, lake, instance, finished.cursor)
        assert requested(after_failure) == []
        assert after_failure.skip_message == "no raw source changed"


def test_schedule_refreshes_every_source(sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = tmp_path / "lake"
    defs = build_definitions(sources, lake)
    schedule = defs.resolve_schedule_def("refresh_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert defs.resolve_sensor_def("refresh_sensor").default_status == dg.DefaultSensorStatus.STOPPED
    resources = {"pipeline": PipelineResource(sources=str(sources), lake=str(lake))}
    with dg.instance_for_test() as instance:
        when = dt.datetime(2026, 1, 2, 3, 0, tzinfo=dt.UTC)
        context = dg.build_schedule_context(
            instance=instance,
            resources=resources,
            scheduled_execution_time=when,
            repository_def=defs.get_repository_def(),
        )
        result = schedule.evaluate_tick(context)
    assert {r.tags[automation.REFRESH_TAG] for r in result.run_requests} == {"schedule-20260102T030000Z"}
    assert [(r.job_name, r.partition_key) for r in result.run_requests] == [
        ("ingest", "texts"),
        ("ingest", "notes"),
        ("ingest", "topics"),
    ]
    monkeypatch.setenv(automation.ENV_CRON, "*/30 * * * *")
    assert build_definitions(sources, lake).resolve_schedule_def("refresh_schedule").cron_schedule == "*/30 * * * *"
    monkeypatch.setenv(automation.ENV_CRON, "every day")
    with pytest.raises(ValueError, match="CORPUS_REFRESH_CRON='every day'"):
        build_definitions(sources, lake)


def test_sensor_hashes_only_files_that_moved(sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = tmp_path / "lake"
    hashed: list[Path] = []
    original = automation._sha256
    monkeypatch.setattr(automation, "_sha256", lambda path: hashed.append(path) or original(path))
    with dg.instance_for_test() as instance:
        first = sensor_tick(sources, lake, instance, None)
        quiet = sensor_tick(sources, lake, instance, first.cursor)
        assert hashed == []  # first sight and an unchanged listing hash nothing
        moved = tmp_path / "texts" / "a.txt"
        moved.write_text(moved.read_text() + ".")
        sensor_tick(sources, lake, instance, quiet.cursor)
    assert hashed == [moved]
