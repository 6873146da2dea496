import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from corpus.config import SourceSpec
from corpus.mixing import (
    MixedLayout,
    MixingWarning,
    SourceInput,
    interleaving_stats,
    layout_validation,
    plan_mixture,
    realize,
    split_sources,
    split_validation,
    temperature_weights,
)

SEED = 7


def source(name, lengths, priority=0, **kw):
    return SourceInput(
        name, np.array(lengths, dtype=np.int64), [f"{name}-{j}" for j in range(len(lengths))], priority, **kw
    )


def synthetic(name, n_docs, total, priority, rng, **kw):
    """n_docs documents of varied lengths (about 50..450) summing to exactly `total` tokens."""
    raw = rng.integers(50, 450, n_docs).astype(float)
    lengths = np.maximum(1, np.round(raw * total / raw.sum())).astype(np.int64)
    lengths[np.argmax(lengths)] += total - lengths.sum()
    return source(name, lengths, priority, **kw)


@pytest.fixture(scope="module")
def corpus3():
    """Token sizes 100:10:1 (1,000,000 / 100,000 / 10,000), 1% validation split."""
    rng = np.random.default_rng(0)
    srcs = [
        synthetic("a", 4000, 1_000_000, 0, rng),
        synthetic("b", 400, 100_000, 1, rng),
        synthetic("c", 40, 10_000, 2, rng),
    ]
    return split_sources(srcs, 0.01, SEED)


def plan_with_warnings(*args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_mixture(*args, **kw)
    messages = [str(w.message) for w in caught]
    assert all(issubclass(w.category, MixingWarning) for w in caught), messages
    assert list(plan.notes) == messages
    return plan, messages


def quiet_plan(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)
        return plan_mixture(*args, **kw)


# --- temperature_weights ---------------------------------------------------------------------------


def test_temperature_weights_exact():
    p = temperature_weights({"a": 100, "b": 10, "c": 1}, 0.7)
    assert p == pytest.approx({"a": 0.8068830685377166, "b": 0.16099433792397577, "c": 0.032122593538307403}, rel=1e-12)
    # The same from the formula, written out independently.
    w = {k: v / 111 for k, v in {"a": 100, "b": 10, "c": 1}.items()}
    z = sum(x**0.7 for x in w.values())
    assert p == pytest.approx({k: x**0.7 / z for k, x in w.items()}, rel=1e-12)
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-15)


def test_temperature_one_is_natural_and_single_source_is_one():
    assert temperature_weights({"a": 100, "b": 10, "c": 1}, 1.0) == pytest.approx(
        {"a": 100 / 111, "b": 10 / 111, "c": 1 / 111}, rel=1e-12
    )
    assert temperature_weights({"only": 12345}, 0.7) == {"only": 1.0}
    assert temperature_weights({"only": 12345}, 0.01) == {"only": 1.0}


def test_temperature_zero_token_source_gets_zero_with_warning():
    with pytest.warns(MixingWarning, match=r"\['empty'\] have 0 tokens"):
        p = temperature_weights({"a": 30, "empty": 0, "b": 10}, 0.5)
    assert p["empty"] == 0.0
    assert p["a"] == pytest.approx(math.sqrt(0.75) / (math.sqrt(0.75) + math.sqrt(0.25)), rel=1e-12)


@pytest.mark.parametrize("a", [0, 0.0, -0.5, 1.0000001, 2, float("nan")])
def test_temperature_out_of_range(a):
    with pytest.raises(ValueError, match="temperature must be in"):
        temperature_weights({"a": 1}, a)


def test_temperature_bad_counts():
    with pytest.raises(ValueError, match=r"tokens\['b'\] must be a finite count >= 0, got -3"):
        temperature_weights({"a": 5, "b": -3}, 0.7)
    with pytest.raises(ValueError, match="no sources"):
        temperature_weights({}, 0.7)
    with pytest.raises(ValueError, match="all 2 sources have 0 tokens"):
        temperature_weights({"a": 0, "b": 0}, 0.7)


# --- split_validation ------------------------------------------------------------------------------


