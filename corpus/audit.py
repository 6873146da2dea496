"""`corpus verify` and `corpus trace`: check every hash of a release, and follow data through the lineage.

verify walks the lineage from a release (or any manifest): each manifest must hash to its own version
id, every file must match its recorded size and sha256, every upstream version a manifest cites must
exist and verify, counts must reconcile (corpus.reconcile), token files must agree with their indexes
(lengths, offsets, ids below the vocabulary size) and the release's Merkle root must recompute. Files
are hashed in 1 MiB chunks and token files scanned in chunks, so memory stays flat on any lake.

trace reads the lineage's Parquet files with DuckDB (the same SQL an auditor can run by hand).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq

from corpus.lake import MANIFEST, Lake, LakeError, Version, read_version
from corpus.reconcile import reconcile
from corpus.release import RELEASE_ASSET, iter_leaves, latest_release, lineage, merkle_root, release_document
from corpus.stages.io import read_tokens

SCAN_CHUNK = 1 << 22  # tokens per chunk when range-checking token files (8 MiB of uint16)


@dataclass
class VerifyResult:
    target: str
    problems: list[str] = field(default_factory=list)
    versions: int = 0
    files: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "target": self.target,
            "problems": self.problems,
            "versions": self.versions,
            "files": self.files,
            "bytes": self.bytes,
        }


def _token_problems(version: Version, name: str, vocab_size: int, expected_tokens: int | None) -> Iterator[str]:
    path = version.path / name
    if not path.is_file():
        return
    size = path.stat().st_size
    if size % 2:
        yield f"{path}: {size} bytes is not a whole number of uint16 tokens"
        return
    tokens = read_tokens(path)
    if expected_tokens is not None and len(tokens) != expected_tokens:
        yield f"{path}: {len(tokens)} tokens, manifest says {expected_tokens}"
    for start in range(0, len(tokens), SCAN_CHUNK):
        high = int(np.asarray(tokens[start : start + SCAN_CHUNK]).max())
        if high >= vocab_size:
            yield f"{path}: token id {high} >= vocabulary size {vocab_size} (chunk at token {start})"
            return


def _structure_problems(version: Version) -> Iterator[str]:
    """Index/data agreement for the versions that hold tokens."""
    extra, counts = version.extra, version.counts
    vocab = int(extra.get("vocab_size", 50257))
    if version.asset == "tokenized_documents":
        index = pq.read_table(version.path / "index.parquet", columns=["start", "length"])
        starts = index.column("start").to_numpy()
        lengths = index.column("length").to_numpy()
        if len(starts) and (starts[0] != 0 or not np.array_equal(starts[1:], np.cumsum(lengths)[:-1])):
            yield f"{version.path / 'index.parquet'}: document offsets are not contiguous"
        yield from _token_problems(version, "tokens.bin", vocab, int(lengths.sum()))
    elif version.asset == "mixed_tokens":
        for split in ("train", "validation"):
            yield from _token_problems(version, f"{split}.bin", vocab, counts.get(f"{split}_tokens"))
    elif version.asset == "training_windows":
        length, stride = int(extra["max_length"]), int(extra["stride"])
        for shard in extra.get("shards", []):
            expected_windows = max(0, -(-(int(shard["tokens"]) - length) // stride))
            if expected_windows != shard["windows"]:
                yield (
                    f"{version.path / shard['path']}: {shard['tokens']} tokens give {expected_windows} windows, "
                    f"manifest says {shard['windows']}"
                )
            yield from _token_problems(version, shard["path"], vocab, int(shard["tokens"]))


def verify(lake_root: Path, manifest: Path | None = None) -> VerifyResult:
    """Re-hash and cross-check everything reachable from `manifest` (default: the latest release)."""
    lake = Lake(lake_root)
    result = VerifyResult(target=str(manifest) if manifest else "latest release")
    try:
        root = read_version(manifest) if manifest else latest_release(lake.root)
    except LakeError as exc:
        result.problems.append(str(exc))
        return result
    if manifest is not None:
        lake = Lake(root.root)
    seen: set[tuple[str, str, str]] = set()
    stack: list[Version] = [root]
    while stack:
        version = stack.pop()
        key = (version.asset, version.partition, version.version)
        if key in seen:
            continue
        seen.add(key)
        result.versions += 1
        upstream: list[Version] = []
        for ref in version.upstream:
            try:
                upstream.append(lake.open_ref(ref))
            except LakeError as exc:
                result.problems.append(
                    f"{version.manifest_path}: cites {ref.asset}[{ref.partition}] {ref.version}: {exc}"
                )
        stack.extend(upstream)
        for entry in version.manifest["files"]:
            result.files += 1
            result.bytes += int(entry["bytes"])
        result.problems.extend(version.check_files())
        result.problems.extend(reconcile(version, upstream))
        try:
            result.problems.extend(_structure_problems(version))
        except (OSError, ValueError, KeyError) as exc:
            result.problems.append(f"{version.path}: cannot check structure: {exc}")
        extra_files = (
            {p.name for p in version.path.iterdir() if p.is_file()}
            - {MANIFEST}
            - {Path(e["path"]).parts[0] for e in version.manifest["files"]}
        )
        for name in sorted(extra_files):
            result.problems.append(f"{version.path / name}: file not listed in the manifest")
    if root.asset == RELEASE_ASSET and not result.problems:
        document = release_document(root)
        recomputed = merkle_root(iter_leaves(lineage(lake, root.upstream)))
        if recomputed != document["merkle_root"] or recomputed != root.extra.get("merkle_root"):
            result.problems.append(
                f"{root.path / 'release.json'}: Merkle root recomputes to {recomputed}, "
                f"release says {document['merkle_root']}"
            )
    return result


# ---------------------------------------------------------------- trace


def _versions(lake: Lake) -> dict[str, list[Version]]:
    out: dict[str, list[Version]] = {}
    for v in lineage(lake, [latest_release(lake.root)]):
        out.setdefault(v.asset, []).append(v)
    return out


def _files(versions: list[Version], name: str) -> list[str]:
    return [str(v.path / name) for v in versions if name in v.files]


def _query(sql: str, params: list[Any]) -> list[dict[str, Any]]:
    con = duckdb.connect()
    try:
        cursor = con.execute(sql, params)
        names = [d[0] for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()


def _document_fate(by_asset: dict[str, list[Version]], doc_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Raw location, filter decision and dedup decision of each doc_id."""
    if not doc_ids:
        return {}
    out: dict[str, dict[str, Any]] = {d: {"doc_id": d} for d in doc_ids}
    raw = _files(by_asset.get("raw_documents", []), "documents.parquet")
    if raw:
        for row in _query(
            "SELECT doc_id, source, uri, position, byte_offset, byte_length, raw_sha256 FROM read_parquet(?) "
            "WHERE list_contains(?, doc_id)",
            [raw, doc_ids],
        ):
            out[row["doc_id"]].setdefault("raw", []).append(row)
    filt = _files(by_asset.get("filtered_documents", []), "decisions.parquet")
    if filt:
        for row in _query(
            "SELECT doc_id, kept, reason, quality, language, normalized FROM read_parquet(?) "
            "WHERE list_contains(?, doc_id)",
            [filt, doc_ids],
        ):
            out[row["doc_id"]].setdefault("filter", []).append(row)
    dedup = _files(by_asset.get("duplicate_clusters", []), "decisions.parquet")
    if dedup:
        for row in _query(
            "SELECT doc_id, source, cluster_id, kept, reason, similarity, kept_source, kept_doc_id "
            "FROM read_parquet(?) WHERE list_contains(?, doc_id)",
            [dedup, doc_ids],
        ):
            out[row["doc_id"]].setdefault("dedup", []).append(row)
    return out


