"""Smoke training throughput: windows vs packed rows, through the project's loaders vs a prebuilt list.

Data: the Python standard library's .py sources (sorted paths, `<|endoftext|>` after each file, the
default corpus's first source) until TOKENS GPT-2 tokens; the last 5% of files are validation. Four
variants, each `corpus.train.smoke_train` with the same seed and config, each in a fresh child process so
that peak memory (process peak RSS on CPU, `max_memory_allocated` on CUDA) is its own:

- windows-list     prebuilt (inputs, targets) tensors in a list: no loader, the baseline for loader wait
- windows-loader   ShardLoader over SlidingWindowDataset (stride = max_length), shuffled
- packed-segments  ShardLoader over PackedDataset, mask built by the training step from segment_ids
- packed-mask      ShardLoader over PackedDataset(with_mask=True): the B x L x L mask comes from the dataset
- packed-device-mask  ShardLoader(device=..., build_mask=True): batches handed over on the training device
                   (pinned, non-blocking on CUDA) with the mask built there by the loader

`--small` (the default without CUDA) is d_model 64, L 64, batch 8, 20 steps, so that the run stays
under ~2 minutes on two CPU cores; with CUDA the default is the pipeline's TrainingConfig at L 256 and
200 steps. `--small` runs one torch thread per child unless `--threads` says otherwise.
Run: `.venv/bin/python benchmarks/smoke_training.py [--small | --full] [--threads N] [--out DIR]`; results go
to DIR/smoke_training.json on the CPU and DIR/smoke_training_cuda.json on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from corpus.config import TrainingConfig  # noqa: E402
from corpus.loader import ShardLoader  # noqa: E402
from corpus.packing import PackedDataset, pack  # noqa: E402
from corpus.tokenizer import EOT_ID, get_encoding  # noqa: E402
from corpus.train import smoke_train  # noqa: E402
from corpus.windows import SlidingWindowDataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOKENS = 200_000
VARIANTS = ("windows-list", "windows-loader", "packed-segments", "packed-mask", "packed-device-mask")
SEED = 1234


def stdlib_documents(min_tokens: int) -> list[np.ndarray]:
    """GPT-2 token arrays of stdlib .py files, each ending in <|endoftext|>, until min_tokens."""
    enc = get_encoding()
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[np.ndarray] = []
    total = 0
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = np.asarray([*enc.encode_ordinary(text), EOT_ID], dtype=np.uint16)  # every id < 50,257 < 2**16
        docs.append(ids)
        total += len(ids)
        if total >= min_tokens:
            break
    return docs


def settings(small: bool) -> tuple[TrainingConfig, int]:
    if small:
        return TrainingConfig(steps=20, batch_size=8, d_model=64, n_layers=2, n_heads=4), 64
    return TrainingConfig(steps=200), 256


def run_variant(variant: str, data: Path, small: bool, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    cfg, length = settings(small)
    blob = np.load(data)
    stream, starts, lengths, n_train = blob["stream"], blob["starts"], blob["lengths"], int(blob["n_train"])
    split = int(starts[n_train])
    if variant.startswith("windows"):
        train_ds = SlidingWindowDataset(stream[:split], length, length)
        val_ds = SlidingWindowDataset(stream[split:], length, length)
    else:
        with_mask = variant == "packed-mask"
        train_ds = PackedDataset(pack(stream, starts[:n_train], lengths[:n_train], length), with_mask=with_mask)
        val_ds = PackedDataset(pack(stream, starts[n_train:], lengths[n_train:], length), with_mask=with_mask)
    on_device = variant == "packed-device-mask"
    device = ("cuda" if torch.cuda.is_available() else "cpu") if on_device else None
    loader = ShardLoader(train_ds, cfg.batch_size, shuffle=True, seed=SEED, device=device, build_mask=on_device)
    if variant == "windows-list":
        batches: Any = [loader.fetch(idx, 0) for idx in loader.epoch_batches(0)[: cfg.steps]]
    else:
        batches = loader

    def val() -> Any:
        return iter(ShardLoader(val_ds, cfg.batch_size, shuffle=False))

    result = smoke_train(batches, val, cfg, max_length=length, seed=SEED)
    out = result.to_dict()
    del out["losses"], out["config"]
    out["variant"] = variant
    out["threads"] = torch.get_num_threads()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="small CPU config (default without CUDA)")
    size.add_argument("--full", action="store_true", help="the pipeline's TrainingConfig, L 256, 200 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 if --small)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = args.small or (not args.full and not torch.cuda.is_available())
    if args.threads is None and small:
        # On the shared 2-core machine two OpenMP threads made these small steps 9x slower than one
        # (8.5 s vs 0.9 s for 20 steps at load ~5), so the small run pins one thread per child.
        args.threads = 1
    if args.child:
        print(json.dumps(run_variant(args.child[0], Path(args.child[1]), small, args.threads)))
        return 0

    docs = stdlib_documents(TOKENS)
    lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n_train = len(docs) - max(1, len(docs) // 20)
    cfg, length = settings(small)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npz"
        np.savez(data, stream=np.concatenate(docs), starts=starts, lengths=lengths, n_train=n_train)
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, str(data), "--small" if small else "--full"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"{variant} failed (exit {proc.returncode})")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)

    first = rows[0]
    print(
        f"device {first['device_type']} ({first['device_name']}), {first['precision']}, threads {first['threads']}; "
        f"d_model {cfg.d_model}, layers {cfg.n_layers}, L {length}, batch {cfg.batch_size}, steps {cfg.steps}; "
        f"{first['param_count']:,} parameters ({first['non_embedding_param_count']:,} non-embedding); "
        f"{int(lengths.sum()):,} tokens in {len(docs)} files"
    )
    header = f"{'variant':19s} {'loss tok/s':>10s} {'loss tokens':>11s} {'wait s':>7s} {'wait %':>7s} {'check s':>7s}"
    header += f" {'peak MiB':>9s} {'loss first5->last5':>19s} {'val before->after':>18s}"
    print(header)
    for r in rows:
        print(
            f"{r['variant']:19s} {r['tokens_per_s']:10.0f} {r['loss_tokens']:11d} {r['loader_wait_s']:7.3f} "
            f"{100 * r['loader_wait_share']:6.2f}% {r['check_s']:7.3f} {r['peak_memory_bytes'] / 2**20:9.1f} "
            f"{r['first_loss_mean']:8.3f} -> {r['last_loss_mean']:6.3f} {r['val_loss_before']:7.3f} -> "
            f"{r['val_loss_after']:6.3f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "smoke_training",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "small": small,
        "max_length": length,
        "corpus": {"source": "python stdlib *.py", "tokens": int(lengths.sum()), "files": len(docs)},
        "config": {k: getattr(cfg, k) for k in ("steps", "batch_size", "d_model", "n_layers", "n_heads")},
        "runs": rows,
    }
    # CPU and GPU figures live side by side: smoke_training.json (CPU) and smoke_training_cuda.json.
    name = "smoke_training.json" if first["device_type"] == "cpu" else f"smoke_training_{first['device_type']}.json"
    out = args.out / name
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