def test_split_validation_exact_docs_and_counts():
    ids = [f"d{j}" for j in range(10)]
    mask = split_validation(ids, np.ones(10, np.int64), 0.3, 1)
    ranked = sorted(ids, key=lambda d: hashlib.sha256(f"1:{d}".encode()).digest())
    assert sorted(np.array(ids)[mask]) == sorted(ranked[:3])
    assert mask.dtype == np.bool_ and mask.sum() == 3
    n25 = [f"x{j}" for j in range(25)]
    assert split_validation(n25, np.ones(25, np.int64), 0.1, 1).sum() == 3  # 2.5 rounds half up
    assert split_validation(ids, np.ones(10, np.int64), 0.01, 1).sum() == 1  # at least one
    assert split_validation(["a", "b"], [3, 4], 0.99, 1).tolist().count(False) == 1  # keep one train doc
    assert split_validation(["a"], [3], 0.5, 1).tolist() == [False]
    assert split_validation(ids, np.ones(10, np.int64), 0.0, 1).sum() == 0


def test_split_validation_is_order_independent_and_seeded():
    ids = [f"doc-{j}" for j in range(200)]
    lengths = np.arange(1, 201, dtype=np.int64)
    base = set(np.array(ids)[split_validation(ids, lengths, 0.1, 3)])
    perm = np.random.default_rng(1).permutation(200)
    shuffled = [ids[j] for j in perm]
    assert set(np.array(shuffled)[split_validation(shuffled, lengths[perm], 0.1, 3)]) == base
    other = set(np.array(ids)[split_validation(ids, lengths, 0.1, 4)])
    assert len(base) == len(other) == 20 and other != base


def test_split_validation_bad_input():
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        split_validation(["a", "b"], [1, 1], 1.0, 0)
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        split_validation(["a", "b"], [1, 1], -0.1, 0)
    with pytest.raises(ValueError, match="2 doc_ids but 3 lengths"):
        split_validation(["a", "b"], [1, 1, 1], 0.1, 0)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        split_validation(["a", "b"], [1, 0], 0.1, 0)


# --- SourceInput -----------------------------------------------------------------------------------


def test_source_input_validation_and_from_spec():
    with pytest.raises(ValueError, match="2 doc_ids but 1 lengths"):
        SourceInput("s", np.array([3]), ["x", "y"])
    with pytest.raises(ValueError, match=r"min_share 0\.5 exceeds max_share 0\.2"):
        source("s", [3], min_share=0.5, max_share=0.2)
    with pytest.raises(ValueError, match="weight 0 excludes the source"):
        source("s", [3], weight=0.0, min_share=0.1)
    with pytest.raises(ValueError, match="validation must be a bool array"):
        source("s", [3, 4], validation=np.array([1, 0]))
    spec = SourceSpec(name="web", kind="jsonl", priority=3, weight=0.2, max_share=0.6, max_epochs=2.0)
    s = SourceInput.from_spec(spec, [5, 6], ["u", "v"])
    assert (s.name, s.priority, s.weight, s.max_share, s.max_epochs, s.min_share) == ("web", 3, 0.2, 0.6, 2.0, None)
    assert s.lengths.dtype == np.int64 and s.train_tokens == 11 and s.validation_tokens == 0


# --- plan_mixture ----------------------------------------------------------------------------------


def test_plan_exact_targets_small():
    srcs = [source("a", [50, 50], 0), source("b", [10], 1), source("c", [1], 2)]
    plan = quiet_plan(srcs, 1.0)
    assert plan.target_tokens.tolist() == [100, 10, 1]
    assert [r.epochs for r in plan.rows] == [1.0, 1.0, 1.0]
    # 0.7: exact shares x 111 = 89.564, 17.870, 3.566; largest remainders give b and c the 2 spare tokens.
    plan = quiet_plan(srcs, 0.7)
    assert plan.total_tokens == 111 and plan.target_tokens.tolist() == [89, 18, 4]
    c = plan.row("c")
    assert (c.whole_epochs, c.fraction, c.capped_by) == (4, 0.0, None)
    assert plan.row("a").temperature_share == pytest.approx(0.8068830685377166, rel=1e-12)
    assert plan.to_rows() == quiet_plan(list(reversed(srcs)), 0.7).to_rows()  # manifest order, not input order
    assert list(plan.to_rows()[0]) == [
        "source",
        "priority",
        "documents",
        "validation_documents",
        "raw_tokens",
        "validation_tokens",
        "natural_share",
        "weight",
        "temperature_share",
        "target_share",
        "target_tokens",
        "epochs",
        "whole_epochs",
        "fraction",
        "max_epochs",
        "capped_by",
        "note",
        "temperature",
        "plan_tokens",
    ]