def trace_sample(lake_root: Path, shard: str, index: int) -> dict[str, Any]:
    """The documents a training window or packed row holds, with their whole history."""
    lake = Lake(lake_root)
    by_asset = _versions(lake)
    windows = by_asset["training_windows"][0]
    mixed = by_asset["mixed_tokens"][0]
    name = Path(shard).name
    shards = {s["path"]: s for s in windows.extra["shards"]}
    if name in shards:
        info = shards[name]
        if not 0 <= index < info["windows"]:
            raise IndexError(f"{name} has {info['windows']} windows; index {index} is out of range")
        length, stride = int(windows.extra["max_length"]), int(windows.extra["stride"])
        start = int(info["stream_start"]) + index * stride
        end = start + length + 1  # input and its shifted target
        split = info["split"]
        spans = [(start, end)]
        kind = "window"
    else:
        raise LakeError(
            f"no shard named {name!r} in training_windows {windows.version[:12]} (shards: {', '.join(sorted(shards))})"
        )
    docs = []
    stream_index = str(mixed.path / "stream_index.parquet")
    for lo, hi in spans:
        docs += _query(
            "SELECT source, doc_id, epoch, uri, position, stream_start, length FROM read_parquet(?) "
            "WHERE split = ? AND stream_start < ? AND stream_start + length > ? ORDER BY stream_start",
            [stream_index, split, hi, lo],
        )
    fates = _document_fate(by_asset, sorted({d["doc_id"] for d in docs}))
    for d in docs:
        d["token_offsets"] = [
            max(start, d["stream_start"]) - d["stream_start"],
            min(end, d["stream_start"] + d["length"]) - d["stream_start"],
        ]
        d["history"] = fates.get(d["doc_id"], {})
    return {
        "kind": kind,
        "shard": name,
        "index": index,
        "split": split,
        "stream_tokens": [start, end],
        "documents": docs,
    }


