"""Ed25519 signing of release manifests, and verification inside `corpus verify --public-key`."""

import base64
import hashlib
import json
import os
import random
import shutil
import stat
from pathlib import Path

import pytest

from corpus.audit import verify
from corpus.lake import MANIFEST, Lake, Version, manifest_version, read_version
from corpus.release import build_release, iter_leaves, latest_release, lineage, merkle_root
from corpus.signing import generate_keypair, key_id, load_public_key, sign_release, signature_path
from orchestration import cli


def build_synthetic_lake(
    root: Path, partitions: int, files: int, size: int = 256, big_bytes: int = 0, seed: int = 1
) -> Lake:
    """`partitions` versions of `files` random files each, one version citing them all, and a release over it."""
    lake = Lake(root)
    rng = random.Random(seed)
    blobs = []
    for p in range(partitions):
        with lake.writer("blobs", f"p{p:03d}") as writer:
            for i in range(files):
                writer.path(f"d{i % 7}/f{i:05d}.dat").write_bytes(rng.randbytes(size))
            blobs.append(writer.commit(code_version="blobs/1", config={"p": p}, counts={"files": files}))
    with lake.writer("bundle") as writer:
        with open(writer.path("big.bin"), "wb") as handle:
            for _ in range(big_bytes >> 20):
                handle.write(rng.randbytes(1 << 20))
        writer.path("index.txt").write_text("\n".join(v.version for v in blobs))
        bundle = writer.commit(code_version="bundle/1", config={}, upstream=[v.ref() for v in blobs])
    with lake.writer("dataset_release") as writer:
        build_release(lake, [bundle], writer)
    return lake


