"""Crash safety of `corpus run`: SIGKILL at random moments, a full disk, two runs on one lake at once.

Each real run is a child process (`python -m orchestration.cli run`) in its own process group, on the
tiny corpus of test_pipeline with a 4-step smoke training, so one run takes ~13 s on 2 idle CPU cores.
The kill test draws 20 kill times with a seeded RNG, one in each twentieth of the measured duration of
an uninterrupted run (so every stage gets hit). Two lanes side by side (one lake each) kill a run at
each time, alternately a first run on a fresh lake and a full recompute over a complete lake, then run
again to completion and check the release, `corpus verify`, the run lock and that no temporary
directory is left."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pipeline import tiny_manifest  # pytest's default (prepend) import mode puts tests/ on sys.path

from corpus.audit import verify
from corpus.lake import INPUTS, VersionWriter
from corpus.release import latest_release
from orchestration import cli
from orchestration.automation import run_lock_held

REPO = Path(__file__).resolve().parent.parent
TRAINING = (
    "{steps: 4, batch_size: 2, d_model: 16, n_layers: 1, n_heads: 2, learning_rate: 0.02, min_loss_drop: 0.01, "
    "eval_batches: 1, scan_samples: 4, scan_chunk_size: 4}"
)
TRIALS = 20
LANES = 2  # two lakes killed and re-run side by side (2 CPU cores): about half the wall time
SEED = 20241126
RUN_TIMEOUT_S = 600  # a guard against a hung child; one run takes ~13 s here
PROGRESS = re.compile(r"\[(\d+)/(\d+)\] (\S+)")


def crash_manifest(root: Path) -> Path:
    """test_pipeline's tiny corpus with a 4-step smoke training and a 4-sample scan (~13 s a run)."""
    manifest = tiny_manifest(root)
    text = manifest.read_text()
    start = text.index("  training: {")
    end = text.index("\n", start)
    manifest.write_text(text[:start] + "  training: " + TRAINING + text[end:])
    return manifest


def run_command(manifest: Path, lake: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "run", "--sources", str(manifest), "--lake", str(lake), *extra]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("CORPUS_LAKE", "CORPUS_SOURCES", "DAGSTER_HOME"):
        env.pop(name, None)
    return env


def start_run(manifest: Path, lake: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            run_command(manifest, lake, *extra),
            cwd=REPO,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL reaches anything it started
        )


def run_to_end(manifest: Path, lake: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_command(manifest, lake, *extra),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def leftovers(lake: Path) -> list[str]:
    """Temporary version directories (and release pointers) a writer left behind."""
    found = list(lake.rglob(".tmp-*"))  # version directories and releases/.tmp-<pid>-LATEST alike
    return sorted(str(p.relative_to(lake)) for p in found)


def jsonl_intact(lake: Path) -> list[str]:
    """Lines of the lake's append-only logs (release history, OpenLineage events) that a kill tore."""
    torn = []
    for name in ("releases/history.jsonl", "lineage/openlineage.jsonl"):
        path = lake / name
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines() if path.exists() else [], 1):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                torn.append(f"{path}:{number}: {line[:80]}")
    return torn


def stage_at_kill(log: Path) -> str:
    """The last progress step the child had printed when it died ('start' before the first)."""
    matches = PROGRESS.findall(log.read_text(encoding="utf-8", errors="replace"))
    return matches[-1][2] if matches else "start"


