"""A release on any fsspec filesystem (s3://, gs://, az://, memory://, file://): push, pull, verify, load.

The lake itself stays a local directory (corpus.lake: atomic renames, fsync, memos); a release is
published to object storage and read back from it:

- `push_release` copies a release's whole lineage (every version its Merkle root covers) from a local
  lake to a URL with the lake's own layout (`<url>/<asset>/<partition>/<version>/...`), then points
  `<url>/releases/LATEST` at it. Order is what makes it safe to read while it runs: a version's data
  files first, its manifest only once all of them are in place, upstream versions before the versions that
  cite them (the release manifest last), LATEST at the very end. A reader that finds a manifest finds
  every file it lists and every version it cites; a push that dies leaves at most unlisted data files,
  which the next push overwrites. Manifests and LATEST are written under a temporary name and moved into
  place (one PUT on an object store). Every file is re-hashed while it is read and must match its manifest,
  so a damaged local lake is never published. A version whose manifest is already at the URL is skipped:
  versions are content-addressed, so a repeated push of the same release copies nothing.
- `pull_release` is the same copy the other way, into a local lake, where `corpus verify` runs every check.
- `verify_remote` checks a release in place at a URL: each manifest hashes to its version id and sits in
  its version's directory, every file has its recorded size and sha256 (streamed in 1 MiB chunks), no
  unlisted file sits in a version, counts reconcile (Parquet row counts from the footers), release.json and
  the Merkle root recompute, LATEST names the release's root. The structural cross-checks of
  corpus.audit (token ids below the vocabulary, windows equal to their slice of the stream, packed rows)
  read local files: `pull_release` first, then `corpus verify --lake DIR`, for those.
- `open_remote_window_shards` loads a training_windows split from a URL: each shard is streamed into a
  local cache, hashed while it is read, and refused on a mismatch before corpus.loader maps it.

NOTE: writing the lake itself straight onto object storage (corpus.lake over fsspec) is not done: its
atomic rename and fsync have no object-store equivalent, and every stage reads local paths.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow.parquet as pq

from corpus.audit import Problem, VerifyResult, streaming_merkle_root
from corpus.lake import HASH_CHUNK, MANIFEST, Lake, LakeError, UpstreamRef, Version, manifest_version
from corpus.reconcile import reconcile
from corpus.release import RELEASE_ASSET, history_line, latest_release, lineage

if TYPE_CHECKING:
    from corpus.loader import WindowShards

LATEST = "releases/LATEST"
HISTORY = "releases/history.jsonl"


@dataclass(frozen=True)
class Location:
    """A lake root on some filesystem: the fsspec filesystem and the root path in it (no protocol)."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @classmethod
    def of(cls, url: str | Path) -> Location:
        text = str(url)
        fs, root = fsspec.core.url_to_fs(text)
        return cls(fs, root.rstrip("/") or "/", text.rstrip("/"))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def show(self, *parts: str) -> str:
        """The URL of a file, for messages."""
        return "/".join([self.url, *parts])


def is_remote(lake: str | Path) -> bool:
    """True for a URL with a protocol other than file:// (a local path or file:// URL is a local lake)."""
    text = str(lake)
    return "://" in text and not text.startswith("file://")


def version_dir(ref: UpstreamRef | Version) -> str:
    return f"{ref.asset}/{ref.partition}/{ref.version}"


# ---------------------------------------------------------------- reading manifests anywhere


def read_manifest(where: Location, ref: UpstreamRef) -> dict[str, Any]:
    """The manifest of `ref` at `where`, checked: valid JSON, hashes to its version id, names `ref`."""
    path = f"{version_dir(ref)}/{MANIFEST}"
    try:
        data = where.fs.cat_file(where.path(path))
    except FileNotFoundError as exc:
        raise LakeError(f"{where.show(path)}: manifest not found ({ref.asset}[{ref.partition}])") from exc
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LakeError(f"{where.show(path)}: not a valid JSON manifest: {exc}") from exc
    if not isinstance(manifest, dict) or any(k not in manifest for k in ("asset", "partition", "version", "files")):
        raise LakeError(f"{where.show(path)}: not a manifest (needs asset, partition, version and files)")
    actual = manifest_version(manifest)
    if actual != manifest["version"]:
        raise LakeError(f"{where.show(path)}: content hashes to {actual}, but claims version {manifest['version']}")
    if (manifest["asset"], manifest["partition"], manifest["version"]) != (ref.asset, ref.partition, ref.version):
        raise LakeError(
            f"{where.show(path)}: holds {manifest['asset']}[{manifest['partition']}] {manifest['version']}, "
            f"expected {ref.asset}[{ref.partition}] {ref.version}"
        )
    return manifest


