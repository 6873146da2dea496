"""`corpus verify` and `corpus trace`: check every hash of a release, and follow data through the lineage.

verify walks the lineage from a release (or any manifest), depth first over upstream references, one
version at a time: the manifest must hash to its own version id and sit in the directory of the version
that cites it; every file must exist with its recorded size and sha256 (a mismatching file whose bytes
are those of another file of the version is reported as swapped); no unlisted file may sit in a version;
counts must reconcile (corpus.reconcile); token files must agree with their indexes (lengths, offsets,
ids below the vocabulary size, window shards equal to their slice of the mixed stream, packed rows equal
to the document pieces their piece table names); and for a release, release.json and the Merkle root
must recompute and, with a public key, the release's Ed25519 signature must verify (corpus.signing).
Every problem is one line naming the file, the expected and the actual value.

Memory stays flat: files are read in 1 MiB chunks (hash and token scan in one pass, no memory map),
Parquet indexes in record batches, packed rows a bounded chunk of rows at a time, and the Merkle root is
recomputed by a streaming binary tree that holds one pending node per level (log2 of the leaf count).
What grows with the lake is one key per version (asset, partition, version id), the file names of the
version being checked, and the problems found.

trace reads the lineage's Parquet files with DuckDB (the same SQL an auditor can run by hand) and the
packed rows' piece tables with numpy; `replay_sample` re-derives a sample's tokens from the raw files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import IO, Any

import duckdb
import numpy as np
import pyarrow.parquet as pq

from corpus.lake import MANIFEST, Lake, LakeError, UpstreamRef, Version, manifest_version
from corpus.layout import PACKED_FILES, packed_shards
from corpus.metrics import MetricsError
from corpus.metrics import connect as connect_metrics
from corpus.reconcile import reconcile
from corpus.release import RELEASE_ASSET, last_released, latest_release, lineage, releases_dir

SCAN_CHUNK = 1 << 20  # bytes per read when hashing and range-checking a file
DEFAULT_VOCAB = 50257  # GPT-2; manifests that hold tokens record their own `vocab_size`
# Packed rows are checked a chunk at a time: at most this many tokens of rows and pieces per chunk, so the
# gathered index arrays stay near 8 x 1M x 8 bytes = 64 MB whatever the number of rows.
PACKED_CHUNK_TOKENS = 1 << 20
PACKED_CHUNK_PIECES = 1 << 13
SPLITS = ("train", "validation")
PIECE_TABLE = ("piece_row", "piece_start", "piece_length", "piece_doc", "piece_doc_offset")
PIECE_COVERAGE = ("piece_doc", "piece_doc_offset", "piece_length")


# ---------------------------------------------------------------- problems and results


@dataclass(frozen=True)
class Problem:
    """One finding of `verify`: the file it concerns, a kind, and the expected and actual values."""

    path: str
    kind: str
    message: str
    expected: str | None = None
    actual: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "message": self.message,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass
class VerifyResult:
    target: str
    issues: list[Problem] = field(default_factory=list)
    versions: int = 0
    files: int = 0
    bytes: int = 0
    release: str | None = None
    merkle_root: str | None = None
    signed_by: str | None = None
    not_checked: list[str] = field(default_factory=list)  # what could not be checked, and why (not a problem)

    @property
    def problems(self) -> list[str]:
        return [str(p) for p in self.issues]

    def add(
        self,
        path: str,
        kind: str,
        message: str,
        expected: Any = None,
        actual: Any = None,
        on_problem: Callable[[Problem], None] | None = None,
    ) -> None:
        """Record a problem (expected/actual as text) and hand it to `on_problem` as soon as it is found."""
        as_text = [None if value is None else str(value) for value in (expected, actual)]
        item = Problem(path, kind, message, *as_text)
        self.issues.append(item)
        if on_problem is not None:
            on_problem(item)

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "target": self.target,
            "release": self.release,
            "merkle_root": self.merkle_root,
            "signed_by": self.signed_by,
            "problems": self.problems,
            "findings": [p.to_dict() for p in self.issues],
            "not_checked": self.not_checked,
            "versions": self.versions,
            "files": self.files,
            "bytes": self.bytes,
        }


# ---------------------------------------------------------------- streaming primitives


def streaming_merkle_root(leaves: Iterable[tuple[str, str, int]]) -> str:
    """corpus.release.merkle_root for leaves given in path order, holding one pending node per tree level.

    The level-by-level tree pairs neighbours and promotes an odd last node unchanged; fed left to right, a
    node waits at its level until its right neighbour arrives, and at the end the unpaired nodes are the
    last of their levels, folded bottom up: exactly the same tree, in O(log n) memory.
    """
    pending: list[bytes | None] = []
    previous: str | None = None
    count = 0
    for path, digest, size in leaves:
        assert previous is None or path > previous, f"Merkle leaves out of order: {previous!r} before {path!r}"
        previous = path
        count += 1
        node = hashlib.sha256(f"{path}\0{digest}\0{size}".encode()).digest()
        level = 0
        while True:
            if level == len(pending):
                pending.append(None)
            left = pending[level]
            if left is None:
                pending[level] = node
                break
            node = hashlib.sha256(left + node).digest()
            pending[level] = None
            level += 1
    if not count:
        return hashlib.sha256(b"").hexdigest()
    carry: bytes | None = None
    for node in pending:
        if carry is None:
            carry = node
        elif node is not None:
            carry = hashlib.sha256(node + carry).digest()
    assert carry is not None
    return carry.hex()


@dataclass(frozen=True)
class Scan:
    sha256: str
    size: int
    tokens: int | None = None
    max_token: int | None = None
    ragged: bool = False  # the token region is not a whole number of tokens


def scan_file(path: Path, token_dtype: np.dtype | None = None, data_offset: int = 0) -> Scan:
    """sha256 and size of a file and, for a token file, its token count and largest id, in one pass."""
    digest = hashlib.sha256()
    size = 0
    high = -1
    carry = b""
    itemsize = token_dtype.itemsize if token_dtype is not None else 1
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_CHUNK):
            digest.update(chunk)
            if token_dtype is not None:
                part = carry + chunk[max(0, data_offset - size) :] if size + len(chunk) > data_offset else b""
                usable = len(part) - len(part) % itemsize
                if usable:
                    high = max(high, int(np.frombuffer(part[:usable], dtype=token_dtype).max()))
                carry = part[usable:]
            size += len(chunk)
    if token_dtype is None:
        return Scan(digest.hexdigest(), size)
    data = max(0, size - data_offset)
    return Scan(digest.hexdigest(), size, data // itemsize, high if high >= 0 else None, ragged=bool(carry))


@dataclass(frozen=True)
class NpyInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def npy_info(path: Path) -> NpyInfo:
    """Shape, dtype and data offset of a .npy file, from its header alone."""
    with open(path, "rb") as handle:
        try:
            major, _ = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle)
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid .npy file: {exc}") from exc
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered array, expected C order")
        return NpyInfo(tuple(shape), np.dtype(dtype), handle.tell())


def npy_read(path: Path, info: NpyInfo, start: int, count: int) -> np.ndarray:
    """Items [start, start + count) of the flattened array, read from the file (no memory map)."""
    count = max(0, min(count, int(np.prod(info.shape)) - start))
    with open(path, "rb") as handle:
        handle.seek(info.offset + start * info.dtype.itemsize)
        return np.fromfile(handle, dtype=info.dtype, count=count)


def _read_at(handle: IO[bytes], offset: int, count: int, dtype: str = "<u2") -> np.ndarray:
    handle.seek(offset)
    return np.fromfile(handle, dtype=dtype, count=count)


# ---------------------------------------------------------------- verify


def _token_files(version: Version) -> dict[str, bool]:
    """Files holding token ids, mapped to whether they are .npy (header before the data)."""
    extra = version.extra
    if version.asset == "tokenized_documents":
        return {"tokens.bin": False}
    if version.asset == "mixed_tokens":
        return {f"{split}.bin": False for split in SPLITS}
    # Entries lacking their path are reported by the structure checks; here they name no file.
    if version.asset == "training_windows":
        return {str(s["path"]): False for s in extra.get("shards", []) if "path" in s}
    if version.asset == "packed_sequences":
        return {
            f"{shard['dir']}/tokens.npy": True
            for split in dict(extra.get("splits", {}))
            for shard in packed_shards(version, split)
            if "dir" in shard
        }
    return {}


class _Verifier:
    def __init__(
        self,
        lake: Lake,
        result: VerifyResult,
        on_problem: Callable[[Problem], None] | None,
    ) -> None:
        self.lake = lake
        self.result = result
        self.on_problem = on_problem
        self.walked: list[Version] = []  # the versions `walk` could open, in walk order

    def problem(self, path: Path | str, kind: str, message: str, expected: Any = None, actual: Any = None) -> None:
        self.result.add(str(path), kind, message, expected, actual, self.on_problem)

    # -- manifests

    def open(self, directory: Path, cited: UpstreamRef | None, cited_by: str | None) -> Version | None:
        """Read a version's manifest, reporting every way it can be wrong; None when it cannot be read."""
        path = directory / MANIFEST
        who = f" (cited by {cited_by})" if cited_by else ""
        if not path.is_file():
            if cited is not None:
                self.problem(
                    path,
                    "missing",
                    f"missing: {cited.asset}[{cited.partition}] version {cited.version} not found{who}",
                    expected=cited.version,
                    actual="no such manifest",
                )
            else:
                self.problem(path, "missing", "manifest not found", actual="no such file")
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as exc:
            self.problem(path, "manifest", f"not a valid JSON manifest: {exc}{who}")
            return None
        missing = [k for k in ("asset", "partition", "version", "files") if k not in manifest]
        if missing:
            self.problem(path, "manifest", f"manifest has no {', '.join(map(repr, missing))} field{who}")
            return None
        claimed = str(manifest["version"])
        actual = manifest_version(manifest)
        if actual != claimed:
            self.problem(
                path,
                "manifest",
                f"manifest content hashes to {actual}, but claims version {claimed}: edited after it was written",
                expected=claimed,
                actual=actual,
            )
        expected = cited.version if cited is not None else directory.name
        if claimed != expected or directory.name != expected:
            self.problem(
                path,
                "manifest",
                f"holds the manifest of {manifest['asset']}[{manifest['partition']}] version {claimed}, expected "
                f"version {expected}: replaced by a manifest from another version or run{who}",
                expected=expected,
                actual=claimed,
            )
        elif cited is not None and (manifest["asset"], manifest["partition"]) != (cited.asset, cited.partition):
            self.problem(
                path,
                "manifest",
                f"is a manifest of {manifest['asset']}[{manifest['partition']}], expected "
                f"{cited.asset}[{cited.partition}]{who}",
                expected=f"{cited.asset}[{cited.partition}]",
                actual=f"{manifest['asset']}[{manifest['partition']}]",
            )
        asset = cited.asset if cited is not None else str(manifest["asset"])
        partition = cited.partition if cited is not None else str(manifest["partition"])
        return Version(directory.parent.parent.parent, asset, partition, directory.name, manifest)

    def upstream(self, version: Version) -> list[Version]:
        """The versions `version` cites, opened quietly (their own problems are reported when they are visited)."""
        out = []
        for ref in version.upstream:
            directory = self.lake.partition_dir(ref.asset, ref.partition) / ref.version
            try:
                manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(manifest, dict):
                out.append(Version(self.lake.root, ref.asset, ref.partition, ref.version, manifest))
        return out

    # -- files

    def files(self, version: Version) -> dict[str, Scan]:
        entries = version.manifest["files"]
        tokens = _token_files(version)
        vocab = self.vocab(version)
        by_hash: dict[str, list[str]] = {}
        for entry in entries:
            by_hash.setdefault(str(entry["sha256"]), []).append(str(entry["path"]))
        scans: dict[str, Scan] = {}
        for entry in entries:
            name, expected, expected_bytes = str(entry["path"]), str(entry["sha256"]), int(entry["bytes"])
            self.result.files += 1
            self.result.bytes += expected_bytes
            path = version.path / name
            if not path.is_file():
                self.problem(
                    path,
                    "missing",
                    f"missing: expected sha256 {expected} ({expected_bytes} bytes), actual: no such file",
                    expected=expected,
                    actual="missing",
                )
                continue
            dtype: np.dtype | None = None
            offset = 0
            if name in tokens:
                dtype = np.dtype("<u2")
                if tokens[name]:
                    try:
                        info = npy_info(path)
                        dtype, offset = info.dtype, info.offset
                    except (ValueError, OSError) as exc:
                        self.problem(path, "structure", f"cannot read the .npy header: {exc}")
                        dtype = None
            scan = scan_file(path, dtype, offset)
            scans[name] = scan
            if scan.sha256 != expected or scan.size != expected_bytes:
                what = "size and sha256" if scan.size != expected_bytes else "sha256"
                twins = [n for n in by_hash.get(scan.sha256, []) if n != name]
                hint = f"; its bytes are those of {', '.join(twins)} (files swapped or copied)" if twins else ""
                if scan.size < expected_bytes:
                    hint += f"; {expected_bytes - scan.size} bytes short (truncated)"
                self.problem(
                    path,
                    "sha256",
                    f"{what} mismatch: expected sha256 {expected} ({expected_bytes} bytes), "
                    f"actual sha256 {scan.sha256} ({scan.size} bytes){hint}",
                    expected=expected,
                    actual=scan.sha256,
                )
            if dtype is not None and scan.max_token is not None and scan.max_token >= vocab:
                self.problem(
                    path,
                    "structure",
                    f"token id {scan.max_token} >= vocabulary size {vocab}",
                    expected=f"< {vocab}",
                    actual=scan.max_token,
                )
            if scan.ragged:
                self.problem(path, "structure", f"{scan.size} bytes are not a whole number of {dtype} tokens")
        listed = {str(e["path"]) for e in entries}
        holders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents}
        for base, dirs, names in os.walk(version.path):
            for name in list(dirs):
                path = Path(base) / name
                rel = path.relative_to(version.path).as_posix()
                if path.is_symlink() or rel not in holders:
                    # A link is never followed (it could reach anywhere); a directory no listed file is in is
                    # reported once, not file by file.
                    what = f"a symbolic link to {os.readlink(path)}" if path.is_symlink() else "a directory"
                    self.problem(path, "unlisted", f"{what} that no file of the manifest is in", expected="absent")
                    dirs.remove(name)
            for name in names:
                path = Path(base) / name
                rel = path.relative_to(version.path).as_posix()
                if rel != MANIFEST and rel not in listed:
                    self.problem(
                        path, "unlisted", "file not listed in the manifest", expected="absent", actual="present"
                    )
                elif path.is_symlink():
                    self.problem(
                        path,
                        "unlisted",
                        f"a symbolic link to {os.readlink(path)}: a version holds its files, not links to them",
                        expected="a file",
                        actual="a link",
                    )
        return scans

    def vocab(self, version: Version) -> int:
        return int(version.extra.get("vocab_size", DEFAULT_VOCAB))

    # -- structure

    def structure(self, version: Version, upstream: list[Version], scans: dict[str, Scan]) -> None:
        try:
            if version.asset == "tokenized_documents":
                self.tokenized(version, scans)
            elif version.asset == "mixed_tokens":
                self.mixed(version, scans)
            elif version.asset == "training_windows":
                self.windows(version, upstream, scans)
            elif version.asset == "packed_sequences":
                self.packed(version, upstream)
            elif version.asset == RELEASE_ASSET:
                self.release_document(version)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            self.problem(version.path, "structure", f"cannot check structure: {type(exc).__name__}: {exc}")

    def tokenized(self, version: Version, scans: dict[str, Scan]) -> None:
        index = version.path / "index.parquet"
        scan = scans.get("tokens.bin")
        if not index.is_file() or scan is None:
            return
        position = 0
        for batch in pq.ParquetFile(index).iter_batches(batch_size=65536, columns=["start", "length"]):
            starts = batch.column(0).to_numpy()
            lengths = batch.column(1).to_numpy()
            expected = position + np.concatenate(([0], np.cumsum(lengths)[:-1]))
            bad = np.nonzero(starts != expected)[0]
            if bad.size:
                self.problem(
                    index,
                    "structure",
                    f"document offsets are not contiguous: start {int(starts[bad[0]])}, "
                    f"expected {int(expected[bad[0]])}",
                    expected=int(expected[bad[0]]),
                    actual=int(starts[bad[0]]),
                )
                return
            position += int(lengths.sum())
        if scan.tokens != position:
            self.problem(
                version.path / "tokens.bin",
                "structure",
                f"{scan.tokens} tokens, index.parquet covers {position}",
                expected=position,
                actual=scan.tokens,
            )

    def mixed(self, version: Version, scans: dict[str, Scan]) -> None:
        counts = version.counts
        totals = dict.fromkeys(SPLITS, 0)
        index = version.path / "stream_index.parquet"
        if index.is_file():
            for batch in pq.ParquetFile(index).iter_batches(
                batch_size=65536, columns=["split", "stream_start", "length"]
            ):
                splits = batch.column(0).to_numpy(zero_copy_only=False)
                starts = batch.column(1).to_numpy()
                lengths = batch.column(2).to_numpy()
                for split in SPLITS:
                    mask = splits == split
                    if not mask.any():
                        continue
                    s, n = starts[mask], lengths[mask]
                    expected = totals[split] + np.concatenate(([0], np.cumsum(n)[:-1]))
                    bad = np.nonzero(s != expected)[0]
                    if bad.size:
                        self.problem(
                            index,
                            "structure",
                            f"{split}: stream_start {int(s[bad[0]])}, "
                            f"expected {int(expected[bad[0]])} (gap or overlap)",
                            expected=int(expected[bad[0]]),
                            actual=int(s[bad[0]]),
                        )
                        return
                    totals[split] += int(n.sum())
        for split in SPLITS:
            scan = scans.get(f"{split}.bin")
            expected_tokens = counts.get(f"{split}_tokens")
            for what, value in (
                ("stream_index.parquet", totals[split] if index.is_file() else None),
                ("manifest", expected_tokens),
            ):
                if scan is not None and value is not None and scan.tokens != value:
                    self.problem(
                        version.path / f"{split}.bin",
                        "structure",
                        f"{scan.tokens} tokens, {what} says {value}",
                        expected=value,
                        actual=scan.tokens,
                    )

    def windows(self, version: Version, upstream: list[Version], scans: dict[str, Scan]) -> None:
        extra = version.extra
        length, stride = int(extra["max_length"]), int(extra["stride"])
        per_shard = int(version.manifest.get("config", {}).get("windows_per_shard", 0)) or None
        mixed = next((u for u in upstream if u.asset == "mixed_tokens"), None)
        next_window = dict.fromkeys(SPLITS, 0)
        for shard in extra.get("shards", []):
            path = version.path / shard["path"]
            tokens, windows, split = int(shard["tokens"]), int(shard["windows"]), str(shard["split"])
            expected_windows = max(0, -(-(tokens - length) // stride))
            if expected_windows != windows:
                self.problem(
                    path,
                    "counts",
                    f"{tokens} tokens give {expected_windows} windows of {length} every {stride}, "
                    f"manifest says {windows}",
                    expected=expected_windows,
                    actual=windows,
                )
            if int(shard["first_window"]) != next_window.get(split, 0):
                self.problem(
                    path,
                    "structure",
                    f"first_window {shard['first_window']}, expected {next_window.get(split, 0)} (shards out of order)",
                    expected=next_window.get(split, 0),
                    actual=shard["first_window"],
                )
            if int(shard["stream_start"]) != int(shard["first_window"]) * stride:
                self.problem(
                    path,
                    "structure",
                    f"stream_start {shard['stream_start']}, expected first_window x stride = "
                    f"{int(shard['first_window']) * stride}",
                    expected=int(shard["first_window"]) * stride,
                    actual=shard["stream_start"],
                )
            if per_shard is not None and windows > per_shard:
                self.problem(path, "structure", f"{windows} windows, windows_per_shard is {per_shard}")
            next_window[split] = int(shard["first_window"]) + windows
            scan = scans.get(str(shard["path"]))
            if scan is not None and scan.tokens != tokens:
                self.problem(
                    path,
                    "structure",
                    f"{scan.tokens} tokens, manifest says {tokens}",
                    expected=tokens,
                    actual=scan.tokens,
                )
                continue
            if mixed is not None and scan is not None:
                self.window_content(path, mixed.path / f"{split}.bin", int(shard["stream_start"]), tokens)

    def window_content(self, shard: Path, stream: Path, start: int, tokens: int) -> None:
        """The shard must be exactly its slice of the mixed stream (both hashed: this catches a wrong cut)."""
        if not stream.is_file():
            return
        if stream.stat().st_size < 2 * (start + tokens):
            self.problem(
                shard,
                "structure",
                f"slice [{start}, {start + tokens}) lies beyond the {stream.stat().st_size // 2} tokens of {stream}",
            )
            return
        step = SCAN_CHUNK // 2
        with open(shard, "rb") as a, open(stream, "rb") as b:
            for at in range(0, tokens, step):
                n = min(step, tokens - at)
                x = _read_at(a, 2 * at, n)
                y = _read_at(b, 2 * (start + at), n)
                if not np.array_equal(x, y):
                    first = int(np.nonzero(x != y)[0][0]) if len(x) == len(y) else min(len(x), len(y))
                    self.problem(
                        shard,
                        "structure",
                        f"token {at + first} differs from the mixed stream {stream} at {start + at + first}",
                        expected=int(y[first]) if first < len(y) else None,
                        actual=int(x[first]) if first < len(x) else None,
                    )
                    return

    def packed(self, version: Version, upstream: list[Version]) -> None:
        mixed = next((u for u in upstream if u.asset == "mixed_tokens"), None)
        length = int(version.extra["max_length"])
        for split, meta in dict(version.extra.get("splits", {})).items():
            shards = packed_shards(version, split)
            if meta.get("rows") and not shards:
                self.problem(version.manifest_path, "structure", f"{split} has {meta['rows']} rows but lists no shards")
            if not shards or not self.packed_shard_table(version, split, meta, shards, length):
                continue
            with tempfile.TemporaryDirectory(prefix="corpus-verify-") as tmp:
                docs = self._split_documents(mixed, split, Path(tmp)) if mixed is not None else None
                stream = mixed.path / f"{split}.bin" if mixed is not None else None
                for shard in shards:
                    self.packed_shard(version.path / str(shard["dir"]), shard, length, docs, stream)
                if docs is not None:
                    self.packed_coverage(version, split, shards, docs)

    def packed_coverage(
        self, version: Version, split: str, shards: Sequence[Mapping[str, Any]], docs: tuple[Path, Path, int]
    ) -> None:
        """Every token of every document of the split is in exactly one piece: per document, the pieces'
        (offset, length) tile [0, length). Reads three int64 columns of the piece tables (24 bytes a piece)."""
        if not all((version.path / str(s["dir"]) / f"{n}.npy").is_file() for s in shards for n in PIECE_COVERAGE):
            return  # reported as missing files
        try:
            doc, offset, length = piece_columns(version, shards, PIECE_COVERAGE)
        except (OSError, ValueError) as exc:
            self.problem(version.path / split, "structure", f"cannot read the piece tables: {exc}")
            return
        doc_lengths = np.fromfile(docs[1], dtype="<i8")
        if doc.size and (doc.min() < 0 or doc.max() >= doc_lengths.size):
            return  # reported by the shard checks
        order = np.lexsort((offset, doc))
        doc, offset, length = doc[order], offset[order], length[order]
        first = np.ones(doc.size, dtype=bool)
        first[1:] = doc[1:] != doc[:-1]
        expected = np.where(first, 0, np.concatenate(([0], offset[:-1] + length[:-1])))
        covered = np.zeros(doc_lengths.size, dtype=np.int64)
        np.add.at(covered, doc, length)
        gap = np.nonzero(offset != expected)[0]
        if gap.size:
            i = int(gap[0])
            self.problem(
                version.path / split,
                "structure",
                f"document {int(doc[i])}: a piece starts at token {int(offset[i])}, the pieces before end at "
                f"{int(expected[i])} (a gap or an overlap)",
                expected=int(expected[i]),
                actual=int(offset[i]),
            )
        elif not np.array_equal(covered, doc_lengths):
            i = int(np.nonzero(covered != doc_lengths)[0][0])
            self.problem(
                version.path / split,
                "structure",
                f"document {i} has {int(doc_lengths[i])} tokens, the packed pieces hold {int(covered[i])}",
                expected=int(doc_lengths[i]),
                actual=int(covered[i]),
            )

    def packed_shard_table(
        self, version: Version, split: str, meta: Mapping[str, Any], shards: Sequence[Mapping[str, Any]], length: int
    ) -> bool:
        """The manifest's shards of a split: complete entries, distinct directories that hold every file of
        the split, rows that follow each other, totals that add up to the split's figures, and efficiency
        stated as real tokens / (rows x max_length). False when the entries cannot be checked further."""
        needed = ("dir", "first_row", "rows")
        for number, shard in enumerate(shards):
            missing = [key for key in needed if key not in shard]
            if missing:
                self.problem(version.manifest_path, "structure", f"{split} shard {number} has no {', '.join(missing)}")
                return False
        dirs = [str(shard["dir"]) for shard in shards]
        if len(set(dirs)) != len(dirs):
            again = next(d for d in dirs if dirs.count(d) > 1)
            self.problem(version.manifest_path, "structure", f"{split} lists shard {again} more than once")
            return False
        listed = {f"{d}/{name}.npy" for d in dirs for name in PACKED_FILES}
        unlisted = sorted(n for n in version.files if n.startswith(f"{split}/") and n not in listed)
        if unlisted:
            self.problem(
                version.path / unlisted[0],
                "structure",
                f"in the manifest's files but in no {split} shard ({len(unlisted)} such files)",
            )
        next_row = 0
        for shard in shards:
            stated = shard.get("efficiency")
            actual = int(shard.get("real_tokens") or 0) / (int(shard["rows"]) * length) if shard["rows"] else 0.0
            if stated is not None and abs(float(stated) - actual) > 1e-9:
                self.problem(
                    version.path / str(shard["dir"]),
                    "counts",
                    f"efficiency {stated}, but {shard.get('real_tokens')} real tokens in {shard['rows']} rows of "
                    f"{length} make {actual}",
                    expected=actual,
                    actual=stated,
                )
            if int(shard["first_row"]) != next_row:
                self.problem(
                    version.path / str(shard["dir"]),
                    "counts",
                    f"shard starts at row {shard['first_row']}, the earlier {split} shards hold {next_row} rows",
                    expected=next_row,
                    actual=int(shard["first_row"]),
                )
            next_row = int(shard["first_row"]) + int(shard["rows"])
        for key in ("rows", "pieces", "real_tokens"):
            total = sum(int(shard.get(key) or 0) for shard in shards)
            if meta.get(key) is not None and total != int(meta[key]):
                self.problem(
                    version.manifest_path,
                    "counts",
                    f"{split} shards hold {total} {key.replace('_', ' ')}, the split says {meta[key]}",
                    expected=meta[key],
                    actual=total,
                )
        return True

    def packed_shard(
        self,
        base: Path,
        meta: Mapping[str, Any],
        length: int,
        docs: tuple[Path, Path, int] | None,
        stream: Path | None,
    ) -> None:
        names = PACKED_FILES
        if not all((base / f"{n}.npy").is_file() for n in names):
            return  # reported as missing files
        info = {n: npy_info(base / f"{n}.npy") for n in names}
        rows = int(meta["rows"])
        pieces = info["piece_row"].shape[0] if info["piece_row"].shape else 0
        expected_shapes = {
            "tokens": (rows, length),
            "segment_ids": (rows, length),
            "position_ids": (rows, length),
            "cu_seqlens_offsets": (rows + 1,),
            "cu_seqlens": (pieces + rows,),
            **{n: (pieces,) for n in names if n.startswith("piece_")},
        }
        bad = False
        for name, shape in expected_shapes.items():
            if info[name].shape != shape:
                self.problem(
                    base / f"{name}.npy",
                    "structure",
                    f"shape {info[name].shape}, expected {shape}",
                    expected=shape,
                    actual=info[name].shape,
                )
                bad = True
        if meta.get("pieces") is not None and pieces != int(meta["pieces"]):
            self.problem(
                base / "piece_row.npy",
                "counts",
                f"{pieces} pieces, manifest says {meta['pieces']}",
                expected=meta["pieces"],
                actual=pieces,
            )
        if bad:
            return
        self._packed_rows(base, info, rows, length, pieces, meta, docs, stream)

    @staticmethod
    def _split_documents(mixed: Version, split: str, tmp: Path) -> tuple[Path, Path, int] | None:
        """The split's document starts and lengths, in stream order, spilled to two int64 files."""
        index = mixed.path / "stream_index.parquet"
        if not index.is_file():
            return None
        starts_path, lengths_path = tmp / "starts.i64", tmp / "lengths.i64"
        n = 0
        with open(starts_path, "wb") as starts, open(lengths_path, "wb") as lengths:
            for batch in pq.ParquetFile(index).iter_batches(
                batch_size=65536, columns=["split", "stream_start", "length"]
            ):
                mask = batch.column(0).to_numpy(zero_copy_only=False) == split
                batch.column(1).to_numpy()[mask].astype("<i8").tofile(starts)
                batch.column(2).to_numpy()[mask].astype("<i8").tofile(lengths)
                n += int(mask.sum())
        return starts_path, lengths_path, n

    def _packed_rows(
        self,
        base: Path,
        info: dict[str, NpyInfo],
        rows: int,
        length: int,
        pieces: int,
        meta: Mapping[str, Any],
        docs: tuple[Path, Path, int] | None,
        stream: Path | None,
    ) -> None:
        offsets_all = info["cu_seqlens_offsets"]
        first = npy_read(base / "cu_seqlens_offsets.npy", offsets_all, 0, 1)
        last = npy_read(base / "cu_seqlens_offsets.npy", offsets_all, rows, 1)
        if int(first[0]) != 0 or int(last[0]) != pieces + rows:
            self.problem(
                base / "cu_seqlens_offsets.npy",
                "structure",
                f"runs from {int(first[0])} to {int(last[0])}, expected 0 to {pieces + rows}",
                expected=f"0..{pieces + rows}",
                actual=f"{int(first[0])}..{int(last[0])}",
            )
            return
        real = 0
        rows_per_chunk = max(1, PACKED_CHUNK_TOKENS // length)
        r0 = 0
        while r0 < rows:
            offsets = npy_read(base / "cu_seqlens_offsets.npy", offsets_all, r0, rows_per_chunk + 1).astype(np.int64)
            piece_at = offsets - np.arange(r0, r0 + len(offsets), dtype=np.int64)  # row r's first piece
            # Cut the chunk where its pieces would exceed the cap (at least one row).
            r_count = int(np.searchsorted(piece_at - piece_at[0], PACKED_CHUNK_PIECES, side="right")) - 1
            r_count = max(1, min(r_count, len(offsets) - 1))
            p0, p1 = int(piece_at[0]), int(piece_at[r_count])
            if np.any(np.diff(piece_at[: r_count + 1]) < 0) or p1 > pieces:
                self.problem(
                    base / "cu_seqlens_offsets.npy", "structure", f"row offsets decrease or overrun near row {r0}"
                )
                return
            table = {n: npy_read(base / f"{n}.npy", info[n], p0, p1 - p0).astype(np.int64) for n in PIECE_TABLE}
            if self._check_piece_table(base, table, np.diff(piece_at[: r_count + 1]), r0, length, p0):
                return
            real += int(table["piece_length"].sum())
            if not self._check_row_arrays(base, info, table, r0, r_count, length, p0, docs, stream):
                return
            r0 += r_count
        if meta.get("real_tokens") is not None and real != int(meta["real_tokens"]):
            self.problem(
                base / "piece_length.npy",
                "counts",
                f"pieces hold {real} tokens, manifest says real_tokens = {meta['real_tokens']}",
                expected=meta["real_tokens"],
                actual=real,
            )

    def _check_piece_table(
        self, base: Path, table: dict[str, np.ndarray], counts: np.ndarray, r0: int, length: int, p0: int
    ) -> bool:
        """Problems in one chunk of the piece table; True when one was found."""
        rows = np.repeat(np.arange(r0, r0 + len(counts), dtype=np.int64), counts)
        lengths, starts = table["piece_length"], table["piece_start"]
        first_of_row = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        cum = np.cumsum(lengths) - lengths  # exclusive, over the chunk
        expected_starts = cum - np.repeat(cum[first_of_row] if len(first_of_row) else cum[:0], counts)
        checks = (
            ("piece_row", table["piece_row"] != rows, rows),
            ("piece_length", lengths < 1, None),
            ("piece_start", starts != expected_starts, expected_starts),
            ("piece_start", starts + lengths > length, None),
        )
        for name, bad, expected in checks:
            at = np.nonzero(bad)[0]
            if at.size:
                i = int(at[0])
                want = f", expected {int(expected[i])}" if expected is not None else ""
                self.problem(
                    base / f"{name}.npy",
                    "structure",
                    f"piece {p0 + i}: {name} {int(table[name][i])}{want} (start {int(starts[i])}, length "
                    f"{int(lengths[i])}, row capacity {length})",
                    expected=None if expected is None else int(expected[i]),
                    actual=int(table[name][i]),
                )
                return True
        return False

    def _check_row_arrays(
        self,
        base: Path,
        info: dict[str, NpyInfo],
        table: dict[str, np.ndarray],
        r0: int,
        r_count: int,
        length: int,
        p0: int,
        docs: tuple[Path, Path, int] | None,
        stream: Path | None,
    ) -> bool:
        """segment/position ids against the piece table, and each piece's tokens against its document."""
        lengths = table["piece_length"]
        total = int(lengths.sum())
        row_of = np.repeat(table["piece_row"] - r0, lengths)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        col = np.repeat(table["piece_start"], lengths) + within
        counts = np.bincount(table["piece_row"] - r0, minlength=r_count)
        first_of_row = np.concatenate(([0], np.cumsum(counts)[:-1]))
        segment = np.arange(len(lengths), dtype=np.int64) - np.repeat(first_of_row, counts)
        expected_seg = np.full((r_count, length), -1, dtype=np.int64)
        expected_pos = np.zeros((r_count, length), dtype=np.int64)
        expected_seg[row_of, col] = np.repeat(segment, lengths)
        expected_pos[row_of, col] = within
        for name, expected in (("segment_ids", expected_seg), ("position_ids", expected_pos)):
            actual = npy_read(base / f"{name}.npy", info[name], r0 * length, r_count * length).reshape(r_count, length)
            bad = np.argwhere(actual != expected)
            if bad.size:
                r, c = (int(x) for x in bad[0])
                self.problem(
                    base / f"{name}.npy",
                    "structure",
                    f"row {r0 + r} column {c}: {int(actual[r, c])}, the piece table gives {int(expected[r, c])}",
                    expected=int(expected[r, c]),
                    actual=int(actual[r, c]),
                )
                return False
        if docs is None or stream is None or not stream.is_file():
            return True
        starts_path, lengths_path, n_docs = docs
        doc = table["piece_doc"]
        if np.any((doc < 0) | (doc >= n_docs)):
            i = int(np.nonzero((doc < 0) | (doc >= n_docs))[0][0])
            self.problem(
                base / "piece_doc.npy",
                "structure",
                f"piece {p0 + i} names document {int(doc[i])}, the split has {n_docs}",
                expected=f"< {n_docs}",
                actual=int(doc[i]),
            )
            return False
        if n_docs == 0 or stream.stat().st_size == 0:
            return True
        doc_starts = np.memmap(starts_path, dtype="<i8", mode="r")
        doc_lengths = np.memmap(lengths_path, dtype="<i8", mode="r")
        tokens_in_stream = np.memmap(stream, dtype="<u2", mode="r")
        try:
            ends = table["piece_doc_offset"] + lengths
            over = np.nonzero((table["piece_doc_offset"] < 0) | (ends > doc_lengths[doc]))[0]
            if over.size:
                i = int(over[0])
                self.problem(
                    base / "piece_doc_offset.npy",
                    "structure",
                    f"piece {p0 + i}: tokens [{int(table['piece_doc_offset'][i])}, {int(ends[i])}) of document "
                    f"{int(doc[i])}, which has {int(doc_lengths[doc[i]])}",
                    expected=f"<= {int(doc_lengths[doc[i]])}",
                    actual=int(ends[i]),
                )
                return False
            position = np.repeat(doc_starts[doc] + table["piece_doc_offset"], lengths) + within
            expected_tokens = np.asarray(tokens_in_stream[position])
        finally:
            del doc_starts, doc_lengths, tokens_in_stream  # unmap: touched pages leave the resident set
        actual_rows = npy_read(base / "tokens.npy", info["tokens"], r0 * length, r_count * length).reshape(
            r_count, length
        )
        mismatch = np.nonzero(actual_rows[row_of, col] != expected_tokens)[0]
        if mismatch.size:
            i = int(mismatch[0])
            self.problem(
                base / "tokens.npy",
                "structure",
                f"row {r0 + int(row_of[i])} column {int(col[i])}: token {int(actual_rows[row_of[i], col[i]])}, the "
                f"document piece in {stream} holds {int(expected_tokens[i])}",
                expected=int(expected_tokens[i]),
                actual=int(actual_rows[row_of[i], col[i]]),
            )
            return False
        return True

    def release_document(self, release: Version) -> None:
        """release.json against its manifest (the lineage itself is checked by `merkle`)."""
        path = release.path / "release.json"
        if not path.is_file():
            return
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("merkle_root") != release.extra.get("merkle_root"):
            self.problem(
                path,
                "merkle",
                f"merkle_root {document.get('merkle_root')}, "
                f"the release manifest says {release.extra.get('merkle_root')}",
                expected=release.extra.get("merkle_root"),
                actual=document.get("merkle_root"),
            )
        finals = {ref.asset: ref.version for ref in release.upstream}
        if document.get("finals") != finals:
            self.problem(
                path,
                "merkle",
                f"finals {document.get('finals')}, the release manifest cites {finals}",
                expected=finals,
                actual=document.get("finals"),
            )

    # -- the release's Merkle root

    def merkle(self, release: Version, visited: set[tuple[str, str, str]]) -> None:
        keys = sorted(
            (k for k in visited if k[0] != RELEASE_ASSET or k[2] != release.version), key=lambda k: "/".join(k) + "/"
        )
        path = release.path / "release.json"
        document: dict[str, Any] = {}
        if path.is_file():
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                document = {}
        listed = sorted((v["asset"], v["partition"], v["version"]) for v in document.get("versions", []))
        if listed and listed != sorted(keys):
            extra_keys = sorted(set(listed) - set(keys))[:3]
            lacking = sorted(set(keys) - set(listed))[:3]
            self.problem(
                path,
                "merkle",
                f"lists {len(listed)} versions, the lineage has {len(keys)} (only in release.json: {extra_keys}; "
                f"only in the lineage: {lacking})",
                expected=len(keys),
                actual=len(listed),
            )

        def leaves() -> Iterator[tuple[str, str, int]]:
            for asset, partition, version in keys:
                try:
                    manifest = json.loads(
                        (self.lake.partition_dir(asset, partition) / version / MANIFEST).read_text("utf-8")
                    )
                except (OSError, ValueError):
                    continue  # already reported as missing or unreadable
                base = f"{asset}/{partition}/{version}"
                entries = [
                    (f"{base}/{e['path']}", str(e["sha256"]), int(e["bytes"])) for e in manifest.get("files", [])
                ]
                entries.append((f"{base}/{MANIFEST}", version, 0))
                yield from sorted(entries)

        recomputed = streaming_merkle_root(leaves())
        self.result.merkle_root = recomputed
        claimed = release.extra.get("merkle_root")
        if recomputed != claimed:
            self.problem(
                release.manifest_path,
                "merkle",
                f"Merkle root over the lineage's {len(keys)} versions recomputes to {recomputed}, "
                f"release says {claimed}",
                expected=claimed,
                actual=recomputed,
            )

    def pointer(self, release: Version) -> None:
        """releases/LATEST must name this release and its Merkle root."""
        pointer = releases_dir(self.lake.root) / "LATEST"
        try:
            record = json.loads(pointer.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if record.get("version") != release.version:
            return  # verifying an older release by its manifest
        if record.get("merkle_root") != release.extra.get("merkle_root"):
            self.problem(
                pointer,
                "merkle",
                f"merkle_root {record.get('merkle_root')}, the release says {release.extra.get('merkle_root')}",
                expected=release.extra.get("merkle_root"),
                actual=record.get("merkle_root"),
            )
        history = pointer.with_name("history.jsonl")
        newest = last_released(history.read_text(encoding="utf-8")) if history.is_file() else None
        if newest is not None and newest != release.version:
            self.problem(
                pointer,
                "structure",
                f"names release {release.version[:12]}, but the newest in {history.name} is {newest[:12]}: LATEST was "
                "moved back, or a run stopped between the two writes (rerun it)",
                expected=newest,
                actual=release.version,
            )

    # -- metrics.duckdb

    def metrics(self, release: Version) -> None:
        """The rows `corpus report` and the README's SQL read must say what the lake holds.

        For every version verified and every run that recorded it: `materializations` has its code version
        and counts, `drops` its dropped counts, and the tables that mirror a file of the version hold exactly
        that file's rows (`quarantine` = quarantine.parquet, `duplicate_decisions` = decisions.parquet).
        `smoke_training` rows of this release equal the result.json of the smoke_training version they name.
        A lake without metrics.duckdb (e.g. one `corpus pull` made) has nothing to check.
        """
        path = self.lake.root / "metrics.duckdb"
        if not path.is_file():
            return
        try:
            with connect_metrics(path, read_only=True) as con:  # waits, bounded, while a writer holds the lock
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                if "materializations" not in tables:
                    return
                for version in self.walked:
                    self.metric_rows(con, tables, path, version)
                if "smoke_training" in tables:
                    self.smoke_rows(con, path, release)
        except MetricsError as exc:
            self.result.not_checked.append(f"{path}: {exc}")
        except duckdb.Error as exc:
            self.problem(path, "metrics", f"cannot read: {exc}")

    def metric_rows(self, con: duckdb.DuckDBPyConnection, tables: set[str], path: Path, version: Version) -> None:
        key = [version.asset, version.partition, version.version]
        where = "asset = ? AND partition = ? AND version = ?"
        name = f"{version.asset}[{version.partition}] {version.version[:12]}"
        runs = con.execute(
            f"SELECT run_id, code_version, counts, reused FROM materializations WHERE {where}", key
        ).fetchall()
        stated = {str(k): int(n) for k, n in dict(version.counts.get("dropped", {})).items() if int(n)}
        for run_id, code_version, counts, reused in runs:
            at = f"{name}, run {run_id}"
            try:
                recorded_counts = json.loads(counts)
                drops = (
                    con.execute(
                        f"SELECT reason, documents FROM drops WHERE {where} AND run_id = ?", [*key, run_id]
                    ).fetchall()
                    if "drops" in tables
                    else None
                )
                held = None if drops is None else {str(r): int(n) for r, n in drops if int(n)}
            except (TypeError, ValueError) as exc:  # NULL or garbage where counts belong
                self.problem(path, "metrics", f"materializations or drops of {at}: unreadable row ({exc})")
                continue
            if code_version != version.manifest.get("code_version"):
                self.problem(
                    path,
                    "metrics",
                    f"materializations of {at}: code_version {code_version}, the manifest says "
                    f"{version.manifest.get('code_version')}",
                    expected=version.manifest.get("code_version"),
                    actual=code_version,
                )
            if recorded_counts != version.counts:
                self.problem(
                    path,
                    "metrics",
                    f"materializations of {at}: counts differ from the manifest's",
                    expected=json.dumps(version.counts, sort_keys=True),
                    actual=counts,
                )
            if held is not None and held != stated:
                self.problem(path, "metrics", f"drops of {at} differ from the manifest's dropped counts", stated, held)
            mirror = METRIC_MIRRORS.get(version.asset)
            if mirror is None or mirror[0] not in tables or mirror[1] not in version.files:
                continue
            table, file = mirror
            columns = ", ".join(f'"{c}"' for c in pq.read_schema(version.file(file)).names)
            db = f"SELECT {columns} FROM {table} WHERE {where} AND run_id = ?"
            lake_rows = f"SELECT {columns} FROM read_parquet(?)"
            # count and an order-free sum of row hashes stream in constant memory; only a mismatch pays for
            # the row-by-row EXCEPT ALL that says how many rows differ.
            digest = "SELECT count(*), coalesce(sum(hash(({cols}))::HUGEINT), 0) FROM ({rows})"
            in_db = con.execute(digest.format(cols=columns, rows=db), [*key, run_id]).fetchone()
            if reused and in_db is not None and in_db[0] == 0:
                continue  # a run that reused the version records its rows once, under the run that built it
            in_lake = con.execute(digest.format(cols=columns, rows=lake_rows), [str(version.file(file))]).fetchone()
            if in_db == in_lake:
                continue
            extra, missing = con.execute(
                f"SELECT (SELECT count(*) FROM ({db} EXCEPT ALL {lake_rows})), "
                f"(SELECT count(*) FROM ({lake_rows} EXCEPT ALL {db}))",
                [*key, run_id, str(version.file(file)), str(version.file(file)), *key, run_id],
            ).fetchone() or (0, 0)
            if extra or missing:
                self.problem(
                    path,
                    "metrics",
                    f"{table} rows of {at}: {extra} not in {version.path / file}, {missing} of its rows missing",
                    expected=0,
                    actual={"not_in_file": extra, "missing": missing},
                )

    def smoke_rows(self, con: duckdb.DuckDBPyConnection, path: Path, release: Version) -> None:
        cursor = con.execute("SELECT * FROM smoke_training WHERE release_version = ?", [release.version])
        names = [d[0] for d in cursor.description or []]
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            directory = self.lake.partition_dir("smoke_training", str(row["partition"])) / str(row["version"])
            if not (directory / MANIFEST).is_file():
                continue  # removed by `corpus gc`; its rows stay as history
            try:
                smoke = self.lake.open("smoke_training", str(row["partition"]), str(row["version"]))
                result = json.loads(smoke.file("result.json").read_text(encoding="utf-8"))[str(row["kind"])]
                smoke.verify_files(["result.json"])
            except (LakeError, OSError, ValueError, KeyError) as exc:
                self.problem(path, "metrics", f"smoke_training row of {str(row['version'])[:12]}: {exc}")
                continue
            losses = result.get("losses") or [None]
            expected = {
                **{k: result.get(k) for k in SMOKE_ROW_FIELDS},
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }
            wrong = {k: row.get(k) for k, v in expected.items() if not _same_value(row.get(k), v)}
            if wrong:
                self.problem(
                    path,
                    "metrics",
                    f"smoke_training row ({row['kind']}) of {str(row['version'])[:12]} differs from its result.json "
                    f"in {', '.join(sorted(wrong))}",
                    expected={k: expected[k] for k in wrong},
                    actual=wrong,
                )

    # -- walk

    def walk(self, root_dir: Path) -> Version | None:
        root = self.open(root_dir, None, None)
        if root is None:
            return None
        visited: set[tuple[str, str, str]] = set()
        stack: list[tuple[UpstreamRef, str | None]] = [(UpstreamRef(root.asset, root.partition, root.version), None)]
        first = True
        while stack:
            ref, cited_by = stack.pop()
            key = (ref.asset, ref.partition, ref.version)
            if key in visited:
                continue
            visited.add(key)
            if first:
                version: Version | None = root
                first = False
            else:
                version = self.open(self.lake.partition_dir(ref.asset, ref.partition) / ref.version, ref, cited_by)
            if version is None:
                continue
            self.walked.append(version)
            self.result.versions += 1
            upstream = self.upstream(version)
            for up in sorted(version.upstream, key=lambda r: (r.asset, r.partition, r.version), reverse=True):
                stack.append((up, str(version.manifest_path)))
            scans = self.files(version)
            for line in reconcile(version, upstream):
                self.problem(version.manifest_path, "counts", line)
            self.structure(version, upstream, scans)
        if root.asset == RELEASE_ASSET:
            self.merkle(root, visited)
            self.pointer(root)
        return root


# DuckDB tables that hold a copy of one file of each version of an asset: asset -> (table, file).
METRIC_MIRRORS = {
    "raw_documents": ("quarantine", "quarantine.parquet"),
    "duplicate_clusters": ("duplicate_decisions", "decisions.parquet"),
}
# smoke_training columns copied as they are from the version's result.json (first/last loss come from `losses`).
SMOKE_ROW_FIELDS = (
    "device_type",
    "device_name",
    "precision",
    "steps",
    "relative_loss_drop",
    "val_loss_before",
    "val_loss_after",
    "tokens_per_s",
    "loader_wait_share",
    "peak_memory_bytes",
    "param_count",
)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return bool(a == b)


def verify(
    lake_root: Path,
    manifest: Path | None = None,
    *,
    public_key: Path | None = None,
    signature: Path | None = None,
    on_problem: Callable[[Problem], None] | None = None,
) -> VerifyResult:
    """Re-hash and cross-check everything reachable from `manifest` (default: the latest release).

    `on_problem` is called with each problem as it is found (the CLI prints them as they come). With
    `public_key`, the release must carry a valid Ed25519 signature by that key (corpus.signing).
    """
    lake = Lake(lake_root)
    result = VerifyResult(target=str(manifest) if manifest else f"latest release of {lake.root}")
    checker = _Verifier(lake, result, on_problem)
    if manifest is None:
        # Read the pointer here rather than through latest_release, which refuses a release whose manifest
        # fails its hash: verify walks from it anyway, to report everything that is wrong below it too.
        pointer = releases_dir(lake.root) / "LATEST"
        try:
            record = json.loads(pointer.read_text(encoding="utf-8"))
            root_dir = (lake.root / str(record["manifest"])).parent
        except FileNotFoundError:
            checker.problem(
                pointer,
                "release",
                f"no release in {lake.root}; run `corpus run --lake {lake.root}` first",
                actual="missing",
            )
            return result
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            checker.problem(pointer, "release", f"not a valid release pointer: {exc}")
            return result
        if record.get("version") != root_dir.name:
            checker.problem(
                pointer,
                "release",
                f"names version {record.get('version')}, but its manifest path is in version {root_dir.name}",
                expected=root_dir.name,
                actual=record.get("version"),
            )
    else:
        manifest = Path(manifest).expanduser().resolve()
        root_dir = manifest.parent
        checker.lake = Lake(root_dir.parent.parent.parent)
    root = checker.walk(root_dir)
    if root is not None and root.asset == RELEASE_ASSET:
        result.release = root.version
        checker.metrics(root)
    if public_key is not None:
        from corpus.signing import SigningError, verify_release_signature

        if root is None or root.asset != RELEASE_ASSET:
            checker.problem(root_dir / MANIFEST, "signature", "signatures cover release manifests only")
        else:
            try:
                result.signed_by = verify_release_signature(checker.lake.root, root, public_key, signature)
            except SigningError as exc:
                checker.problem(exc.path, "signature", exc.message, expected=exc.expected, actual=exc.actual)
    return result


# ---------------------------------------------------------------- trace: the lineage in tables


def _query(sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    con = duckdb.connect()
    try:
        cursor = con.execute(sql, list(params))
        names = [d[0] for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()


class _Release:
    """The latest release's lineage, by asset, in stage order (upstream first)."""

    def __init__(self, lake_root: Path) -> None:
        self.lake = Lake(lake_root)
        self.release = latest_release(self.lake.root)
        self.versions = lineage(self.lake, [self.release])
        self.by_asset: dict[str, list[Version]] = {}
        for v in self.versions:
            self.by_asset.setdefault(v.asset, []).append(v)
        depth: dict[str, int] = {}

        def level(asset: str) -> int:
            if asset not in depth:
                depth[asset] = 0
                ups = {ref.asset for v in self.by_asset.get(asset, []) for ref in v.upstream}
                depth[asset] = 1 + max((level(u) for u in ups if u in self.by_asset), default=-1)
            return depth[asset]

        self.order = sorted(self.by_asset, key=lambda a: (level(a), a))

    def one(self, asset: str) -> Version:
        versions = self.by_asset.get(asset)
        if not versions:
            raise LakeError(f"release {self.release.version[:12]} has no {asset} version in its lineage")
        return versions[0]

    def files(self, asset: str, name: str) -> list[str]:
        return [str(v.path / name) for v in self.by_asset.get(asset, []) if name in v.files]

    def tables_with(self, column: str, *names: str) -> list[tuple[str, str, list[str]]]:
        """(asset, file name, paths) of every Parquet file of the lineage with `column`, in stage order."""
        out = []
        for asset in self.order:
            files: dict[str, list[str]] = {}
            for v in self.by_asset[asset]:
                for name in v.files:
                    if name.endswith(".parquet") and (not names or name in names):
                        path = v.path / name
                        if column in pq.read_schema(path).names:
                            files.setdefault(name, []).append(str(path))
            out += [(asset, name, paths) for name, paths in sorted(files.items())]
        return out


def _columns(paths: Sequence[str], skip: Iterable[str] = ("text",)) -> str:
    names: dict[str, None] = {}
    for path in paths:
        names.update(dict.fromkeys(pq.read_schema(path).names))
    return ", ".join(f'"{n}"' for n in names if n not in set(skip))


def _stage_rows(rel: _Release, doc_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Every row about each doc_id in every Parquet file of the lineage, in stage order."""
    out: dict[str, list[dict[str, Any]]] = {d: [] for d in doc_ids}
    if not doc_ids:
        return out
    for asset, name, paths in rel.tables_with("doc_id"):
        if asset == "mixed_tokens" and name == "stream_index.parquet":
            continue  # placements, reported separately
        rows = _query(
            f"SELECT {_columns(paths)}, filename AS _file FROM read_parquet(?, union_by_name = true, filename = true) "
            "WHERE list_contains(?, doc_id)",
            [paths, list(doc_ids)],
        )
        for row in rows:
            file = Path(row.pop("_file"))
            row = {k: v for k, v in row.items() if v is not None}
            out[row["doc_id"]].append({"asset": asset, "partition": file.parent.parent.name, "file": name, **row})
    return out


def _mine(row: Mapping[str, Any], source: str | None, uri: str | None) -> bool:
    """Whether a stage row is about the record of `source` at `uri` (the same text may sit in several)."""
    if source is None:
        return True
    if row["partition"] != "_all" and row["partition"] != source:
        return False
    if row.get("source", source) != source:
        return False
    return uri is None or row.get("uri", uri) == uri


def _fate(
    stages: list[dict[str, Any]], source: str | None = None, uri: str | None = None, prefer_kept: bool = False
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(raw row, filter decision, dedup decision, summarised stages) of one record of a document.

    A doc_id is the hash of a text, and the same text can be several records (an exact duplicate in another
    file or source): rows are narrowed to the record's source and uri, and where a stage still has several
    (dedup decisions carry no uri), the kept one is taken for a record that reached the stream."""
    rows = [s for s in stages if _mine(s, source, uri)]
    if prefer_kept:
        rows.sort(key=lambda s: not s.get("kept", True))  # stable: kept rows first within each stage

    def first(asset: str, file: str) -> dict[str, Any]:
        return next((s for s in rows if s["asset"] == asset and s["file"] == file), {})

    by_stage: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for s in rows:
        key = (s["asset"], s["partition"], s.get("source") if s["partition"] == "_all" else None)
        entry = {"stage": s["asset"], "partition": s["partition"], "kept": bool(s.get("kept", True))}
        entry["reason"] = s.get("reason") if s["file"] == "decisions.parquet" else None
        if s["file"] == "decisions.parquet" and (key not in by_stage or by_stage[key].get("_file") != "decisions"):
            by_stage[key] = {**entry, "_file": "decisions"}
        elif key not in by_stage:
            by_stage[key] = entry
    summary = [{k: v for k, v in e.items() if k != "_file"} for e in by_stage.values()]
    order = {(s["asset"], s["partition"]): i for i, s in reversed(list(enumerate(stages)))}
    summary.sort(key=lambda e: order.get((e["stage"], e["partition"]), 0))
    return (
        first("raw_documents", "documents.parquet"),
        first("filtered_documents", "decisions.parquet"),
        first("duplicate_clusters", "decisions.parquet"),
        summary,
    )


@cache
def _licenses() -> dict[str, str]:
    from corpus.sources import license_files

    return {uri: str(path) for uri, path in license_files()}


def raw_location(spec: Mapping[str, Any], uri: str) -> tuple[str, str | None]:
    """(raw file path, key inside it) of a record, from the source spec recorded in raw_documents' manifest."""
    kind = spec.get("kind")
    base = Path(spec["path"]) if spec.get("path") else None
    if kind == "text_files" and base is not None:
        return str(base / uri), None
    if kind in ("jsonl", "parquet") and base is not None:
        return str(base), None
    if kind == "python_stdlib":
        from corpus.sources import stdlib_root

        return str(stdlib_root() / uri), None
    if kind == "pydoc_topics":
        import pydoc_data.topics

        return str(Path(pydoc_data.topics.__file__ or "")), uri.split("#", 1)[1]
    if kind == "installed_licenses":
        return _licenses().get(uri, uri), None
    raise ValueError(f"source kind {kind!r} of {spec.get('name')!r}: unknown, cannot locate {uri!r}")


def _raw_spec(rel: _Release, source: str) -> dict[str, Any]:
    for v in rel.by_asset.get("raw_documents", []):
        if v.partition == source:
            return dict(v.manifest["config"]["source"])
    raise LakeError(f"no raw_documents[{source}] version in release {rel.release.version[:12]}")


def read_raw_text(spec: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    """Re-read one record's text from its raw file at its recorded position (`replay_sample` compares the
    file's sha256 with the one ingested)."""
    path_str, key = raw_location(spec, str(raw["uri"]))
    path = Path(path_str)
    kind = spec["kind"]
    if not path.is_file():
        raise LakeError(f"raw file {path} of {spec['name']}:{raw['uri']} is gone")
    if kind == "pydoc_topics":
        import pydoc_data.topics

        return str(pydoc_data.topics.topics[key])
    if kind == "jsonl":
        with open(path, "rb") as handle:
            handle.seek(int(raw["byte_offset"]))
            line = handle.read(int(raw["byte_length"]))
        return str(json.loads(line.rstrip(b"\r\n").decode("utf-8"))[spec.get("text_field", "text")])
    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        row = int(raw["position"])
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if row < n:
                value = parquet.read_row_group(group, columns=[spec.get("text_column", "text")]).column(0)[row].as_py()
                return value.decode("utf-8") if isinstance(value, bytes) else str(value)
            row -= n
        raise LakeError(f"raw file {path} has no row {raw['position']}")
    data = path.read_bytes()
    if raw.get("byte_length") is not None and raw.get("byte_offset") is not None:
        data = data[int(raw["byte_offset"]) : int(raw["byte_offset"]) + int(raw["byte_length"])]
    return data.decode("utf-8")


def _describe(rel: _Release, docs: list[dict[str, Any]]) -> None:
    """Attach raw location, filter and dedup decisions and the stage summary to each placed document."""
    stages = _stage_rows(rel, sorted({d["doc_id"] for d in docs}))
    specs: dict[str, dict[str, Any]] = {}
    for d in docs:
        raw, filt, dedup, summary = _fate(stages.get(d["doc_id"], []), d["source"], d["uri"], prefer_kept=True)
        source = d["source"]
        if source not in specs:
            specs[source] = _raw_spec(rel, source)
        path, key = raw_location(specs[source], str(d["uri"]))
        d["raw"] = {
            "path": path,
            "key": key,
            "uri": d["uri"],
            "sha256": raw.get("raw_sha256"),
            "position": raw.get("position", d.get("position")),
            "byte_offset": raw.get("byte_offset"),
            "byte_length": raw.get("byte_length"),
        }
        d["filter"] = {k: filt.get(k) for k in ("kept", "reason", "quality", "language", "normalized") if k in filt}
        d["dedup"] = {
            k: dedup.get(k)
            for k in ("cluster_id", "kept", "reason", "similarity", "kept_source", "kept_doc_id")
            if k in dedup
        }
        d["stages"] = summary


def _packed_shards(rel: _Release, split: str) -> tuple[Version, list[dict[str, Any]]]:
    packed = rel.one("packed_sequences")
    shards = packed_shards(packed, split)
    if not shards:
        raise LakeError(f"packed_sequences {packed.version[:12]} has no rows for split {split!r}")
    return packed, shards


def _packed_piece_table(rel: _Release, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document index, row in the split, token offset in the document) of every packed piece of a split."""
    try:
        packed, shards = _packed_shards(rel, split)
    except LakeError:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    doc, row, offset = piece_columns(packed, shards, ("piece_doc", "piece_row", "piece_doc_offset"))
    return doc, row, offset


def piece_columns(packed: Version, shards: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[np.ndarray]:
    """Columns `names` of a split's piece tables, all its shards concatenated in row order, as int64;
    `piece_row` is made a row of the split (a shard's rows count from 0, its manifest `first_row` places them)."""
    columns = []
    for name in names:
        parts = []
        for shard in shards:
            part = np.asarray(np.load(packed.path / str(shard["dir"]) / f"{name}.npy", mmap_mode="r"), dtype=np.int64)
            parts.append(part + int(shard["first_row"]) if name == "piece_row" else part)
        columns.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return columns


def _piece_offset(stream_index: Path) -> str:
    """SQL for a stream index row's token offset in its document (0 in indexes written before remove_span)."""
    return '"offset"' if "offset" in pq.read_schema(stream_index).names else '0 AS "offset"'


def _split_docs_by_index(rel: _Release, split: str, indexes: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Rows of the mixed stream index for a split's document pieces, by their index in stream order."""
    mixed = rel.one("mixed_tokens")
    index = mixed.path / "stream_index.parquet"
    rows = _query(
        "SELECT * FROM (SELECT split, stream_start, length, source, doc_id, epoch, uri, position, "
        f"{_piece_offset(index)}, row_number() OVER (ORDER BY stream_start) - 1 AS doc_index "
        "FROM read_parquet(?) WHERE split = ?) "
        "WHERE list_contains(?, doc_index)",
        [str(index), split, [int(i) for i in indexes]],
    )
    return {int(r["doc_index"]): r for r in rows}


def _parse_sample(name: str) -> tuple[str, str, str | None]:
    """('packed', split, shard dir or None) or ('window', shard file name, None)."""
    if name.startswith("packed:"):
        return "packed", name.split(":", 1)[1], None
    path = Path(name)
    if path.name.endswith(".npy") and path.parent.name in SPLITS:  # <split>/tokens.npy (packed_sequences/1)
        return "packed", path.parent.name, None
    if path.name.endswith(".npy") and path.parent.parent.name in SPLITS:  # <split>/<shard>/tokens.npy
        return "packed", path.parent.parent.name, f"{path.parent.parent.name}/{path.parent.name}"
    return "window", path.name, None


def trace_sample(lake_root: Path, shard: str, index: int) -> dict[str, Any]:
    """The documents a training window or packed row holds, with their whole history and exact token offsets.

    `shard` is a window shard's file name (`train-00000.bin`), or for a packed row `packed:<split>` (index:
    the row in the split) or a shard's `<split>/<shard>/tokens.npy` (index: the row in that file).
    `token_offsets` address the document's tokens (its text encoded, plus the trailing
    <|endoftext|>); `sample_offsets` where those tokens sit in the sample (window: input plus the last
    target token, max_length + 1 tokens; packed row: columns).
    """
    rel = _Release(lake_root)
    kind, name, shard_dir = _parse_sample(shard)
    if kind == "packed":
        if shard_dir is not None:  # a row of one shard file: its row in the split
            _, shards = _packed_shards(rel, name)
            entry = next((s for s in shards if s["dir"] == shard_dir), None)
            if entry is None:
                raise LakeError(f"no packed shard {shard_dir!r} (shards: {', '.join(s['dir'] for s in shards)})")
            if not 0 <= index < int(entry["rows"]):
                raise IndexError(f"{shard_dir} has {entry['rows']} rows; index {index} is out of range")
            index += int(entry["first_row"])
        return _trace_packed(rel, name, index)
    windows = rel.one("training_windows")
    shards = {s["path"]: s for s in windows.extra["shards"]}
    if name not in shards:
        raise LakeError(
            f"no shard named {name!r} in training_windows {windows.version[:12]} (shards: {', '.join(sorted(shards))}; "
            "packed rows: packed:train, packed:validation)"
        )
    info = shards[name]
    if not 0 <= index < info["windows"]:
        raise IndexError(f"{name} has {info['windows']} windows; index {index} is out of range")
    length, stride = int(windows.extra["max_length"]), int(windows.extra["stride"])
    start = int(info["stream_start"]) + index * stride
    end = start + length + 1  # the input and its shifted target
    mixed = rel.one("mixed_tokens")
    stream_index = mixed.path / "stream_index.parquet"
    # One entry per document piece: a window across a cut of remove_span lists both pieces of the document,
    # each with its own token offsets.
    docs = _query(
        f"SELECT source, doc_id, epoch, uri, position, stream_start, length, {_piece_offset(stream_index)} "
        "FROM read_parquet(?) WHERE split = ? AND stream_start < ? AND stream_start + length > ? ORDER BY stream_start",
        [str(stream_index), info["split"], end, start],
    )
    for d in docs:
        lo, hi = max(start, d["stream_start"]), min(end, d["stream_start"] + d["length"])
        offset = int(d.pop("offset"))
        d["token_offsets"] = [offset + lo - d["stream_start"], offset + hi - d["stream_start"]]
        d["sample_offsets"] = [lo - start, hi - start]
    _describe(rel, docs)
    return {
        "kind": "window",
        "release": rel.release.version,
        "shard": name,
        "file": str(windows.path / name),
        "index": index,
        "split": info["split"],
        "file_tokens": [index * stride, index * stride + length + 1],
        "stream_tokens": [start, end],
        "documents": docs,
    }


def _trace_packed(rel: _Release, split: str, row: int) -> dict[str, Any]:
    packed, shards = _packed_shards(rel, split)
    rows = int(shards[-1]["first_row"]) + int(shards[-1]["rows"])
    if not 0 <= row < rows:
        raise IndexError(f"packed {split} has {rows} rows; row {row} is out of range")
    shard = next(s for s in reversed(shards) if int(s["first_row"]) <= row)
    base = packed.path / str(shard["dir"])
    local = row - int(shard["first_row"])
    offsets = np.load(base / "cu_seqlens_offsets.npy", mmap_mode="r")
    p0, p1 = int(offsets[local]) - local, int(offsets[local + 1]) - local - 1
    table = {
        n: np.load(base / f"{n}.npy", mmap_mode="r")[p0:p1].tolist()
        for n in ("piece_start", "piece_length", "piece_doc", "piece_doc_offset")
    }
    by_index = _split_docs_by_index(rel, split, sorted(set(table["piece_doc"])))
    docs = []
    for start, length, doc, offset in zip(
        table["piece_start"], table["piece_length"], table["piece_doc"], table["piece_doc_offset"], strict=True
    ):
        entry = dict(by_index[doc])
        offset += int(entry.pop("offset"))  # the piece's place in the stream index row, plus the row's in the document
        entry["token_offsets"] = [offset, offset + length]
        entry["sample_offsets"] = [start, start + length]
        docs.append(entry)
    _describe(rel, docs)
    width = int(np.load(base / "tokens.npy", mmap_mode="r").shape[1])
    real = sum(table["piece_length"])
    return {
        "kind": "packed",
        "release": rel.release.version,
        "shard": f"packed:{split}",
        "file": str(base / "tokens.npy"),
        "file_row": local,
        "index": row,
        "split": split,
        "max_length": width,
        "real_tokens": real,
        "padding": [real, width],
        "documents": docs,
    }


def sample_tokens(lake_root: Path, traced: Mapping[str, Any]) -> list[int]:
    """The token ids of a traced sample, read from its shard (padding of packed rows left out)."""
    path = Path(traced["file"])
    if traced["kind"] == "window":
        lo, hi = traced["file_tokens"]
        return np.fromfile(path, dtype="<u2", count=hi - lo, offset=2 * lo).astype(np.int64).tolist()
    row = np.load(path, mmap_mode="r")[traced.get("file_row", traced["index"])]
    return np.asarray(row[: traced["real_tokens"]]).astype(np.int64).tolist()


def _comparable(settings: Mapping[str, Any]) -> Any:
    """Settings without the library versions, as JSON would hold them (dict keys as text, tuples as lists)."""
    return json.loads(json.dumps({k: v for k, v in settings.items() if k != "libraries"}, default=str))


def quality_filter_for(rel: _Release, source: str) -> Any:
    """The QualityFilter a source's documents went through, rebuilt from the manifest that recorded it.

    Newer manifests record `QualityFilter.settings()` (resolved thresholds, languages, PII policy): those
    become one profile override, and the rebuilt filter must report the very same settings. Older ones
    record the FilterConfig fields, profile and languages."""
    from corpus.config import FilterConfig
    from corpus.filters import QualityFilter

    for asset in ("heuristic_documents", "filtered_documents"):
        version = next((v for v in rel.by_asset.get(asset, []) if v.partition == source), None)
        if version is None:
            continue
        config = version.manifest["config"]
        if "filter" in config:
            settings = config["filter"]
            profile = str(settings["profile"])
            cfg = FilterConfig(
                profiles={profile: dict(settings["thresholds"])},
                pii=dict(settings["pii_policy"]),
                phone_region=settings["phone_region"],
                secret_min_entropy=float(settings["secret_min_entropy"]),
                lid_languages=tuple(settings["lid_candidates"]) if settings.get("lid_candidates") else None,
                lid_sample_chars=int(settings.get("lid_sample_chars") or FilterConfig.lid_sample_chars),
                lid_fast_sample_chars=settings.get("lid_fast_sample_chars"),  # absent: written before the fast look
                lid_decisive_confidence=float(settings.get("lid_decisive_confidence", 0.95)),
            )
            rebuilt = QualityFilter(profile, cfg, languages=tuple(settings.get("languages") or ("en",)))
            if _comparable(rebuilt.settings()) != _comparable(settings):
                raise LakeError(f"{version.manifest_path}: the recorded filter settings cannot be rebuilt exactly")
            return rebuilt
        if "filters" in config:
            return QualityFilter(
                config["profile"], FilterConfig(**config["filters"]), languages=tuple(config["languages"])
            )
    raise LakeError(f"release {rel.release.version[:12]} records no quality filter for source {source!r}")


def replay_sample(lake_root: Path, shard: str, index: int) -> dict[str, Any]:
    """Re-derive a sample's tokens from the raw files: re-read each record at its traced position, apply the
    recorded filter (normalization + redaction), tokenize with the recorded encoding plus <|endoftext|>, take
    the traced token offsets. `equal` says whether that reproduces the shard's tokens exactly; `raw_changed`
    lists the raw files whose sha256 is no longer the one ingested (the provenance then no longer holds, even
    where the record's own bytes still give the same tokens); `ok` is both: equal, and no raw file changed."""
    from corpus.tokenizer import get_encoding

    rel = _Release(lake_root)
    traced = trace_sample(lake_root, shard, index)
    filters: dict[str, Any] = {}
    encodings: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    changed: list[dict[str, Any]] = []
    replayed: list[int] = []
    for d in traced["documents"]:
        source = d["source"]
        if source not in filters:
            filters[source] = quality_filter_for(rel, source)
            tokenized = next(v for v in rel.by_asset["tokenized_documents"] if v.partition == source)
            encodings[source] = get_encoding(str(tokenized.manifest["config"].get("encoding", "gpt2")))
        raw = {**d["raw"], "uri": d["uri"]}
        path = Path(str(raw["path"]))
        ingested = raw.get("sha256")
        if ingested and path.is_file():
            now = hashes.setdefault(str(path), scan_file(path).sha256)
            if now != ingested:
                changed.append({"source": source, "uri": d["uri"], "path": str(path), "ingested": ingested, "now": now})
        text = read_raw_text(_raw_spec(rel, source), raw)
        decision = filters[source].apply(text)
        enc = encodings[source]
        ids = [*enc.encode_ordinary(decision.text), enc.eot_token]
        lo, hi = d["token_offsets"]
        replayed += ids[lo:hi]
    expected = sample_tokens(lake_root, traced)
    equal = replayed == expected
    return {
        "trace": traced,
        "tokens": expected,
        "replayed": replayed,
        "equal": equal,
        "raw_changed": changed,
        "ok": equal and not changed,
    }


def trace_document(lake_root: Path, doc_id: str) -> dict[str, Any]:
    """Every stage a document went through in the latest release, kept or dropped with the reason, and every
    window and packed row it ended up in."""
    rel = _Release(lake_root)
    stages = _stage_rows(rel, [doc_id])[doc_id]
    raw, filt, dedup, summary = _fate(stages)
    if not raw:
        raise LakeError(f"doc_id {doc_id} is in no raw_documents version of release {rel.release.version[:12]}")
    mixed = rel.one("mixed_tokens")
    index = mixed.path / "stream_index.parquet"
    placements = _query(
        f"SELECT * FROM (SELECT split, epoch, stream_start, length, {_piece_offset(index)}, "
        "row_number() OVER (PARTITION BY split ORDER BY stream_start) - 1 AS doc_index, doc_id FROM read_parquet(?)) "
        "WHERE doc_id = ? ORDER BY split, stream_start",
        [str(index), doc_id],
    )
    windows = rel.one("training_windows")
    length, stride = int(windows.extra["max_length"]), int(windows.extra["stride"])
    piece_docs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for p in placements:
        p.pop("doc_id")
        # Window w covers stream tokens [w * stride, w * stride + length + 1).
        first = max(0, -(-(p["stream_start"] - length) // stride))
        last = (p["stream_start"] + p["length"] - 1) // stride
        hits = []
        for s in windows.extra["shards"]:
            if s["split"] != p["split"]:
                continue
            lo, hi = max(first, s["first_window"]), min(last, s["first_window"] + s["windows"] - 1)
            if lo <= hi:
                hits.append({"shard": s["path"], "windows": [lo - s["first_window"], hi - s["first_window"]]})
        p["shards"] = hits
        split = p["split"]
        if split not in piece_docs:
            piece_docs[split] = _packed_piece_table(rel, split)
        doc, row, offset = piece_docs[split]
        p["packed_rows"] = [
            {"shard": f"packed:{split}", "row": int(row[i]), "token_offset": p["offset"] + int(offset[i])}
            for i in np.nonzero(doc == p["doc_index"])[0]
        ]
    records = []
    for row in (s for s in stages if s["asset"] == "raw_documents" and s["file"] == "documents.parquet"):
        _, r_filt, r_dedup, r_summary = _fate(stages, row["source"], row["uri"])
        path, key = raw_location(_raw_spec(rel, row["source"]), str(row["uri"]))
        r_dropped = next((e for e in r_summary if not e["kept"]), None)
        records.append(
            {
                **{k: row.get(k) for k in ("source", "uri", "position", "byte_offset", "byte_length", "raw_sha256")},
                "path": path,
                "key": key,
                "fate": f"dropped by {r_dropped['stage']}: {r_dropped['reason']}" if r_dropped else "kept",
                "filter": r_filt,
                "dedup": r_dedup,
                "stages": r_summary,
            }
        )
    if placements:
        # A document cut by remove_span has several pieces (stream index rows) per placement.
        placed = len({(p["split"], p["epoch"]) for p in placements})
        fate = f"trained on: {placed} placements in the mixed stream"
    elif all(r["fate"] != "kept" for r in records):
        fate = records[0]["fate"]
    elif span := next(
        (
            s
            for s in stages
            if s["asset"] == "repeated_spans" and s["file"] == "documents.parquet" and s.get("action") == "drop"
        ),
        None,
    ):
        fate = (
            f"dropped by repeated_spans: {span.get('span_tokens')} of its {span.get('tokens')} tokens repeat an "
            "earlier document (dedup.span_policy drop)"
        )
    else:
        fate = "kept, but not placed in the mixed stream"
    # The text may be several records (exact duplicates): the top-level raw record is the one that was kept.
    kept = next((r for r in records if r["fate"] == "kept"), None)
    if kept is not None:
        raw, filt, dedup, summary = _fate(stages, kept["source"], kept["uri"], prefer_kept=True)
    shown = kept or records[0]
    return {
        "doc_id": doc_id,
        "release": rel.release.version,
        "fate": fate,
        "raw": {**raw, "path": shown["path"], "key": shown["key"]},
        "records": records,
        "filter": filt,
        "dedup": dedup,
        "stages": summary,
        "tokenized": [
            {k: s.get(k) for k in ("source", "start", "length")} for s in stages if s["asset"] == "tokenized_documents"
        ],
        "placements": placements,
    }


def _kept_record(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """{source, uri} of the record of a text that no stage dropped ({} when every record was dropped)."""
    for row in (s for s in stages if s["asset"] == "raw_documents" and s["file"] == "documents.parquet"):
        if all(step["kept"] for step in _fate(stages, row["source"], row["uri"])[3]):
            return {"source": row["source"], "uri": row["uri"]}
    return {}


def trace_file(lake_root: Path, path: str) -> dict[str, Any]:
    """What became of every record of one raw file (its uri inside the source, or a path ending in it)."""
    rel = _Release(lake_root)
    raw_files = rel.files("raw_documents", "documents.parquet")
    quarantine_files = rel.files("raw_documents", "quarantine.parquet")
    records = _query(
        "SELECT doc_id, source, uri, position, byte_offset, byte_length, raw_sha256 FROM read_parquet(?) "
        "WHERE uri = ? OR ends_with(?, '/' || uri) OR starts_with(uri, ? || '#') ORDER BY uri, position",
        [raw_files, path, path, path],
    )
    quarantined = (
        _query(
            "SELECT source, uri, position, byte_offset, reason, detail FROM read_parquet(?) "
            "WHERE uri = ? OR ends_with(?, '/' || uri) OR starts_with(uri, ? || '#') ORDER BY uri, position",
            [quarantine_files, path, path, path],
        )
        if quarantine_files
        else []
    )
    if not records and not quarantined:
        raise LakeError(f"no record of release {rel.release.version[:12]} comes from a file matching {path!r}")
    stages = _stage_rows(rel, sorted({r["doc_id"] for r in records}))
    mixed = rel.one("mixed_tokens")
    placed = _query(
        "SELECT doc_id, split, count(DISTINCT epoch) AS placements, sum(length) AS tokens FROM read_parquet(?) "
        "WHERE list_contains(?, doc_id) GROUP BY doc_id, split ORDER BY doc_id, split",
        [str(mixed.path / "stream_index.parquet"), [r["doc_id"] for r in records]],
    )
    outcome: dict[str, int] = {}
    for r in records:
        _, filt, dedup, summary = _fate(stages.get(r["doc_id"], []), r["source"], r["uri"])
        r["filter"] = {k: filt.get(k) for k in ("kept", "reason", "quality", "language") if k in filt}
        r["dedup"] = {
            k: dedup.get(k) for k in ("cluster_id", "kept", "reason", "kept_source", "kept_doc_id") if k in dedup
        }
        r["stages"] = summary
        placements = [
            {k: p[k] for k in ("split", "placements", "tokens")} for p in placed if p["doc_id"] == r["doc_id"]
        ]
        dropped = next((s for s in summary if not s["kept"]), None)
        r["placements"] = [] if dropped else placements
        if dropped and placements:
            # The same text (same doc_id) reached the stream from another record, the copy dedup kept.
            r["trained_via"] = {**_kept_record(stages.get(r["doc_id"], [])), "placements": placements}
        r["fate"] = (
            f"dropped by {dropped['stage']}: {dropped['reason']}"
            if dropped
            else ("trained on" if r["placements"] else "kept, not placed")
        )
        outcome[r["fate"]] = outcome.get(r["fate"], 0) + 1
    for q in quarantined:
        key = f"quarantined: {q['reason']}"
        outcome[key] = outcome.get(key, 0) + 1
    return {
        "path": path,
        "release": rel.release.version,
        "summary": dict(sorted(outcome.items())),
        "records": records,
        "quarantined": quarantined,
    }
