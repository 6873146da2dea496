"""SlidingWindowDataset against the seed's list-of-tensors GPTDatasetV1 on >= 1M real GPT-2 tokens.

The token stream is the Python standard library's .py sources (sorted paths, `<|endoftext|>` between
files) until at least 1M tokens. Each (implementation, stride) runs in a fresh child process that loads
the tokens, records ru_maxrss as its baseline, builds the dataset (construction time, peak RSS delta),
then iterates loaders (batch_size 8, shuffle=False, num_workers=0) over 20k samples: each project's
create_dataloader DataLoader (the seed's with default_collate, ours with collate_windows), ours under
plain default_collate, and ShardLoader. Every loader's batches are hashed (untimed), and the parent
checks that all of them served tensors identical to the seed's.

The parent imports neither numpy nor torch and tokenizes in a child too: on Linux a process's
ru_maxrss never drops below the RSS of the image it was exec'ed from, so a heavy parent would hide
every child's growth below its own size. Run: `.venv/bin/python benchmarks/windows.py`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIN_TOKENS = 1_000_000
MAX_LENGTH = 256
STRIDES = (1, 256)
BATCH_SIZE = 8
SAMPLES = 20_000
REPEATS = 3
RUNS = ("seed", "ours", "ours-memmap")
LOADERS = ("dataloader", "dataloader_default_collate", "shard_loader")


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def vmrss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Make ru_maxrss - baseline see what the dataset adds (Linux, glibc); True when the reset took.

    Two blind spots otherwise: heap memory freed earlier (importing torch, the token list's temporaries)
    stays resident and is reused without raising RSS (it hid the seed's ~21 MiB at stride 256), and an
    earlier transient peak above the current RSS hides growth below it. malloc_trim(0) hands free heap
    pages back to the kernel; writing 5 to /proc/self/clear_refs (Linux >= 4.0) resets the peak to now.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except (OSError, AttributeError):
        return False
    return maxrss_kib() <= vmrss_kib() + 1024


def tokenize(token_file: str) -> dict[str, Any]:
    """Child: GPT-2 tokens of the stdlib's .py files in sorted path order, EOT after each, until >= MIN_TOKENS."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from corpus.tokenizer import ENDOFTEXT, EOT_ID, get_encoding

    start = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    enc = get_encoding("gpt2")
    ids: list[int] = []
    files = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        ids.extend(enc.encode(path.read_text(encoding="utf-8", errors="replace"), allowed_special={ENDOFTEXT}))
        ids.append(EOT_ID)
        files += 1
        if len(ids) >= MIN_TOKENS:
            break
    assert len(ids) >= MIN_TOKENS, f"only {len(ids)} tokens in {files} files under {stdlib}"
    tokens = np.asarray(ids, dtype="<u2")  # GPT-2 ids < 50,257 fit uint16
    tokens.tofile(token_file)
    return {
        "what": "Python stdlib .py files, sorted paths, <|endoftext|> after each, GPT-2 BPE",
        "stdlib": str(stdlib),
        "files": files,
        "tokens": len(tokens),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "tokenize_s": time.perf_counter() - start,
    }


