"""`corpus diff OLD NEW`: what changed between two releases.

Per source: documents added and removed, counted at ingest (raw_documents) and at the end of the
cleaning stages (tokenized_documents, the documents the mixture draws from), token counts, and the
mixture (target and realized share, epochs); overall: stream tokens, windows, packed rows, the Merkle
roots, and which asset versions changed. A document is its doc_id, the sha256 of its text: a record
whose text changed is one document removed and one added; the same text under another file name is the
same document. Set differences run in DuckDB over the Parquet files, so memory does not grow with the
corpus. The two releases may live in different lakes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from corpus.lake import MANIFEST, Lake, LakeError, Version, read_version
from corpus.release import RELEASE_ASSET, latest_release, lineage, releases_dir

EXAMPLES = 5  # doc ids listed per source and direction, so a reviewer can trace a few by hand


def _history(lake_root: Path) -> list[str]:
    """Distinct release versions in the order they were released (oldest first)."""
    path = releases_dir(lake_root) / "history.jsonl"
    seen: list[str] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                version = json.loads(line)["version"]
                if version in seen:
                    seen.remove(version)
                seen.append(version)
    return seen


def resolve_release(spec: str, lake_root: Path) -> Version:
    """A release named by: a manifest.json or version directory, a lake directory (its latest release),
    `latest`, `latest~N` (N releases before it, by releases/history.jsonl), or a version id or unique prefix."""
    lake = Lake(lake_root)
    path = Path(spec).expanduser()
    if path.is_file():
        version = read_version(path)
    elif (path / MANIFEST).is_file():
        version = read_version(path / MANIFEST)
    elif (releases_dir(path) / "LATEST").is_file():
        version = latest_release(path.resolve())
    elif spec == "latest" or spec.startswith("latest~"):
        back = int(spec.split("~", 1)[1]) if "~" in spec else 0
        history = _history(lake.root)
        if back >= len(history):
            raise LakeError(
                f"{releases_dir(lake.root) / 'history.jsonl'} lists {len(history)} releases; {spec} is not one"
            )
        version = lake.open(RELEASE_ASSET, None, history[-1 - back])
    else:
        candidates = sorted(p.name for p in lake.partition_dir(RELEASE_ASSET, None).glob(f"{spec}*") if p.is_dir())
        if len(candidates) != 1:
            found = f"{len(candidates)} match" + (f" ({', '.join(c[:12] for c in candidates)})" if candidates else "")
            raise LakeError(
                f"{spec!r} names no single release in {lake.root} ({found}); give a manifest path, a lake directory, "
                "latest, latest~N or a version id"
            )
        version = lake.open(RELEASE_ASSET, None, candidates[0])
    if version.asset != RELEASE_ASSET:
        raise LakeError(f"{version.manifest_path} is a manifest of {version.asset}, not of a release")
    return version


def _files(versions: list[Version], asset: str, name: str) -> list[str]:
    return [str(v.path / name) for v in versions if v.asset == asset and name in v.files]


def _document_changes(old: list[str], new: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not old and not new:
        return out
    con = duckdb.connect()
    try:
        empty = "SELECT NULL::VARCHAR AS source, NULL::VARCHAR AS doc_id, NULL::VARCHAR AS uri WHERE false"
        o = "SELECT source, doc_id, min(uri) AS uri FROM read_parquet(?) GROUP BY ALL" if old else empty
        n = "SELECT source, doc_id, min(uri) AS uri FROM read_parquet(?) GROUP BY ALL" if new else empty
        params = [p for p in (old, new) if p]
        con.execute(
            f"CREATE TEMP TABLE joined AS SELECT coalesce(o.source, n.source) AS source, "
            f"coalesce(o.doc_id, n.doc_id) AS doc_id, coalesce(n.uri, o.uri) AS uri, "
            f"o.doc_id IS NOT NULL AS in_old, n.doc_id IS NOT NULL AS in_new "
            f"FROM ({o}) o FULL OUTER JOIN ({n}) n ON o.source = n.source AND o.doc_id = n.doc_id",
            params,
        )
        for source, n_old, n_new, added, removed in con.execute(
            "SELECT source, count(*) FILTER (WHERE in_old), count(*) FILTER (WHERE in_new), "
            "count(*) FILTER (WHERE in_new AND NOT in_old), count(*) FILTER (WHERE in_old AND NOT in_new) "
            "FROM joined GROUP BY source ORDER BY source"
        ).fetchall():
            out[source] = {"old": n_old, "new": n_new, "added": added, "removed": removed, "examples": {}}
        for direction, where in (("added", "in_new AND NOT in_old"), ("removed", "in_old AND NOT in_new")):
            rows = con.execute(
                "SELECT source, doc_id, uri FROM (SELECT *, row_number() OVER (PARTITION BY source ORDER BY doc_id) "
                f"AS k FROM joined WHERE {where}) WHERE k <= {EXAMPLES} ORDER BY source, doc_id"
            ).fetchall()
            for source, doc_id, uri in rows:
                out[source]["examples"].setdefault(direction, []).append({"doc_id": doc_id, "uri": uri})
    finally:
        con.close()
    return out


def _by_partition(versions: list[Version], asset: str, key: str) -> dict[str, int]:
    return {v.partition: int(v.counts.get(key, 0)) for v in versions if v.asset == asset}


def _one(versions: list[Version], asset: str) -> Version | None:
    return next((v for v in versions if v.asset == asset), None)


def diff_releases(old: Version, new: Version) -> dict[str, Any]:
    """Everything `corpus diff` reports, as JSON-able data."""
    old_versions = lineage(Lake(old.root), [old])
    new_versions = lineage(Lake(new.root), [new])
    raw = _document_changes(
        _files(old_versions, "raw_documents", "documents.parquet"),
        _files(new_versions, "raw_documents", "documents.parquet"),
    )
    final = _document_changes(
        _files(old_versions, "tokenized_documents", "index.parquet"),
        _files(new_versions, "tokenized_documents", "index.parquet"),
    )
    tokens_old = _by_partition(old_versions, "tokenized_documents", "tokens")
    tokens_new = _by_partition(new_versions, "tokenized_documents", "tokens")
    mixed_old, mixed_new = _one(old_versions, "mixed_tokens"), _one(new_versions, "mixed_tokens")
    mix_old = {r["source"]: r for r in (mixed_old.extra.get("mixture", []) if mixed_old else [])}
    mix_new = {r["source"]: r for r in (mixed_new.extra.get("mixture", []) if mixed_new else [])}
    sources = sorted(set(raw) | set(final) | set(tokens_old) | set(tokens_new) | set(mix_old) | set(mix_new))
    per_source = {}
    for source in sources:
        mo, mn = mix_old.get(source, {}), mix_new.get(source, {})
        per_source[source] = {
            "raw_documents": raw.get(source, {"old": 0, "new": 0, "added": 0, "removed": 0, "examples": {}}),
            "documents": final.get(source, {"old": 0, "new": 0, "added": 0, "removed": 0, "examples": {}}),
            "tokens": _change(tokens_old.get(source, 0), tokens_new.get(source, 0)),
            "trained_tokens": _change(int(mo.get("realized_tokens", 0)), int(mn.get("realized_tokens", 0))),
            "share": _change(float(mo.get("realized_share", 0.0)), float(mn.get("realized_share", 0.0)), pp=True),
            "target_share": _change(float(mo.get("target_share", 0.0)), float(mn.get("target_share", 0.0)), pp=True),
            "epochs": _change(float(mo.get("epochs", 0.0)), float(mn.get("epochs", 0.0))),
        }
    totals = {}
    for label, asset, key in (
        ("train_tokens", "mixed_tokens", "train_tokens"),
        ("validation_tokens", "mixed_tokens", "validation_tokens"),
        ("train_windows", "training_windows", "train_windows"),
        ("validation_windows", "training_windows", "validation_windows"),
        ("train_packed_rows", "packed_sequences", "train_rows"),
        ("validation_packed_rows", "packed_sequences", "validation_rows"),
    ):
        vo, vn = _one(old_versions, asset), _one(new_versions, asset)
        totals[label] = _change(int(vo.counts.get(key, 0)) if vo else 0, int(vn.counts.get(key, 0)) if vn else 0)
    old_keys = {(v.asset, v.partition): v.version for v in old_versions}
    new_keys = {(v.asset, v.partition): v.version for v in new_versions}
    versions = []
    for asset, partition in sorted(set(old_keys) | set(new_keys)):
        a, b = old_keys.get((asset, partition)), new_keys.get((asset, partition))
        status = "unchanged" if a == b else "added" if a is None else "removed" if b is None else "changed"
        versions.append({"asset": asset, "partition": partition, "old": a, "new": b, "status": status})
    settings = _setting_changes(
        {(v.asset, v.partition): v for v in old_versions}, {(v.asset, v.partition): v for v in new_versions}
    )
    return {
        "old": {
            "release": old.version,
            "merkle_root": old.extra.get("merkle_root"),
            "manifest": str(old.manifest_path),
        },
        "new": {
            "release": new.version,
            "merkle_root": new.extra.get("merkle_root"),
            "manifest": str(new.manifest_path),
        },
        "identical": old.version == new.version,
        "settings": settings,
        "sources": per_source,
        "totals": totals,
        "versions": versions,
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _setting_changes(old: dict[tuple[str, str], Version], new: dict[tuple[str, str], Version]) -> list[dict[str, Any]]:
    """The settings (manifest `config` entries and code versions) that differ between the versions an asset
    partition has in the two releases: what was changed to make the new release, one entry per setting with
    the asset partitions it reached."""
    changes: dict[tuple[str, str, str], list[str]] = {}
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if a.version == b.version:
            continue
        before = {"code_version": a.manifest.get("code_version"), **_flatten(a.manifest.get("config", {}), "config")}
        after = {"code_version": b.manifest.get("code_version"), **_flatten(b.manifest.get("config", {}), "config")}
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                change = (name, json.dumps(before.get(name)), json.dumps(after.get(name)))
                changes.setdefault(change, []).append(f"{key[0]}[{key[1]}]")
    return [
        {"setting": name, "old": json.loads(a), "new": json.loads(b), "assets": assets}
        for (name, a, b), assets in sorted(changes.items())
    ]


def _change(old: float, new: float, pp: bool = False) -> dict[str, Any]:
    delta = new - old
    out: dict[str, Any] = {"old": old, "new": new, "delta": delta}
    if pp:
        out["delta_pp"] = round(100.0 * delta, 4)
    return out


def format_diff(diff: dict[str, Any]) -> str:
    old, new = diff["old"], diff["new"]
    lines = [f"old release {old['release']}  (merkle {old['merkle_root']})"]
    lines.append(f"new release {new['release']}  (merkle {new['merkle_root']})")
    if diff["identical"]:
        lines.append("identical: same release version, every byte the same")
    if diff.get("settings"):
        lines.append("")
        lines.append("settings changed:")
        for change in diff["settings"]:
            reached = change["assets"]
            where = ", ".join(reached[:3]) + (f" and {len(reached) - 3} more" if len(reached) > 3 else "")
            lines.append(f"  {change['setting']}: {change['old']!r} -> {change['new']!r}  ({where})")
    lines.append("")
    header = (
        f"{'source':<14} {'raw +':>8} {'raw -':>8} {'docs':>17} {'docs +':>8} {'docs -':>8} "
        f"{'tokens':>23} {'share':>18}"
    )
    lines.append(header)
    for source, s in diff["sources"].items():
        raw, docs, tokens, share = s["raw_documents"], s["documents"], s["tokens"], s["share"]
        lines.append(
            f"{source:<14} {raw['added']:>8,} {raw['removed']:>8,} "
            f"{docs['old']:>8,}->{docs['new']:<8,} {docs['added']:>8,} {docs['removed']:>8,} "
            f"{tokens['old']:>11,}->{tokens['new']:<11,} "
            f"{100 * share['old']:6.2f}%->{100 * share['new']:6.2f}% ({share['delta_pp']:+.2f} pp)"
        )
    lines.append("")
    for label, t in diff["totals"].items():
        lines.append(f"{label:<24} {t['old']:>12,} -> {t['new']:<12,} ({t['delta']:+,})")
    changed = [v for v in diff["versions"] if v["status"] != "unchanged"]
    lines.append("")
    lines.append(
        f"asset versions: {len(diff['versions']) - len(changed)} unchanged, {len(changed)} changed/added/removed"
    )
    for v in changed:
        a = (v["old"] or "-")[:12]
        b = (v["new"] or "-")[:12]
        lines.append(f"  {v['status']:<9} {v['asset']}[{v['partition']}] {a} -> {b}")
    return "\n".join(lines)
