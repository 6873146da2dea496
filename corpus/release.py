"""Releases: one hash that pins a whole dataset, and the pointer to the latest one.

A release's lineage is every version reachable from its final shards through the manifests' upstream
references. Its Merkle root is a binary SHA-256 tree over one leaf per file of every version in the
lineage, leaf = sha256("<asset>/<partition>/<version>/<path>\\0<file sha256>\\0<bytes>"), leaves sorted
by path, each level pairing neighbours (an odd last node is promoted unchanged). Any changed, added,
removed or renamed file anywhere in the lineage changes the root.

`<lake>/releases/LATEST` names the newest release (written atomically); `history.jsonl` lists every
release in order, for retention and `corpus diff`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from corpus.lake import Lake, LakeError, UpstreamRef, Version, VersionWriter, read_version, remove_dead_temporaries
from corpus.stages import StageOutput

CODE_VERSION = "dataset_release/1"
RELEASE_ASSET = "dataset_release"


def lineage(lake: Lake, roots: Iterable[Version | UpstreamRef]) -> list[Version]:
    """Every version reachable from `roots` (roots included), each manifest's own hash checked, sorted."""
    seen: dict[tuple[str, str, str], Version] = {}
    stack: list[Version | UpstreamRef] = list(roots)
    while stack:
        item = stack.pop()
        key = (item.asset, item.partition, item.version)
        if key in seen:
            continue
        version = item if isinstance(item, Version) else lake.open_ref(item)
        seen[key] = version
        stack.extend(version.upstream)
    return [seen[k] for k in sorted(seen)]


def iter_leaves(versions: Sequence[Version]) -> Iterator[tuple[str, str, int]]:
    """(lake-relative path, sha256, bytes) of every file of every version, manifests included."""
    for v in versions:
        base = f"{v.asset}/{v.partition}/{v.version}"
        for entry in v.manifest["files"]:
            yield f"{base}/{entry['path']}", entry["sha256"], int(entry["bytes"])
        yield f"{base}/manifest.json", v.version, 0  # the manifest is pinned by its own content hash


def merkle_root(leaves: Iterable[tuple[str, str, int]]) -> str:
    level = [
        hashlib.sha256(f"{path}\0{digest}\0{size}".encode()).digest()
        for path, digest, size in sorted(leaves, key=lambda leaf: leaf[0])
    ]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        nxt = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def build_release(lake: Lake, finals: Sequence[Version], writer: VersionWriter) -> StageOutput:
    versions = lineage(lake, finals)
    leaves = list(iter_leaves(versions))
    root = merkle_root(leaves)
    release = {
        "merkle_root": root,
        "finals": {v.asset: v.version for v in finals},
        "versions": [{"asset": v.asset, "partition": v.partition, "version": v.version} for v in versions],
        "files": len(leaves),
        "bytes": sum(size for _, _, size in leaves),
    }
    with open(writer.path("release.json"), "w", encoding="utf-8") as handle:
        json.dump(release, handle, indent=1, sort_keys=True)
    counts = {"versions": len(versions), "files": len(leaves), "bytes": release["bytes"]}
    version = writer.commit(
        code_version=CODE_VERSION,
        config={},
        upstream=[v.ref() for v in finals],
        counts=counts,
        extra={"merkle_root": root},
    )
    point_latest(lake, version)
    return StageOutput(version=version, counts=counts, summary={"merkle_root": root, **counts})


def releases_dir(lake: Lake | Path) -> Path:
    root = lake.root if isinstance(lake, Lake) else Path(lake)
    return root / "releases"


def point_latest(lake: Lake, version: Version) -> None:
    """Make `version` the latest release: atomic replace of LATEST, one line appended to history.jsonl."""
    directory = releases_dir(lake)
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "version": version.version,
        "manifest": str(version.manifest_path.relative_to(lake.root)),
        "merkle_root": version.extra["merkle_root"],
        "released_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    remove_dead_temporaries(directory)  # a pointer file left by a writer that was killed before its rename
    # History first, then the pointer: a kill in between leaves LATEST on the previous release, and the rerun
    # points it again without a second history line (the last line already names this version).
    history = directory / "history.jsonl"
    line = history_line(history.read_text(encoding="utf-8") if history.exists() else "", record)
    if line:
        with open(history, "a", encoding="utf-8") as handle:
            handle.write(line)
    tmp = directory / f".tmp-{os.getpid()}-LATEST"
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / "LATEST")


def history_line(history: str, record: dict[str, Any]) -> str:
    """What to append to history.jsonl's text `history` for release `record`: nothing when its last line
    already names that release (a rerun after a kill between the two writes), else the record's line, on a
    line of its own after a line a kill cut short."""
    if last_released(history) == record["version"]:
        return ""
    torn = bool(history) and not history.endswith("\n")
    return ("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n"


def last_released(history: str) -> str | None:
    """The version on the last complete line of history.jsonl (None if none, or if that line is torn)."""
    lines = history.splitlines()
    if not lines or not history.endswith("\n"):
        return None
    try:
        return str(json.loads(lines[-1]).get("version"))
    except (ValueError, AttributeError):
        return None


def latest_release(lake_root: Path) -> Version:
    """The release LATEST points at; a clear error when there is none or it is broken."""
    pointer = releases_dir(lake_root) / "LATEST"
    if not pointer.is_file():
        raise LakeError(f"no release in {lake_root} ({pointer} missing); run `corpus run --lake {lake_root}` first")
    try:
        record = json.loads(pointer.read_text(encoding="utf-8"))
        manifest = Path(lake_root) / record["manifest"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LakeError(f"{pointer}: not a valid release pointer: {exc}") from exc
    version = read_version(manifest)
    if version.version != record.get("version"):
        raise LakeError(f"{pointer} names version {record.get('version')}, {manifest} is {version.version}")
    return version


def release_finals(lake: Lake, release: Version) -> dict[str, Version]:
    return {ref.asset: lake.open_ref(ref) for ref in release.upstream}


def release_document(release: Version) -> dict[str, Any]:
    return json.loads(release.file("release.json").read_text(encoding="utf-8"))