def trace_document(lake_root: Path, doc_id: str) -> dict[str, Any]:
    """Every stage a document went through in the latest release, and where it ended up."""
    lake = Lake(lake_root)
    by_asset = _versions(lake)
    fate = _document_fate(by_asset, [doc_id]).get(doc_id, {"doc_id": doc_id})
    if "raw" not in fate:
        raise LakeError(f"doc_id {doc_id} is in no raw_documents version of the latest release")
    mixed = by_asset["mixed_tokens"][0]
    placements = _query(
        "SELECT split, epoch, stream_start, length FROM read_parquet(?) WHERE doc_id = ? ORDER BY split, stream_start",
        [str(mixed.path / "stream_index.parquet"), doc_id],
    )
    windows = by_asset["training_windows"][0]
    length, stride = int(windows.extra["max_length"]), int(windows.extra["stride"])
    for p in placements:
        first = max(0, -(-(p["stream_start"] - length) // stride))
        last = (p["stream_start"] + p["length"] - 1) // stride
        shard_hits = []
        for s in windows.extra["shards"]:
            if s["split"] != p["split"]:
                continue
            lo = max(first, s["first_window"])
            hi = min(last, s["first_window"] + s["windows"] - 1)
            if lo <= hi:
                shard_hits.append({"shard": s["path"], "windows": [lo - s["first_window"], hi - s["first_window"]]})
        p["shards"] = shard_hits
    tokenized = _files(by_asset.get("tokenized_documents", []), "index.parquet")
    fate["tokenized"] = _query(
        "SELECT source, start, length FROM read_parquet(?) WHERE doc_id = ?", [tokenized, doc_id]
    )
    fate["placements"] = placements
    return fate


def trace_file(lake_root: Path, path: str) -> dict[str, Any]:
    """What became of every record of one raw file (its uri inside the source, or a path ending in it)."""
    lake = Lake(lake_root)
    by_asset = _versions(lake)
    raw_files = _files(by_asset.get("raw_documents", []), "documents.parquet")
    quarantine_files = _files(by_asset.get("raw_documents", []), "quarantine.parquet")
    records = _query(
        "SELECT doc_id, source, uri, position, raw_sha256 FROM read_parquet(?) "
        "WHERE uri = ? OR ends_with(?, '/' || uri) ORDER BY position",
        [raw_files, path, path],
    )
    quarantined = _query(
        "SELECT source, uri, position, reason, detail FROM read_parquet(?) WHERE uri = ? OR ends_with(?, '/' || uri)",
        [quarantine_files, path, path],
    )
    if not records and not quarantined:
        raise LakeError(f"no record of the latest release comes from a file matching {path!r}")
    fates = _document_fate(by_asset, sorted({r["doc_id"] for r in records}))
    mixed = by_asset["mixed_tokens"][0]
    placed = _query(
        "SELECT doc_id, split, count(*) AS placements, sum(length) AS tokens FROM read_parquet(?) "
        "WHERE list_contains(?, doc_id) GROUP BY doc_id, split",
        [str(mixed.path / "stream_index.parquet"), [r["doc_id"] for r in records]],
    )
    for r in records:
        r["history"] = fates.get(r["doc_id"], {})
        r["placements"] = [p for p in placed if p["doc_id"] == r["doc_id"]]
    return {"path": path, "records": records, "quarantined": quarantined}
