import json
import os
import shutil
from pathlib import Path

import pytest

from corpus.lake import Lake, LakeError, UpstreamRef, manifest_version, read_version


def commit(lake: Lake, asset: str, content: bytes, partition: str | None = "p", **kw: object) -> object:
    with lake.writer(asset, partition) as writer:
        writer.path("data.bin").write_bytes(content)
        writer.path("sub/inner.txt").write_text("inner")
        return writer.commit(code_version="x/1", config={"k": 1}, counts={"in": 2, "out": 2}, **kw)


def test_commit_is_content_addressed_and_deterministic(tmp_path: Path) -> None:
    a = commit(Lake(tmp_path / "a"), "asset", b"hello")
    b = commit(Lake(tmp_path / "b"), "asset", b"hello")
    c = commit(Lake(tmp_path / "c"), "asset", b"hellO")
    assert a.version == b.version != c.version
    assert (a.path / "manifest.json").read_bytes() == (b.path / "manifest.json").read_bytes()
    manifest = json.loads(a.manifest_path.read_text())
    assert manifest_version(manifest) == a.version
    assert {f["path"] for f in manifest["files"]} == {"data.bin", "sub/inner.txt"}
    assert manifest["files"][0]["bytes"] == 5
    assert not [p for p in a.path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_upstream_and_config_change_the_version(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    base = commit(lake, "asset", b"x")
    other = commit(lake, "asset", b"x", upstream=[UpstreamRef("raw", "p", "0" * 64)])
    assert base.version != other.version
    assert other.upstream == [UpstreamRef("raw", "p", "0" * 64)]


def test_recommit_reuses_the_existing_version(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    first = commit(lake, "asset", b"same")
    mtime = os.stat(first.path / "data.bin").st_mtime_ns
    second = commit(lake, "asset", b"same")
    assert second.version == first.version
    assert os.stat(first.path / "data.bin").st_mtime_ns == mtime


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), lake.writer("asset", "p") as writer:
        writer.path("data.bin").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list((tmp_path / "asset" / "p").iterdir()) == []


def test_stale_temporary_of_dead_writer_is_removed(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    stale = tmp_path / "asset" / "p" / ".tmp-999999999-abc"
    stale.mkdir(parents=True)
    commit(lake, "asset", b"x")
    assert not stale.exists()


def test_tampering_is_detected(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    v = commit(lake, "asset", b"hello")
    assert list(v.check_files()) == []
    (v.path / "data.bin").write_bytes(b"jello")
    problems = list(v.check_files())
    assert len(problems) == 1 and "data.bin" in problems[0] and "sha256" in problems[0]
    (v.path / "data.bin").write_bytes(b"hell")
    assert "size 4 bytes, expected 5" in next(iter(v.check_files()))
    (v.path / "data.bin").unlink()
    assert "missing" in next(iter(v.check_files()))
    with pytest.raises(LakeError, match=r"data\.bin"):
        v.verify_files()


def test_edited_manifest_is_detected(tmp_path: Path) -> None:
    v = commit(Lake(tmp_path), "asset", b"hello")
    manifest = json.loads(v.manifest_path.read_text())
    manifest["counts"]["out"] = 3
    v.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(LakeError, match="claims version"):
        read_version(v.manifest_path)


def test_open_missing_version(tmp_path: Path) -> None:
    with pytest.raises(LakeError, match="not found"):
        Lake(tmp_path).open("asset", "p", "f" * 64)


def test_invalid_file_names(tmp_path: Path) -> None:
    with Lake(tmp_path).writer("asset") as writer:
        for name in ("../x", "/abs", "manifest.json"):
            with pytest.raises(ValueError, match="invalid file name"):
                writer.path(name)


def test_failed_write_names_the_version_and_leaves_nothing(tmp_path: Path) -> None:
    import errno

    import numpy as np

    from corpus.stages.io import write_tokens

    lake = Lake(tmp_path)
    with pytest.raises(LakeError) as info, lake.writer("tokenized_documents", "docs") as writer:
        target = writer.path("tokens.bin")
        target.symlink_to("/dev/full")  # as on a full disk: open succeeds, the flush fails with ENOSPC
        write_tokens(target, np.arange(1000, dtype=np.uint16), vocab_size=50257)
    message = str(info.value)
    assert str(tmp_path / "tokenized_documents" / "docs") in message and "nothing was committed" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert list((tmp_path / "tokenized_documents" / "docs").iterdir()) == []


def test_commit_replaces_a_damaged_copy_of_the_same_version(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    first = commit(lake, "asset", b"same")
    (first.path / "manifest.json").unlink()  # as if killed while an earlier run replaced this directory
    again = commit(lake, "asset", b"same")
    assert again.version == first.version and list(again.check_files()) == []
    assert not [p for p in again.path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_version_copied_out_of_the_lake_layout_is_refused_clearly(tmp_path: Path) -> None:
    v = commit(Lake(tmp_path / "lake"), "asset", b"hello")
    assert read_version(v.manifest_path).path == v.path
    loose = tmp_path / "copy" / v.version
    shutil.copytree(v.path, loose)
    with pytest.raises(LakeError, match=r"not in a lake's layout <lake>/asset/p/[0-9a-f]{64}/manifest\.json"):
        read_version(loose / "manifest.json")
