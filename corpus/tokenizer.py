"""GPT-2 BPE that works on a machine with no internet.

tiktoken downloads its vocabulary on first use, which fails on air-gapped machines. GPT-2's ids are
exactly those of tiktoken's `r50k_base` (same 50,256 mergeable ranks, same split pattern, same
`<|endoftext|>` = 50256), and the ranks file `r50k_base.tiktoken` also ships, byte-identical, inside the
PyPI sdist of `openai-whisper==20250625` as `whisper/assets/gpt2.tiktoken`. `install_ranks()` (run by
`make setup`) takes the file from tiktoken's own cache when it is there, else from that sdist through
pip, verifies its sha256 and stores it twice: in this environment (`<prefix>/share/corpus/`) and in
tiktoken's cache, so that `tiktoken.get_encoding("r50k_base")` works offline too.

`get_encoding()` never downloads: a missing or corrupt file is a `TokenizerError` that says how to
provide one (`CORPUS_GPT2_RANKS=/path/to/r50k_base.tiktoken`, or `make setup`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
ENV_RANKS = "CORPUS_GPT2_RANKS"
# r50k_base's split pattern, as tiktoken_ext.openai_public defines it for both gpt2 and r50k_base.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257


class TokenizerError(RuntimeError):
    """The GPT-2 ranks file is missing or corrupt."""


def project_ranks_path() -> Path:
    """Where `make setup` stores the verified ranks file inside this Python environment."""
    return Path(sys.prefix) / "share" / "corpus" / "r50k_base.tiktoken"


def tiktoken_cache_path() -> Path:
    """The path tiktoken's own loader looks at for r50k_base (see tiktoken.load.read_file_cached)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache_dir) / hashlib.sha1(R50K_URL.encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _candidates() -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    if os.environ.get(ENV_RANKS):
        out.append((f"${ENV_RANKS}", Path(os.environ[ENV_RANKS])))
    out.append(("this environment", project_ranks_path()))
    out.append(("tiktoken's cache", tiktoken_cache_path()))
    return out


def find_ranks_file() -> Path:
    """The first verified ranks file: $CORPUS_GPT2_RANKS, then this environment's copy, then tiktoken's cache."""
    problems: list[str] = []
    for label, path in _candidates():
        if not path.is_file():
            if label.startswith("$"):
                problems.append(f"{label}={path} does not exist")
            continue
        digest = _sha256(path.read_bytes())
        if digest == R50K_SHA256:
            return path
        problems.append(f"{label} {path} has sha256 {digest}, expected {R50K_SHA256}")
    detail = ("; ".join(problems) + ". ") if problems else ""
    raise TokenizerError(
        f"GPT-2 BPE ranks not found or corrupt. {detail}Run `make setup` (it fetches {WHISPER_SDIST} from PyPI "
        f"and extracts {WHISPER_MEMBER}), or set {ENV_RANKS} to a copy of r50k_base.tiktoken "
        f"(sha256 {R50K_SHA256})."
    )


@functools.cache
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 ids, `<|endoftext|>` = 50256), loaded from a verified local file."""
    if name not in ("gpt2", "r50k_base"):
        raise ValueError(f"encoding must be 'gpt2' or 'r50k_base', got {name!r}")
    path = find_ranks_file()
    ranks = load_tiktoken_bpe(str(path), expected_hash=R50K_SHA256)
    enc = tiktoken.Encoding(
        name=name,
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )
    assert enc.eot_token == EOT_ID and enc.n_vocab == N_VOCAB, f"unexpected vocab: {enc.n_vocab}, {enc.eot_token}"
    return enc


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _from_whisper_sdist() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, WHISPER_SDIST], capture_output=True, text=True)
        if proc.returncode != 0:
            raise TokenizerError(f"`pip download {WHISPER_SDIST}` failed:\n{proc.stderr.strip()}")
        archives = sorted(Path(tmp).glob("openai_whisper-*.tar.gz")) + sorted(Path(tmp).glob("openai-whisper-*.tar.gz"))
        if not archives:
            raise TokenizerError(f"pip download {WHISPER_SDIST} produced no sdist in {tmp}")
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if member.name.endswith("/" + WHISPER_MEMBER):
                    handle = tar.extractfile(member)
                    assert handle is not None, f"{member.name} is not a regular file"
                    return handle.read()
        raise TokenizerError(f"{archives[0].name} has no {WHISPER_MEMBER}")


def install_ranks(quiet: bool = False) -> Path:
    """Obtain, verify and store the ranks file; quick and idempotent when it is already in place."""
    target = project_ranks_path()
    data: bytes | None = None
    origin = ""
    for label, path in _candidates():
        if path.is_file():
            blob = path.read_bytes()
            if _sha256(blob) == R50K_SHA256:
                data, origin = blob, f"{label} ({path})"
                break
    if data is None:
        data, origin = _from_whisper_sdist(), f"{WHISPER_SDIST} sdist ({WHISPER_MEMBER})"
        digest = _sha256(data)
        if digest != R50K_SHA256:
            raise TokenizerError(f"{origin} has sha256 {digest}, expected {R50K_SHA256}; refusing to install it")
    for path in (target, tiktoken_cache_path()):
        if not (path.is_file() and _sha256(path.read_bytes()) == R50K_SHA256):
            try:
                _write_atomic(path, data)
            except OSError as exc:
                if path == target:
                    raise TokenizerError(f"cannot write {path}: {exc}") from exc
                print(f"warning: could not also store the ranks in tiktoken's cache {path}: {exc}", file=sys.stderr)
    if not quiet:
        print(f"GPT-2 BPE ranks verified (sha256 {R50K_SHA256[:12]}...) from {origin} -> {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corpus.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "check"])
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install_ranks()
        else:
            print(find_ranks_file())
            enc = get_encoding()
            print(f"{enc.name}: {enc.n_vocab} tokens, <|endoftext|> = {enc.eot_token}")
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
