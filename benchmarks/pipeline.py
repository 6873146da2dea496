"""`corpus run` end to end, twice on one fresh lake: wall time per asset, peak RSS, same release both times.

Each run is a child process (`python -m orchestration.cli run`); its peak RSS is the child's own
`ru_maxrss` from wait4(2) (RUSAGE_CHILDREN would give the maximum over both runs): the largest single
process, its `--workers` included. The RSS sampler sums VmRSS over the child and every process below it
(the workers of `--workers N`), every 0.1 s: `peak_tree_rss_mib`, the memory the whole run held. Per-asset wall time
comes from the lake's Dagster instance (`<lake>/dagster_home`): the step stats of every run that the
`corpus run` started, summed over source partitions; `reused` counts the partitions whose materialization
says it returned a remembered version instead of recomputing (the lake's input memos). What a run spends
outside steps (interpreter and Dagster start-up, run bookkeeping, the closing report) is `outside steps`.

Run: `.venv/bin/python benchmarks/pipeline.py [--sources FILE] [--runs N] [--lake DIR] [--workers N]` (default: the
embedded corpus, data/sources.yaml, into a fresh temporary lake; ~2 minutes a cold run on 2 CPU cores).
Writes benchmarks/results/pipeline.json. `benchmarks/scale.py` reuses `timed_run`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus.release import latest_release  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CLI_TAG = "corpus/cli"


@dataclass
class AssetTime:
    seconds: float = 0.0
    partitions: int = 0
    reused: int = 0
    peak_rss_mib: float | None = None  # the highest sampled RSS (run + workers) while one of its steps ran


@dataclass
class RunFigures:
    """One `corpus run`: its wall time, the child's peak RSS, time per asset, the release it made."""

    wall_s: float
    cpu_s: float  # the child's user + system CPU time: steadier than wall time on a shared machine
    peak_rss_mib: float
    returncode: int
    load_before: float  # 1-minute load average when the run started and ended (other work on the machine)
    load_after: float
    release: str | None
    assets: dict[str, AssetTime] = field(default_factory=dict)
    dagster_runs: int = 0
    output_tail: str = ""
    workers: int | None = None  # `corpus run --workers`; None: the command's default (usable CPUs)
    phases: dict[str, float] = field(default_factory=dict)  # phase job -> first run start to last run end, s
    peak_tree_rss_mib: float | None = None  # the highest sampled sum of RSS over the run and its workers

    @property
    def steps_s(self) -> float:
        return sum(a.seconds for a in self.assets.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps_s"] = round(self.steps_s, 3)
        out["outside_steps_s"] = round(self.wall_s - self.steps_s, 3)
        out["wall_s"] = round(self.wall_s, 3)
        out["cpu_s"] = round(self.cpu_s, 3)
        out["peak_rss_mib"] = round(self.peak_rss_mib, 1)
        if self.peak_tree_rss_mib is not None:
            out["peak_tree_rss_mib"] = round(self.peak_tree_rss_mib, 1)
        out["assets"] = {k: {**asdict(v), "seconds": round(v.seconds, 3)} for k, v in self.assets.items()}
        return out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("CORPUS_LAKE", "CORPUS_SOURCES", "DAGSTER_HOME"):
        env.pop(name, None)
    return env


def dagster_run_ids(lake: Path) -> set[str]:
    home = lake / "dagster_home"
    if not (home / "dagster.yaml").exists():
        return set()
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home))
    return {run.run_id for run in instance.get_runs(filters=dg.RunsFilter(tags={CLI_TAG: "run"}))}


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc/<pid>/task/<tid>/children); [pid] where that is missing."""
    out, stack = [], [pid]
    while stack:
        current = stack.pop()
        out.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                stack.extend(int(child) for child in children.read_text().split())
            except (OSError, ValueError):
                continue
    return out


def rss_mib(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


class RssSampler(threading.Thread):
    """Sums VmRSS over a process and its descendants every `interval` s, so each step's peak can be read off."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (epoch seconds, MiB over the process tree)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            own = rss_mib(self.pid)
            if own is None:
                return
            others = (rss_mib(child) for child in process_tree(self.pid)[1:])
            self.samples.append((time.time(), own + sum(m for m in others if m is not None)))
            self.done.wait(self.interval)

    @property
    def highest(self) -> float | None:
        return max((mib for _, mib in self.samples), default=None)

    def peak(self, windows: Sequence[tuple[float, float]]) -> float | None:
        inside = [mib for t, mib in self.samples if any(start <= t <= end for start, end in windows)]
        return max(inside) if inside else None


def phase_walls(lake: Path, run_ids: set[str]) -> dict[str, float]:
    """Wall time per phase job: from its first run's start to its last run's end (partitions side by side
    with `--workers` overlap, so this, not the summed step time, is what they cost)."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(lake / "dagster_home"))
    spans: dict[str, tuple[float, float]] = {}
    for record in instance.get_run_records(filters=dg.RunsFilter(run_ids=sorted(run_ids))):
        if record.start_time is None or record.end_time is None:
            continue
        job = record.dagster_run.job_name
        start, end = spans.get(job, (record.start_time, record.end_time))
        spans[job] = (min(start, record.start_time), max(end, record.end_time))
    return {job: round(end - start, 3) for job, (start, end) in sorted(spans.items(), key=lambda item: item[1][0])}


def asset_times(lake: Path, run_ids: set[str], rss: RssSampler | None = None) -> dict[str, AssetTime]:
    """Step wall time per asset over the given Dagster runs (one run per phase and source partition)."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(lake / "dagster_home"))
    out: dict[str, AssetTime] = {}
    windows: dict[str, list[tuple[float, float]]] = {}
    for run_id in sorted(run_ids):
        for stats in instance.get_run_step_stats(run_id):
            if stats.start_time is None or stats.end_time is None:
                continue
            entry = out.setdefault(stats.step_key, AssetTime())
            entry.seconds += stats.end_time - stats.start_time
            windows.setdefault(stats.step_key, []).append((stats.start_time, stats.end_time))
            entry.partitions += 1
            for event in stats.materialization_events:
                materialization = event.asset_materialization
                reused = materialization.metadata.get("reused") if materialization else None
                if reused is not None and bool(reused.value):
                    entry.reused += 1
                    break
    if rss is not None:
        for name, entry in out.items():
            entry.peak_rss_mib = rss.peak(windows[name])
    # In pipeline order: by the first start of each asset's steps.
    return dict(sorted(out.items(), key=lambda item: min(start for start, _ in windows[item[0]])))


