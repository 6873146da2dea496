"""`corpus report` and `corpus cat`: the latest release's figures and text, read from manifests only.

Everything comes from the release's lineage (manifests are content-addressed, so the figures are
those of exactly the versions the shards were made from); the smoke-training result is the latest one
recorded for this release in metrics.duckdb, when there is one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from corpus.lake import Lake, Version
from corpus.metrics import MetricsError, MetricsStore
from corpus.release import latest_release, lineage, release_document
from corpus.stages.io import read_tokens
from corpus.tokenizer import get_encoding

STAGE_ORDER = (
    "raw_documents",
    "heuristic_documents",
    "reference_model",
    "filtered_documents",
    "minhash_signatures",
    "duplicate_clusters",
    "deduplicated_documents",
    "tokenized_documents",
    "mixture_plan",
    "mixed_tokens",
    "training_windows",
    "packed_sequences",
)
CAT_CHUNK_TOKENS = 1 << 16


def _stages(versions: list[Version]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for v in versions:
        counts = v.counts
        entry = stages.setdefault(v.asset, {"versions": {}})
        entry["versions"][v.partition] = v.version
        if "in" in counts and "out" in counts:
            entry["in"] = entry.get("in", 0) + int(counts["in"])
            entry["out"] = entry.get("out", 0) + int(counts["out"])
            dropped = entry.setdefault("dropped", {})
            for reason, n in dict(counts.get("dropped", {})).items():
                dropped[reason] = dropped.get(reason, 0) + int(n)
        for key in ("tokens", "train_tokens", "validation_tokens", "train_windows", "validation_windows", "shards"):
            if key in counts:
                entry[key] = entry.get(key, 0) + int(counts[key])
    return {name: stages[name] for name in [*STAGE_ORDER, *sorted(set(stages) - set(STAGE_ORDER))] if name in stages}


def _training(lake_root: Path, release: Version) -> dict[str, Any] | None:
    store = MetricsStore(lake_root / "metrics.duckdb")
    try:
        if "smoke_training" not in store.tables():
            return None
        rows = store.query(
            "SELECT s.* FROM smoke_training s JOIN materializations m USING (asset, partition, version, run_id) "
            "WHERE s.release_version = ? AND s.kind = 'windows' ORDER BY m.materialized_at DESC LIMIT 1",
            [release.version],
        )
    except MetricsError:
        return None
    return rows[0] if rows else None


def build_report(lake_root: Path) -> dict[str, Any]:
    lake = Lake(lake_root)
    release = latest_release(lake.root)
    versions = lineage(lake, [release])
    by_asset: dict[str, list[Version]] = {}
    for v in versions:
        by_asset.setdefault(v.asset, []).append(v)
    windows = by_asset["training_windows"][0]
    packed = by_asset["packed_sequences"][0]
    mixed = by_asset["mixed_tokens"][0]
    clusters = by_asset["duplicate_clusters"][0]
    doc = release_document(release)
    files = windows.files
    shards = [
        {**shard, "sha256": files[shard["path"]]["sha256"], "bytes": files[shard["path"]]["bytes"]}
        for shard in windows.extra["shards"]
    ]
    mixture = [
        {
            "source": r["source"],
            "tokens": r["raw_tokens"],
            "natural_share": r["natural_share"],
            "temperature_share": r["temperature_share"],
            "target_share": r["target_share"],
            "realized_share": r["realized_share"],
            "realized_tokens": r["realized_tokens"],
            "epochs": r["epochs"],
        }
        for r in mixed.extra["mixture"]
    ]
    quarantined = sum(int(v.counts.get("quarantined", 0)) for v in by_asset.get("raw_documents", []))
    return {
        "version": windows.version,
        "release": {
            "version": release.version,
            "merkle_root": doc["merkle_root"],
            "versions": doc["versions"].__len__(),
            "files": doc["files"],
            "bytes": doc["bytes"],
            "manifest": str(release.manifest_path),
        },
        "stages": _stages(versions),
        "quarantined": quarantined,
        "mixture": mixture,
        "duplicates": {
            "ratio": clusters.extra["duplicate_ratio"],  # residual among kept documents (the asset check's)
            "removed_ratio": clusters.extra.get("removed_ratio"),  # duplicates removed / documents
            "confirm": clusters.extra.get("confirm"),
            "clusters": clusters.counts.get("clusters", 0),
            "removed": dict(clusters.counts.get("dropped", {})),
            "per_source": {r["scope"]: r for r in clusters.extra.get("ratios", []) if r["scope"] != "all"},
        },
        "shards": shards,
        "windows": {
            "version": windows.version,
            "max_length": windows.extra["max_length"],
            "stride": windows.extra["stride"],
            "train_windows": windows.counts["train_windows"],
            "validation_windows": windows.counts["validation_windows"],
            "manifest": str(windows.manifest_path),
        },
        "packing": {
            "version": packed.version,
            "max_length": packed.extra["max_length"],
            "splits": packed.extra["splits"],
            "comparison": packed.extra["comparison"],
            "manifest": str(packed.manifest_path),
        },
        "training": _training(lake.root, release),
    }


def format_summary(report: dict[str, Any]) -> str:
    lines = ["", "stage                      in         out    dropped"]
    for name, stage in report["stages"].items():
        if "in" in stage:
            dropped = sum(stage.get("dropped", {}).values())
            lines.append(f"{name:<22} {stage['in']:>8,} {stage['out']:>11,} {dropped:>10,}")
    w = report["windows"]
    lines.append(
        f"\ntokens: train {report['stages']['mixed_tokens'].get('train_tokens', 0):,}, "
        f"validation {report['stages']['mixed_tokens'].get('validation_tokens', 0):,}; "
        f"windows (L={w['max_length']}, stride={w['stride']}): {w['train_windows']:,} train, "
        f"{w['validation_windows']:,} validation in {len(report['shards'])} shards"
    )
    packing = report["packing"]
    length = int(packing["max_length"])
    for split, meta in packing["splits"].items():
        if meta.get("rows"):
            count = len(meta.get("shards", [None]))  # one directory per split before packed_sequences/2
            lines.append(
                f"packed {split} (L={length}): {meta['rows']:,} rows, efficiency {meta['efficiency']:.4f} "
                f"in {count} shard{'' if count == 1 else 's'}"
            )
    lines.append(f"duplicate ratio after dedup: {report['duplicates']['ratio']:.4f}")
    lines.append("mixture: " + ", ".join(f"{m['source']} {100 * m['realized_share']:.1f}%" for m in report["mixture"]))
    training = report.get("training")
    if training:
        lines.append(
            f"smoke training on {training.get('device_name')}: loss {training.get('first_loss'):.3f} -> "
            f"{training.get('last_loss'):.3f}, {training.get('tokens_per_s', 0):,.0f} tokens/s"
        )
    lines.append(f"release {report['release']['version']}\n  merkle root {report['release']['merkle_root']}")
    lines.append(f"  windows manifest {w['manifest']}")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    lines = [format_summary(report), "", "mixture:"]
    lines.append("  source        tokens   natural  temperature  target  realized  epochs")
    for m in report["mixture"]:
        lines.append(
            f"  {m['source']:<10} {m['tokens']:>10,}   {m['natural_share']:.4f}   {m['temperature_share']:.4f}     "
            f"{m['target_share']:.4f}  {m['realized_share']:.4f}   {m['epochs']:.2f}"
        )
    lines.append("drops:")
    for name, stage in report["stages"].items():
        for reason, n in sorted(stage.get("dropped", {}).items()):
            lines.append(f"  {name}: {reason} {n:,}")
    lines.append("shards:")
    lines += [f"  {s['path']}  {s['sha256']}  {s['bytes']:,} bytes  {s['windows']:,} windows" for s in report["shards"]]
    lines.append("packed shards:")
    for meta in report["packing"]["splits"].values():
        lines += [
            f"  {shard['dir']}  rows {shard['first_row']:,}..{shard['first_row'] + shard['rows'] - 1:,}  "
            f"{shard['real_tokens']:,} tokens  efficiency {shard['efficiency']:.4f}"
            for shard in meta.get("shards", [])
        ]
    return "\n".join(lines)


def iter_decoded_stream(lake_root: Path, split: str = "train") -> Iterator[str]:
    """The decoded mixed stream of the latest release, exactly the tokens the shards were cut from."""
    lake = Lake(lake_root)
    release = latest_release(lake.root)
    mixed = next(v for v in lineage(lake, [release]) if v.asset == "mixed_tokens")
    mixed.verify_files([f"{split}.bin"])
    tokens = read_tokens(mixed.file(f"{split}.bin"))
    enc = get_encoding()
    # Tokens are byte pieces: a character can straddle two chunks, so decode bytes incrementally.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for start in range(0, len(tokens), CAT_CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + CAT_CHUNK_TOKENS])
        yield decoder.decode(enc.decode_bytes(chunk.tolist()))
    yield decoder.decode(b"", final=True)