def read_pointer(where: Location) -> UpstreamRef:
    """The release `<where>/releases/LATEST` names."""
    try:
        record = json.loads(where.fs.cat_file(where.path(LATEST)))
        parts = str(record["manifest"]).split("/")
        version = str(record["version"])
    except FileNotFoundError as exc:
        raise LakeError(f"{where.show(LATEST)}: no release at {where.url} (push one with `corpus push`)") from exc
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise LakeError(f"{where.show(LATEST)}: not a valid release pointer: {exc}") from exc
    if len(parts) != 4 or parts[3] != MANIFEST or parts[2] != version:
        raise LakeError(f"{where.show(LATEST)}: manifest {record['manifest']!r} is not <asset>/<partition>/{version}")
    return UpstreamRef(parts[0], parts[1], version)


def ordered_lineage(where: Location, root: UpstreamRef) -> list[tuple[UpstreamRef, dict[str, Any]]]:
    """Every version reachable from `root` with its manifest, upstream before the versions citing it."""
    out: list[tuple[UpstreamRef, dict[str, Any]]] = []
    done: set[UpstreamRef] = set()
    manifests: dict[UpstreamRef, dict[str, Any]] = {}
    stack: list[tuple[UpstreamRef, bool]] = [(root, False)]
    while stack:  # iterative post-order depth-first walk
        ref, expanded = stack.pop()
        if ref in done:
            continue
        if expanded:
            done.add(ref)
            out.append((ref, manifests[ref]))
            continue
        if ref not in manifests:
            manifests[ref] = read_manifest(where, ref)
        stack.append((ref, True))
        for up in sorted((UpstreamRef(**u) for u in manifests[ref].get("upstream", [])), key=version_dir, reverse=True):
            if up not in done:
                stack.append((up, False))
    return out


# ---------------------------------------------------------------- copying


@dataclass
class CopyResult:
    release: str
    merkle_root: str | None
    versions: int = 0
    versions_copied: int = 0
    files_copied: int = 0
    bytes_copied: int = 0

    def summary(self, verb: str, target: str) -> str:
        skipped = self.versions - self.versions_copied
        return (
            f"{verb} release {self.release} to {target}: {self.versions_copied} of {self.versions} versions copied "
            f"({self.files_copied} files, {self.bytes_copied:,} bytes), {skipped} already there; "
            f"Merkle root {self.merkle_root}"
        )


def _copy_file(source: Location, target: Location, rel: str, entry: dict[str, Any], to: str | None = None) -> int:
    """Stream one file across (to `to`, default the same relative path), hashing it on the way.

    A mismatch with the manifest entry is an error, and the copy is removed.
    """
    digest = hashlib.sha256()
    size = 0
    destination = target.path(to or rel)
    target.fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
    try:
        with source.fs.open(source.path(rel), "rb") as reader, target.fs.open(destination, "wb") as writer:
            while chunk := reader.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                writer.write(chunk)
    except FileNotFoundError as exc:
        raise LakeError(f"{source.show(rel)}: missing (expected sha256 {entry['sha256']})") from exc
    if digest.hexdigest() != entry["sha256"] or size != int(entry["bytes"]):
        target.fs.rm_file(destination)
        raise LakeError(
            f"{source.show(rel)}: sha256 {digest.hexdigest()} ({size} bytes), expected {entry['sha256']} "
            f"({entry['bytes']} bytes); nothing of it copied to {target.url}"
        )
    return size


def _put_atomically(target: Location, rel: str, data: bytes) -> None:
    """Write under a temporary name, then move into place: a reader sees the whole file or none."""
    final = target.path(rel)
    target.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
    target.fs.pipe_file(tmp, data)
    try:
        target.fs.mv(tmp, final)
    finally:
        if target.fs.exists(tmp):
            target.fs.rm_file(tmp)


