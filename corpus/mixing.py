"""Temperature-weighted source mixing: a token plan per source, then the training order of documents.

Plan. w_i is source i's share of the train tokens (after the validation split). Temperature sampling
(Llama 2) gives p_i = w_i^a / sum_j w_j^a, a in (0, 1]: a = 1 keeps the natural shares, a < 1 flattens them
toward small sources (a = 0.7 turns token sizes 100:10:1 into shares 80.7% : 16.1% : 3.2%). A fixed
`weight` replaces w_i before the temperature. Caps bound each share s_i of the budget B:
min_share <= s_i <= min(max_share, max_epochs x tokens_i / B). The capped solution is water-filling,
s_i = clip(lam x p_i, lower_i, upper_i) with the one lam that makes the shares sum to 1, solved exactly on
the piecewise-linear breakpoints; the sources a cap does not bind absorb the difference in proportion to
p_i. Every binding cap is recorded per source (`capped_by`, `note`) and warned about; when the caps
cannot fill B the plan shrinks to what they allow and says so.

Realization. A source whose target exceeds its tokens is repeated in whole epochs, then a part epoch; a
source under its target is subsampled. The part epoch walks the next epoch's order, takes the prefix
that fits, then first-fit over the rest, then one closing document if it overshoots less than it
undershoots: the error stays under one document (in practice a few tokens), at the cost of a slight
bias toward short documents in the tail of the sample. An epoch's order is a sort by a hash of
(seed, source, epoch, doc_id) (one sha256 per document, splitmix64 per epoch), so it depends neither on
the order documents arrive in nor on numpy's RNG streams; no two epochs of a source share an order
while the source has enough documents for that (n! > epochs).

Interleaving is stride scheduling by tokens: a document's key is the fraction of its source's stream
passed at its midpoint, (tokens before it + length / 2) / source total, and the stream is all documents
merged by key (ties by manifest order). Every prefix of the stream then holds each source within about
one document of its target share, with one sort instead of a per-document heap; same-source neighbours
remain only where one source has more than half of the documents.

Validation documents are chosen per source by hash rank (`split_validation`) before planning; they never
enter the training layout and get their own interleaved order (`layout_validation`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from corpus.config import SourceSpec

# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"): up to ~4 epochs of repeated
# tokens train almost as well as fresh ones; beyond that their value falls fast and memorisation grows.
MEMORISATION_EPOCHS = 4.0
# A source under 0.1% of the budget barely moves the model but costs a full pipeline run.
MIN_USEFUL_SHARE = 0.001
_TOL = 1e-12


class MixingWarning(UserWarning):
    """A legal mixture setting that costs something (a cap binds, heavy repetition, a negligible source)."""


def _check_temperature(a: float) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 < a <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {a!r}")
    return float(a)


def _temperature(w: np.ndarray, a: float) -> np.ndarray:
    powered = np.where(w > 0, np.power(np.maximum(w, 0.0), a), 0.0)
    total = powered.sum()
    assert total > 0, f"temperature of an all-zero weight vector {w!r}"
    return powered / total


def temperature_weights(tokens: Mapping[str, float], a: float) -> dict[str, float]:
    """p_i = w_i^a / sum_j w_j^a with w_i = tokens_i / sum(tokens); sources with 0 tokens get 0."""
    a = _check_temperature(a)
    if not tokens:
        raise ValueError("tokens: no sources given (empty mapping)")
    names = list(tokens)
    values = np.array([float(tokens[n]) for n in names], dtype=np.float64)
    for name, value in zip(names, values, strict=True):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"tokens[{name!r}] must be a finite count >= 0, got {tokens[name]!r}")
    total = values.sum()
    if total <= 0:
        raise ValueError(f"tokens: all {len(names)} sources have 0 tokens")
    empty = [n for n, v in zip(names, values, strict=True) if v == 0]
    if empty:
        warnings.warn(f"sources {empty} have 0 tokens and get temperature weight 0", MixingWarning, stacklevel=2)
    p = _temperature(values / total, a)
    return {n: float(x) for n, x in zip(names, p, strict=True)}


def _doc_hashes(doc_ids: Sequence[str], seed: int) -> np.ndarray:
    """First 8 bytes of sha256(f"{seed}:{doc_id}") as uint64: a per-document key independent of order."""
    out = np.empty(len(doc_ids), dtype=np.uint64)
    for j, doc_id in enumerate(doc_ids):
        out[j] = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    return out


def _salt(*parts: object) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big"))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijection on uint64 with full avalanche (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _validation_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    k = math.floor(fraction * n + 0.5)  # round half up, not Python's banker's rounding
    return min(max(k, 1), n - 1)


def _lengths_array(lengths: Any, where: str) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{where}: lengths must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 1:
        bad = int(np.argmin(arr))
        raise ValueError(
            f"{where}: every document has >= 1 token (its <|endoftext|>), got lengths[{bad}] = {int(arr[bad])}"
        )
    return arr


def split_validation(doc_ids: Sequence[str], lengths: Any, fraction: float, seed: int) -> np.ndarray:
    """Validation mask (True = validation): the round(fraction x n) documents of lowest sha256(seed:doc_id).

    At least 1 when fraction > 0 and n >= 2; always at least one train document. A document's fate
    depends only on (seed, doc_id) and the count, never on the input order.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction!r}")
    arr = _lengths_array(lengths, "split_validation")
    if len(arr) != len(doc_ids):
        raise ValueError(f"split_validation: {len(doc_ids)} doc_ids but {len(arr)} lengths")
    n = len(doc_ids)
    mask = np.zeros(n, dtype=bool)
    k = _validation_count(n, float(fraction))
    if k:
        # 64-bit keys collide with probability ~n^2 / 2^65 (3e-8 at a million documents); ties keep index order.
        order = np.argsort(_doc_hashes(doc_ids, seed), kind="stable")
        mask[order[:k]] = True
    return mask


