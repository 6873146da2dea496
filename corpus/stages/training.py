"""smoke_training and poisoning_scan: a tiny GPT trained over the verified shards, then a gradient scan.

Both shard kinds are trained: windows (causal attention) and packed rows (block-diagonal attention,
restarted position ids). Every shard is re-hashed against its manifest before the first batch; a
mismatch fails the stage. The smoke-trained model is saved in the version so `poisoning_scan` can
score training samples with it; flagged samples are traced to (source, doc_id, token offsets).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from corpus.config import PipelineConfig
from corpus.lake import Version, VersionWriter
from corpus.loader import ShardLoader, open_packed_shards, open_window_shards
from corpus.model import TinyGPT
from corpus.packing import PackedDataset
from corpus.poison import gradient_similarity_scan
from corpus.stages import StageOutput
from corpus.train import SmokeResult, loss_chart_png, smoke_train

SMOKE_CODE_VERSION = "smoke_training/1"
SCAN_CODE_VERSION = "poisoning_scan/1"


def open_packed_split(
    packed: Version | str | Path, split: str, *, with_mask: bool = False, verify: bool = True
) -> PackedDataset:
    """`corpus.loader.open_packed_shards` under its earlier name (kept for callers of this module)."""
    return open_packed_shards(packed, split, verify=verify, with_mask=with_mask)


def _val_batches(loader: ShardLoader | None, count: int) -> list[Any]:
    if loader is None:
        return []
    out: list[Any] = []
    for batch in loader:
        out.append(batch)
        if len(out) >= count:
            break
    return out


def build_smoke_training(
    windows: Version, packed: Version, release: Version, cfg: PipelineConfig, writer: VersionWriter
) -> tuple[StageOutput, dict[str, SmokeResult]]:
    tcfg = cfg.training
    results: dict[str, SmokeResult] = {}
    # Windows: verify every shard of both splits before the first batch.
    train_w = open_window_shards(windows.manifest_path, "train", verify=True)
    val_w = (
        open_window_shards(windows.manifest_path, "validation", verify=False)  # hashed with train, whole
        if windows.counts["validation_windows"]
        else None
    )
    kinds: dict[str, tuple[Any, Any]] = {
        "windows": (
            ShardLoader(train_w, tcfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True),
            ShardLoader(val_w, tcfg.batch_size, shuffle=False, drop_last=False) if val_w is not None else None,
        )
    }
    train_p = open_packed_split(packed, "train")
    # Opening train re-hashed the whole version, validation included.
    val_p = open_packed_split(packed, "validation", verify=False) if packed.counts.get("validation_rows") else None
    kinds["packed"] = (
        ShardLoader(train_p, tcfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True),
        ShardLoader(val_p, tcfg.batch_size, shuffle=False, drop_last=False) if val_p is not None else None,
    )
    losses_rows = []
    for kind, (train_loader, val_loader) in kinds.items():
        result = smoke_train(
            train_loader, _val_batches(val_loader, tcfg.eval_batches), tcfg, max_length=cfg.max_length, seed=cfg.seed
        )
        results[kind] = result
        with open(writer.path(f"{kind}_loss.png"), "wb") as handle:
            handle.write(
                loss_chart_png(
                    result.losses,
                    f"{kind}: {result.device_name}",
                    val_before=result.val_loss_before,
                    val_after=result.val_loss_after,
                )
            )
        assert result.model is not None, "smoke_train returned no model"
        result.model.save(writer.path(f"{kind}_model.pt"))
        losses_rows += [{"kind": kind, "step": i, "loss": loss} for i, loss in enumerate(result.losses)]
    summary_doc = {kind: r.to_dict() for kind, r in results.items()}
    with open(writer.path("result.json"), "w", encoding="utf-8") as handle:
        json.dump(summary_doc, handle, indent=1, sort_keys=True)
    w = results["windows"]
    counts = {
        "steps": sum(r.steps for r in results.values()),
        "loss_tokens": sum(r.loss_tokens for r in results.values()),
    }
    version = writer.commit(
        code_version=SMOKE_CODE_VERSION,
        config={"training": dataclasses.asdict(tcfg), "max_length": cfg.max_length, "seed": cfg.seed},
        upstream=[windows.ref(), packed.ref(), release.ref()],
        counts=counts,
        # The trained weights differ between CPU and GPU (and bf16 vs fp32), so the device is part of what
        # this version is; speed figures are facts about the run and go to DuckDB and Dagster only.
        extra={"device_type": w.device_type, "device_name": w.device_name},
    )
    rows = [
        {
            "kind": kind,
            "release_version": release.version,
            "device_type": r.device_type,
            "device_name": r.device_name,
            "precision": r.precision,
            "steps": r.steps,
            "first_loss": r.losses[0],
            "last_loss": r.losses[-1],
            "relative_loss_drop": r.relative_loss_drop,
            "val_loss_before": r.val_loss_before,
            "val_loss_after": r.val_loss_after,
            "tokens_per_s": r.tokens_per_s,
            "loader_wait_share": r.loader_wait_share,
            "peak_memory_bytes": r.peak_memory_bytes,
            "param_count": r.param_count,
        }
        for kind, r in results.items()
    ]
    return (
        StageOutput(
            version=version,
            counts=counts,
            tables={"smoke_training": rows, "training_losses": losses_rows},
            summary={
                "device": f"{w.device_type}: {w.device_name}",
                **{f"{kind}_loss_first": r.losses[0] for kind, r in results.items()},
                **{f"{kind}_loss_last": r.losses[-1] for kind, r in results.items()},
                **{f"{kind}_tokens_per_s": round(r.tokens_per_s, 1) for kind, r in results.items()},
                **{f"{kind}_loader_wait_share": round(r.loader_wait_share, 4) for kind, r in results.items()},
                "param_count": w.param_count,
            },
        ),
        results,
    )


def _window_batches(train: Any, indices: np.ndarray, batch_size: int) -> Iterator[Any]:
    for start in range(0, len(indices), batch_size):
        yield train.get_batch(indices[start : start + batch_size])


def build_poisoning_scan(
    smoke: Version, windows: Version, mixed: Version, cfg: PipelineConfig, writer: VersionWriter
) -> StageOutput:
    """Score `training.scan_samples` seeded training windows by gradient similarity; flag, trace, never drop."""
    samples = cfg.training.scan_samples
    model = TinyGPT.load(smoke.file("windows_model.pt"))
    train = open_window_shards(windows.manifest_path, "train", verify=True)
    rng = np.random.default_rng(cfg.seed)
    count = min(samples, len(train))
    indices = np.sort(rng.choice(len(train), size=count, replace=False)).astype(np.int64)
    result = gradient_similarity_scan(
        model,
        _window_batches(train, indices, cfg.training.batch_size),
        max_samples=count,
        chunk_size=cfg.training.scan_chunk_size,
        z_threshold=cfg.training.scan_z_threshold,
        sample_ids=indices.tolist(),
    )
    stride, length = int(windows.extra["stride"]), int(windows.extra["max_length"])
    index = pq.read_table(
        mixed.file("stream_index.parquet"), columns=["split", "stream_start", "length", "source", "doc_id"]
    )
    is_train = np.asarray(index.column("split").to_numpy(zero_copy_only=False)) == "train"
    starts = index.column("stream_start").to_numpy()[is_train]
    lengths = index.column("length").to_numpy()[is_train]
    sources = np.asarray(index.column("source").to_pylist(), dtype=object)[is_train]
    doc_ids = np.asarray(index.column("doc_id").to_pylist(), dtype=object)[is_train]
    flagged_rows = []
    for s in result.samples:
        if not s.flagged:
            continue
        lo = s.index * stride
        hi = lo + length + 1
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        docs = []
        for d in range(max(first, 0), len(starts)):
            if starts[d] >= hi:
                break
            docs.append(
                {
                    "source": sources[d],
                    "doc_id": doc_ids[d],
                    "offsets": [int(max(lo, starts[d]) - starts[d]), int(min(hi, starts[d] + lengths[d]) - starts[d])],
                }
            )
        flagged_rows.append({"window": s.index, "cosine": s.cosine, "z": s.z, "documents": json.dumps(docs)})
    with open(writer.path("scan.json"), "w", encoding="utf-8") as handle:
        json.dump({**result.to_dict(), "flagged_documents": flagged_rows}, handle, indent=1, sort_keys=True)
    counts = {"scanned": len(result.samples), "flagged": len(flagged_rows)}
    version = writer.commit(
        code_version=SCAN_CODE_VERSION,
        config={"samples": samples, "z_threshold": result.z_threshold, "seed": cfg.seed},
        upstream=[smoke.ref(), windows.ref(), mixed.ref()],
        counts=counts,
        extra={"scanned_params": result.scanned_params},
    )
    md = ["| window | cosine | robust z | documents |", "| --- | --- | --- | --- |"]
    md += [f"| {r['window']} | {r['cosine']:.3f} | {r['z']:.2f} | {r['documents'][:120]} |" for r in flagged_rows]
    return StageOutput(
        version=version,
        counts=counts,
        tables={"poisoning_flags": flagged_rows},
        summary={**counts, "median_cosine": result.median_cosine},
        markdown="Flagged for review (nothing is dropped automatically):\n\n" + "\n".join(md),
    )
