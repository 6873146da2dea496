"""corpus.spans: repeated token spans across documents."""

from __future__ import annotations

import numpy as np
import pytest

from corpus import spans as dd

# ---------------------------------------------------------------------------------------------------
# Repeated spans


def span_docs() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    d0 = rng.integers(0, 50257, 1000)
    block = rng.integers(0, 50257, 200)
    d0[600:800] = block  # a block that repeats inside d0 only: never a hit by itself
    d0[850:1000] = block[:150]
    d1 = np.concatenate((rng.integers(0, 50257, 300), d0[100:400], rng.integers(0, 50257, 200)))
    d2 = d0[100:400].copy()  # earliest occurrence is d0, not d1
    d3 = np.concatenate((block[:130], rng.integers(0, 50257, 50)))  # matches d0 at 600 (first occurrence)
    d4 = rng.integers(0, 50257, 100)  # shorter than n
    d5 = np.concatenate((d1[250:700], d0[:5]))  # spans d1's random head + the copied part
    return [d0, d1, d2, d3, d4, d5]


def test_find_repeated_spans_exact():
    hits = dd.find_repeated_spans(span_docs(), n=128)
    # d5 = d1[250:700] + 5 tokens: windows touching d1's random parts are first seen in d1, windows inside
    # the copied part d5[50:350] = d0[100:400] are first seen in d0, so d5 splits into three spans.
    assert hits == [
        dd.SpanHit(doc=1, start=300, length=300, source_doc=0, source_start=100),
        dd.SpanHit(doc=2, start=0, length=300, source_doc=0, source_start=100),
        dd.SpanHit(doc=3, start=0, length=130, source_doc=0, source_start=600),
        dd.SpanHit(doc=5, start=0, length=177, source_doc=1, source_start=250),
        dd.SpanHit(doc=5, start=50, length=300, source_doc=0, source_start=100),
        dd.SpanHit(doc=5, start=223, length=227, source_doc=1, source_start=473),
    ]


def test_find_repeated_spans_survives_hash_collisions(monkeypatch):
    docs = span_docs()
    reference = dd.find_repeated_spans(docs, n=128)

    def colliding(tokens, starts, n, powers):  # every window of every document hashes to the same value
        return np.zeros(len(starts), dtype=np.uint64)

    monkeypatch.setattr(dd, "_window_hashes", colliding)
    assert dd.find_repeated_spans(docs, n=128) == reference


def test_find_repeated_spans_small_n_and_errors():
    docs = [np.array([1, 2, 3, 4]), np.array([9, 3, 4, 7]), np.array([], dtype=np.int64)]
    assert dd.find_repeated_spans(docs, n=2) == [dd.SpanHit(1, 1, 2, 0, 2)]
    assert dd.find_repeated_spans(docs, n=1) == [dd.SpanHit(1, 1, 2, 0, 2)]
    assert dd.find_repeated_spans([], n=4) == []
    with pytest.raises(ValueError, match="n must be >= 1"):
        dd.find_repeated_spans(docs, n=0)
    with pytest.raises(ValueError, match=r"token_arrays\[0\]"):
        dd.find_repeated_spans([np.zeros((2, 2), dtype=int)], n=1)


def test_remove_spans():
    docs = span_docs()
    hits = [h for h in dd.find_repeated_spans(docs, n=128) if h.doc == 1]
    out = dd.remove_spans(docs[1], hits)
    assert np.array_equal(out, np.concatenate((docs[1][:300], docs[1][600:])))
    overlapping = [dd.SpanHit(0, 2, 3, 0, 0), dd.SpanHit(0, 4, 2, 0, 0)]
    assert dd.remove_spans(np.arange(8), overlapping).tolist() == [0, 1, 6, 7]
    assert dd.remove_spans(np.arange(3), []).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one document"):
        dd.remove_spans(np.arange(8), [dd.SpanHit(0, 0, 1, 0, 0), dd.SpanHit(1, 0, 1, 0, 0)])
    with pytest.raises(ValueError, match="outside"):
        dd.remove_spans(np.arange(8), [dd.SpanHit(0, 6, 5, 0, 0)])