def test_plan_epoch_cap_water_fills():
    # a=1, budget 1110: c wants 10 tokens = 10 epochs, capped at 4; a and b split 1106 in 10:1.
    srcs = [source("a", [50, 50], 0), source("b", [10], 1, max_epochs=20), source("c", [1], 2, max_epochs=4)]
    plan, messages = plan_with_warnings(srcs, 1.0, token_budget=1110, default_max_epochs=20)
    assert plan.target_tokens.tolist() == [1005, 101, 4]
    assert [r.capped_by for r in plan.rows] == [None, None, "max_epochs"]
    note = "max_epochs 4 caps it at 4 tokens: temperature share 0.90% -> 0.36%, the other sources renormalized"
    assert plan.row("c").note == note
    assert messages == [
        f"source 'c': {note}",
        "source 'a' is repeated 10.05 epochs (cap 20): past ~4 epochs repeated tokens are worth far less than "
        "fresh ones and rare strings get memorised",
        "source 'b' is repeated 10.10 epochs (cap 20): past ~4 epochs repeated tokens are worth far less than "
        "fresh ones and rare strings get memorised",
    ]


def test_plan_max_and_min_share():
    srcs = [source("a", [50, 50], 0, max_share=0.5), source("b", [10], 1), source("c", [1], 2)]
    plan = quiet_plan(srcs, 1.0, default_max_epochs=100)
    assert plan.target_tokens.tolist() == [55, 51, 5]  # a at floor(0.5 x 111); b, c share the rest 10:1
    assert plan.row("a").capped_by == "max_share"
    assert plan.row("a").note == (
        "max_share 0.5 caps temperature share 90.09% -> 49.55%, the other sources renormalized"
    )
    srcs = [source("a", [50, 50], 0), source("b", [10], 1), source("c", [1], 2, min_share=0.1, max_epochs=12)]
    plan, messages = plan_with_warnings(srcs, 1.0)
    assert plan.target_tokens.tolist() == [91, 9, 11]
    assert plan.row("c").capped_by == "min_share"
    assert messages[0] == "source 'c': min_share 0.1 raises temperature share 0.90% -> 9.91%"
    # 11 epochs of 1 token allow 11 / 111 = 0.0991 < min_share 0.1: the cap wins and the plan says so.
    srcs[2] = source("c", [1], 2, min_share=0.1, max_epochs=11)
    plan, messages = plan_with_warnings(srcs, 1.0)
    assert plan.target_tokens.tolist() == [91, 9, 11] and plan.row("c").capped_by == "max_epochs"
    assert plan.row("c").note.endswith("; min_share 0.1 unreachable: max_epochs allows 0.0991")


def test_plan_budget_beyond_caps_shrinks_and_says_so():
    srcs = [source("a", [50, 50], 0), source("b", [10], 1), source("c", [1], 2)]
    plan, messages = plan_with_warnings(srcs, 0.7, token_budget=1000)
    assert plan.total_tokens == 444 and plan.token_budget == 1000
    assert plan.target_tokens.tolist() == [400, 40, 4]
    assert [r.capped_by for r in plan.rows] == ["max_epochs"] * 3
    assert messages == [
        "token_budget 1,000 exceeds what the sources and caps allow (444 tokens): the plan delivers 444 "
        "(44.4% of the budget)",
        "source 'a': max_epochs 4 caps it at 400 tokens: temperature share 80.69% -> 90.09%, the budget is not filled",
        "source 'b': max_epochs 4 caps it at 40 tokens: temperature share 16.10% -> 9.01%, the budget is not filled",
        "source 'c': max_epochs 4 caps it at 4 tokens: temperature share 3.21% -> 0.90%, the budget is not filled",
    ]


def test_plan_fixed_weight_replaces_natural_share():
    srcs = [source("a", [100], 0), source("b", [10], 1, weight=0.9)]
    plan = quiet_plan(srcs, 1.0, default_max_epochs=100)
    wa = 100 / 110
    assert plan.row("b").temperature_share == pytest.approx(0.9 / (wa + 0.9), rel=1e-12)
    assert plan.row("b").natural_share == pytest.approx(10 / 110, rel=1e-12)
    assert "fixed weight 0.9 replaces natural share 0.0909" in plan.row("b").note


