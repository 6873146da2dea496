"""`corpus gc`: keep the last N releases and everything they need, remove the rest, never a needed file."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_refresh import corpus_run, materializations, run_rows, small_manifest

from corpus.audit import verify
from corpus.gc import collect, version_dirs
from corpus.lake import Lake, LakeError, Version, input_fingerprint
from corpus.release import build_release, latest_release, lineage
from orchestration import cli

Key = tuple[str, str, str]


def keys(versions: list[Version]) -> set[Key]:
    return {(v.asset, v.partition, v.version) for v in versions}


def all_versions(lake: Path) -> set[Key]:
    return {(asset, partition, path.name) for asset, partition, path in version_dirs(Lake(lake))}


def trained_on(lake: Path, release: Version) -> set[Key]:
    """The smoke_training made from `release` and the poisoning_scan made from that training."""
    out: set[Key] = set()
    for asset in ("smoke_training", "poisoning_scan"):
        for path in sorted((lake / asset / "_all").glob("*/manifest.json")):
            manifest = json.loads(path.read_text())
            cited = {(u["asset"], u["partition"], u["version"]) for u in manifest["upstream"]}
            if (release.asset, release.partition, release.version) in cited or cited & out:
                out.add((asset, "_all", manifest["version"]))
    return out


@pytest.fixture(scope="module")
def two_releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("gc")
    manifest = small_manifest(root)
    lake = root / "lake"
    corpus_run(manifest, lake)
    run_a = run_rows(lake, [])
    release_a = latest_release(lake)
    text = manifest.read_text()
    assert "  stride: 32\n" in text
    manifest.write_text(text.replace("  stride: 32\n", "  stride: 16\n"))  # config B: overlapping windows
    rows_a = materializations(lake)
    corpus_run(manifest, lake)
    run_b = run_rows(lake, rows_a)
    release_b = latest_release(lake)
    assert release_b.version != release_a.version
    return {"manifest": manifest, "lake": lake, "a": release_a, "b": release_b, "runs": (run_a, run_b)}


def made_in(run: dict[tuple[str, str], dict[str, object]]) -> set[Key]:
    """The versions a `corpus run` built or reused: after it, they are the current ones."""
    return {(asset, partition, str(row["version"])) for (asset, partition), row in run.items()}


def test_keep_two_removes_nothing(two_releases: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    lake = two_releases["lake"]
    before = all_versions(lake)
    assert cli.main(["gc", "--lake", str(lake), "--keep", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith("removed 0 versions, 0 memos, 0 temporaries: 0 bytes freed")
    assert all_versions(lake) == before


def test_keep_one_removes_only_what_the_newest_release_does_not_need(
    two_releases: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    lake = Path(two_releases["lake"])
    release_a, release_b = two_releases["a"], two_releases["b"]
    run_a, run_b = two_releases["runs"]
    store = Lake(lake)
    before = all_versions(lake)
    assert before == made_in(run_a) | made_in(run_b)  # two runs, nothing else in the lake
    needed_b = keys(lineage(store, [release_b])) | trained_on(lake, release_b)
    assert needed_b <= made_in(run_b)
    # Kept: B's lineage and training, and every version run B left current (assets no release cites too).
    expected = made_in(run_a) - made_in(run_b)
    assert keys(lineage(store, [release_a])) | trained_on(lake, release_a) <= made_in(run_a)
    assert ("dataset_release", "_all", release_a.version) in expected
    assert {k[0] for k in expected} >= {"training_windows", "dataset_release", "smoke_training", "poisoning_scan"}
    assert not {k for k in expected if k[0] in ("raw_documents", "tokenized_documents")}  # B reused them

    dry = collect(lake, keep=1, dry_run=True)
    removed = [r.path for r in dry.removed if r.kind == "version"]
    assert {(path.parent.parent.name, path.parent.name, path.name) for path in removed} == expected
    assert all_versions(lake) == before  # a dry run removes nothing
    freed = sum(f.stat().st_size for a, p, v in expected for f in (lake / a / p / v).rglob("*") if f.is_file())
    assert sum(r.bytes for r in dry.removed if r.kind == "version") == freed
    assert dry.count("memo") >= len(expected)  # at least the memo each removed version was built under

    assert cli.main(["gc", "--lake", str(lake), "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert f"removed {len(expected)} versions" in out.splitlines()[-1]
    assert all_versions(lake) == made_in(run_b)
    assert verify(lake).ok, verify(lake).problems
    assert cli.main(["verify", "--lake", str(lake)]) == 0
    for asset, partition, _ in expected:  # no memo names a removed version
        for memo in (lake / asset / partition / ".inputs").glob("*.json"):
            assert (asset, partition, json.loads(memo.read_text())["version"]) not in expected

    # Nothing the kept release needs went: a refresh with config B rebuilds nothing.
    rows_before = materializations(lake)
    corpus_run(two_releases["manifest"], lake)
    rerun = run_rows(lake, rows_before)
    assert sorted(key for key, row in rerun.items() if not row["reused"]) == []
    assert latest_release(lake).version == release_b.version


# ---------------------------------------------------------------- a hand-made lake


def memo(version: Version) -> str:
    return f"raw/p/.inputs/{input_fingerprint({'content': version.version})}.json"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def commit(lake: Lake, asset: str, content: bytes, upstream: tuple[Version, ...] = ()) -> Version:
    with lake.writer(asset, "p" if asset == "raw" else None) as writer:
        writer.path("data.bin").write_bytes(content)
        return writer.commit(code_version=f"{asset}/1", config={}, upstream=[v.ref() for v in upstream])


def release(lake: Lake, finals: list[Version]) -> Version:
    with lake.writer("dataset_release") as writer:
        return build_release(lake, finals, writer).version


def age(version: Version, seconds: float) -> None:
    """Make a version look `seconds` old (the pending rule compares manifest mtimes with release times)."""
    when = time.time() - seconds
    os.utime(version.manifest_path, (when, when))


@pytest.fixture
def lake(tmp_path: Path) -> dict[str, object]:
    store = Lake(tmp_path / "lake")
    raw1 = commit(store, "raw", b"one")
    rel1 = release(store, [raw1])
    smoke1 = commit(store, "smoke_training", b"s1", (rel1,))
    raw2 = commit(store, "raw", b"two")
    orphan = commit(store, "raw", b"never released")
    for v in (raw1, rel1, smoke1, raw2, orphan):
        age(v, 100)
    rel2 = release(store, [raw2])
    age(rel2, 50)
    smoke2 = commit(store, "smoke_training", b"s2", (rel2,))
    age(smoke2, 40)
    pending = commit(store, "raw", b"built after the latest release")
    for v in (raw1, raw2, orphan):
        store.remember(v, input_fingerprint({"content": v.version}))
    return {
        "store": store,
        "raw1": raw1,
        "rel1": rel1,
        "smoke1": smoke1,
        "raw2": raw2,
        "rel2": rel2,
        "smoke2": smoke2,
        "orphan": orphan,
        "pending": pending,
    }


def test_gc_keeps_lineage_dependents_and_pending_work(lake: dict[str, object]) -> None:
    store: Lake = lake["store"]
    dead = dead_pid()
    stale_dir = store.root / "raw" / "p" / f".tmp-{dead}-abcdef"
    stale_dir.mkdir()
    (stale_dir / "partial.bin").write_bytes(b"x" * 10)
    stale_memo = store.root / "raw" / "p" / ".inputs" / f".tmp-{dead}-123456"
    stale_memo.write_text("{")
    live = store.root / "raw" / "p" / f".tmp-{os.getpid()}-live"
    live.mkdir()
    (store.root / "lineage").mkdir()
    (store.root / "lineage" / "openlineage.jsonl").write_text("{}\n")
    hidden = store.root / "dagster_home" / "x" / ("f" * 64)
    hidden.mkdir(parents=True)
    (hidden / "manifest.json").write_text("{}")

    result = collect(store.root, keep=1)
    removed = {(r.kind, r.path.relative_to(store.root).as_posix()) for r in result.removed}
    assert removed == {
        ("version", f"raw/p/{lake['raw1'].version}"),
        ("version", f"raw/p/{lake['orphan'].version}"),
        ("version", f"dataset_release/_all/{lake['rel1'].version}"),
        ("version", f"smoke_training/_all/{lake['smoke1'].version}"),
        ("memo", memo(lake["raw1"])),
        ("memo", memo(lake["orphan"])),
        ("temporary", stale_dir.relative_to(store.root).as_posix()),
        ("temporary", stale_memo.relative_to(store.root).as_posix()),
    }
    assert result.releases == [lake["rel2"].version]
    assert result.kept_versions == 3  # raw2, rel2 and smoke2, which cites rel2
    assert result.kept_pending == 1
    assert lake["pending"].path.is_dir() and lake["smoke2"].path.is_dir() and live.is_dir()
    assert (store.root / "lineage" / "openlineage.jsonl").is_file() and hidden.is_dir()
    assert (store.root / memo(lake["raw2"])).is_file()
    assert result.bytes_freed == sum(r.bytes for r in result.removed) > 0
    assert not list(store.root.glob("*/*/.tmp-*gc*"))
    assert verify(store.root).ok

    again = collect(store.root, keep=1)
    assert again.removed == []


def test_keep_counts_distinct_releases_and_latest_wins(lake: dict[str, object]) -> None:
    store: Lake = lake["store"]
    from corpus.release import point_latest

    point_latest(store, lake["rel1"])  # a refresh went back to config 1: its release is the newest again
    result = collect(store.root, keep=1, dry_run=True)
    assert result.releases == [lake["rel1"].version]
    assert collect(store.root, keep=2, dry_run=True).releases == [lake["rel1"].version, lake["rel2"].version]
    assert {r.path.name for r in result.removed if r.kind == "version"} == {
        lake["raw2"].version,
        lake["orphan"].version,
        lake["rel2"].version,
        lake["smoke2"].version,
    }  # the pending raw is newer than the re-pointed release too: kept


def test_gc_refuses_when_it_cannot_tell_what_is_needed(lake: dict[str, object], tmp_path: Path) -> None:
    store: Lake = lake["store"]
    with pytest.raises(ValueError, match="--keep must be >= 1"):
        collect(store.root, keep=0)
    empty = Lake(tmp_path / "empty")
    commit(empty, "raw", b"x")
    with pytest.raises(LakeError, match="no release"):
        collect(empty.root)
    assert len(list(version_dirs(empty))) == 1
    with cli.run_lock(store.root, wait=False), pytest.raises(LakeError, match="is writing to"):
        collect(store.root, keep=1)
    (lake["raw2"].path / "manifest.json").write_text("{}")  # the kept release's lineage is broken
    before = set(version_dirs(store))
    with pytest.raises(LakeError, match="nothing removed"):
        collect(store.root, keep=1)
    assert set(version_dirs(store)) == before
    assert cli.main(["gc", "--lake", str(store.root), "--keep", "1"]) == 1
