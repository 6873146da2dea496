"""corpus.minhash: normalization, shingles, the shingle hash and datasketch-identical signatures."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import shared_text

from corpus import minhash as mh
from corpus.config import DedupConfig

CFG = DedupConfig()


SCHEMES = ("legacy", "affine32")


def datasketch_signature(text: str, cfg: DedupConfig = CFG) -> np.ndarray:
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=mh.shingle_hash, scheme=cfg.scheme)
    m.update_batch(mh.shingles(text, cfg.shingle_size))
    return m.hashvalues


def test_normalize_exact_values():
    assert mh.normalize_for_dedup("Hello,  World!\n\tIt's  ﬁne…  ") == "hello world its fine"
    # Unicode symbols (Sm, Sc) are kept; punctuation (P*) is deleted, also inside words.
    assert mh.normalize_for_dedup("a+b = c; cost: $5 (approx.)") == "a+b = c cost $5 approx"
    assert mh.normalize_for_dedup("x_y.z-w") == "xyzw"
    # NFKC folds full-width letters and the non-breaking space; U+2028 and U+001C are whitespace.
    assert mh.normalize_for_dedup("ＡＢＣ\u00a0d\u2028e\x1cf") == "abc d e f"
    assert mh.normalize_for_dedup("  \n\t ") == ""
    assert mh.normalize_for_dedup("«¿Qué?» —dijo") == "qué dijo"


def test_exact_key_is_sha256_of_normalized_text():
    assert mh.exact_key("Hello, World!") == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert mh.exact_key("hello world") == mh.exact_key("  HELLO   world!!")
    assert mh.exact_key("") == mh.EMPTY_KEY == hashlib.sha256(b"").hexdigest()
    assert mh.exact_key("?!") == mh.EMPTY_KEY


def test_shingles_exact():
    assert mh.shingles("A b, c d e f!", 5) == [b"a b c d e", b"b c d e f"]
    assert mh.shingles("one two", 5) == [b"one two"]
    assert mh.shingles("one two three four five", 5) == [b"one two three four five"]
    assert mh.shingles("...", 5) == []
    assert mh.shingles("a b c", 2) == [b"a b", b"b c"]
    with pytest.raises(ValueError, match="shingle_size"):
        mh.shingles("a", 0)


def test_config_rejects_unknown_scheme():
    with pytest.raises(ValueError, match=r"dedup\.scheme"):
        DedupConfig(scheme="affine64")


def test_shingle_hash_pinned_values():
    # Pinned: a change here silently invalidates every persisted signature and LSH index.
    assert mh.shingle_hash(b"a b c d e") == 2499400588
    assert mh.shingle_hash(b"hello world") == 2268741801
    assert mh.shingle_hash(b"") == 0
    # NUL bytes count (the +1 per byte), and byte order matters.
    assert mh.shingle_hash(b"a") != mh.shingle_hash(b"a\x00")
    assert mh.shingle_hash(b"ab") != mh.shingle_hash(b"ba")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_permutations_are_datasketch(scheme):
    a, b = mh.permutations(CFG.num_perm, CFG.seed, scheme)
    ref = MinHash(num_perm=CFG.num_perm, seed=CFG.seed, scheme=scheme).permutations
    assert np.array_equal(a, ref[0]) and np.array_equal(b, ref[1])
    with pytest.raises(ValueError, match="scheme"):
        mh.permutations(4, 1, "affine64")


def test_lsh_probability_and_threshold():
    assert float(mh.lsh_probability(0.8, 14, 8)) == pytest.approx(0.923548, abs=1e-6)
    assert float(mh.lsh_probability(0.5, 14, 8)) == pytest.approx(0.053320, abs=1e-6)
    assert mh.lsh_threshold(14, 8) == pytest.approx(0.719008, abs=1e-6)
    assert float(mh.lsh_probability(1.0, 14, 8)) == 1.0
    assert float(mh.lsh_probability(0.0, 14, 8)) == 0.0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signatures_hand_made_docs(scheme):
    texts = ["The cat sat on the mat today.", "the CAT sat, on the mat... today", "", "   ", "lone", "x y z"]
    sig = mh.MinHasher(DedupConfig(scheme=scheme)).signatures(texts)
    assert sig.shape == (6, 112) and sig.dtype == np.uint64
    assert int(sig.max()) <= mh.MAX_HASH
    assert np.array_equal(sig[0], sig[1])  # same normalized text
    assert np.all(sig[2] == mh.MAX_HASH) and np.all(sig[3] == mh.MAX_HASH)
    assert list(mh.is_empty_signature(sig)) == [False, False, True, True, False, False]
    assert float(mh.jaccard_estimate(sig[0], sig[4])) < 0.1
    assert mh.MinHasher(CFG).signatures([]).shape == (0, 112)


def real_documents() -> list[str]:
    verdict = shared_text("data/the-verdict.txt")
    shakespeare = shared_text("data/tinyshakespeare.txt")
    plays = [shakespeare[i : i + 3000] for i in range(0, 60000, 3000)]
    odd = [
        "Ünïcödé ﬁ text — with… punctuation\u2028 and\x1c odd  spaces",
        "日本語のテキスト、句読点。",
        "ΟΔΟΣ\nΣΑΣ Σ\n\u0301a e\u0301\nＡＢ Ｃ\r\n½ ﬀ",  # final sigma, combining marks after newlines
        "a",
        "!!",
        "",
    ]
    return [verdict, *plays, *odd]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signatures_equal_datasketch_on_real_text(scheme):
    cfg = DedupConfig(scheme=scheme)
    docs = real_documents()
    keys, sig = mh.MinHasher(cfg).keys_and_signatures(docs)
    for i, text in enumerate(docs):
        assert np.array_equal(sig[i], datasketch_signature(text, cfg)), f"document {i}"
        assert keys[i] == mh.exact_key(text)
        lean = LeanMinHash(seed=cfg.seed, hashvalues=sig[i], scheme=scheme)
        assert np.array_equal(lean.hashvalues, sig[i])
    # The datasketch estimate from our signatures is our estimate.
    a = LeanMinHash(seed=cfg.seed, hashvalues=sig[1], scheme=scheme)
    b = LeanMinHash(seed=cfg.seed, hashvalues=sig[2], scheme=scheme)
    assert a.jaccard(b) == float(mh.jaccard_estimate(sig[1], sig[2]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_other_configs_match_datasketch(scheme):
    cfg = DedupConfig(shingle_size=3, num_perm=64, bands=8, rows=8, seed=7, scheme=scheme)
    docs = real_documents()[:6]
    sig = mh.MinHasher(cfg).signatures(docs)
    for i, text in enumerate(docs):
        assert np.array_equal(sig[i], datasketch_signature(text, cfg))
    assert not np.array_equal(
        sig, mh.MinHasher(DedupConfig(shingle_size=3, num_perm=64, bands=8, rows=8)).signatures(docs)
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_batches_and_chunks_do_not_change_signatures(monkeypatch, scheme):
    cfg = DedupConfig(scheme=scheme)
    docs = real_documents()
    reference = mh.MinHasher(cfg).signatures(docs)
    # Tiny batches and permutation chunks: documents span many chunks, chunks span many documents.
    monkeypatch.setattr(mh, "_BATCH_BYTES", 700)
    monkeypatch.setattr(mh, "_PERM_CHUNK", 7)
    assert np.array_equal(mh.MinHasher(cfg).signatures(docs), reference)


def test_fast_modulo_band_is_repaired():
    """Exact values <= 7 (the 61-bit fold wraps) or == 2^32 - 1 (e + 1 wraps) take the exact path."""
    cfg = DedupConfig(num_perm=16, bands=2, rows=8)
    hasher = mh.MinHasher(cfg)
    # a = 1 and b near multiples of 2^61 (x = h + b lands on and around P, 2^61 + P, 3 * 2^61 + P, ...),
    # or b = 2^32 - 1 - j so that x = 2^32 - 1 exactly for h = j.
    hasher.a = np.ones(16, dtype=np.uint64)
    near_p = [(k % 4) * (1 << 61) + (1 << 61) - 8 + k // 4 for k in range(12)]
    hasher.b = np.array(near_p + [mh.MAX_HASH - j for j in range(4)], dtype=np.uint64)
    hashes = np.arange(12, dtype=np.uint64)
    offsets = np.array([0, 3, 12])
    out = np.full((2, 16), mh.MAX_HASH, dtype=np.uint64)
    hasher._min_permuted(hashes, offsets, out)
    exact = ((hashes[:, None] * hasher.a + hasher.b) % np.uint64(mh.MERSENNE_PRIME)) & np.uint64(mh.MAX_HASH)
    assert (exact <= 7).sum() > 20 and (exact == mh.MAX_HASH).sum() == 4  # both repair cases occur
    assert np.array_equal(out[0], exact[:3].min(axis=0))
    assert np.array_equal(out[1], exact[3:].min(axis=0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from("aΣσ\n \u0301ﬁＡ.-\u2028Iİ\x1c"), max_size=40) | st.text(max_size=80),
        min_size=1,
        max_size=4,
    )
)
def test_vectorised_path_equals_reference(texts):
    for cfg in (DedupConfig(shingle_size=2), DedupConfig(shingle_size=2, scheme="affine32")):
        keys, sig = mh.MinHasher(cfg).keys_and_signatures(texts)
        for i, text in enumerate(texts):
            assert keys[i] == mh.exact_key(text)
            assert np.array_equal(sig[i], datasketch_signature(text, cfg))
