import json
from pathlib import Path

import pytest
import tiktoken
from shared_data import SHARED
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from corpus import tokenizer
from corpus.tokenizer import EOT_ID, R50K_SHA256, TokenizerError, get_encoding

VERDICT = SHARED / "data" / "the-verdict.txt"

VARIED = (
    "Hello, world! It's 2026 -- naïve café, Zürich, 東京, emoji 🙂, tabs\tand\nnewlines\r\n"
    "    def f(x): return x**2  # code\n<|endoftext|> after special; don't won't I'll we've\n"
    "Numbers 1234567 3.14159 and  multiple   spaces \u00a0nbsp"
)


@pytest.fixture(scope="module")
def official_gpt2() -> tiktoken.Encoding:
    """tiktoken's gpt2 encoding built from the official vocab.bpe and encoder.json in ../shared/tiktoken."""
    vocab = SHARED / "tiktoken" / "vocab.bpe"
    encoder = SHARED / "tiktoken" / "encoder.json"
    if not vocab.exists():
        pytest.skip("../shared/tiktoken is not available")
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder))
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        "gpt2-official", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def test_encoding_shape() -> None:
    enc = get_encoding("gpt2")
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]


def test_matches_official_gpt2_files(official_gpt2: tiktoken.Encoding) -> None:
    enc = get_encoding("gpt2")
    texts = [VARIED, VERDICT.read_text(encoding="utf-8")] if VERDICT.exists() else [VARIED]
    for text in texts:
        ours = enc.encode(text, allowed_special="all")
        assert ours == official_gpt2.encode(text, allowed_special="all")
        assert enc.decode(ours) == text
    assert enc.encode_ordinary(VARIED) == official_gpt2.encode_ordinary(VARIED)


def test_verdict_tokens() -> None:
    if not VERDICT.exists():
        pytest.skip("../shared/data is not available")
    ids = get_encoding().encode(VERDICT.read_text(encoding="utf-8"), allowed_special={"<|endoftext|>"})
    assert len(ids) == 5145
    assert ids[:6] == [40, 367, 2885, 1464, 1807, 3619]


def test_tiktoken_r50k_works_offline_after_install() -> None:
    # `make setup` stored the verified ranks in tiktoken's own cache too.
    assert tokenizer.tiktoken_cache_path().is_file()
    assert tiktoken.get_encoding("r50k_base").encode("hello world") == get_encoding().encode("hello world")


def test_missing_or_corrupt_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes(b"not a vocabulary")
    monkeypatch.setenv(tokenizer.ENV_RANKS, str(bad))
    monkeypatch.setattr(tokenizer, "project_ranks_path", lambda: tmp_path / "absent")
    monkeypatch.setattr(tokenizer, "tiktoken_cache_path", lambda: tmp_path / "absent2")
    get_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerError) as info:
            get_encoding("gpt2")
        message = str(info.value)
        assert str(bad) in message and R50K_SHA256 in message and "CORPUS_GPT2_RANKS" in message
        monkeypatch.setenv(tokenizer.ENV_RANKS, str(tmp_path / "nowhere"))
        with pytest.raises(TokenizerError, match="does not exist"):
            get_encoding("gpt2")
    finally:
        get_encoding.cache_clear()


def test_unknown_encoding_name() -> None:
    with pytest.raises(ValueError, match="cl100k"):
        get_encoding("cl100k_base")


def test_install_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    path = tokenizer.install_ranks(quiet=True)
    assert tokenizer._sha256(path.read_bytes()) == R50K_SHA256
    assert json.dumps(str(path))