@dataclass(frozen=True)
class Baseline:
    manifest: Path
    lake: Path
    version: str
    duration_s: float


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """Uninterrupted runs, one per lane at once: the release every lake must end up at, and a run's duration.

    Run side by side like the kill trials, so the duration is measured under the same CPU contention.
    """
    root = tmp_path_factory.mktemp("crash")
    manifest = crash_manifest(root / "corpus")
    lakes = [root / f"reference-{lane}" for lane in range(LANES)]

    def timed(lake: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
        started = time.monotonic()
        done = run_to_end(manifest, lake)
        return time.monotonic() - started, done

    with ThreadPoolExecutor(LANES) as pool:
        outcomes = list(pool.map(timed, lakes))
    for lake, (_, done) in zip(lakes, outcomes, strict=True):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert verify(lake).ok
    versions = {latest_release(lake).version for lake in lakes}
    assert len(versions) == 1, f"uninterrupted runs on {LANES} fresh lakes gave {versions}"
    return Baseline(manifest, lakes[0], versions.pop(), max(duration for duration, _ in outcomes))


def forget_memos(lake: Path) -> None:
    """Remove the lake's input memos (documented as a pure shortcut), so the next run recomputes every stage."""
    for memo_dir in [p for p in lake.rglob(INPUTS) if p.is_dir()]:
        shutil.rmtree(memo_dir)


def lock_holders(path: Path) -> list[str]:
    """'pid: command line' of the processes /proc/locks names as holding a flock on `path` (Linux)."""
    inode = path.stat().st_ino
    holders = []
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ["(no /proc/locks)"]
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            pid = fields[4]
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                command = "(gone)"
            holders.append(f"{pid}: {command}")
    return holders


def kill_and_rerun(baseline: Baseline, lake: Path, logs: Path, trials: list[tuple[int, float]]) -> list[str]:
    """One lane: for each (trial, kill time) start a run, SIGKILL it then, re-run to the end, check the lake.

    Every killed run does real work: a lane's trials alternate between a fresh lake (a first run, killed)
    and the complete lake the trial before left, with its input memos removed (a recompute over a release,
    killed). The re-run after the kill may reuse whatever the killed run finished. Returns the step each
    run was in when killed ("finished" when it ended first).
    """
    stages = []
    for position, (trial, kill_at) in enumerate(trials):
        if position % 2 == 0:
            shutil.rmtree(lake, ignore_errors=True)
        else:
            forget_memos(lake)
        log = logs / f"trial-{trial:02d}.log"
        proc = start_run(baseline.manifest, lake, log)
        try:
            proc.wait(timeout=kill_at)
            stage = "finished"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stage = stage_at_kill(log)
        stages.append(stage)
        where = f"trial {trial} on {lake}: kill at {kill_at:.2f} s ({stage})"
        # proc.wait() reaps the run itself; its other processes (workers die by PDEATHSIG) may still be
        # exiting, and the kernel releases the lock when the last of them has closed it: allow them 10 s.
        deadline = time.monotonic() + 10.0
        while run_lock_held(lake) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not run_lock_held(lake), (
            f"{where}: {lake / '.run.lock'} still locked 10 s after SIGKILL by {lock_holders(lake / '.run.lock')}"
        )
        rerun = run_to_end(baseline.manifest, lake)
        assert rerun.returncode == 0, f"{where}: the next run failed:\n{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
        assert latest_release(lake).version == baseline.version, where
        result = verify(lake)
        assert result.ok, f"{where}: {result.problems}"
        assert leftovers(lake) == [], where
        assert jsonl_intact(lake) == [], where
    return stages


def test_sigkill_at_random_moments_then_rerun_gives_the_same_release(
    baseline: Baseline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    # Stratified: kill time i falls in the i-th twentieth of a run, so kills spread over every stage.
    times = [baseline.duration_s * (i + rng.random()) / TRIALS for i in range(TRIALS)]
    rng.shuffle(times)  # fresh-lake and recompute trials both get early and late kills
    lanes = [(tmp_path / f"lake-{lane}", list(enumerate(times))[lane::LANES]) for lane in range(LANES)]
    with ThreadPoolExecutor(LANES) as pool:
        futures = [pool.submit(kill_and_rerun, baseline, lake, tmp_path, trials) for lake, trials in lanes]
        stages = [stage for future in futures for stage in future.result()]
    killed = sum(stage != "finished" for stage in stages)
    with capsys.disabled():
        print(f"\n{killed}/{TRIALS} runs killed (a run ~{baseline.duration_s:.1f} s); at: {dict(Counter(stages))}")
    # Another load on the machine can make later runs faster than the measured one; most are still killed.
    assert killed >= TRIALS // 4, f"only {killed} of {TRIALS} runs were still running at their kill time"


FAULTS = [
    # (asset, file, errno): a write fails in the middle of a stage (pyarrow's writer, a Python file object), or
    # a file cannot be opened.
    ("filtered_documents", "documents.parquet", errno.ENOSPC),
    ("tokenized_documents", "tokens.bin", errno.ENOSPC),
    ("dataset_release", "release.json", errno.EACCES),
]


def test_disk_full_or_denied_keeps_the_previous_release(
    baseline: Baseline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(baseline.lake, lake)
    before = (lake / "releases" / "LATEST").read_bytes()
    # New input (one more book) so every stage has a new version to write.
    manifest = crash_manifest(tmp_path / "corpus")
    (manifest.parent / "books" / "extra.txt").write_text("The reading room will stay open until nine. " * 40)
    original_path = VersionWriter.path
    for asset, name, code in FAULTS:

        def faulty_path(self: VersionWriter, file: str, asset: str = asset, name: str = name, code: int = code) -> Path:
            target = original_path(self, file)
            if self.asset == asset and file == name:
                if code == errno.ENOSPC:
                    target.symlink_to("/dev/full")  # every write(2) into it fails with ENOSPC, as on a full disk
                else:
                    raise PermissionError(code, os.strerror(code), str(target))
            return target

        monkeypatch.setattr(VersionWriter, "path", faulty_path)
        # --workers 1: the fault is patched into this process, so its runs must execute here, not in workers.
        assert cli.main(["run", "--sources", str(manifest), "--lake", str(lake), "--workers", "1"]) == 1
        err = capsys.readouterr().err
        # write(2) names no file: the error must say which version was being written, and where.
        assert os.strerror(code) in err and f"writing a version of {asset}[" in err, err
        assert f"{lake / asset}/" in err and "the previous version stays current" in err, err
        assert (lake / "releases" / "LATEST").read_bytes() == before
        assert latest_release(lake).version == baseline.version
        assert verify(lake).ok
        assert leftovers(lake) == []
        monkeypatch.setattr(VersionWriter, "path", original_path)
    assert cli.main(["run", "--sources", str(manifest), "--lake", str(lake)]) == 0
    assert latest_release(lake).version != baseline.version
    assert verify(lake).ok
    assert leftovers(lake) == []


def wait_for_lock_holder(lake: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until `proc` has written its pid into the run lock (60 s at most)."""
    path = lake / ".run.lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip() == str(proc.pid):
            return
        assert proc.poll() is None, f"run exited with {proc.returncode} before taking the lock:\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"pid {proc.pid} did not take {path} within 60 s")


def test_two_runs_at_once_one_fails_naming_the_other(baseline: Baseline, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(baseline.lake, lake)
    first = start_run(baseline.manifest, lake, tmp_path / "first.log")
    waiter: subprocess.Popen[bytes] | None = None
    try:
        wait_for_lock_holder(lake, first, tmp_path / "first.log")
        # Freeze the holder so the second run surely meets the lock, however loaded the machine is.
        os.killpg(first.pid, signal.SIGSTOP)
        second = run_to_end(baseline.manifest, lake)
        assert second.returncode == 1
        assert f"another `corpus run` (pid {first.pid}) is writing to {lake}" in second.stderr
        waiter = start_run(baseline.manifest, lake, tmp_path / "waiter.log", "--wait")
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "first.log").read_text()
        assert waiter.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "waiter.log").read_text()
    finally:
        for proc in (first, waiter):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert latest_release(lake).version == baseline.version
    assert verify(lake).ok
    assert leftovers(lake) == []
    assert not run_lock_held(lake)