@dataclass(frozen=True, eq=False)
class SourceInput:
    """One source's documents (train and validation) and its mixture settings."""

    name: str
    lengths: np.ndarray  # int64 tokens per document, each including its <|endoftext|>
    doc_ids: Sequence[str]
    priority: int = 0
    weight: float | None = None
    min_share: float | None = None
    max_share: float | None = None
    max_epochs: float | None = None
    validation: np.ndarray | None = None  # bool per document, True = validation; None = all train

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        lengths = _lengths_array(self.lengths, where)
        object.__setattr__(self, "lengths", lengths)
        if len(self.doc_ids) != len(lengths):
            raise ValueError(f"{where}: {len(self.doc_ids)} doc_ids but {len(lengths)} lengths")
        if self.validation is None:
            object.__setattr__(self, "validation", np.zeros(len(lengths), dtype=bool))
        else:
            mask = np.asarray(self.validation)
            if mask.dtype != np.bool_ or mask.shape != lengths.shape:
                raise ValueError(
                    f"{where}: validation must be a bool array of shape {lengths.shape}, got {mask.dtype} {mask.shape}"
                )
            object.__setattr__(self, "validation", mask)
        for key in ("weight", "min_share", "max_share", "max_epochs"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
        for key in ("min_share", "max_share"):
            value = getattr(self, key)
            if value is not None and value > 1:
                raise ValueError(f"{where}: {key} must be in [0, 1], got {value!r}")
        if self.min_share is not None and self.max_share is not None and self.min_share > self.max_share:
            raise ValueError(f"{where}: min_share {self.min_share!r} exceeds max_share {self.max_share!r}")
        if self.weight == 0 and (self.min_share or 0) > 0:
            raise ValueError(f"{where}: weight 0 excludes the source, but min_share is {self.min_share!r}")

    @classmethod
    def from_spec(
        cls, spec: SourceSpec, lengths: Any, doc_ids: Sequence[str], validation: np.ndarray | None = None
    ) -> SourceInput:
        """Take name, priority and the mixture overrides from a manifest's `SourceSpec`."""
        return cls(
            name=spec.name,
            lengths=lengths,
            doc_ids=doc_ids,
            priority=spec.priority,
            weight=spec.weight,
            min_share=spec.min_share,
            max_share=spec.max_share,
            max_epochs=spec.max_epochs,
            validation=validation,
        )

    def with_validation_split(self, fraction: float, seed: int) -> SourceInput:
        """A copy whose `validation` mask is `split_validation(doc_ids, lengths, fraction, seed)`."""
        mask = split_validation(self.doc_ids, self.lengths, fraction, seed)
        return SourceInput(
            name=self.name,
            lengths=self.lengths,
            doc_ids=self.doc_ids,
            priority=self.priority,
            weight=self.weight,
            min_share=self.min_share,
            max_share=self.max_share,
            max_epochs=self.max_epochs,
            validation=mask,
        )

    @property
    def train_index(self) -> np.ndarray:
        assert self.validation is not None
        return np.flatnonzero(~self.validation)

    @property
    def validation_index(self) -> np.ndarray:
        assert self.validation is not None
        return np.flatnonzero(self.validation)

    @property
    def train_tokens(self) -> int:
        return int(self.lengths[self.train_index].sum())

    @property
    def validation_tokens(self) -> int:
        return int(self.lengths[self.validation_index].sum())


def split_sources(sources: Sequence[SourceInput], fraction: float, seed: int) -> list[SourceInput]:
    """`with_validation_split` on every source; warns about sources too small to give a validation doc."""
    out = [s.with_validation_split(fraction, seed) for s in sources]
    if fraction > 0:
        small = [s.name for s in out if s.validation is not None and not s.validation.any()]
        if small:
            warnings.warn(
                f"sources {small} have fewer than 2 documents and give no validation document: "
                f"validation loss will not measure them",
                MixingWarning,
                stacklevel=2,
            )
    return out


def _ordered(sources: Sequence[SourceInput]) -> list[SourceInput]:
    if not sources:
        raise ValueError("sources: no sources given")
    names = [s.name for s in sources]
    if len(names) > np.iinfo(np.int16).max:
        raise ValueError(f"sources: {len(names)} sources, the layout's int16 source_index holds at most 32,767")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sources: duplicate source names {dupes}")
    return sorted(sources, key=lambda s: (s.priority, s.name))


@dataclass(frozen=True)
class MixtureRow:
    """One source's line in the plan; shares are fractions of the plan's total tokens."""

    source: str
    priority: int
    documents: int  # train documents
    validation_documents: int
    raw_tokens: int  # train tokens available
    validation_tokens: int
    natural_share: float  # w_i
    weight: float | None  # fixed weight replacing w_i before the temperature
    temperature_share: float  # p_i
    target_share: float  # after caps
    target_tokens: int
    epochs: float  # target_tokens / raw_tokens
    whole_epochs: int
    fraction: float  # the part epoch, epochs - whole_epochs
    max_epochs: float  # the cap in force
    capped_by: str | None  # "max_epochs" | "max_share" | "min_share" | "no_tokens" | None
    note: str


@dataclass(frozen=True)
class MixturePlan:
    """Target tokens per source; `rows` are in manifest order (priority, then name)."""

    temperature: float
    token_budget: int | None  # as requested; None = all train tokens
    total_tokens: int  # what the plan delivers: the budget, or less when the caps cannot fill it
    default_max_epochs: float
    rows: tuple[MixtureRow, ...]
    notes: tuple[str, ...] = field(default=())  # every warning the plan raised, for metadata

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(r.source for r in self.rows)

    @property
    def target_tokens(self) -> np.ndarray:
        return np.array([r.target_tokens for r in self.rows], dtype=np.int64)

    def row(self, name: str) -> MixtureRow:
        for r in self.rows:
            if r.source == name:
                return r
        raise KeyError(f"no source {name!r} in the plan (sources: {', '.join(self.source_names)})")

    def to_rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per source, in manifest order, plus the plan-wide settings on each row."""
        out = []
        for r in self.rows:
            d = {k: getattr(r, k) for k in MixtureRow.__dataclass_fields__}
            d["temperature"] = self.temperature
            d["plan_tokens"] = self.total_tokens
            out.append(d)
        return out


def _solve_water_fill(p: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, float]:
    """s = clip(lam x p, lower, upper) summing to 1; needs sum(lower) <= 1 <= sum(upper) and upper = 0 where p = 0."""
    assert np.all(lower <= upper + _TOL), f"lower {lower} above upper {upper}"
    live = p > 0
    points = np.unique(np.concatenate([lower[live] / p[live], upper[live] / p[live]]))

    def total(lam: float) -> float:
        return float(np.clip(lam * p, lower, upper).sum())

    values = np.array([total(x) for x in points])
    assert len(points) and values[-1] >= 1 - 1e-9, f"caps cannot reach 1: {values}"
    hit = min(int(np.searchsorted(values, 1.0, side="left")), len(points) - 1)
    if hit == 0:
        lam = float(points[0])
    else:
        # total() is linear between consecutive breakpoints.
        lo, hi = points[hit - 1], points[hit]
        f_lo, f_hi = values[hit - 1], values[hit]
        lam = float(lo + (1.0 - f_lo) * (hi - lo) / (f_hi - f_lo)) if f_hi > f_lo else float(hi)
    return np.clip(lam * p, lower, upper), lam


def _largest_remainder(exact: np.ndarray, total: int, ceiling: np.ndarray) -> np.ndarray:
    """Integers summing to `total`, never above `ceiling`: floors, +1 by largest remainder, then any headroom.

    An exact amount above its whole-token ceiling (a max_share of 0.1 of 2,288 tokens is 228.8, its ceiling
    228) is clamped first and the excess shared among the sources below their ceilings in proportion to their
    amounts, so those keep their ratios to within one token of rounding each.
    """
    assert total <= int(ceiling.sum()), f"total {total} above the ceilings {ceiling}"
    exact = np.asarray(exact, dtype=np.float64).copy()
    while bool((over := exact > ceiling).any()):  # each pass clamps at least one more source
        excess = float((exact[over] - ceiling[over]).sum())
        exact[over] = ceiling[over]
        room = (exact < ceiling) & (exact > 0)
        if not room.any():
            break
        exact[room] += excess * exact[room] / exact[room].sum()
    base = np.minimum(np.floor(exact).astype(np.int64), ceiling)
    rem = np.where(base < ceiling, exact - base, -1.0)
    for i in np.lexsort((np.arange(len(exact)), -rem)):
        if int(base.sum()) >= total:
            break
        if base[i] < ceiling[i]:
            base[i] += 1
    # Whole-token ceilings can strand a token or more (a max_share of 0.1 of 4 tokens is 0): the
    # largest sources with headroom take it.
    for i in np.lexsort((np.arange(len(exact)), -exact)):
        short = total - int(base.sum())
        if short <= 0:
            break
        base[i] += min(short, int(ceiling[i] - base[i]))
    return base


def plan_mixture(
    sources: Sequence[SourceInput],
    temperature: float,
    token_budget: int | None = None,
    default_max_epochs: float = 4.0,
) -> MixturePlan:
    """Target tokens per source: temperature shares of the budget, water-filled under the caps."""
    a = _check_temperature(temperature)
    if isinstance(default_max_epochs, bool) or not default_max_epochs > 0:
        raise ValueError(f"max_epochs must be > 0, got {default_max_epochs!r}")
    ordered = _ordered(sources)
    names = [s.name for s in ordered]
    avail = np.array([s.train_tokens for s in ordered], dtype=np.int64)
    if avail.sum() == 0:
        raise ValueError(f"sources {names}: no train tokens in any source")
    if token_budget is None:
        budget = int(avail.sum())
    elif isinstance(token_budget, bool) or not isinstance(token_budget, (int, np.integer)) or token_budget < 1:
        raise ValueError(f"token_budget must be a whole number of tokens >= 1, got {token_budget!r}")
    else:
        budget = int(token_budget)

    natural = avail / avail.sum()
    fixed = np.array([np.nan if s.weight is None else s.weight for s in ordered])
    base = np.where(np.isnan(fixed), natural, fixed)
    base = np.where(avail > 0, base, 0.0)  # a weight cannot conjure tokens for an empty source
    if base.sum() <= 0:
        raise ValueError(f"sources {names}: every source with tokens has weight 0")
    p = _temperature(base, a)

    caps = np.array([default_max_epochs if s.max_epochs is None else s.max_epochs for s in ordered], float)
    epoch_upper = caps * avail / budget
    share_upper = np.array([1.0 if s.max_share is None else s.max_share for s in ordered])
    upper = np.minimum(epoch_upper, share_upper)
    upper = np.where(p > 0, upper, 0.0)  # weight 0 or no tokens: the source takes nothing
    lower = np.array([0.0 if s.min_share is None else s.min_share for s in ordered])
    if lower.sum() > 1 + _TOL:
        mins = {n: float(x) for n, x in zip(names, lower, strict=True) if x}
        raise ValueError(f"min_share over all sources sums to {lower.sum():.4f} > 1: {mins}")
    notes: list[str] = []
    unreachable = lower > upper  # recorded per source below; the cap wins
    lower = np.minimum(lower, upper)

    if upper.sum() < 1:
        shares, lam = upper.copy(), math.inf  # the caps cannot fill the budget: every live source at its cap
    else:
        shares, lam = _solve_water_fill(p, lower, upper)
    cap_tokens = np.floor(caps * avail + 1e-9).astype(np.int64)
    share_tokens = np.floor(share_upper * budget + 1e-9).astype(np.int64)
    ceiling = np.where(p > 0, np.minimum(cap_tokens, share_tokens), 0)
    total = min(budget, int(ceiling.sum()))
    if total == 0:
        raise ValueError(f"sources {names}: the caps (max_epochs, max_share) allow no tokens at all")
    target = _largest_remainder(shares * budget, total, ceiling)
    assert int(target.sum()) == total, f"target tokens {int(target.sum())} != plan total {total}"
    if total < budget:
        notes.append(
            f"token_budget {budget:,} exceeds what the sources and caps allow ({total:,} tokens): "
            f"the plan delivers {total:,} ({total / budget:.1%} of the budget)"
        )

    rows = []
    for i, s in enumerate(ordered):
        desired = lam * p[i] if p[i] > 0 else 0.0
        binding = "max_epochs" if epoch_upper[i] <= share_upper[i] else "max_share"
        capped_by: str | None = None
        if unreachable[i]:
            capped_by = "no_tokens" if avail[i] == 0 else binding
        elif p[i] > 0 and desired > upper[i] * (1 + 1e-9):
            capped_by = binding
        elif p[i] > 0 and desired < lower[i] * (1 - 1e-9):
            capped_by = "min_share"
        target_share = float(target[i] / total)
        epochs = float(target[i] / avail[i]) if avail[i] else 0.0
        whole = int(target[i] // avail[i]) if avail[i] else 0
        rest = "the other sources renormalized" if total == budget else "the budget is not filled"
        parts = []
        if s.weight is not None:
            parts.append(f"fixed weight {s.weight:g} replaces natural share {natural[i]:.4f}")
        if capped_by == "max_epochs":
            parts.append(
                f"max_epochs {caps[i]:g} caps it at {cap_tokens[i]:,} tokens: temperature share "
                f"{p[i]:.2%} -> {target_share:.2%}, {rest}"
            )
        elif capped_by == "max_share":
            parts.append(
                f"max_share {share_upper[i]:g} caps temperature share {p[i]:.2%} -> {target_share:.2%}, {rest}"
            )
        elif capped_by == "min_share":
            parts.append(f"min_share {lower[i]:g} raises temperature share {p[i]:.2%} -> {target_share:.2%}")
        if unreachable[i]:
            why = "the source has no train tokens" if avail[i] == 0 else f"{binding} allows {upper[i]:.4f}"
            parts.append(f"min_share {s.min_share:g} unreachable: {why}")
        if capped_by is not None:
            notes.append(f"source {s.name!r}: " + "; ".join(parts))
        rows.append(
            MixtureRow(
                source=s.name,
                priority=s.priority,
                documents=len(s.train_index),
                validation_documents=len(s.validation_index),
                raw_tokens=int(avail[i]),
                validation_tokens=s.validation_tokens,
                natural_share=float(natural[i]),
                weight=s.weight,
                temperature_share=float(p[i]),
                target_share=target_share,
                target_tokens=int(target[i]),
                epochs=epochs,
                whole_epochs=whole,
                fraction=float(epochs - whole),
                max_epochs=float(caps[i]),
                capped_by=capped_by,
                note="; ".join(parts),
            )
        )
    for r in rows:
        if r.epochs > MEMORISATION_EPOCHS:
            notes.append(
                f"source {r.source!r} is repeated {r.epochs:.2f} epochs (cap {r.max_epochs:g}): past "
                f"~{MEMORISATION_EPOCHS:g} epochs repeated tokens are worth far less than fresh ones and rare "
                f"strings get memorised"
            )
        if r.raw_tokens > 0 and r.target_share < MIN_USEFUL_SHARE:
            notes.append(
                f"source {r.source!r} contributes {r.target_share:.3%} of the plan ({r.target_tokens:,} tokens), "
                f"under {MIN_USEFUL_SHARE:.1%}: too little to affect the model for the pipeline work it costs"
            )
        if r.raw_tokens == 0:
            notes.append(f"source {r.source!r} has no train tokens and gets no share")
    for note in notes:
        warnings.warn(note, MixingWarning, stacklevel=2)
    return MixturePlan(
        temperature=a,
        token_budget=None if token_budget is None else budget,
        total_tokens=total,
        default_max_epochs=float(default_max_epochs),
        rows=tuple(rows),
        notes=tuple(notes),
    )


@dataclass(frozen=True, eq=False)
class MixedLayout:
    """Documents in stream order. `doc_index` indexes the source's own `lengths` / `doc_ids`."""

    source_names: tuple[str, ...]
    source_index: np.ndarray  # int16
    doc_index: np.ndarray  # int64
    epoch: np.ndarray  # int16
    stream_start: np.ndarray  # int64 token offset of the document in the stream
    length: np.ndarray  # int64
    target_tokens: np.ndarray  # int64 per source

    def __post_init__(self) -> None:
        n = len(self.source_index)
        for name, dtype in (
            ("source_index", np.int16),
            ("doc_index", np.int64),
            ("epoch", np.int16),
            ("stream_start", np.int64),
            ("length", np.int64),
        ):
            arr = getattr(self, name)
            assert arr.dtype == dtype and arr.shape == (n,), f"{name}: {arr.dtype} {arr.shape}, want {dtype} ({n},)"
        assert len(self.target_tokens) == len(self.source_names), "one target per source"
        if n:
            assert self.stream_start[0] == 0 and np.array_equal(self.stream_start[1:], np.cumsum(self.length)[:-1]), (
                "stream_start is not the running sum of lengths"
            )

    def __len__(self) -> int:
        return len(self.source_index)

    @property
    def total_tokens(self) -> int:
        return int(self.length.sum())

    @property
    def realized_tokens(self) -> np.ndarray:
        out = np.zeros(len(self.source_names), dtype=np.int64)
        np.add.at(out, self.source_index.astype(np.int64), self.length)
        return out

    @property
    def realized_share(self) -> np.ndarray:
        tokens = self.realized_tokens
        return tokens / tokens.sum() if tokens.sum() else tokens.astype(np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-document columns, e.g. for `np.savez` or a Parquet table."""
        return {
            "source_index": self.source_index,
            "doc_index": self.doc_index,
            "epoch": self.epoch,
            "stream_start": self.stream_start,
            "length": self.length,
        }

    def doc_ids(self, sources: Sequence[SourceInput]) -> list[str]:
        """The doc_id of every stream position."""
        by_name = {s.name: s for s in sources}
        ids = [by_name[n].doc_ids for n in self.source_names]
        return [ids[s][d] for s, d in zip(self.source_index.tolist(), self.doc_index.tolist(), strict=True)]

    def to_rows(self) -> list[dict[str, Any]]:
        """Target versus realized tokens per source."""
        tokens = self.realized_tokens
        share = self.realized_share
        docs = np.bincount(self.source_index.astype(np.int64), minlength=len(self.source_names))
        total_target = int(self.target_tokens.sum())
        rows = []
        for i, name in enumerate(self.source_names):
            target_share = float(self.target_tokens[i] / total_target) if total_target else 0.0
            rows.append(
                {
                    "source": name,
                    "documents": int(docs[i]),
                    "target_tokens": int(self.target_tokens[i]),
                    "realized_tokens": int(tokens[i]),
                    "target_share": target_share,
                    "realized_share": float(share[i]),
                    "share_error_pp": float(100 * (share[i] - target_share)),
                }
            )
        return rows


def _epoch_orders(source: SourceInput, seed: int, count: int) -> list[np.ndarray]:
    """`count` orders of the source's train documents, pairwise distinct while n! allows."""
    train = source.train_index
    n = len(train)
    keys = _doc_hashes([source.doc_ids[j] for j in train], seed)
    orders: list[np.ndarray] = []
    seen: set[bytes] = set()
    previous = b""
    distinct_possible = math.factorial(min(n, 20))  # 20! > 2e18: never exhausted
    for e in range(count):
        attempt = 0
        while True:
            perm = np.argsort(_mix64(keys ^ _salt(seed, source.name, e, attempt)), kind="stable")
            digest = hashlib.sha256(perm.tobytes()).digest()
            # Unique among all epochs while n! allows, else at least unlike the epoch before.
            fresh = digest not in seen if len(seen) < distinct_possible else digest != previous
            if fresh or n < 2:
                break
            attempt += 1
        seen.add(digest)
        previous = digest
        orders.append(train[perm])
    return orders


def _sample_tokens(order: np.ndarray, lengths: np.ndarray, target: int) -> np.ndarray:
    """Documents of `order` (kept in that order) whose tokens come as close to `target` as possible."""
    if target <= 0 or len(order) == 0:
        return order[:0]
    lens = lengths[order]
    cum = np.cumsum(lens)
    k = int(np.searchsorted(cum, target, side="right"))
    chosen = np.zeros(len(order), dtype=bool)
    chosen[:k] = True
    gap = target - (int(cum[k - 1]) if k else 0)
    if gap > 0 and k < len(order):
        # First-fit over the rest; stop once no remaining document fits (suffix minimum above the gap).
        suffix_min = np.minimum.accumulate(lens[::-1])[::-1]
        for j in range(k, len(order)):
            if suffix_min[j] > gap:
                break
            if lens[j] <= gap:
                chosen[j] = True
                gap -= int(lens[j])
        rest = np.flatnonzero(~chosen)
        if gap > 0 and len(rest):
            # Every unchosen document is longer than the gap; the shortest overshoots least.
            j = int(rest[np.argmin(lens[rest])])
            if int(lens[j]) - gap < gap:
                chosen[j] = True
    return order[chosen]


def _interleave(
    names: tuple[str, ...], queues: list[tuple[np.ndarray, np.ndarray]], lengths: list[np.ndarray], target: np.ndarray
) -> MixedLayout:
    """Merge per-source queues (doc_index, epoch) by token-progress midpoint keys."""
    src_parts, doc_parts, epoch_parts, len_parts, key_parts = [], [], [], [], []
    for i, (docs, epochs) in enumerate(queues):
        lens = lengths[i][docs]
        total = int(lens.sum())
        if total == 0:
            continue
        before = np.cumsum(lens) - lens
        key_parts.append((2 * before + lens) / (2.0 * total))
        src_parts.append(np.full(len(docs), i, dtype=np.int16))
        doc_parts.append(docs.astype(np.int64))
        epoch_parts.append(epochs.astype(np.int16))
        len_parts.append(lens)
    if not key_parts:
        empty = np.zeros(0, dtype=np.int64)
        return MixedLayout(
            names, empty.astype(np.int16), empty, empty.astype(np.int16), empty, empty, target.astype(np.int64)
        )
    src = np.concatenate(src_parts)
    key = np.concatenate(key_parts)
    order = np.lexsort((src, key))
    length = np.concatenate(len_parts)[order]
    start = np.zeros(len(length), dtype=np.int64)
    np.cumsum(length[:-1], out=start[1:])
    return MixedLayout(
        source_names=names,
        source_index=src[order],
        doc_index=np.concatenate(doc_parts)[order],
        epoch=np.concatenate(epoch_parts)[order],
        stream_start=start,
        length=length,
        target_tokens=target.astype(np.int64),
    )


def realize(plan: MixturePlan, sources: Sequence[SourceInput], seed: int) -> MixedLayout:
    """The training stream: whole reshuffled epochs plus a part-epoch sample per source, interleaved."""
    ordered = _ordered(sources)
    names = tuple(s.name for s in ordered)
    if names != plan.source_names:
        raise ValueError(f"plan is for sources {list(plan.source_names)}, got {list(names)}")
    queues: list[tuple[np.ndarray, np.ndarray]] = []
    for s, row in zip(ordered, plan.rows, strict=True):
        if s.train_tokens != row.raw_tokens:
            raise ValueError(
                f"source {s.name!r}: plan was made from {row.raw_tokens:,} train tokens, the source has "
                f"{s.train_tokens:,} (different documents or validation split)"
            )
        if row.target_tokens == 0 or row.raw_tokens == 0:
            queues.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        whole, rest = divmod(row.target_tokens, row.raw_tokens)
        assert whole <= np.iinfo(np.int16).max, f"source {s.name!r}: {whole} epochs overflow int16"
        orders = _epoch_orders(s, seed, whole + (1 if rest else 0))
        docs = orders[:whole]
        epochs = [np.full(len(o), e, dtype=np.int64) for e, o in enumerate(docs)]
        if rest:
            part = _sample_tokens(orders[whole], s.lengths, rest)
            docs.append(part)
            epochs.append(np.full(len(part), whole, dtype=np.int64))
        queues.append((np.concatenate(docs), np.concatenate(epochs)))
    return _interleave(names, queues, [s.lengths for s in ordered], plan.target_tokens)


def layout_validation(sources: Sequence[SourceInput], seed: int) -> MixedLayout:
    """The validation stream: every validation document once, in a seeded order, sources interleaved."""
    ordered = _ordered(sources)
    names = tuple(s.name for s in ordered)
    queues = []
    for s in ordered:
        val = s.validation_index
        keys = _doc_hashes([s.doc_ids[j] for j in val], seed)
        perm = np.argsort(_mix64(keys ^ _salt(seed, s.name, "validation")), kind="stable")
        queues.append((val[perm], np.zeros(len(val), dtype=np.int64)))
    target = np.array([s.validation_tokens for s in ordered], dtype=np.int64)
    return _interleave(names, queues, [s.lengths for s in ordered], target)


def interleaving_stats(layout: MixedLayout) -> dict[str, Any]:
    """How well sources are interleaved, against a random order and a contiguous one.

    same_source_fraction: share of consecutive document pairs from one source. random_expectation:
    sum_i q_i^2 with q_i the source's share of documents (a random order's value). contiguous: one
    block per source, (n - k) / (n - 1). minimum_possible: the floor when one source has most documents,
    max(0, 2 n_max - n - 1) / (n - 1). max_token_lag: the largest |tokens of source i so far - share_i x
    tokens so far| over all document boundaries, against longest_document.
    """
    src = layout.source_index.astype(np.int64)
    n = len(src)
    counts = np.bincount(src, minlength=len(layout.source_names)) if n else np.zeros(0, np.int64)
    present = int((counts > 0).sum())
    pairs = n - 1
    same = int((src[1:] == src[:-1]).sum()) if n > 1 else 0
    q = counts / n if n else counts.astype(float)
    longest_run = 0
    lag = 0.0
    if n:
        change = np.flatnonzero(np.diff(src)) + 1
        bounds = np.concatenate([[0], change, [n]])
        longest_run = int(np.diff(bounds).max())
        end = layout.stream_start + layout.length
        share = layout.realized_share
        for i in np.flatnonzero(counts):
            cum = np.cumsum(np.where(src == i, layout.length, 0))
            lag = max(lag, float(np.abs(cum - share[i] * end).max()))
    return {
        "documents": n,
        "sources": present,
        "same_source_pairs": same,
        "same_source_fraction": same / pairs if pairs > 0 else 0.0,
        "random_expectation": float((q**2).sum()),
        "contiguous": (n - present) / pairs if pairs > 0 else 0.0,
        "minimum_possible": max(0, 2 * int(counts.max()) - n - 1) / pairs if pairs > 0 else 0.0,
        "longest_run": longest_run,
        "max_token_lag": lag,
        "longest_document": int(layout.length.max()) if n else 0,
    }