def timed_run(sources: Path, lake: Path, cpus: str | None = None, workers: int | None = None) -> RunFigures:
    """`corpus run --sources --lake [--workers]` in a child process (pinned to `cpus` with taskset when given)."""
    before = dagster_run_ids(lake)
    command = [sys.executable, "-m", "orchestration.cli", "run", "--sources", str(sources), "--lake", str(lake)]
    if workers is not None:
        command += ["--workers", str(workers)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    log = Path(tempfile.mkstemp(prefix="corpus-run-", suffix=".log")[1])
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    sampler = RssSampler(proc.pid)
    sampler.start()
    # wait4 gives this child's own rusage; ru_maxrss is in KiB on Linux.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
    log.unlink()
    try:
        release: str | None = latest_release(lake).version if proc.returncode == 0 else None
    except Exception:
        release = None
    run_ids = dagster_run_ids(lake) - before
    return RunFigures(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024,
        returncode=proc.returncode,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        release=release,
        assets=asset_times(lake, run_ids, sampler) if run_ids else {},
        dagster_runs=len(run_ids),
        output_tail=tail if proc.returncode else "",
        workers=workers,
        peak_tree_rss_mib=sampler.highest,
        phases=phase_walls(lake, run_ids) if run_ids else {},
    )


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
    }


def format_table(runs: Sequence[RunFigures], labels: Sequence[str]) -> str:
    """Per asset and run: step seconds (summed over partitions), highest sampled RSS, partitions reused."""
    names = list(dict.fromkeys(name for run in runs for name in run.assets))
    width = 30
    header = f"{'asset':<26}" + "".join(f"{label:>{width}}" for label in labels)
    lines = [header, f"{'':<26}" + f"{'s   RSS MiB  reused':>{width}}" * len(runs), "-" * len(header)]
    for name in names:
        cells = []
        for run in runs:
            a = run.assets.get(name)
            if a is None:
                cells.append("-")
                continue
            rss = "-" if a.peak_rss_mib is None else f"{a.peak_rss_mib:.0f}"
            cells.append(f"{a.seconds:8.2f} {rss:>8} {a.reused:>3}/{a.partitions}")
        lines.append(f"{name:<26}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("-" * len(header))
    for title, values in (
        ("all steps", [f"{r.steps_s:8.2f} s" for r in runs]),
        ("outside steps", [f"{r.wall_s - r.steps_s:8.2f} s" for r in runs]),
        ("total wall", [f"{r.wall_s:8.2f} s" for r in runs]),
        ("CPU (user + sys)", [f"{r.cpu_s:8.2f} s" for r in runs]),
        ("load avg before/after", [f"{r.load_before:.1f}/{r.load_after:.1f}" for r in runs]),
        ("peak RSS (wait4)", [f"{r.peak_rss_mib:8.0f} MiB" for r in runs]),
        ("peak RSS, run + workers", [f"{r.peak_tree_rss_mib or 0:8.0f} MiB" for r in runs]),
        *((f"phase {job} wall", [f"{r.phases.get(job, 0):8.2f} s" for r in runs]) for job in runs[0].phases),
        ("release", [(r.release or "FAILED")[:16] for r in runs]),
    ):
        lines.append(f"{title:<26}" + "".join(f"{v:>{width}}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default=str(ROOT / "data" / "sources.yaml"), help="sources manifest")
    parser.add_argument("--runs", type=int, default=2, help="runs on the same lake (default 2)")
    parser.add_argument("--lake", help="lake directory (default: a fresh temporary one, removed afterwards)")
    parser.add_argument("--workers", type=int, help="corpus run --workers (default: the command's, usable CPUs)")
    parser.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    args = parser.parse_args(argv)
    sources = Path(args.sources).resolve()
    lake = Path(args.lake).resolve() if args.lake else Path(tempfile.mkdtemp(prefix="corpus-bench-")) / "lake"
    fresh = args.lake is None or not lake.exists()
    runs: list[RunFigures] = []
    try:
        for number in range(1, args.runs + 1):
            print(f"run {number}/{args.runs}: corpus run --sources {sources} --lake {lake}", flush=True)
            figures = timed_run(sources, lake, workers=args.workers)
            runs.append(figures)
            if figures.returncode:
                print(figures.output_tail, file=sys.stderr)
                return 1
    finally:
        if args.lake is None:
            shutil.rmtree(lake.parent, ignore_errors=True)
    labels = [f"run {i}" for i in range(1, len(runs) + 1)]
    print(format_table(runs, labels))
    same = len({r.release for r in runs}) == 1
    print(f"same release every run: {same}")
    result = {
        "benchmark": "pipeline",
        "machine": machine(),
        "sources": str(sources.relative_to(ROOT) if sources.is_relative_to(ROOT) else sources),
        "fresh_lake": fresh,
        "workers": args.workers,
        "runs": [r.to_dict() for r in runs],
        "same_release": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
