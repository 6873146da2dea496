"""Packing benchmark: best-fit-decreasing vs pad-to-max vs concatenate-and-split, and loader throughput.

Corpus: the default corpus's Python side, every stdlib .py file (sorted, site-packages excluded, valid
UTF-8 only) plus every pydoc topic, GPT-2 tokens with <|endoftext|> appended to each document.
Part 1, per max_length: time to build the [R, L] rows and the rows / efficiency / dropped tokens /
boundary crossings of each layout. Part 2, batch 8 over the packed rows (memory-mapped from .npy files
as the lake stores them): samples/s and tokens/s of PackedDataset.__getitems__ without and with the
dense attention mask, `block_causal_mask(segment_ids, position_ids)` as `ShardLoader(build_mask=True)`
calls it (the block fill on the CPU), the one comparison of position ids that CUDA runs by default
(timed here on the CPU, where it loses to the block fill), and sliding windows (stride = max_length) over
the same stream; and the memorisation control's target masking (1-3 per row, `ShardLoader(mask_tokens=)`)
against its earlier full-sort version. Writes benchmarks/results/packing.json.

    .venv/bin/python benchmarks/packing.py [--lengths 1024 2048] [--seconds 2.0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpus import masks
from corpus.loader import _GOLDEN, ShardLoader, _mix64
from corpus.masks import block_causal_mask
from corpus.packing import (
    concat_split_stats,
    fill_rows,
    open_packed,
    pack,
    pad_to_max_stats,
    plan_packing,
    save_packed,
)
from corpus.tokenizer import EOT_ID, get_encoding

RESULTS = Path(__file__).resolve().parent / "results" / "packing.json"
BATCH = 8
SHARD_ROWS = 1024  # rows per packed shard for the multi-shard loader row
ROUNDS = 5
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and "\x00" not in text:
            texts.append(text)
    import pydoc_data.topics as topics

    texts.extend(topics.topics[key] for key in sorted(topics.topics) if topics.topics[key].strip())
    return texts


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    enc = get_encoding()
    docs = enc.encode_ordinary_batch(texts, num_threads=2)
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    stream = np.empty(int(lengths.sum()), dtype=np.uint16)
    for doc, start in zip(docs, starts.tolist(), strict=True):
        stream[start : start + len(doc)] = doc
        stream[start + len(doc)] = EOT_ID
    return stream, starts, lengths


def pad_to_max_rows(stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
    """The baseline's actual rows: one document per row, truncated at `length`, padded with EOT."""
    kept = np.minimum(lengths, length)
    rows = np.full((lengths.size, length), EOT_ID, dtype=stream.dtype)
    col = np.arange(length)[None, :]
    inside = col < kept[:, None]
    rows[inside] = stream[(starts[:, None] + col)[inside]]
    return rows


