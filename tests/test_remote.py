"""corpus.remote on fsspec's memory:// filesystem: push a release, verify it there, load shards, pull it back."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from test_crash import crash_manifest  # pytest's default (prepend) import mode puts tests/ on sys.path

from corpus import remote
from corpus.audit import verify
from corpus.lake import MANIFEST, Lake, LakeError
from corpus.loader import open_window_shards
from corpus.release import latest_release, lineage
from orchestration import cli
from orchestration.resources import lake_path

URL = "memory://bucket/corpus"


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    assert cli.main(["run", "--sources", str(crash_manifest(root)), "--lake", str(root / "lake")]) == 0
    return root / "lake"


@pytest.fixture(autouse=True)
def memory() -> Iterator[fsspec.AbstractFileSystem]:
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()


def remote_state_is_readable(fs: fsspec.AbstractFileSystem) -> list[str]:
    """Every manifest present at the URL lists only files that are there, and cites only versions that are."""
    problems = []
    for path in fs.find("/bucket/corpus"):
        if not path.endswith(f"/{MANIFEST}"):
            continue
        manifest = json.loads(fs.cat_file(path))
        base = path.rsplit("/", 1)[0]
        problems += [f"{base}/{e['path']} missing" for e in manifest["files"] if not fs.exists(f"{base}/{e['path']}")]
        for up in manifest["upstream"]:
            cited = f"/bucket/corpus/{up['asset']}/{up['partition']}/{up['version']}/{MANIFEST}"
            if not fs.exists(cited):
                problems.append(f"{path} cites missing {cited}")
    return problems


def test_push_copies_the_lineage_and_verifies_there(lake: Path, memory: fsspec.AbstractFileSystem) -> None:
    release = latest_release(lake)
    versions = lineage(Lake(lake), [release])
    checkpoints: list[list[str]] = []
    # After each version's manifest lands, the remote must already be a consistent (partial) lake.
    result = remote.push_release(lake, URL, on_version=lambda rel: checkpoints.append(remote_state_is_readable(memory)))
    assert len(checkpoints) == len(versions) and all(c == [] for c in checkpoints)
    assert (result.versions, result.versions_copied) == (len(versions), len(versions))
    assert result.files_copied == sum(len(v.files) for v in versions)
    assert result.merkle_root == release.extra["merkle_root"]
    pointer = json.loads(memory.cat_file("/bucket/corpus/releases/LATEST"))
    assert pointer["version"] == release.version and pointer["merkle_root"] == release.extra["merkle_root"]
    for v in versions:  # byte for byte, manifests included
        for name in [*v.files, MANIFEST]:
            assert (
                memory.cat_file(f"/bucket/corpus/{v.asset}/{v.partition}/{v.version}/{name}")
                == (v.path / name).read_bytes()
            )
    checked_remote = remote.verify_remote(URL)
    assert checked_remote.ok, checked_remote.problems
    local = verify(lake)
    assert (checked_remote.versions, checked_remote.files, checked_remote.bytes) == (
        local.versions,
        local.files,
        local.bytes,
    )
    assert checked_remote.merkle_root == release.extra["merkle_root"] and checked_remote.release == release.version
    again = remote.push_release(lake, URL)
    assert (again.versions_copied, again.files_copied) == (0, 0)


def test_verify_remote_names_a_tampered_file(lake: Path, memory: fsspec.AbstractFileSystem) -> None:
    remote.push_release(lake, URL)
    shard = next(p for p in memory.find("/bucket/corpus/training_windows") if p.endswith(".bin"))
    data = bytearray(memory.cat_file(shard))
    data[3] ^= 0xFF
    memory.pipe_file(shard, bytes(data))
    memory.pipe_file(shard.rsplit("/", 1)[0] + "/extra.txt", b"planted")
    result = remote.verify_remote(URL)
    assert not result.ok
    kinds = {p.kind: p for p in result.issues}
    assert set(kinds) == {"sha256", "unlisted"}
    assert kinds["sha256"].path == "memory://bucket/corpus" + shard.removeprefix("/bucket/corpus")
    assert kinds["sha256"].actual is not None and kinds["sha256"].expected != kinds["sha256"].actual
    assert kinds["unlisted"].path.endswith("/extra.txt")
    with pytest.raises(LakeError, match=r"\.bin: sha256 [0-9a-f]{64} .*expected [0-9a-f]{64}"):
        remote.open_remote_window_shards(URL, "train")
    assert cli.main(["verify", "--lake", URL]) == 1


def test_a_broken_local_file_stops_the_push_before_its_manifest(lake: Path, memory: fsspec.AbstractFileSystem) -> None:
    release = latest_release(lake)
    mixed = next(v for v in lineage(Lake(lake), [release]) if v.asset == "mixed_tokens")
    path = mixed.file("train.bin")
    original = path.read_bytes()
    path.write_bytes(original[:-2] + bytes([original[-2] ^ 1, original[-1]]))
    try:
        with pytest.raises(LakeError, match=f"{path}: sha256 .* expected {mixed.files['train.bin']['sha256']}"):
            remote.push_release(lake, URL)
    finally:
        path.write_bytes(original)
    assert remote_state_is_readable(memory) == []
    assert not memory.exists(f"/bucket/corpus/mixed_tokens/_all/{mixed.version}/{MANIFEST}")
    assert not memory.exists("/bucket/corpus/releases/LATEST")
    assert not remote.verify_remote(URL).ok  # no release there yet: said so, not a crash
    assert remote.push_release(lake, URL).versions_copied >= 1  # the next push completes it
    assert remote.verify_remote(URL).ok


def test_shards_load_from_the_url_and_equal_the_local_ones(lake: Path, tmp_path: Path) -> None:
    remote.push_release(lake, URL)
    windows = next(v for v in lineage(Lake(lake), [latest_release(lake)]) if v.asset == "training_windows")
    local = open_window_shards(windows.manifest_path, "train")
    fetched = remote.open_remote_window_shards(URL, "train", cache_dir=tmp_path / "cache")
    assert len(fetched) == len(local)
    for i in (0, len(local) // 2, len(local) - 1):
        assert all(torch.equal(a, b) for a, b in zip(fetched[i], local[i], strict=True))
    # A cached copy is re-hashed on the next open: damage in the cache is refused too.
    shard = next((tmp_path / "cache").rglob("train-*.bin"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(LakeError, match=shard.name):
        remote.open_remote_window_shards(URL, "train", cache_dir=tmp_path / "cache")


def test_pull_then_full_local_verify(lake: Path, tmp_path: Path) -> None:
    assert cli.main(["push", "--to", URL, "--lake", str(lake)]) == 0
    assert cli.main(["verify", "--lake", URL]) == 0
    pulled = tmp_path / "pulled"
    assert cli.main(["pull", URL, "--lake", str(pulled)]) == 0
    assert latest_release(pulled).version == latest_release(lake).version
    result = verify(pulled)  # every check of corpus.audit, structure included
    assert result.ok, result.problems


def test_pull_into_a_lake_with_its_own_newer_release_records_it_in_the_history(lake: Path, tmp_path: Path) -> None:
    """The pulled release becomes LATEST and the newest line of history.jsonl, so verify sees no rollback."""
    assert cli.main(["push", "--to", URL, "--lake", str(lake)]) == 0
    assert cli.main(["push", "--to", URL, "--lake", str(lake)]) == 0  # again: no second history line
    pushed = fsspec.filesystem("memory").cat_file("/bucket/corpus/releases/history.jsonl").decode().splitlines()
    assert [json.loads(line)["version"] for line in pushed] == [latest_release(lake).version]
    local = tmp_path / "local"
    shutil.copytree(lake, local, ignore=shutil.ignore_patterns("dagster_home"))
    with open(local / "releases" / "history.jsonl", "a") as history:  # this lake made a newer release since
        history.write(json.dumps({"version": "e" * 64}) + "\n")
    assert cli.main(["pull", URL, "--lake", str(local)]) == 0
    lines = (local / "releases" / "history.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["version"] == latest_release(lake).version
    assert verify(local).ok, verify(local).problems


def test_is_remote() -> None:
    assert remote.is_remote("s3://bucket/x") and remote.is_remote("memory://x")
    assert not remote.is_remote("/data/lake") and not remote.is_remote("file:///data/lake")


def test_a_file_url_is_a_local_lake_for_every_command(
    lake: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`push --to file://...` makes a lake that `verify`, `report` and the rest open by the same URL."""
    url = f"file://{tmp_path / 'pushed'}"
    assert cli.main(["push", "--to", url, "--lake", str(lake)]) == 0
    assert cli.main(["verify", "--lake", url]) == 0
    capsys.readouterr()
    assert cli.main(["report", "--json", "--lake", url]) == 0
    assert json.loads(capsys.readouterr().out)["release"]["version"] == latest_release(lake).version
    assert cli.main(["report", "--lake", URL]) == 1
    assert "--lake memory://bucket/corpus is a remote lake, not a local directory; `corpus report` works on a " in (
        capsys.readouterr().err
    )


def test_lake_path() -> None:
    assert lake_path("file:///data/lake") == Path("/data/lake")
    with pytest.raises(ValueError, match="a file:// URL with a host \\(nas\\); write file:///path"):
        lake_path("file://nas/data/lake")
    with pytest.raises(ValueError, match="s3://b/x is a remote lake"):
        lake_path("s3://b/x")
