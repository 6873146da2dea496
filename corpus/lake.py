"""Content-addressed asset versions in a directory lake.

Layout: `<lake>/<asset>/<partition>/<version>/` holds an asset version's files and its `manifest.json`.
The manifest lists every file's sha256 and size, the config, the code version, the upstream versions
it was made from, the counts and the library versions. The version id is the sha256 of the canonical
JSON of that content (sorted keys, no whitespace), so it is a Merkle root over the files plus the
inputs: same inputs + config + code give the same id. Nothing run-specific (time, run id) is hashed;
that goes to DuckDB and Dagster.

A version is written into `.tmp-<pid>-<random>/` beside its final place and renamed into place only
when complete, so a crash never leaves a half-written version where a reader can find it. Temporary
directories of dead writers are removed by the next writer of the same asset partition.

Input memos let a refresh skip unchanged work: `<lake>/<asset>/<partition>/.inputs/<fingerprint>.json`
maps a fingerprint of everything a build reads (code version, config, upstream version ids, library
versions; see `input_fingerprint`) to the version it produced. A build whose fingerprint has a memo
naming a complete version returns that version instead of recomputing it. The memo is only a shortcut:
deleting `.inputs/` costs one recomputation, which gives the same version id again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
UNPARTITIONED = "_all"  # source names must start with a letter or digit, so this never collides
HASH_CHUNK = 1 << 20
TRACKED_LIBRARIES = ("numpy", "pyarrow", "tiktoken", "torch", "datasketch", "duckdb")
# Libraries whose upgrade can change a stage's output without changing its code version: a different
# version in any of them invalidates every input memo (the manifests' `libraries` stay TRACKED_LIBRARIES,
# so version ids do not change with this list).
FINGERPRINT_LIBRARIES = (*TRACKED_LIBRARIES, "ftfy", "lingua-language-detector", "phonenumbers")
INPUTS = ".inputs"


class LakeError(RuntimeError):
    """A version is missing, corrupt or inconsistent with its manifest; the message names the file."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def fingerprint_libraries() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in FINGERPRINT_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def input_fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a build's inputs (values JSON cannot hold, like paths, as text)."""
    return sha256_bytes(
        json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
    )


@dataclass(frozen=True)
class UpstreamRef:
    asset: str
    partition: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"asset": self.asset, "partition": self.partition, "version": self.version}


@dataclass(frozen=True)
class Version:
    """A committed, complete asset version."""

    root: Path
    asset: str
    partition: str
    version: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.root / self.asset / self.partition / self.version

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def file(self, name: str) -> Path:
        if name not in self.files:
            raise LakeError(f"{self.manifest_path} lists no file {name!r} (files: {', '.join(sorted(self.files))})")
        return self.path / name

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return {entry["path"]: entry for entry in self.manifest["files"]}

    @property
    def counts(self) -> dict[str, Any]:
        return dict(self.manifest.get("counts", {}))

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.manifest.get("extra", {}))

    @property
    def upstream(self) -> list[UpstreamRef]:
        return [UpstreamRef(**ref) for ref in self.manifest.get("upstream", [])]

    def ref(self) -> UpstreamRef:
        return UpstreamRef(self.asset, self.partition, self.version)

    def verify_files(self, names: Iterable[str] | None = None) -> None:
        """Re-hash files against the manifest; raise `LakeError` naming the first mismatch."""
        problems = list(self.check_files(names))
        if problems:
            raise LakeError("; ".join(problems))

    def check_sizes(self) -> list[str]:
        """Every manifest file present with its recorded size: the cheap check (`check_files` re-hashes)."""
        problems = []
        for entry in self.manifest["files"]:
            path = self.path / entry["path"]
            try:
                size = path.stat().st_size
            except OSError:
                problems.append(f"{path}: missing")
                continue
            if size != entry["bytes"]:
                problems.append(f"{path}: size {size} bytes, expected {entry['bytes']}")
        return problems

    def check_files(self, names: Iterable[str] | None = None) -> Iterator[str]:
        entries = self.files
        for name in sorted(entries) if names is None else names:
            entry = entries.get(name)
            if entry is None:
                yield f"{self.manifest_path}: no file {name!r} in manifest"
                continue
            path = self.path / name
            if not path.is_file():
                yield f"{path}: missing (expected sha256 {entry['sha256']})"
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                yield f"{path}: size {size} bytes, expected {entry['bytes']} (sha256 expected {entry['sha256']})"
                continue
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                yield f"{path}: sha256 {actual}, expected {entry['sha256']}"


