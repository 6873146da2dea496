"""training_windows and packed_sequences: the two kinds of training shards, from the mixed stream.

Windows: each split's stream is cut into shards of `windows_per_shard` windows (corpus.windows
`shard_token_ranges`), consecutive shards overlapping by max_length + 1 - stride tokens, so that the
windows of the shards, in order, are exactly the windows over the whole stream (stride = max_length by
default: no window overlaps another). Packed: the split's documents, in stream order, packed by
best-fit-decreasing into rows of exactly max_length with segment and position ids (corpus.packing),
written in shards of `packed_rows_per_shard` rows (`<split>/00000/`, ... each a self-contained set of
arrays whose rows count from 0; the manifest's `first_row` places them in the split). Rows come in BFD
order: whole max_length pieces first, the emptiest rows last, so efficiency is recorded per shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from corpus.config import PipelineConfig
from corpus.lake import Version, VersionWriter
from corpus.packing import PACKED_FILES, concat_split_stats, fill_rows, pad_to_max_stats, plan_packing, save_packed
from corpus.stages import StageOutput
from corpus.stages.io import read_tokens, write_tokens
from corpus.windows import shard_token_ranges, window_count

WINDOWS_CODE_VERSION = "training_windows/1"
PACKED_CODE_VERSION = "packed_sequences/2"
SPLITS = ("train", "validation")


def build_training_windows(mixed: Version, cfg: PipelineConfig, writer: VersionWriter) -> StageOutput:
    shards: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    notes: list[str] = []
    for split in SPLITS:
        stream = read_tokens(mixed.file(f"{split}.bin"))
        total = window_count(len(stream), cfg.max_length, cfg.stride)
        totals[split] = total
        if total == 0:
            notes.append(
                f"{split}: {len(stream)} tokens are too few for one window of max_length {cfg.max_length}; no shards"
            )
            continue
        ranges = shard_token_ranges(len(stream), cfg.max_length, cfg.stride, cfg.windows_per_shard)
        for number, (start, end) in enumerate(ranges):
            name = f"{split}-{number:05d}.bin"
            write_tokens(writer.path(name), np.asarray(stream[start:end]), vocab_size=50257)
            shards.append(
                {
                    "path": name,
                    "split": split,
                    "tokens": end - start,
                    "windows": window_count(end - start, cfg.max_length, cfg.stride),
                    "first_window": number * cfg.windows_per_shard,
                    "stream_start": start,
                }
            )
    if totals["train"] == 0:
        raise ValueError(
            f"mixed_tokens {mixed.version[:12]}: the train stream has too few tokens for one window of "
            f"max_length {cfg.max_length}; lower pipeline.max_length or add data"
        )
    assert sum(s["windows"] for s in shards) == sum(totals.values()), "shard windows do not add up to the stream's"
    counts = {
        "train_windows": totals["train"],
        "validation_windows": totals["validation"],
        "shards": len(shards),
        "tokens": int(sum(s["tokens"] for s in shards)),
    }
    if cfg.stride < cfg.max_length:
        notes.append(f"stride {cfg.stride} < max_length {cfg.max_length}: windows overlap (memorisation risk)")
    version = writer.commit(
        code_version=WINDOWS_CODE_VERSION,
        config={"max_length": cfg.max_length, "stride": cfg.stride, "windows_per_shard": cfg.windows_per_shard},
        upstream=[mixed.ref()],
        counts=counts,
        extra={
            "kind": "windows",
            "max_length": cfg.max_length,
            "stride": cfg.stride,
            "dtype": "uint16",
            "vocab_size": 50257,
            "shards": shards,
            "notes": notes,
        },
    )
    files = version.files
    shard_rows = [{**s, "sha256": files[s["path"]]["sha256"], "bytes": files[s["path"]]["bytes"]} for s in shards]
    return StageOutput(
        version=version,
        counts=counts,
        tables={"shards": shard_rows},
        summary={**counts, "max_length": cfg.max_length, "stride": cfg.stride},
    )


def build_packed_sequences(mixed: Version, cfg: PipelineConfig, writer: VersionWriter) -> StageOutput:
    index = pq.read_table(mixed.file("stream_index.parquet"), columns=["split", "stream_start", "length"])
    splits = index.column("split").to_numpy(zero_copy_only=False)
    stats_rows: list[dict[str, Any]] = []
    splits_meta: dict[str, Any] = {}
    per_shard = cfg.packed_rows_per_shard
    for split in SPLITS:
        mask = splits == split
        starts = index.column("stream_start").to_numpy()[mask]
        lengths = index.column("length").to_numpy()[mask]
        stream = read_tokens(mixed.file(f"{split}.bin"))
        if not len(lengths):
            splits_meta[split] = {"rows": 0, "shards": []}
            continue
        # The placement of every piece first (O(pieces)), then the rows one shard at a time: memory is
        # bounded by a shard's rows, not the split's.
        plan = plan_packing(np.asarray(stream), starts, lengths, cfg.max_length)
        shards = []
        for number, row_lo in enumerate(range(0, plan.num_rows, per_shard)):
            row_hi = min(row_lo + per_shard, plan.num_rows)
            rows = fill_rows(plan, stream, row_lo, row_hi)
            where = f"{split}/{number:05d}"
            save_packed(lambda name, w=where: writer.path(f"{w}/{name}"), rows)
            shards.append(
                {
                    "dir": where,
                    "first_row": row_lo,
                    "rows": rows.num_rows,
                    "pieces": rows.num_pieces,
                    "real_tokens": rows.real_tokens,
                    "efficiency": rows.efficiency,
                }
            )
        bfd = plan.stats()
        for stats in (bfd, pad_to_max_stats(lengths, cfg.max_length), concat_split_stats(lengths, cfg.max_length)):
            stats_rows.append({"split": split, **dataclasses.asdict(stats)})
        splits_meta[split] = {
            "rows": plan.num_rows,
            "pieces": int(plan.piece_row.size),
            "real_tokens": plan.real_tokens,
            "efficiency": bfd.efficiency,
            "shards": shards,
        }
    counts = {
        "train_rows": splits_meta["train"]["rows"],
        "validation_rows": splits_meta["validation"]["rows"],
        "tokens": int(sum(m.get("real_tokens", 0) for m in splits_meta.values())),
        "shards": sum(len(m["shards"]) for m in splits_meta.values()),
    }
    version = writer.commit(
        code_version=PACKED_CODE_VERSION,
        config={"max_length": cfg.max_length, "packed_rows_per_shard": per_shard},
        upstream=[mixed.ref()],
        counts=counts,
        extra={"kind": "packed", "max_length": cfg.max_length, "splits": splits_meta, "comparison": stats_rows},
    )
    md = ["| split | method | rows | efficiency | tokens dropped |", "| --- | --- | --- | --- | --- |"]
    md += [
        f"| {r['split']} | {r['method']} | {r['rows']:,} | {r['efficiency']:.4f} | {r['tokens_dropped']:,} |"
        for r in stats_rows
    ]
    files = version.files
    shard_rows = [
        {
            "split": split,
            **shard,
            "bytes": sum(int(files[f"{shard['dir']}/{name}.npy"]["bytes"]) for name in PACKED_FILES),
            "tokens_sha256": files[f"{shard['dir']}/tokens.npy"]["sha256"],
        }
        for split, meta in splits_meta.items()
        for shard in meta["shards"]
    ]
    if shard_rows:
        efficiencies = [shard["efficiency"] for shard in shard_rows]
        md.append(
            f"\n{len(shard_rows)} shards of up to {per_shard:,} rows; efficiency per shard "
            f"{min(efficiencies):.4f} to {max(efficiencies):.4f}"
        )
    return StageOutput(
        version=version,
        counts=counts,
        tables={"packing": stats_rows, "packed_shards": shard_rows},
        summary={**counts, "train_efficiency": float(splits_meta["train"].get("efficiency", 0.0))},
        markdown="\n".join(md),
    )
