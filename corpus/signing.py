"""Ed25519 signatures of release manifests: who vouches for a dataset, checked by `corpus verify --public-key`.

What is signed is the canonical JSON of {format, asset, release version id, Merkle root}. The version id
is the sha256 of the release manifest, which cites the final shards' versions, whose manifests cite
theirs, down to the raw snapshots; `corpus verify` re-hashes that whole chain, so one 64-byte
signature over one version id vouches for every byte of the dataset. Without a signature an attacker
who rewrites a shard, every manifest above it and the release pointer leaves a lake that verifies;
with one, they would also need the private key.

A signature lives beside the release pointer, `<lake>/releases/signatures/<release version>/<key id>.json`
(several signers may sign one release), never inside the version directory: a version's files are
fixed by its manifest. The key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public; an OpenSSH `ssh-ed25519` public key
works too); `generate_keypair` writes an unencrypted private key with mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from corpus.lake import Lake, LakeError, Version, canonical_json, read_version
from corpus.release import RELEASE_ASSET, latest_release, releases_dir

FORMAT = "corpus-release-signature/1"


class SigningError(RuntimeError):
    """A signature is missing, malformed, made by another key, or does not verify; names the file."""

    def __init__(self, path: Path | str, message: str, expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message
        self.expected = expected
        self.actual = actual


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path | None = None) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair (private key mode 0600); refuse to overwrite an existing key."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ValueError(f"{path} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"private key {path}: cannot read: {exc.strerror or exc}") from exc
    password = os.environ.get("CORPUS_SIGNING_PASSPHRASE")
    try:
        key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"private key {path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"private key {path}: a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"public key {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        key = (
            serialization.load_ssh_public_key(data)
            if data.startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"public key {path}: not a PEM or OpenSSH public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key {path}: a {type(key).__name__}, expected an Ed25519 key")
    return key


def message(release: Version) -> bytes:
    """The bytes that are signed: canonical JSON of the release's identity."""
    return canonical_json(
        {
            "format": FORMAT,
            "asset": release.asset,
            "release": release.version,
            "merkle_root": release.extra.get("merkle_root"),
        }
    )


def signature_path(lake_root: Path, release_version: str, kid: str) -> Path:
    return releases_dir(Path(lake_root)) / "signatures" / release_version / f"{kid}.json"


def _release(lake_root: Path, manifest: Path | None) -> Version:
    release = read_version(manifest) if manifest else latest_release(Lake(lake_root).root)
    if release.asset != RELEASE_ASSET:
        raise LakeError(f"{release.manifest_path} is a manifest of {release.asset}; only {RELEASE_ASSET} is signed")
    return release


def sign_release(lake_root: Path, private_key: Path, manifest: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Sign the latest release (or the release manifest given); returns the signature file and its content."""
    key = load_private_key(private_key)
    release = _release(lake_root, manifest)
    public = key.public_key()
    kid = key_id(public)
    record = {
        "format": FORMAT,
        "release": release.version,
        "merkle_root": release.extra.get("merkle_root"),
        "manifest": f"{release.asset}/{release.partition}/{release.version}/manifest.json",
        "key_id": kid,
        "public_key": base64.b64encode(_raw(public)).decode("ascii"),
        "signature": base64.b64encode(key.sign(message(release))).decode("ascii"),
        "signed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path = signature_path(release.root, release.version, kid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path, record


@dataclass(frozen=True)
class _Signature:
    path: Path
    record: dict[str, Any]


def _load_signature(path: Path) -> _Signature:
    if not path.is_file():
        raise SigningError(
            path, "no signature by this key for this release", expected="a signature file", actual="missing"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise SigningError(path, f"not a valid signature file: {exc}") from exc
    if record.get("format") != FORMAT:
        raise SigningError(
            path, f"format {record.get('format')!r}, expected {FORMAT!r}", FORMAT, str(record.get("format"))
        )
    return _Signature(path, record)


def verify_release_signature(lake_root: Path, release: Version, public_key: Path, signature: Path | None = None) -> str:
    """Check the release's signature by `public_key`; returns the key id, raises SigningError naming the file."""
    try:
        public = load_public_key(public_key)
    except ValueError as exc:
        raise SigningError(public_key, str(exc).removeprefix(f"public key {public_key}: ")) from exc
    kid = key_id(public)
    sig = _load_signature(Path(signature) if signature else signature_path(lake_root, release.version, kid))
    record = sig.record
    if record.get("release") != release.version:
        raise SigningError(
            sig.path,
            f"signs release {record.get('release')}, not {release.version}: the signature belongs to another release",
            release.version,
            str(record.get("release")),
        )
    if record.get("key_id") != kid:
        raise SigningError(
            sig.path,
            f"made by key {record.get('key_id')}, not by the given public key {kid} ({public_key})",
            kid,
            str(record.get("key_id")),
        )
    if record.get("merkle_root") != release.extra.get("merkle_root"):
        raise SigningError(
            sig.path,
            f"signs Merkle root {record.get('merkle_root')}, the release has {release.extra.get('merkle_root')}",
            str(release.extra.get("merkle_root")),
            str(record.get("merkle_root")),
        )
    try:
        raw = base64.b64decode(str(record.get("signature", "")), validate=True)
        public.verify(raw, message(release))
    except (InvalidSignature, ValueError) as exc:
        raise SigningError(
            sig.path,
            f"Ed25519 signature does not verify with key {kid}: the release manifest or the signature was altered",
            "valid signature",
            type(exc).__name__,
        ) from exc
    return kid