def manifest_version(manifest: Mapping[str, Any]) -> str:
    """The version id: sha256 of the canonical manifest content without its own `version` field."""
    content = {k: v for k, v in manifest.items() if k != "version"}
    return sha256_bytes(canonical_json(content))


class Lake:
    """A directory of asset versions. Pure filesystem, no Dagster."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Lake({str(self.root)!r})"

    def partition_dir(self, asset: str, partition: str | None) -> Path:
        return self.root / asset / (partition or UNPARTITIONED)

    def writer(self, asset: str, partition: str | None = None) -> VersionWriter:
        return VersionWriter(self, asset, partition or UNPARTITIONED)

    def open(self, asset: str, partition: str | None, version: str) -> Version:
        """Open a committed version and check the manifest's own hash (files are not re-hashed here)."""
        path = self.partition_dir(asset, partition) / version / MANIFEST
        if not path.is_file():
            raise LakeError(
                f"{path}: version {version} of {asset}/{partition or UNPARTITIONED} not found in {self.root}"
            )
        return read_version(path)

    def open_ref(self, ref: UpstreamRef) -> Version:
        return self.open(ref.asset, ref.partition, ref.version)

    def memo_path(self, asset: str, partition: str | None, fingerprint: str) -> Path:
        assert len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint), (
            f"input fingerprint must be a sha256 hex digest, got {fingerprint!r}"
        )
        return self.partition_dir(asset, partition) / INPUTS / f"{fingerprint}.json"

    def remember(self, version: Version, fingerprint: str, record: Mapping[str, Any] | None = None) -> Path:
        """Record that inputs `fingerprint` produced `version` (atomic replace; `record` is kept alongside)."""
        path = self.memo_path(version.asset, version.partition, fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path.parent)
        body = {**dict(record or {}), "asset": version.asset, "partition": version.partition}
        body["version"] = version.version
        tmp = path.parent / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(
                    json.dumps(body, sort_keys=True, indent=1, ensure_ascii=False, default=str).encode("utf-8")
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return path

    def recall(self, asset: str, partition: str | None, fingerprint: str) -> Recall:
        """The version inputs `fingerprint` produced, when its memo exists and the version is still complete.

        Completeness is checked cheaply (manifest hash, every file present with its size); a full re-hash
        is `corpus verify`'s job. Anything amiss is a miss with a reason, never an error: the caller rebuilds.
        """
        path = self.memo_path(asset, partition, fingerprint)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            version_id = str(record["version"])
        except FileNotFoundError:
            return Recall(None, {}, f"no memo for inputs {fingerprint[:12]}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            return Recall(None, {}, f"memo {path} unreadable ({exc})")
        try:
            version = self.open(asset, partition, version_id)
        except LakeError as exc:
            return Recall(None, record, f"memo names {version_id[:12]}, which is gone or broken: {exc}")
        problems = version.check_sizes()
        if problems:
            return Recall(None, record, f"version {version_id[:12]} is incomplete: {'; '.join(problems[:3])}")
        return Recall(version, record, f"inputs {fingerprint[:12]} unchanged since version {version_id[:12]}")


@dataclass(frozen=True)
class Recall:
    """The outcome of `Lake.recall`: the reusable version (None on a miss), the memo's record and why."""

    version: Version | None
    record: dict[str, Any]
    reason: str


def read_version(manifest_path: str | Path) -> Version:
    """Open a version from its manifest path; the manifest must hash to its own version id."""
    path = Path(manifest_path).resolve()
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LakeError(f"{path}: manifest not found") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LakeError(f"{path}: not a valid JSON manifest: {exc}") from exc
    for key in ("asset", "partition", "version", "files"):
        if key not in manifest:
            raise LakeError(f"{path}: manifest has no {key!r} field")
    actual = manifest_version(manifest)
    if actual != manifest["version"]:
        raise LakeError(f"{path}: manifest content hashes to {actual}, but claims version {manifest['version']}")
    if path.parent.name != manifest["version"]:
        raise LakeError(f"{path}: directory {path.parent.name} does not match manifest version {manifest['version']}")
    if (path.parent.parent.name, path.parent.parent.parent.name) != (manifest["partition"], manifest["asset"]):
        raise LakeError(
            f"{path}: not in a lake's layout <lake>/{manifest['asset']}/{manifest['partition']}/{manifest['version']}/"
            f"{MANIFEST}, where its files are found; copy the whole version directory into that layout"
        )
    root = path.parent.parent.parent.parent
    return Version(root, manifest["asset"], manifest["partition"], manifest["version"], manifest)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_owner(name: str) -> int | None:
    """The writer pid in a `.tmp-<pid>-<random>` name; None when the name is not one."""
    if not name.startswith(".tmp-"):
        return None
    try:
        return int(name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def temporary_is_stale(name: str) -> bool:
    """A `.tmp-*` name whose writer is neither this process nor alive (an unparsable pid counts as dead)."""
    pid = temporary_owner(name)
    if pid is None:
        return False
    return not (pid == os.getpid() or (pid > 0 and _pid_alive(pid)))


def remove_dead_temporaries(directory: Path) -> list[Path]:
    """Remove the `.tmp-*` entries in `directory` whose writer process is gone; return what was removed."""
    removed = []
    for entry in directory.glob(".tmp-*"):
        if not temporary_is_stale(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class VersionWriter:
    """Write files into a temporary directory, then `commit()` them as one content-addressed version.

    Use as a context manager: an exception (or a missing commit) removes the temporary directory.
    """

    def __init__(self, lake: Lake, asset: str, partition: str) -> None:
        self.lake = lake
        self.asset = asset
        self.partition = partition
        self.parent = lake.root / asset / partition
        self.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        self.tmp = self.parent / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        self.tmp.mkdir()
        self.committed: Version | None = None

    def _remove_stale_temporaries(self) -> None:
        remove_dead_temporaries(self.parent)

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            # write(2) failing with ENOSPC or EACCES names no file; say which version was being written.
            raise LakeError(
                f"writing a version of {self.asset}[{self.partition}] into {self.tmp} failed: {exc}; "
                "nothing was committed, the previous version stays current"
            ) from exc

    def path(self, name: str) -> Path:
        """Where to write file `name` (a relative path; subdirectories are created)."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or name == MANIFEST:
            raise ValueError(f"invalid file name {name!r} for a version of {self.asset}")
        target = self.tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(
        self,
        *,
        code_version: str,
        config: Mapping[str, Any],
        upstream: Iterable[UpstreamRef] = (),
        counts: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Version:
        assert self.committed is None, f"{self.tmp} was already committed"
        files = []
        for path in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            files.append(
                {
                    "path": path.relative_to(self.tmp).as_posix(),
                    "sha256": sha256_file(path),
                    "bytes": path.stat().st_size,
                }
            )
        manifest: dict[str, Any] = {
            "asset": self.asset,
            "partition": self.partition,
            "code_version": code_version,
            "config": json.loads(canonical_json(dict(config))),
            "upstream": sorted(
                (ref.to_dict() for ref in upstream), key=lambda r: (r["asset"], r["partition"], r["version"])
            ),
            "files": files,
            "counts": json.loads(canonical_json(dict(counts or {}))),
            "extra": json.loads(canonical_json(dict(extra or {}))),
            "libraries": library_versions(),
        }
        version = manifest_version(manifest)
        manifest["version"] = version
        manifest_path = self.tmp / MANIFEST
        with open(manifest_path, "wb") as handle:
            handle.write(json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        final = self.parent / version
        if final.exists():
            # Same content already committed by an earlier run: keep it, it is byte-identical by construction.
            try:
                problems = list(read_version(final / MANIFEST).check_files())
            except LakeError as exc:  # e.g. a kill inside an earlier replacement left no manifest
                problems = [str(exc)]
            if problems:
                # Move the damaged copy aside first (a .tmp-* name the next writer cleans up), so a kill
                # here never leaves a manifest-less directory under the version's own name.
                aside = self.parent / f".tmp-{os.getpid()}-{secrets.token_hex(6)}-replaced"
                os.rename(final, aside)
                os.rename(self.tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                shutil.rmtree(self.tmp)
        else:
            os.rename(self.tmp, final)
        _fsync_dir(self.parent)
        self.committed = read_version(final / MANIFEST)
        return self.committed
