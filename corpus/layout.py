"""Where a packed_sequences version keeps its rows, read from its manifest alone.

Kept free of numpy and torch so that the auditor and the lineage export can read layouts without
importing the training stack.
"""

from __future__ import annotations

from typing import Any

from corpus.lake import Version

# Arrays of one packed shard, one `<name>.npy` each, in this order (corpus.packing.save_packed writes them).
PACKED_FILES = (
    "tokens",
    "segment_ids",
    "position_ids",
    "cu_seqlens",
    "cu_seqlens_offsets",
    "piece_row",
    "piece_start",
    "piece_length",
    "piece_doc",
    "piece_doc_offset",
)


def packed_shards(packed: Version, split: str) -> list[dict[str, Any]]:
    """A split's shards in row order: {dir, first_row, rows, pieces, real_tokens, efficiency}; [] without rows.

    Versions written before sharding (packed_sequences/1) hold one array set per split in `<split>/`: one shard.
    """
    meta = dict(packed.extra.get("splits", {})).get(split) or {}
    if not meta.get("rows"):
        return []
    if "shards" in meta:
        return [dict(shard) for shard in meta["shards"]]
    keys = ("rows", "pieces", "real_tokens", "efficiency")
    return [{"dir": str(meta.get("dir", split)), "first_row": 0, **{k: meta.get(k) for k in keys}}]