def measure(run: str, stride: int, token_file: str) -> dict[str, Any]:
    """Child: one (implementation, stride) measurement in this fresh process."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from corpus.loader import ShardLoader
    from corpus.windows import SlidingWindowDataset, collate_windows

    class SeedGPTDatasetV1(torch.utils.data.Dataset):  # type: ignore[type-arg]
        """The seed's algorithm, given the token list instead of text (tokenizing is timed for neither)."""

        def __init__(self, token_ids: list[int], max_length: int, stride: int) -> None:
            self.input_ids = []
            self.target_ids = []
            for i in range(0, len(token_ids) - max_length, stride):
                self.input_ids.append(torch.tensor(token_ids[i : i + max_length]))
                self.target_ids.append(torch.tensor(token_ids[i + 1 : i + max_length + 1]))

        def __len__(self) -> int:
            return len(self.input_ids)

        def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.input_ids[idx], self.target_ids[idx]

    def iterate(loader: Any) -> float:
        """Samples per second serving SAMPLES samples (epochs repeat as needed); best of REPEATS passes."""
        best = 0.0
        for _ in range(REPEATS):
            if isinstance(loader, ShardLoader):
                loader.set_epoch(0)  # it resumes where it stopped otherwise
            served = 0
            start = time.perf_counter()
            while served < SAMPLES:
                for batch in loader:
                    served += len(batch[0])
                    if served >= SAMPLES:
                        break
            best = max(best, served / (time.perf_counter() - start))
        return best

    def digest(loader: Any) -> str:
        """sha256 over the first SAMPLES samples' inputs and targets as served (untimed)."""
        hasher = hashlib.sha256()
        if isinstance(loader, ShardLoader):
            loader.set_epoch(0)
        served = 0
        while served < SAMPLES:
            for inputs, targets in loader:
                assert inputs.dtype == targets.dtype == torch.int64, f"{inputs.dtype}, {targets.dtype}"
                hasher.update(inputs.numpy().tobytes())
                hasher.update(targets.numpy().tobytes())
                served += len(inputs)
                if served >= SAMPLES:
                    break
        return hasher.hexdigest()

    def build() -> Any:
        if run == "seed":
            return SeedGPTDatasetV1(source, MAX_LENGTH, stride)
        if run == "ours":
            return SlidingWindowDataset(source, MAX_LENGTH, stride, warn_overlap=False)
        return SlidingWindowDataset.from_file(token_file, MAX_LENGTH, stride, warn_overlap=False)

    if run == "seed":
        source: Any = np.fromfile(token_file, dtype="<u2").tolist()  # the seed's tokenizer output: list[int]
    elif run == "ours":
        source = np.fromfile(token_file, dtype="<u2")
    else:
        source = None
    gc.collect()
    peak_reset = reset_peak_rss()
    baseline = maxrss_kib()
    start = time.perf_counter()
    dataset = build()
    construct_s = time.perf_counter() - start
    out: dict[str, Any] = {
        "run": run,
        "stride": stride,
        "windows": len(dataset),
        "construct_ms": construct_s * 1e3,
        "peak_reset": peak_reset,
        "baseline_rss_mib": baseline / 1024,
        "peak_rss_construct_mib": (maxrss_kib() - baseline) / 1024,
    }
    if run != "seed":  # ours is cheap to rebuild: a warm median beside the cold first build
        warm = []
        for _ in range(20):
            t = time.perf_counter()
            build()
            warm.append(time.perf_counter() - t)
        out["construct_warm_median_ms"] = float(np.median(warm)) * 1e3
    # Each project's create_dataloader DataLoader: the seed's with default_collate, ours with collate_windows.
    loaders: dict[str, Any] = {"dataloader": DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False)}
    if run != "seed":
        loaders = {
            "dataloader": DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False, collate_fn=collate_windows),
            "dataloader_default_collate": DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False),
            "shard_loader": ShardLoader(dataset, BATCH_SIZE, shuffle=False),
        }
    for name, loader in loaders.items():
        if name == "shard_loader":
            # Before it: its epoch order (8 bytes per window, 8 MB at 1M windows) is the ShardLoader's,
            # not the dataset's, and the seed comparison is DataLoader against DataLoader.
            out["peak_rss_dataloader_mib"] = (maxrss_kib() - baseline) / 1024
        out[f"{name}_samples_per_s"] = iterate(loader)
    out.setdefault("peak_rss_dataloader_mib", (maxrss_kib() - baseline) / 1024)
    if run != "seed":
        out["peak_rss_with_shard_loader_mib"] = (maxrss_kib() - baseline) / 1024
    for name, loader in loaders.items():
        out[f"{name}_sha256"] = digest(loader)
    out["versions"] = {"torch": torch.__version__, "numpy": np.__version__}
    return out