def rewrite_version(version: Version, edit: dict) -> Version:
    """A forger's rewrite: change manifest fields, recompute the version id, move the directory to the new id."""
    manifest = {**version.manifest, **edit}
    manifest.pop("version")
    manifest["version"] = manifest_version(manifest)
    new_dir = version.path.parent / manifest["version"]
    shutil.move(version.path, new_dir)
    (new_dir / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
    return read_version(new_dir / MANIFEST)


def forge_release(lake: Lake, edit_final: dict) -> Version:
    """Rewrite the release's final version and the release above it so that every hash is consistent again."""
    release = latest_release(lake.root)
    final = lake.open_ref(release.upstream[0])
    forged_final = rewrite_version(final, edit_final)
    versions = lineage(lake, [forged_final])
    root = merkle_root(iter_leaves(versions))
    document = json.loads(release.file("release.json").read_text())
    document.update(
        merkle_root=root,
        finals={forged_final.asset: forged_final.version},
        versions=[{"asset": v.asset, "partition": v.partition, "version": v.version} for v in versions],
    )
    (release.path / "release.json").write_text(json.dumps(document, indent=1, sort_keys=True))
    files = [
        {**e, "sha256": hashlib.sha256((release.path / e["path"]).read_bytes()).hexdigest(),
         "bytes": (release.path / e["path"]).stat().st_size}
        for e in release.manifest["files"]
    ]  # fmt: skip
    forged = rewrite_version(
        release, {"files": files, "upstream": [forged_final.ref().to_dict()], "extra": {"merkle_root": root}}
    )
    pointer = lake.root / "releases" / "LATEST"
    record = json.loads(pointer.read_text())
    record.update(version=forged.version, merkle_root=root, manifest=str(forged.manifest_path.relative_to(lake.root)))
    pointer.write_text(json.dumps(record, sort_keys=True) + "\n")
    with open(lake.root / "releases" / "history.jsonl", "a") as history:  # else verify reports LATEST moved
        history.write(json.dumps(record, sort_keys=True) + "\n")
    return forged


@pytest.fixture()
def signed_lake(tmp_path: Path) -> tuple[Lake, Path, Path]:
    lake = build_synthetic_lake(tmp_path / "lake", partitions=3, files=4)
    private, public, _ = generate_keypair(tmp_path / "keys" / "release.pem")
    sign_release(lake.root, private)
    return lake, private, public


def test_generate_keypair_writes_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public, kid = generate_keypair(tmp_path / "k.pem")
    assert public == tmp_path / "k.pem.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert kid == key_id(load_public_key(public)) and len(kid) == 16
    with pytest.raises(ValueError, match="already exists"):
        generate_keypair(tmp_path / "k.pem")


def test_signed_release_verifies_with_its_key(signed_lake: tuple[Lake, Path, Path]) -> None:
    lake, _, public = signed_lake
    release = latest_release(lake.root)
    result = verify(lake.root, public_key=public)
    assert result.ok, result.problems
    assert result.signed_by == key_id(load_public_key(public))
    record = json.loads(signature_path(lake.root, release.version, result.signed_by).read_text())
    assert record["release"] == release.version
    assert record["merkle_root"] == release.extra["merkle_root"]


def test_unsigned_release_or_other_key_fails(signed_lake: tuple[Lake, Path, Path], tmp_path: Path) -> None:
    lake, _, _ = signed_lake
    _, other, other_id = generate_keypair(tmp_path / "other.pem")
    result = verify(lake.root, public_key=other)
    assert not result.ok
    release = latest_release(lake.root)
    assert result.problems == [
        f"{signature_path(lake.root, release.version, other_id)}: no signature by this key for this release"
    ]


def test_tampered_signature_fails(signed_lake: tuple[Lake, Path, Path]) -> None:
    lake, _, public = signed_lake
    release = latest_release(lake.root)
    path = signature_path(lake.root, release.version, key_id(load_public_key(public)))
    record = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[0] ^= 1
    record["signature"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(record))
    result = verify(lake.root, public_key=public)
    assert [i.kind for i in result.issues] == ["signature"]
    assert "Ed25519 signature does not verify" in result.problems[0]
    assert "the release manifest or the signature was altered" in result.problems[0]


def test_forged_chain_passes_hashes_but_not_the_signature(signed_lake: tuple[Lake, Path, Path]) -> None:
    """A forger who rewrites a version and every hash above it leaves a lake that verifies; the key catches it."""
    lake, _, public = signed_lake
    original = latest_release(lake.root)
    forged = forge_release(lake, {"counts": {"note": "rewritten"}})
    assert forged.version != original.version
    assert verify(lake.root).ok  # every hash is consistent again
    result = verify(lake.root, public_key=public)
    assert not result.ok
    assert result.problems == [
        f"{signature_path(lake.root, forged.version, key_id(load_public_key(public)))}: "
        "no signature by this key for this release"
    ]
    # Copying the old signature next to the forged release does not help either.
    kid = key_id(load_public_key(public))
    old = signature_path(lake.root, original.version, kid)
    result = verify(lake.root, public_key=public, signature=old)
    assert result.problems == [
        f"{old}: signs release {original.version}, not {forged.version}: the signature belongs to another release"
    ]


def test_cli_sign_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = build_synthetic_lake(tmp_path / "lake", partitions=2, files=3)
    key = tmp_path / "k.pem"
    assert cli.main(["sign", "--generate-key", str(key)]) == 0
    assert cli.main(["sign", "--lake", str(lake.root), "--key", str(key)]) == 0
    out = capsys.readouterr().out
    assert f"signed release {latest_release(lake.root).version}" in out
    assert cli.main(["verify", "--lake", str(lake.root), "--public-key", f"{key}.pub"]) == 0
    assert "signed by key" in capsys.readouterr().out
    (tmp_path / "bad.pub").write_text("not a key")
    assert cli.main(["verify", "--lake", str(lake.root), "--public-key", str(tmp_path / "bad.pub")]) == 1
    assert "not a PEM or OpenSSH public key" in capsys.readouterr().out
    assert cli.main(["sign", "--lake", str(lake.root), "--key", str(tmp_path / "missing.pem")]) == 1
    assert "private key" in capsys.readouterr().err


def test_only_release_manifests_are_signed(tmp_path: Path) -> None:
    lake = build_synthetic_lake(tmp_path / "lake", partitions=1, files=1)
    private, _, _ = generate_keypair(tmp_path / "k.pem")
    blob = next(v for v in lineage(lake, [latest_release(lake.root)]) if v.asset == "blobs")
    with pytest.raises(Exception, match="only dataset_release is signed"):
        sign_release(lake.root, private, blob.manifest_path)
