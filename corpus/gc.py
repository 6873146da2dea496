"""`corpus gc`: retention. Keep the last N releases and everything they need; remove every other version.

Kept:
- the last `keep` distinct releases of `releases/history.jsonl` (and the one `releases/LATEST` names);
- every version in their lineage (corpus.release.lineage: all upstream references, transitively);
- the versions made from a kept release (smoke_training cites its release, poisoning_scan its smoke
  training), with their lineage: an auditor of a kept release also wants the training that validated it;
- the current version of every asset partition (its latest row in metrics.duckdb's `materializations`,
  what the next run reads and reuses) with its lineage: assets no release cites and the state a failed
  refresh stopped in stay usable;
- versions committed after the latest release was recorded: work of a refresh still in flight, which
  metrics.duckdb may not list yet (its next phase reads them). The next release adopts or drops them.

Removed: every other version directory `<lake>/<asset>/<partition>/<64 hex>/`, the input memos naming
removed versions, and `.tmp-*` leftovers of writers that are no longer alive. A version is first renamed
to `.tmp-<pid>-gc...` and then deleted, so a crash mid-way never leaves a half-deleted version under its
real name (the next writer or gc removes the leftover). Nothing under `releases/` or the Dagster home is
touched, and DuckDB metric rows stay (they are small and keyed by version id, so history stays auditable).

The lineage of every kept release must open cleanly; if one cannot (a manifest missing or corrupt), gc
removes nothing, since it could not tell what that release needs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from corpus.lake import INPUTS, MANIFEST, Lake, LakeError, Version, read_version, temporary_is_stale
from corpus.metrics import MetricsError, MetricsStore
from corpus.release import RELEASE_ASSET, lineage, releases_dir

DEFAULT_KEEP = 3
VERSION_NAME = re.compile(r"^[0-9a-f]{64}$")
NOT_ASSETS = frozenset({"releases", "dagster_home"})  # lake entries that hold no asset versions
# history.jsonl's released_at has whole seconds: a version written in the same second as the latest
# release counts as newer than it (kept), never the other way round.
CLOCK_SLACK_S = 1.0


@dataclass(frozen=True)
class Removal:
    path: Path
    bytes: int
    kind: str  # "version", "memo" or "temporary"


@dataclass
class GcResult:
    lake: Path
    keep: int
    dry_run: bool
    releases: list[str] = field(default_factory=list)
    kept_versions: int = 0
    kept_current: int = 0
    kept_pending: int = 0
    removed: list[Removal] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.removed)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.removed if r.kind == kind)


def _tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _record(text: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LakeError(f"{where}: not a release record ({exc}); nothing removed") from exc
    if not isinstance(record, dict) or not {"version", "manifest"} <= set(record):
        raise LakeError(f"{where}: a release record needs 'version' and 'manifest'; nothing removed")
    return record


def release_history(lake: Lake) -> list[dict[str, str]]:
    """The records of history.jsonl, oldest first; the LATEST record is appended when history lacks it."""
    directory = releases_dir(lake)
    records: list[dict[str, str]] = []
    history = directory / "history.jsonl"
    if history.is_file():
        for number, line in enumerate(history.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                records.append(_record(line, f"{history}:{number}"))
    pointer = directory / "LATEST"
    if pointer.is_file():
        latest = _record(pointer.read_text(encoding="utf-8"), str(pointer))
        if not records or records[-1]["version"] != latest["version"]:
            records.append(latest)
    return records


def kept_releases(lake: Lake, keep: int) -> tuple[list[Version], float | None]:
    """The last `keep` distinct releases, newest first, and when the latest was recorded (epoch seconds)."""
    records = release_history(lake)
    if not records:
        raise LakeError(
            f"no release in {lake.root} (releases/history.jsonl and releases/LATEST missing); "
            "gc keeps releases and their lineage, so with none it would remove everything: nothing removed"
        )
    chosen: dict[str, dict[str, str]] = {}
    for record in reversed(records):
        if record["version"] not in chosen:
            chosen[record["version"]] = record
        if len(chosen) == keep:
            break
    releases = []
    for version_id, record in chosen.items():
        manifest = lake.root / record["manifest"]
        try:
            release = read_version(manifest)
        except LakeError as exc:
            raise LakeError(f"kept release {version_id[:12]} cannot be opened ({exc}); nothing removed") from exc
        if release.version != version_id:
            raise LakeError(f"{manifest} is version {release.version}, history names {version_id}; nothing removed")
        releases.append(release)
    released_at = records[-1].get("released_at")
    when = None
    if released_at:
        with contextlib.suppress(ValueError):
            when = dt.datetime.fromisoformat(released_at).timestamp()
    return releases, when


def version_dirs(lake: Lake) -> Iterator[tuple[str, str, Path]]:
    """(asset, partition, directory) of every version directory: `<asset>/<partition>/<64 hex>/manifest.json`.

    VersionWriter renames only complete directories into place, so a directory without its manifest is
    not a version, and whatever other tools keep in the lake (a `lineage/` export, say) is never touched.
    """
    for asset_dir in sorted(p for p in lake.root.iterdir() if p.is_dir() and not p.is_symlink()):
        if asset_dir.name in NOT_ASSETS or asset_dir.name.startswith("."):
            continue
        for partition_dir in sorted(p for p in asset_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            for entry in sorted(partition_dir.iterdir()):
                if VERSION_NAME.match(entry.name) and not entry.is_symlink() and (entry / MANIFEST).is_file():
                    yield asset_dir.name, partition_dir.name, entry


def _dependents(lake: Lake, releases: list[Version]) -> list[Version]:
    """Versions that cite a kept release, or cite such a version, transitively."""
    anchors = {(r.asset, r.partition, r.version) for r in releases}
    candidates: list[Version] = []
    for asset, _, path in version_dirs(lake):
        if asset == RELEASE_ASSET:
            continue
        try:
            candidates.append(read_version(path / MANIFEST))
        except LakeError:
            continue  # unreadable: it cannot be a dependent anyone can use
    found: dict[tuple[str, str, str], Version] = {}
    grew = True
    while grew:
        grew = False
        for v in candidates:
            key = (v.asset, v.partition, v.version)
            if key in found:
                continue
            if any(
                (u.asset, u.partition, u.version) in anchors or (u.asset, u.partition, u.version) in found
                for u in v.upstream
            ):
                found[key] = v
                grew = True
    return list(found.values())


def current_versions(lake: Lake) -> list[Version]:
    """The latest materialized version of each asset partition per metrics.duckdb, those still in the lake."""
    store = MetricsStore(lake.root / "metrics.duckdb")
    try:
        if "materializations" not in store.tables():
            return []
        rows = store.query(
            "SELECT asset, partition, arg_max(version, materialized_at) AS version FROM materializations "
            "GROUP BY asset, partition ORDER BY asset, partition"
        )
    except MetricsError:
        return []
    out = []
    for row in rows:
        with contextlib.suppress(LakeError):
            out.append(lake.open(str(row["asset"]), str(row["partition"]), str(row["version"])))
    return out


def _lineage_of_current(lake: Lake, current: list[Version]) -> set[tuple[str, str, str]]:
    """Keys of the current versions and their lineage; a broken lineage keeps what it can reach."""
    out: set[tuple[str, str, str]] = set()
    for version in current:
        try:
            out |= {(v.asset, v.partition, v.version) for v in lineage(lake, [version])}
        except LakeError:
            out.add((version.asset, version.partition, version.version))
    return out


@contextlib.contextmanager
def _run_lock(lake: Lake) -> Iterator[None]:
    """The lock `corpus run` holds: gc never deletes while a run writes (it might be about to reuse a version)."""
    path = lake.root / ".run.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LakeError(f"a `corpus run` (pid {holder}) is writing to {lake.root}; nothing removed") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Rename out of readers' sight first, then delete."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.parent / f".tmp-{os.getpid()}-gc{secrets.token_hex(4)}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    else:
        path.unlink(missing_ok=True)


def collect(lake_root: str | Path, keep: int = DEFAULT_KEEP, dry_run: bool = False) -> GcResult:
    """Remove what the last `keep` releases do not need (see the module docstring); `dry_run` removes nothing."""
    if keep < 1:
        raise ValueError(f"gc --keep must be >= 1 (releases to keep), got {keep}")
    lake = Lake(lake_root)
    if not lake.root.is_dir():
        raise LakeError(f"lake {lake.root} does not exist")
    with contextlib.nullcontext() if dry_run else _run_lock(lake):
        releases, released_at = kept_releases(lake, keep)
        try:
            needed = lineage(lake, releases)
            dependents = _dependents(lake, releases)
            needed += lineage(lake, dependents)
        except LakeError as exc:
            raise LakeError(
                f"lineage of a kept release is broken ({exc}); run `corpus verify`; nothing removed"
            ) from exc
        kept = {(v.asset, v.partition, v.version) for v in needed}
        current = _lineage_of_current(lake, current_versions(lake))
        result = GcResult(lake=lake.root, keep=keep, dry_run=dry_run, releases=[r.version for r in releases])
        doomed: list[tuple[str, str, Path]] = []
        present = set()
        for asset, partition, path in version_dirs(lake):
            present.add((asset, partition, path.name))
            if (asset, partition, path.name) in kept:
                result.kept_versions += 1
                continue
            if (asset, partition, path.name) in current:
                result.kept_current += 1
                continue
            if released_at is not None and (path / MANIFEST).stat().st_mtime > released_at - CLOCK_SLACK_S:
                result.kept_pending += 1
                continue
            doomed.append((asset, partition, path))
        gone = {(a, p, path.name) for a, p, path in doomed}
        # Memos first: a crash between the two steps leaves memos that name existing versions, never the reverse.
        for memo_dir in sorted(lake.root.glob(f"*/*/{INPUTS}")):
            asset, partition = memo_dir.parent.parent.name, memo_dir.parent.name
            if asset in NOT_ASSETS:
                continue
            for memo in sorted(memo_dir.glob("*.json")):
                try:
                    named = str(json.loads(memo.read_text(encoding="utf-8"))["version"])
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    named = ""
                if (asset, partition, named) in gone or (asset, partition, named) not in present:
                    result.removed.append(Removal(memo, _tree_bytes(memo), "memo"))
        for _, _, path in doomed:
            result.removed.append(Removal(path, _tree_bytes(path), "version"))
        for entry in sorted([*lake.root.glob("*/*/.tmp-*"), *lake.root.glob(f"*/*/{INPUTS}/.tmp-*")]):
            if entry.relative_to(lake.root).parts[0] in NOT_ASSETS:
                continue
            if not temporary_is_stale(entry.name):
                continue
            result.removed.append(Removal(entry, _tree_bytes(entry), "temporary"))
        if not dry_run:
            for removal in result.removed:
                _remove(removal.path)
    return result


def format_result(result: GcResult) -> str:
    verb = "would remove" if result.dry_run else "removed"
    lines = [f"{verb} {r.kind} {r.path} ({r.bytes:,} bytes)" for r in result.removed]
    lines.append(
        f"{'dry run: ' if result.dry_run else ''}kept {len(result.releases)} release(s) "
        f"({', '.join(v[:12] for v in result.releases)}), {result.kept_versions} versions in their lineage"
        + (f", {result.kept_current} current version(s) outside it" if result.kept_current else "")
        + (f", {result.kept_pending} newer than the latest release" if result.kept_pending else "")
        + f"; {verb} {result.count('version')} versions, {result.count('memo')} memos, "
        f"{result.count('temporary')} temporaries: {result.bytes_freed:,} bytes "
        + ("would be freed" if result.dry_run else "freed")
    )
    return "\n".join(lines)