def child(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(by: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    comparisons = []
    for stride in STRIDES:
        seed = by["seed", stride]
        for run in RUNS[1:]:
            ours = by[run, stride]
            assert ours["windows"] == seed["windows"], f"{run} stride={stride}: {ours['windows']} != {seed['windows']}"
            for loader in LOADERS:
                same = ours[f"{loader}_sha256"] == seed["dataloader_sha256"]
                assert same, f"{run} {loader} stride={stride} served different batches than the seed"
            seed_kib = seed["peak_rss_dataloader_mib"] * 1024
            ours_kib = ours["peak_rss_dataloader_mib"] * 1024
            speed = {name: ours[f"{name}_samples_per_s"] / seed["dataloader_samples_per_s"] for name in LOADERS}
            comparisons.append(
                {
                    "run": run,
                    "stride": stride,
                    "identical_batches": True,
                    "construct_speedup": seed["construct_ms"] / ours["construct_ms"],
                    # ru_maxrss counts whole KiB: under 1 KiB only a lower bound, seed_kib / 1, is known.
                    "peak_memory_ratio": seed_kib / ours_kib if ours_kib >= 1 else None,
                    "peak_memory_ratio_at_least": seed_kib / max(ours_kib, 1.0),
                    "samples_per_s_ratio": speed,
                    "target_construct_under_10ms": ours["construct_ms"] < 10.0,
                    "target_memory_20x_at_stride_1": None if stride != 1 else seed_kib >= 20 * max(ours_kib, 1.0),
                    "target_samples_per_s_at_least_seed": speed["dataloader"] >= 1.0,
                }
            )
    return comparisons


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    header = (
        f"{'run':<12} {'stride':>6} {'windows':>9} {'build ms':>10} {'warm ms':>8} {'MiB build':>10} "
        f"{'MiB +iter':>10} {'DataLoader/s':>13} {'default_collate/s':>18} {'ShardLoader/s':>14}"
    )
    print()
    print(
        f"max_length={MAX_LENGTH}, batch_size={BATCH_SIZE}, {SAMPLES:,} samples (best of {REPEATS}), num_workers=0, "
        "shuffle=False; MiB = ru_maxrss - baseline after loading the tokens (+iter: after the DataLoaders)"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['run']:<12} {r['stride']:>6} {r['windows']:>9,} {r['construct_ms']:>10.3f} "
            f"{fmt(r.get('construct_warm_median_ms'), '.3f'):>8} {r['peak_rss_construct_mib']:>10.2f} "
            f"{r['peak_rss_dataloader_mib']:>10.2f} {r['dataloader_samples_per_s']:>13,.0f} "
            f"{fmt(r.get('dataloader_default_collate_samples_per_s'), ',.0f'):>18} "
            f"{fmt(r.get('shard_loader_samples_per_s'), ',.0f'):>14}"
        )
    print()
    for c in comparisons:
        memory = (
            f"{c['peak_memory_ratio']:,.0f}x"
            if c["peak_memory_ratio"] is not None
            else f">= {c['peak_memory_ratio_at_least']:,.0f}x (ours < 1 KiB)"
        )
        speed = c["samples_per_s_ratio"]
        print(
            f"{c['run']:<12} stride={c['stride']:<4} identical batches; construction {c['construct_speedup']:,.0f}x "
            f"faster; peak memory {memory} less; samples/s vs seed: DataLoader {speed['dataloader']:.2f}x, "
            f"default_collate {speed['dataloader_default_collate']:.2f}x, ShardLoader {speed['shard_loader']:.2f}x"
        )


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    token_file = RESULTS / f".windows-tokens-{os.getpid()}.u16"  # removed below; children read it
    rows: list[dict[str, Any]] = []
    try:
        source = child("tokenize", str(token_file))
        print(
            f"{source['tokens']:,} tokens from {source['files']} stdlib .py files "
            f"({source['tokenize_s']:.1f} s to tokenize); parent ru_maxrss {maxrss_kib() / 1024:.0f} MiB",
            flush=True,
        )
        for stride in STRIDES:
            for run in RUNS:
                row = child("measure", run, str(stride), str(token_file))
                rows.append(row)
                print(
                    f"  {run:<12} stride={stride:<4} construct {row['construct_ms']:10.2f} ms  "
                    f"peak +{row['peak_rss_dataloader_mib']:8.1f} MiB  {row['dataloader_samples_per_s']:9,.0f} "
                    f"samples/s  (peak reset: {row['peak_reset']})",
                    flush=True,
                )
    finally:
        token_file.unlink(missing_ok=True)
    comparisons = compare({(r["run"], r["stride"]): r for r in rows})
    report(rows, comparisons)
    result = {
        "benchmark": "windows",
        "token_source": source,
        "settings": {
            "max_length": MAX_LENGTH,
            "strides": list(STRIDES),
            "batch_size": BATCH_SIZE,
            "samples": SAMPLES,
            "repeats": REPEATS,
        },
        "machine": {
            "python": platform.python_version(),
            **rows[0]["versions"],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "runs": rows,
        "comparisons": comparisons,
        "total_s": time.perf_counter() - start,
    }
    out = RESULTS / "windows.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out.relative_to(ROOT)} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = tokenize(*rest) if kind == "tokenize" else measure(rest[0], int(rest[1]), rest[2])
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