def test_plan_warnings_memorisation_and_negligible():
    srcs = [source("a", [100] * 10, 0), source("b", [10], 1, max_epochs=10)]
    plan, messages = plan_with_warnings(srcs, 0.6)
    assert plan.row("b").target_tokens == 60 and plan.row("b").capped_by is None
    assert messages == [
        "source 'b' is repeated 6.00 epochs (cap 10): past ~4 epochs repeated tokens are worth far less than "
        "fresh ones and rare strings get memorised"
    ]
    srcs = [source("big", [1000] * 100, 0), source("tiny", [50], 1)]
    plan, messages = plan_with_warnings(srcs, 1.0)
    assert messages == [
        "source 'tiny' contributes 0.050% of the plan (50 tokens), under 0.1%: too little to affect the model "
        "for the pipeline work it costs"
    ]
    # Under the default cap (4) the cap binds and says so; epochs never pass 4, so no memorisation warning.
    plan, messages = plan_with_warnings([source("a", [100] * 10, 0), source("b", [30], 1)], 0.5)
    assert plan.row("b").epochs == 4.0
    assert messages == [
        "source 'b': max_epochs 4 caps it at 120 tokens: temperature share 14.76% -> 11.65%, "
        "the other sources renormalized"
    ]


def test_plan_bad_input():
    srcs = [source("a", [5], 0), source("b", [7], 1)]
    for budget in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="token_budget must be a whole number of tokens >= 1"):
            plan_mixture(srcs, 0.7, token_budget=budget)
    with pytest.raises(ValueError, match="temperature must be in"):
        plan_mixture(srcs, 0.0)
    with pytest.raises(ValueError, match="no sources given"):
        plan_mixture([], 0.7)
    with pytest.raises(ValueError, match="no train tokens in any source"):
        plan_mixture([source("a", [], 0), source("b", [], 1)], 0.7)
    with pytest.raises(ValueError, match=r"duplicate source names \['a'\]"):
        plan_mixture([source("a", [5], 0), source("a", [7], 1)], 0.7)
    with pytest.raises(ValueError, match=r"min_share over all sources sums to 1\.2000 > 1"):
        plan_mixture([source("a", [5], 0, min_share=0.6), source("b", [7], 1, min_share=0.6)], 0.7)
    with pytest.raises(ValueError, match="max_epochs must be > 0"):
        plan_mixture(srcs, 0.7, default_max_epochs=0)


def test_plan_empty_source_gets_nothing():
    srcs = [source("a", [5, 5], 0), source("none", [], 1, min_share=0.2)]
    plan, messages = plan_with_warnings(srcs, 0.7)
    assert plan.target_tokens.tolist() == [10, 0]
    assert plan.row("none").temperature_share == 0.0
    assert plan.row("none").capped_by == "no_tokens"
    assert messages == [
        "source 'none': min_share 0.2 unreachable: the source has no train tokens",
        "source 'none' has no train tokens and gets no share",
    ]


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
    caps=st.lists(st.sampled_from([None, 0.5, 1.0, 2.0, 4.0]), min_size=6, max_size=6),
    max_shares=st.lists(st.sampled_from([None, 0.1, 0.3, 0.9]), min_size=6, max_size=6),
    a=st.floats(0.05, 1.0),
    budget=st.one_of(st.none(), st.integers(1, 200_000)),
)
@example(tokens=[35, 28, 35, 14, 14, 14], caps=[None] * 6, max_shares=[None] * 3 + [0.1] * 3, a=1.0, budget=229)
@example(
    tokens=[233, 296, 58, 58, 58], caps=[None] * 6, max_shares=[None, None, 0.1, 0.1, 0.1, None], a=0.5, budget=2288
)
def test_plan_water_filling_properties(tokens, caps, max_shares, a, budget):
    srcs = [source(f"s{i}", [t], i, max_epochs=caps[i], max_share=max_shares[i]) for i, t in enumerate(tokens)]
    want = sum(tokens) if budget is None else budget
    ceilings = [
        min(math.floor((4.0 if c is None else c) * t + 1e-9), want if m is None else math.floor(m * want + 1e-9))
        for t, c, m in zip(tokens, caps, max_shares, strict=False)
    ]
    if sum(ceilings) == 0:
        with pytest.raises(ValueError, match="allow no tokens at all"):
            plan_mixture(srcs, a, token_budget=budget)
        return
    plan = quiet_plan(srcs, a, token_budget=budget)
    assert plan.total_tokens == min(want, sum(ceilings))
    target = plan.target_tokens
    assert int(target.sum()) == plan.total_tokens <= want
    for i, r in enumerate(plan.rows):
        cap = 4.0 if caps[i] is None else caps[i]
        assert r.target_tokens <= math.floor(cap * tokens[i] + 1e-9)
        if max_shares[i] is not None:
            assert r.target_tokens <= math.floor(max_shares[i] * want + 1e-9)
    # A source whose share equals its max_share exactly is not capped, but its integer ceiling (the floor of
    # max_share x budget) can still hold it below its rounded share: it is not free to take rounding tokens.
    free = [i for i, r in enumerate(plan.rows) if r.capped_by is None and r.target_tokens < ceilings[i]]
    if plan.total_tokens == want and len(free) >= 2:
        # Uncapped sources keep their temperature ratio, up to one token of rounding each.
        i, j = free[0], free[-1]
        p_i, p_j = plan.rows[i].temperature_share, plan.rows[j].temperature_share
        assert abs(target[i] * p_j - target[j] * p_i) <= p_i + p_j + 1e-9 * want