def copy_release(
    source: Location, target: Location, release: UpstreamRef, on_version: Callable[[str], None] | None = None
) -> CopyResult:
    """Copy `release` and its lineage from `source` to `target` (data files, then manifests, then LATEST)."""
    versions = ordered_lineage(source, release)
    root_manifest = versions[-1][1]
    result = CopyResult(release.version, root_manifest.get("extra", {}).get("merkle_root"), versions=len(versions))
    for ref, manifest in versions:
        rel = version_dir(ref)
        manifest_bytes = source.fs.cat_file(source.path(rel, MANIFEST))
        try:
            if target.fs.cat_file(target.path(rel, MANIFEST)) == manifest_bytes:
                continue  # content-addressed: the same manifest means the same files, put before it
        except FileNotFoundError:
            pass
        for entry in manifest["files"]:
            result.bytes_copied += _copy_file(source, target, f"{rel}/{entry['path']}", entry)
            result.files_copied += 1
        _put_atomically(target, f"{rel}/{MANIFEST}", manifest_bytes)
        result.versions_copied += 1
        if on_version is not None:
            on_version(rel)
    if release.asset == RELEASE_ASSET:
        pointer = {
            "version": release.version,
            "manifest": f"{version_dir(release)}/{MANIFEST}",
            "merkle_root": result.merkle_root,
        }
        # As corpus.release.point_latest: the history's line first, then the pointer, so the target's
        # LATEST always names the newest release of its history (`corpus verify` reports it otherwise).
        try:
            history = target.fs.cat_file(target.path(HISTORY)).decode("utf-8")
        except FileNotFoundError:
            history = ""
        record = {**pointer, "released_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        line = history_line(history, record)
        if line:  # an object store has no append: the whole file, replaced
            _put_atomically(target, HISTORY, (history + line).encode("utf-8"))
        _put_atomically(target, LATEST, (json.dumps(pointer, sort_keys=True) + "\n").encode("utf-8"))
    return result


def push_release(
    lake_root: str | Path,
    url: str,
    manifest: str | Path | None = None,
    on_version: Callable[[str], None] | None = None,
) -> CopyResult:
    """Publish the latest release of a local lake (or the version `manifest` names) with its lineage to `url`.

    `on_version(path)` is called after each version's manifest is in place at `url`.
    """
    lake = Lake(lake_root)
    version = latest_release(lake.root) if manifest is None else Lake(lake.root).open_ref(_ref_of(Path(manifest)))
    lineage(lake, [version])  # every manifest present and self-consistent before a byte is copied
    return copy_release(Location.of(lake.root.as_uri()), Location.of(url), version.ref(), on_version)


def pull_release(url: str, lake_root: str | Path) -> CopyResult:
    """Copy the release `<url>/releases/LATEST` names, with its lineage, into a local lake directory."""
    source = Location.of(url)
    Path(lake_root).mkdir(parents=True, exist_ok=True)
    return copy_release(source, Location.of(Path(lake_root).resolve().as_uri()), read_pointer(source))


def _ref_of(manifest: Path) -> UpstreamRef:
    parts = manifest.expanduser().resolve().parts
    if len(parts) < 5 or parts[-1] != MANIFEST:
        raise ValueError(f"{manifest}: expected <lake>/<asset>/<partition>/<version>/manifest.json")
    return UpstreamRef(parts[-4], parts[-3], parts[-2])


# ---------------------------------------------------------------- verifying in place


class _RemoteVerifier:
    def __init__(self, where: Location, result: VerifyResult, on_problem: Callable[[Problem], None] | None) -> None:
        self.where = where
        self.result = result
        self.on_problem = on_problem
        self.manifests: dict[UpstreamRef, dict[str, Any]] = {}

    def problem(self, rel: str, kind: str, message: str, expected: Any = None, actual: Any = None) -> None:
        self.result.add(self.where.show(rel), kind, message, expected, actual, self.on_problem)

    def files(self, ref: UpstreamRef, manifest: dict[str, Any]) -> None:
        base = version_dir(ref)
        for entry in manifest["files"]:
            rel = f"{base}/{entry['path']}"
            self.result.files += 1
            self.result.bytes += int(entry["bytes"])
            digest = hashlib.sha256()
            size = 0
            try:
                with self.where.fs.open(self.where.path(rel), "rb") as handle:
                    while chunk := handle.read(HASH_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                self.problem(rel, "missing", f"missing: expected sha256 {entry['sha256']}", entry["sha256"], "missing")
                continue
            if digest.hexdigest() != entry["sha256"] or size != int(entry["bytes"]):
                self.problem(
                    rel,
                    "sha256",
                    f"sha256 mismatch: expected {entry['sha256']} ({entry['bytes']} bytes), "
                    f"actual {digest.hexdigest()} ({size} bytes)",
                    entry["sha256"],
                    digest.hexdigest(),
                )
        listed = {f"{base}/{entry['path']}" for entry in manifest["files"]} | {f"{base}/{MANIFEST}"}
        prefix = self.where.path(base) + "/"
        for found in self.where.fs.find(self.where.path(base)):
            rel = f"{base}/{found[len(prefix) :]}" if found.startswith(prefix) else found
            if rel not in listed:
                self.problem(rel, "unlisted", "file not listed in the manifest", "absent", "present")

    def counts(self, ref: UpstreamRef, manifest: dict[str, Any], upstream: list[dict[str, Any]]) -> None:
        # corpus.reconcile on the counts alone; the out_file's row count is read here from the Parquet footer
        # (the dropped_file's reasons only by a local verify, after `corpus pull`).
        def version(m: dict[str, Any]) -> Version:
            extra = {k: v for k, v in m.get("extra", {}).items() if k not in ("out_file", "dropped_file")}
            return Version(Path(self.where.root), m["asset"], m["partition"], m["version"], {**m, "extra": extra})

        for line in reconcile(version(manifest), [version(m) for m in upstream]):
            self.problem(f"{version_dir(ref)}/{MANIFEST}", "counts", line)
        out_file = manifest.get("extra", {}).get("out_file")
        counts = manifest.get("counts", {})
        if out_file and "out" in counts:
            rel = f"{version_dir(ref)}/{out_file}"
            try:
                with self.where.fs.open(self.where.path(rel), "rb") as handle:
                    rows = pq.ParquetFile(handle).metadata.num_rows
            except Exception as exc:  # a missing or unreadable file is itself the finding
                self.problem(rel, "counts", f"cannot read {out_file}: {exc}")
                return
            if rows != counts["out"]:
                self.problem(rel, "counts", f"{rows} rows, manifest says out = {counts['out']}", counts["out"], rows)

    def release(self, ref: UpstreamRef, manifest: dict[str, Any], visited: set[UpstreamRef]) -> None:
        claimed = manifest.get("extra", {}).get("merkle_root")
        keys = sorted((r for r in visited if r != ref), key=lambda r: version_dir(r) + "/")

        def leaves() -> Iterator[tuple[str, str, int]]:
            for r in keys:
                m = self.manifests[r]
                base = version_dir(r)
                entries = [(f"{base}/{e['path']}", str(e["sha256"]), int(e["bytes"])) for e in m["files"]]
                entries.append((f"{base}/{MANIFEST}", r.version, 0))
                yield from sorted(entries)

        recomputed = streaming_merkle_root(leaves())
        self.result.merkle_root = recomputed
        rel = f"{version_dir(ref)}/{MANIFEST}"
        if recomputed != claimed:
            self.problem(rel, "merkle", f"Merkle root recomputes to {recomputed}, release says {claimed}", claimed)
        try:
            document = json.loads(self.where.fs.cat_file(self.where.path(version_dir(ref), "release.json")))
        except (FileNotFoundError, ValueError):
            return  # a missing release.json is reported by `files`
        if document.get("merkle_root") != claimed:
            self.problem(f"{version_dir(ref)}/release.json", "merkle", f"merkle_root {document.get('merkle_root')}")
        listed = sorted((UpstreamRef(**v) for v in document.get("versions", [])), key=version_dir)
        if listed and listed != keys:
            self.problem(
                f"{version_dir(ref)}/release.json", "merkle", f"lists {len(listed)} versions, lineage has {len(keys)}"
            )

    def walk(self, root: UpstreamRef) -> None:
        stack: list[tuple[UpstreamRef, str | None]] = [(root, None)]
        visited: set[UpstreamRef] = set()
        while stack:
            ref, cited_by = stack.pop()
            if ref in visited:
                continue
            visited.add(ref)
            try:
                manifest = read_manifest(self.where, ref)
            except LakeError as exc:
                who = f" (cited by {cited_by})" if cited_by else ""
                self.problem(f"{version_dir(ref)}/{MANIFEST}", "manifest", f"{exc}{who}")
                continue
            self.manifests[ref] = manifest
            self.result.versions += 1
            upstream = [UpstreamRef(**u) for u in manifest.get("upstream", [])]
            stack.extend((u, version_dir(ref)) for u in sorted(upstream, key=version_dir, reverse=True))
            self.files(ref, manifest)
        for ref, manifest in self.manifests.items():
            ups = [
                self.manifests[UpstreamRef(**u)]
                for u in manifest.get("upstream", [])
                if UpstreamRef(**u) in self.manifests
            ]
            self.counts(ref, manifest, ups)
        if root.asset == RELEASE_ASSET and root in self.manifests:
            self.release(root, self.manifests[root], visited)


def verify_remote(
    url: str, manifest: str | None = None, on_problem: Callable[[Problem], None] | None = None
) -> VerifyResult:
    """Re-hash and cross-check the release at `url` (or the version `manifest`, relative to `url`) in place."""
    where = Location.of(url)
    result = VerifyResult(target=f"{url}/{manifest}" if manifest else f"latest release at {url}")
    checker = _RemoteVerifier(where, result, on_problem)
    if manifest is None:
        try:
            root = read_pointer(where)
        except LakeError as exc:
            checker.problem(LATEST, "release", str(exc).removeprefix(f"{where.show(LATEST)}: "))  # path shown once
            return result
    else:
        parts = manifest.strip("/").split("/")
        if len(parts) != 4 or parts[3] != MANIFEST:
            raise ValueError(f"{manifest}: expected <asset>/<partition>/<version>/manifest.json relative to {url}")
        root = UpstreamRef(parts[0], parts[1], parts[2])
    checker.walk(root)
    if root.asset == RELEASE_ASSET and root in checker.manifests:
        result.release = root.version
        try:
            pointer = json.loads(where.fs.cat_file(where.path(LATEST)))
        except (FileNotFoundError, ValueError):
            pointer = {}
        if pointer.get("version") == root.version and pointer.get("merkle_root") != result.merkle_root:
            checker.problem(LATEST, "merkle", f"merkle_root {pointer.get('merkle_root')}", result.merkle_root)
    return result


# ---------------------------------------------------------------- loading shards


def open_remote_window_shards(url: str, split: str = "train", cache_dir: str | Path | None = None) -> WindowShards:
    """A split of the training_windows version of the release at `url`, via a verified local cache.

    Every shard of the version is streamed into `cache_dir` (default: a new temporary directory) with
    its sha256 computed while it is read; a mismatch raises `LakeError` naming the URL and both hashes
    before any byte is served. Files already in the cache are re-hashed by corpus.loader instead.
    """
    from corpus.loader import open_window_shards

    source = Location.of(url)
    release_ref = read_pointer(source)
    release = read_manifest(source, release_ref)
    windows = [UpstreamRef(**u) for u in release.get("upstream", []) if u["asset"] == "training_windows"]
    if len(windows) != 1:
        raise LakeError(f"{source.show(version_dir(release_ref), MANIFEST)}: cites {len(windows)} training_windows")
    ref = windows[0]
    manifest = read_manifest(source, ref)
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="corpus-shards-"))
    local = Location.of(cache.resolve().as_uri())
    rel = version_dir(ref)
    fresh = True
    for entry in manifest["files"]:
        target = cache / rel / entry["path"]
        if target.is_file():
            fresh = False
            continue
        part = f"{rel}/{entry['path']}.part-{os.getpid()}-{secrets.token_hex(6)}"
        _copy_file(source, local, f"{rel}/{entry['path']}", entry, to=part)
        os.replace(cache / part, target)  # a killed download never leaves a whole-looking shard in the cache
    (cache / rel / MANIFEST).write_bytes(source.fs.cat_file(source.path(rel, MANIFEST)))
    # Freshly streamed files were hashed on the way in; files that were already cached are re-hashed now.
    return open_window_shards(cache / rel / MANIFEST, split, verify=not fresh)
