"""The Kneser-Ney reference model and the perplexity filter (corpus.filters.perplexity)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from shared_data import shared_text

from corpus.config import FilterConfig
from corpus.filters import QualityFilter
from corpus.filters.perplexity import ModelFileError, NGramLM, flag_perplexity, perplexity_cutoff


def reference_kn(docs: list[list[int]], order: int, vocab: int, pad: int):
    """Interpolated Kneser-Ney written out with dicts, straight from the formula."""
    levels: dict[int, Counter] = {order: Counter()}
    for doc in docs:
        padded = [pad] * (order - 1) + doc
        for i in range(order - 1, len(padded)):
            levels[order][tuple(padded[i - order + 1 : i + 1])] += 1
    for k in range(order - 1, 0, -1):
        levels[k] = Counter(gram[1:] for gram in levels[k + 1])
    discounts = {}
    for k, counts in levels.items():
        n1 = sum(1 for c in counts.values() if c == 1)
        n2 = sum(1 for c in counts.values() if c == 2)
        discounts[k] = min(0.95, max(0.05, n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.75))

    def prob(context: tuple[int, ...], word: int) -> float:
        p = 1.0 / vocab
        for k in range(1, order + 1):
            h = context[len(context) - (k - 1) :] if k > 1 else ()
            matching = {g: c for g, c in levels[k].items() if g[:-1] == h}
            total = sum(matching.values())
            if total:
                d = discounts[k]
                p = (max(matching.get((*h, word), 0) - d, 0) + d * len(matching) * p) / total
        return p

    return prob


def small_corpus(seed: int = 3, vocab: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = []
    for length in (1, 2, 5, 30, 40, 17):
        # A skewed distribution so that some n-grams repeat and others do not.
        docs.append([int(x) for x in rng.choice(vocab - 1, size=length, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])])
    return docs


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_the_reference_formula(order: int) -> None:
    vocab, pad = 7, 6
    docs = small_corpus()
    model = NGramLM.train(docs, order=order, vocab_size=vocab, pad_id=pad)
    prob = reference_kn(docs, order, vocab, pad)
    contexts = [(), (0,), (1, 2), (6, 0), (5, 5, 5), (0, 1, 0)]
    for context in contexts:
        got = np.exp(model.next_token_log_probs(list(context)))
        full = tuple([pad] * (order - 1) + list(context))[len(context) :] if order > 1 else ()
        expected = [prob(full, w) for w in range(vocab)]
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert math.isclose(got.sum(), 1.0, rel_tol=1e-12)  # a distribution for every context
    # Per-token scoring uses the same probabilities, with contexts from inside the document.
    doc = docs[3]
    padded = [pad] * (order - 1) + doc
    expected = [math.log(prob(tuple(padded[i : i + order - 1]), doc[i])) for i in range(len(doc))]
    np.testing.assert_allclose(model.token_log_probs(doc), expected, rtol=1e-12)


def test_score_batch_equals_single_scores() -> None:
    docs = small_corpus()
    model = NGramLM.train(docs, order=3, vocab_size=7, pad_id=6)
    batch = model.score_batch([*docs, []])
    single = [model.score(d) for d in docs]
    np.testing.assert_allclose(batch[:-1], single, rtol=1e-12)
    assert math.isnan(batch[-1])  # an empty document has no perplexity
    assert model.score(docs[3]) == pytest.approx(-np.mean(model.token_log_probs(docs[3])))


def test_save_load_is_deterministic_and_verified(tmp_path: Path) -> None:
    model = NGramLM.train(small_corpus(), order=3, vocab_size=7, pad_id=6)
    sha = model.save(tmp_path / "a")
    assert model.save(tmp_path / "b") == sha == model.sha256
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "model.json",
        *[f"order{k}_{part}.npy" for k in (1, 2, 3) for part in ("counts", "keys")],
    ]
    loaded = NGramLM.load(tmp_path / "a", expected_sha256=sha)
    assert loaded.sha256 == sha
    probe = [0, 1, 2, 3, 4, 5, 0, 0]
    assert loaded.score(probe) == model.score(probe)
    with pytest.raises(ModelFileError, match="model sha256"):
        NGramLM.load(tmp_path / "a", expected_sha256="0" * 64)
    corrupt = tmp_path / "b" / "order2_counts.npy"
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x07")
    with pytest.raises(ModelFileError, match=r"order2_counts\.npy: sha256 [0-9a-f]{64}, manifest says"):
        NGramLM.load(tmp_path / "b")
    with pytest.raises(ModelFileError, match="cannot read the model manifest"):
        NGramLM.load(tmp_path / "missing")


def test_input_validation() -> None:
    with pytest.raises(ValueError, match=r"order must be in \[1, 4\], got 5"):
        NGramLM.train([[1, 2]], order=5, vocab_size=7, pad_id=6)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 7\)"):
        NGramLM.train([[1, 9]], order=2, vocab_size=7, pad_id=6)
    with pytest.raises(ValueError, match="at least one non-empty token array"):
        NGramLM.train([[]], order=2, vocab_size=7, pad_id=6)
    with pytest.raises(ValueError, match="1-d sequence"):
        NGramLM.train([np.zeros((2, 2), dtype=np.int64)], order=2, vocab_size=7, pad_id=6)


def test_cutoff() -> None:
    assert perplexity_cutoff([1.0, 2.0, 3.0]) == pytest.approx(2.0 + 3 * math.sqrt(2 / 3))
    assert perplexity_cutoff([1.0, float("nan"), 3.0, float("inf")], n_std=1.0) == 3.0
    assert perplexity_cutoff([]) == math.inf


def test_shakespeare_reference_flags_gibberish() -> None:
    from corpus.tokenizer import get_encoding

    enc = get_encoding()
    text = shared_text("data/tinyshakespeare.txt")
    lines = text.split("\n")
    blocks = ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    train_blocks, held_out = blocks[:900], blocks[900:960]
    model = NGramLM.train([np.array(enc.encode_ordinary(b)) for b in train_blocks], order=3)
    assert model.order == 3 and model.vocab_size == 50257

    rng = np.random.default_rng(0)
    held_tokens = [np.array(enc.encode_ordinary(b)) for b in held_out]
    shuffled = [rng.permutation(t) for t in held_tokens[:5]]  # same words, no order
    random_tokens = [rng.integers(0, 50256, size=300)]
    scores = model.score_batch([*held_tokens, *shuffled, *random_tokens])
    held, shuf, rand = scores[:60], scores[60:65], scores[65]
    assert held.max() < shuf.min() < rand  # prose < bag of its words < random ids

    # The filter: 60 held-out blocks plus one random-id document; only the outlier is dropped.
    docs = [*held_out, enc.decode(random_tokens[0].tolist())]
    decisions = [QualityFilter("prose", _rules_off()).apply(d) for d in docs]
    assert all(d.kept for d in decisions[:-1])
    log_ppls = model.score_texts([d.text for d in decisions])
    cutoff = perplexity_cutoff(log_ppls)
    flagged = flag_perplexity(decisions, log_ppls, cutoff)
    assert [d.reason for d in flagged] == [None] * 60 + ["perplexity_too_high"]
    assert flagged[-1].features["log_perplexity"] > cutoff == flagged[0].features["perplexity_cutoff"]
    with pytest.raises(ValueError, match="61 decisions but 2 log-perplexities"):
        flag_perplexity(decisions, log_ppls[:2], cutoff)


def _rules_off() -> FilterConfig:
    """Prose with its rules and PII policy off, so that the random-id document reaches the perplexity stage."""
    off = dict.fromkeys(
        (
            "min_words",
            "min_mean_word_length",
            "max_mean_word_length",
            "max_symbol_word_ratio",
            "min_alpha_word_fraction",
            "min_stop_words",
            "max_dup_line_fraction",
            "max_dup_line_char_fraction",
            "max_dup_para_fraction",
            "max_dup_para_char_fraction",
            "max_top_ngram_char_fraction",
            "max_dup_ngram_char_fraction",
            "min_language_confidence",
            "max_control_fraction",
        )
    )
    return FilterConfig(profiles={"prose": off}, pii={"pii": "keep", "secrets": "keep"})