# --- realize ---------------------------------------------------------------------------------------


def test_realize_hits_targets_with_repetition_and_subsampling(corpus3):
    plan = quiet_plan(corpus3, 0.7)
    a, b, c = plan.rows
    assert a.epochs < 1 and b.whole_epochs == 1 and c.whole_epochs == 3  # subsample, repeat, repeat
    layout = realize(plan, corpus3, SEED)
    rows = layout.to_rows()
    for row, prow in zip(rows, plan.rows, strict=True):
        assert abs(row["realized_share"] - prow.target_share) < 0.005
        # Part epochs are filled to within one document (here a few tokens).
        assert abs(row["realized_tokens"] - row["target_tokens"]) < 450
    assert layout.total_tokens == int(layout.realized_tokens.sum())
    assert layout.source_index.dtype == np.int16 and layout.epoch.dtype == np.int16
    assert layout.doc_index.dtype == layout.stream_start.dtype == layout.length.dtype == np.int64
    assert layout.stream_start[0] == 0 and layout.stream_start[-1] + layout.length[-1] == layout.total_tokens
    for i, s in enumerate(corpus3):
        assert np.array_equal(
            layout.length[layout.source_index == i], s.lengths[layout.doc_index[layout.source_index == i]]
        )


def test_realize_never_uses_validation_docs(corpus3):
    layout = realize(quiet_plan(corpus3, 0.7), corpus3, SEED)
    for i, s in enumerate(corpus3):
        used = layout.doc_index[layout.source_index == i]
        assert s.validation is not None and s.validation.sum() >= 1
        assert not s.validation[used].any()
    val = layout_validation(corpus3, SEED)
    for i, s in enumerate(corpus3):
        docs = val.doc_index[val.source_index == i]
        assert sorted(docs.tolist()) == s.validation_index.tolist()  # each validation doc exactly once
    assert val.realized_tokens.tolist() == [s.validation_tokens for s in corpus3]
    assert np.array_equal(layout_validation(corpus3, SEED).doc_index, val.doc_index)


def test_realize_epochs_are_reshuffled(corpus3):
    layout = realize(quiet_plan(corpus3, 0.7), corpus3, SEED)
    c = corpus3[2]
    orders = []
    for e in range(3):
        docs = layout.doc_index[(layout.source_index == 2) & (layout.epoch == e)]
        assert sorted(docs.tolist()) == c.train_index.tolist()  # a whole epoch: every train doc once
        orders.append(tuple(docs.tolist()))
    assert len(set(orders)) == 3
    part = layout.doc_index[(layout.source_index == 2) & (layout.epoch == 3)]
    assert 0 < len(part) < len(c.train_index) and len(set(part.tolist())) == len(part)


def test_epoch_orders_distinct_for_tiny_sources():
    # 3 documents have 3! = 6 orders: 5 epochs get 5 different ones.
    srcs = [source("t", [3, 4, 5], 0)]
    layout = realize(quiet_plan(srcs, 1.0, token_budget=60, default_max_epochs=5), srcs, SEED)
    orders = [tuple(layout.doc_index[layout.epoch == e].tolist()) for e in range(5)]
    assert len(set(orders)) == 5
    # 2 documents have 2 orders: 4 epochs alternate, never the same order twice in a row.
    srcs = [source("t", [3, 4], 0)]
    layout = realize(quiet_plan(srcs, 1.0, token_budget=28), srcs, SEED)
    orders = [tuple(layout.doc_index[layout.epoch == e].tolist()) for e in range(4)]
    assert all(orders[e] != orders[e + 1] for e in range(3))


def test_realize_deterministic_and_seeded(corpus3):
    plan = quiet_plan(corpus3, 0.7)
    one, two = realize(plan, corpus3, SEED), realize(plan, corpus3, SEED)
    for key, arr in one.arrays().items():
        assert np.array_equal(arr, two.arrays()[key]), key
    other = realize(plan, corpus3, SEED + 1)
    assert not np.array_equal(one.doc_index, other.doc_index)
    assert other.realized_tokens.tolist() != [0, 0, 0]


