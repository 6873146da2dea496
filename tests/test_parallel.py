"""`corpus run --workers N`: per-source partitions side by side, the same bytes as one at a time.

Runs test_pipeline's tiny corpus (4 sources) with 4 workers (every partition of a phase at once, all
sharing one SQLite Dagster instance) and with 1 (today's one-after-another, in-process), into two lakes,
and compares them file by file; then breaks one source and checks that the phase fails naming that
partition and leaves nothing half-written; then kills a `corpus run` (and only it) and checks that its
workers do not outlive it.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from test_crash import crash_manifest  # pytest's default (prepend) import mode puts tests/ on sys.path

from corpus.audit import verify
from corpus.lake import MANIFEST, Lake, read_version
from corpus.release import latest_release, lineage
from orchestration import cli
from orchestration.definitions import PHASES

REPO = Path(__file__).resolve().parent.parent
EXIT_WAIT_S = 30.0  # a killed run's workers must be gone by then (PDEATHSIG makes it immediate on Linux)


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def lakes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("parallel")
    manifest = crash_manifest(root)
    for name, workers in (("parallel", "4"), ("sequential", "1")):
        assert run_cli("run", "--sources", str(manifest), "--lake", str(root / name), "--workers", workers) == 0
    return manifest, root / "parallel", root / "sequential"


def all_versions(lake: Path) -> list[Path]:
    return sorted(p.parent for p in lake.glob(f"*/*/*/{MANIFEST}"))


def test_parallel_run_is_byte_identical_to_sequential(lakes: tuple[Path, Path, Path]) -> None:
    _, parallel, sequential = lakes
    release = latest_release(parallel)
    assert release.version == latest_release(sequential).version
    versions = lineage(Lake(parallel), [release])
    assert {v.partition for v in versions if v.asset == "raw_documents"} == {"docs", "books", "chat", "web"}
    for va in versions:
        vb = read_version(sequential / va.asset / va.partition / va.version / MANIFEST)
        assert va.manifest == vb.manifest
        for name in va.files:
            assert (va.path / name).read_bytes() == (vb.path / name).read_bytes(), f"{va.path / name}"
    # Nothing else was written either: the same version directories in both lakes. The smoke training's
    # result.json records timings (tokens/s, peak memory), so its version (and the scan's) differs by run.
    timed = ("smoke_training", "poisoning_scan")
    assert [p.relative_to(parallel) for p in all_versions(parallel) if p.parts[-3] not in timed] == [
        p.relative_to(sequential) for p in all_versions(sequential) if p.parts[-3] not in timed
    ]
    assert verify(parallel).ok


def test_concurrent_runs_leave_the_dagster_instance_whole(lakes: tuple[Path, Path, Path]) -> None:
    _, parallel, _ = lakes
    instance = dg.DagsterInstance.from_config(str(parallel / "dagster_home"))
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"corpus/cli": "run"}))
    sources = ["docs", "books", "chat", "web"]
    expected = sum(len(sources) if phase.partitioned else 1 for phase in PHASES)
    assert Counter(run.status for run in runs) == {dg.DagsterRunStatus.SUCCESS: expected}
    by_job = Counter(run.job_name for run in runs)
    assert all(by_job[phase.job] == (len(sources) if phase.partitioned else 1) for phase in PHASES)
    for phase in PHASES:
        if not phase.partitioned:
            continue
        for asset in phase.assets:
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
            partitions = [r.asset_materialization.partition for r in records if r.asset_materialization]
            assert sorted(partitions) == sorted(sources), asset
            # Each materialization's version is the lake's: the index rows and event logs agree.
            for record in records:
                materialization = record.asset_materialization
                assert materialization is not None
                version = str(materialization.metadata["version"].value)
                assert (parallel / asset / str(materialization.partition) / version / MANIFEST).is_file()


def test_second_parallel_run_reuses_everything(lakes: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    manifest, parallel, _ = lakes
    before = latest_release(parallel).version
    assert run_cli("run", "--sources", str(manifest), "--lake", str(parallel), "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "2 workers for per-source phases" in out and "ingest: 4 partitions, 2 at a time" in out
    assert latest_release(parallel).version == before


def test_a_failing_partition_fails_the_phase_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = crash_manifest(tmp_path)
    (tmp_path / "web.parquet").write_bytes(b"not a parquet file")
    lake = tmp_path / "lake"
    assert run_cli("run", "--sources", str(manifest), "--lake", str(lake), "--workers", "2") == 1
    err = capsys.readouterr().err
    assert "ingest[web] failed (run " in err and "web.parquet is not a readable Parquet file" in err, err
    assert "ingest[docs]" not in err and "reference" not in err
    # The others are whole or absent: every version directory holds a complete version, no temporary is left.
    assert not list(lake.glob(f"*/web/*/{MANIFEST}"))
    for path in all_versions(lake):
        assert list(read_version(path / MANIFEST).check_files()) == []
    assert not list(lake.rglob(".tmp-*"))
    assert not (lake / "reference_model").exists()  # the phase failed, so no later phase started


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_pids(parent: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the workers")
def test_workers_die_with_a_killed_run(tmp_path: Path) -> None:
    manifest = crash_manifest(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("CORPUS_LAKE", "CORPUS_SOURCES", "DAGSTER_HOME")}
    command = [sys.executable, "-m", "orchestration.cli", "run", "--sources", str(manifest), "--lake"]
    proc = subprocess.Popen(
        [*command, str(tmp_path / "lake"), "--workers", "2"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            # spawn's resource tracker is a child too: the workers are the children running the pool's entry.
            workers = [
                pid
                for pid in child_pids(proc.pid)
                if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            time.sleep(0.1)
        assert len(workers) == 2, f"no 2 workers seen (run exited with {proc.poll()})"
        proc.send_signal(signal.SIGKILL)  # the run only, not its process group
        proc.wait()
        deadline = time.monotonic() + EXIT_WAIT_S
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in workers if running(pid)]
        assert alive == [], f"workers {alive} outlived the killed run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