def concat_split_rows(stream: np.ndarray, length: int) -> np.ndarray:
    n_rows = -(-stream.size // length)
    rows = np.full(n_rows * length, EOT_ID, dtype=stream.dtype)
    rows[: stream.size] = stream
    return rows.reshape(n_rows, length)


def mask_positions_by_sort(
    seed: int, epoch: int, sample_indices: np.ndarray, length: int, lo: int, hi: int
) -> np.ndarray:
    """The baseline: corpus.loader.mask_positions before argpartition, a full argsort of every row's position
    hashes to pick at most `hi` of them (the same masks on rows without -100 targets)."""
    base = _mix64(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(epoch))
    keys = _mix64(base ^ (_mix64(sample_indices.astype(np.uint64) + np.uint64(1)) * _GOLDEN))
    counts = lo + (keys % np.uint64(hi - lo + 1)).astype(np.int64)
    position_keys = _mix64(keys[:, None] ^ _mix64(np.arange(1, length + 1, dtype=np.uint64))[None, :])
    order = np.argsort(position_keys, axis=1, kind="stable")
    mask = np.zeros((len(sample_indices), length), dtype=bool)
    chosen = np.arange(hi)[None, :] < counts[:, None]
    rows = np.broadcast_to(np.arange(len(sample_indices))[:, None], (len(sample_indices), hi))
    mask[rows[chosen], order[:, :hi][chosen]] = True
    return mask


def best_of(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput(fetch: Callable[[np.ndarray], Any], n_items: int, seconds: float, seed: int) -> tuple[float, int]:
    """Batches per second over shuffled batches of BATCH indices: the best of ROUNDS rounds.

    Best-of rather than mean because other processes share the machine: interference only ever slows a
    round down, so the fastest round is the closest to the loader's own cost.
    """
    rng = np.random.default_rng(seed)
    fetch(rng.integers(0, n_items, BATCH))  # warm-up: page in, allocate
    best, total = 0.0, 0
    for _ in range(ROUNDS):
        done, t0 = 0, time.perf_counter()
        while done < 3 or time.perf_counter() - t0 < seconds / ROUNDS:
            fetch(rng.integers(0, n_items, BATCH))
            done += 1
        best = max(best, done / (time.perf_counter() - t0))
        total += done
    return best, total


def window_fetcher(stream: np.ndarray, length: int) -> tuple[Callable[[np.ndarray], Any], int, str]:
    try:
        from corpus.windows import SlidingWindowDataset
    except ImportError as exc:
        # The fallback: the same vectorised gather, stream[start + arange(L + 1)].
        n = (stream.size - 1) // length
        offsets = np.arange(length + 1)

        def gather(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            chunk = stream[(idx * length)[:, None] + offsets].astype(np.int64)
            return torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])

        return gather, n, f"own vectorised gather (corpus.windows unavailable: {exc})"
    dataset = SlidingWindowDataset(stream, length, length)
    return dataset.get_batch, len(dataset), "corpus.windows.SlidingWindowDataset.get_batch"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per throughput measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    args = parser.parse_args(argv)
    # torch's DataLoader sets one thread per worker process; one thread also keeps the figures from
    # swinging 10x when other processes share the cores (two OpenMP threads then wait on each other).
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    texts = default_corpus()
    stream, starts, lengths = tokenize(texts)
    tokenize_s = time.perf_counter() - t0
    print(
        f"corpus: {lengths.size} documents, {stream.size:,} tokens (median {int(np.median(lengths))}, "
        f"max {int(lengths.max()):,} per document), tokenized in {tokenize_s:.1f} s; torch threads "
        f"{torch.get_num_threads()}"
    )
    results: dict[str, Any] = {
        "corpus": {"documents": int(lengths.size), "tokens": int(stream.size), "tokenize_s": tokenize_s},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0],
        },
        "batch_size": BATCH,
        "layouts": [],
        "loader": [],
    }

    print("\n| max_length | layout | build s | rows | efficiency | tokens dropped | boundary crossings |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    packed_by_length = {}
    for length in args.lengths:
        bfd_s, packed = best_of(lambda length=length: pack(stream, starts, lengths, length))
        pad_s, pad_rows = best_of(lambda length=length: pad_to_max_rows(stream, starts, lengths, length))
        cat_s, cat_rows = best_of(lambda length=length: concat_split_rows(stream, length))
        stats = [
            (packed.stats(), bfd_s, packed.num_rows),
            (pad_to_max_stats(lengths, length), pad_s, pad_rows.shape[0]),
            (concat_split_stats(lengths, length), cat_s, cat_rows.shape[0]),
        ]
        for stat, seconds, built_rows in stats:
            assert stat.rows == built_rows, f"{stat.method}: stats say {stat.rows} rows, built {built_rows}"
            print(
                f"| {length} | {stat.method} | {seconds:.3f} | {stat.rows:,} | {stat.efficiency:.2%} | "
                f"{stat.tokens_dropped:,} | {stat.boundary_crossings:,} |"
            )
            results["layouts"].append({**stat.to_dict(), "build_s": seconds})
        packed_by_length[length] = packed

    print(f"\n| max_length | loader (batch {BATCH}) | samples/s | tokens/s | real tokens/s | vs no mask |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for length, packed in packed_by_length.items():
            save_packed(Path(tmp) / str(length), packed)
            plain = open_packed(Path(tmp) / str(length))
            masked = open_packed(Path(tmp) / str(length), with_mask=True)
            efficiency = packed.efficiency

            def vectorised(idx: np.ndarray, plain: Any = plain) -> dict[str, torch.Tensor]:
                batch = plain.__getitems__(idx)
                batch["attention_mask"] = block_causal_mask(batch["segment_ids"], batch["position_ids"])
                return batch

            def from_positions(idx: np.ndarray, plain: Any = plain) -> dict[str, torch.Tensor]:
                batch = plain.__getitems__(idx)
                batch["attention_mask"] = masks._position_mask(batch["position_ids"])
                return batch

            target_masker = ShardLoader(plain, BATCH, mask_tokens=(1, 3))

            def masked_targets(idx: np.ndarray, masker: ShardLoader = target_masker) -> Any:
                return masker.fetch(idx, 0)

            def masked_targets_by_sort(
                idx: np.ndarray, plain: Any = plain, length: int = length
            ) -> dict[str, torch.Tensor]:
                batch = plain.__getitems__(idx)
                hide = torch.from_numpy(mask_positions_by_sort(0, 0, idx, length, 1, 3))
                batch["labels"] = batch["labels"].masked_fill(hide, -100)
                return batch

            plan = plan_packing(stream, starts, lengths, length)
            shard_dirs = []
            for lo in range(0, plan.num_rows, SHARD_ROWS):
                shard_dirs.append(Path(tmp) / f"{length}-shards" / f"{lo // SHARD_ROWS:05d}")
                save_packed(shard_dirs[-1], fill_rows(plan, stream, lo, min(lo + SHARD_ROWS, plan.num_rows)))
            sharded = open_packed(shard_dirs)
            assert len(sharded) == len(plain)
            fetch_windows, n_windows, window_source = window_fetcher(stream, length)
            runs = [
                ("packed, no mask", plain.__getitems__, len(plain), efficiency),
                (
                    f"packed, no mask, {len(shard_dirs)} shards of {SHARD_ROWS:,} rows",
                    sharded.__getitems__,
                    len(sharded),
                    efficiency,
                ),
                ("packed + mask (block fill)", masked.__getitems__, len(masked), efficiency),
                ("packed + block_causal_mask", vectorised, len(plain), efficiency),
                ("packed + mask from position ids (one op)", from_positions, len(plain), efficiency),
                (
                    "packed + mask_tokens (1-3 targets), full sort per row (before)",
                    masked_targets_by_sort,
                    len(plain),
                    efficiency,
                ),
                ("packed + mask_tokens (1-3 targets), argpartition", masked_targets, len(plain), efficiency),
                ("sliding windows", fetch_windows, n_windows, 1.0),
            ]
            base = None
            for name, fetch, n_items, real in runs:
                batches_per_s, batches = throughput(fetch, n_items, args.seconds, seed=length)
                samples = batches_per_s * BATCH
                base = samples if base is None else base
                print(
                    f"| {length} | {name} | {samples:,.0f} | {samples * length:,.0f} | {samples * length * real:,.0f} "
                    f"| {samples / base:.3f}x |"
                )
                results["loader"].append(
                    {
                        "max_length": length,
                        "loader": name,
                        "samples_per_s": samples,
                        "tokens_per_s": samples * length,
                        "real_tokens_per_s": samples * length * real,
                        "batches_timed": batches,
                        "relative_to_no_mask": samples / base,
                    }
                )
            results.setdefault("window_source", window_source)

    print(f"\nsliding windows: {results['window_source']}")
    at = {(r["max_length"], r["method"]): r for r in results["layouts"]}
    loader = {(r["max_length"], r["loader"]): r for r in results["loader"]}
    targets = {}
    if 2048 in packed_by_length:
        eff = at[(2048, "best_fit_decreasing")]["efficiency"]
        cost = 1 - loader[(2048, "packed + mask (block fill)")]["relative_to_no_mask"]
        targets = {
            "efficiency_2048": eff,
            "efficiency_2048_met": eff >= 0.99,
            "mask_cost_2048": cost,
            "mask_cost_2048_met": cost < 0.20,
        }
        print(f"target efficiency >= 99% at 2048: {eff:.2%} -> {'met' if eff >= 0.99 else 'NOT met'}")
        print(
            f"target mask cost < 20% of throughput at 2048: {cost:.1%} -> {'met' if cost < 0.20 else 'NOT met'} "
            f"(a dense mask is {BATCH} x 2048 x 2048 bool = {BATCH * 2048 * 2048 / 2**20:.0f} MiB per batch)"
        )
    results["targets"] = targets
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