def test_realize_independent_of_input_document_order(corpus3):
    plan = quiet_plan(corpus3, 0.7)
    expected = realize(plan, corpus3, SEED).doc_ids(corpus3)
    rng = np.random.default_rng(5)
    shuffled = []
    for s in corpus3:
        perm = rng.permutation(len(s.lengths))
        shuffled.append(SourceInput(s.name, s.lengths[perm], [s.doc_ids[j] for j in perm], s.priority))
    shuffled = split_sources(shuffled, 0.01, SEED)
    got = realize(quiet_plan(shuffled, 0.7), shuffled, SEED).doc_ids(shuffled)
    assert got == expected


def test_realize_rejects_a_foreign_plan(corpus3):
    plan = quiet_plan(corpus3, 0.7)
    with pytest.raises(ValueError, match=r"plan is for sources \['a', 'b', 'c'\], got \['a', 'b'\]"):
        realize(plan, corpus3[:2], SEED)
    changed = [*corpus3[:2], source("c", [5, 6], 2)]
    with pytest.raises(ValueError, match="source 'c': plan was made from"):
        realize(plan, changed, SEED)


# --- interleaving ----------------------------------------------------------------------------------


def test_interleaving_close_to_the_minimum(corpus3):
    layout = realize(quiet_plan(corpus3, 0.7), corpus3, SEED)
    stats = interleaving_stats(layout)
    n = stats["documents"]
    assert stats["sources"] == 3 and n == len(layout)
    assert stats["contiguous"] == pytest.approx((n - 3) / (n - 1), rel=1e-12)
    assert stats["same_source_fraction"] < stats["random_expectation"] - 0.04
    assert stats["same_source_fraction"] <= stats["minimum_possible"] + 0.02
    assert stats["max_token_lag"] <= stats["longest_document"]
    # The same documents in one block per source.
    order = np.argsort(layout.source_index, kind="stable")
    length = layout.length[order]
    block = MixedLayout(
        layout.source_names,
        layout.source_index[order],
        layout.doc_index[order],
        layout.epoch[order],
        np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64),
        length,
        layout.target_tokens,
    )
    blocked = interleaving_stats(block)
    assert blocked["same_source_fraction"] == pytest.approx(blocked["contiguous"], rel=1e-12)
    assert stats["same_source_fraction"] < blocked["same_source_fraction"] - 0.3
    assert blocked["max_token_lag"] > 10 * stats["max_token_lag"]


def test_interleaving_alternates_equal_sources():
    srcs = [source("a", [10] * 4, 0), source("b", [10] * 4, 1)]
    layout = realize(quiet_plan(srcs, 1.0), srcs, SEED)
    assert layout.source_index.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert layout.stream_start.tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    stats = interleaving_stats(layout)
    assert stats["same_source_pairs"] == 0 and stats["random_expectation"] == 0.5 and stats["longest_run"] == 1


def test_share_check_allows_one_document_of_a_source_of_few_long_documents(tmp_path: Path) -> None:
    """A part-epoch takes whole documents: books, one document of 1,556 tokens, overshoots its target by most of
    it, which moves both shares by 0.55 pp; each source is within one of its documents of its target tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from assets.mixing import shares_off_plan
    from corpus.lake import Lake

    versions = []
    for name, lengths in (("books", [1556]), ("web", [10, 20, 30])):
        with Lake(tmp_path).writer("tokenized_documents", name) as writer:
            pq.write_table(pa.table({"length": lengths}), writer.path("index.parquet"))
            versions.append(writer.commit(code_version="1", config={}))
    mixture = [
        {"source": "books", "target_tokens": 5000, "realized_tokens": 6224, "share_error_pp": 0.55},
        {"source": "web", "target_tokens": 33770, "realized_tokens": 33776, "share_error_pp": -0.55},
    ]
    assert shares_off_plan(mixture, versions) == []
    mixture[1] = {**mixture[1], "realized_tokens": 33700}  # 70 tokens short: more than its longest document
    assert [(r["source"], r["token_gap"], r["longest_document"]) for r in shares_off_plan(mixture, versions)] == [
        ("web", -70, 30)
    ]
    mixture[1] = {**mixture[1], "share_error_pp": 0.4}  # within the tolerance whatever the tokens
    assert shares_off_plan(mixture, versions) == []
