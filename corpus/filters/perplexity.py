"""A small reference language model for the perplexity filter: interpolated Kneser-Ney over token ids.

Model (Chen & Goodman 1998, interpolated, one discount per order): for a context h of k-1 tokens,

    P_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k * T_k(h) * P_{k-1}(w | h[1:])) / C_k(h)   if C_k(h) > 0
               = P_{k-1}(w | h[1:])                                                       otherwise
    P_0(w)     = 1 / vocab_size

where c_N is the raw count at the highest order N, c_k (k < N) the continuation count (number of
distinct tokens seen before the k-gram), C_k(h) = sum_w c_k(h w), T_k(h) = number of distinct w
after h, and D_k = n1 / (n1 + 2 n2) from the count-of-counts of that order (clipped to [0.05, 0.95]).
Each document is prefixed with N-1 end-of-text tokens, so every token has a full context and no
n-gram crosses documents. The probabilities of the next token sum to 1 for every context.

Storage: n-grams are exact, not hashed. Token ids are < 2**16 (GPT-2: 50,257), so a k-gram packs into
one uint64 (k <= 4); each order keeps its sorted unique keys and counts (12 bytes per distinct n-gram:
about 10 MB per million training tokens at order 3) and lookups are vectorised `np.searchsorted`. A
hashed table would bound memory but add collisions; at reference-set sizes (<= 10^7 tokens) exact is
affordable. Files: `model.json` (order, vocab, discounts, each file's sha256) and one `.npy` per array,
written with `allow_pickle=False`; the model's sha256 is that of the canonical model.json, so equal
training data gives byte-identical files and the same id.

Score: log-perplexity = mean over a document's tokens of -ln P(token | context), in nats per token.
The filter drops documents above mean + 3 std of their source's scores (`perplexity_cutoff`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corpus.filters.quality import Decision

FORMAT = "corpus.ngram_lm/1"
BITS = 16  # bits per token id in a packed key
MAX_ORDER = 64 // BITS
GPT2_VOCAB = 50257
GPT2_EOT = 50256


class ModelFileError(ValueError):
    """A saved model is missing, corrupt or from another format; the message names the file."""


@dataclasses.dataclass(frozen=True)
class _Order:
    keys: np.ndarray  # uint64, sorted unique k-grams
    counts: np.ndarray  # float64, raw (highest order) or continuation counts
    ctx_keys: np.ndarray  # uint64, sorted unique contexts (keys >> BITS)
    ctx_total: np.ndarray  # float64, C_k(h)
    ctx_types: np.ndarray  # float64, T_k(h)


def _order_from(keys: np.ndarray, counts: np.ndarray) -> _Order:
    ctx = keys >> np.uint64(BITS)
    # keys are sorted, so their contexts are sorted too: groups are runs.
    starts = np.flatnonzero(np.concatenate(([True], ctx[1:] != ctx[:-1]))) if len(ctx) else np.zeros(0, np.int64)
    counts = counts.astype(np.float64)
    total = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0)
    types = np.diff(np.append(starts, len(keys))).astype(np.float64)
    return _Order(keys, counts, ctx[starts], total, types)


def _discount(counts: np.ndarray) -> float:
    n1 = int(np.count_nonzero(counts == 1))
    n2 = int(np.count_nonzero(counts == 2))
    d = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.75
    return min(0.95, max(0.05, d))


def _as_tokens(tokens: np.ndarray | Sequence[int], vocab_size: int) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-d sequence of ids, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must be integers in [0, {vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint64, copy=False)


def _packed(docs: Sequence[np.ndarray], order: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys of the k-grams ending at every real token, for k = 1..order: shape (order, n_tokens).

    Docs are concatenated, each after order-1 pads, so no window reaches into the previous doc.
    Also returns the token count per doc and the positions of the real tokens in the buffer.
    """
    pad = np.full(order - 1, pad_id, dtype=np.uint64)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    buf = np.concatenate([part for d in docs for part in (pad, d)]) if docs else np.zeros(0, np.uint64)
    starts = np.cumsum(lengths + order - 1) - lengths  # buffer offset of each doc's first token
    positions = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(lengths.sum())
    keys = np.zeros((order, len(positions)), dtype=np.uint64)
    key = np.zeros(len(positions), dtype=np.uint64)
    for k in range(order):  # k-gram = previous (k-1)-gram shifted in front of the token
        key = key | (buf[positions - k] << np.uint64(BITS * k)) if k else buf[positions].copy()
        keys[k] = key
    return keys, lengths, positions


class NGramLM:
    """Interpolated Kneser-Ney n-gram model over token ids (see the module docstring)."""

    def __init__(
        self,
        orders: list[_Order],
        discounts: list[float],
        vocab_size: int,
        pad_id: int,
        meta: dict[str, Any],
    ) -> None:
        assert len(orders) == len(discounts), f"{len(orders)} orders but {len(discounts)} discounts"
        self.orders = orders
        self.order = len(orders)
        self.discounts = discounts
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.meta = meta

    @classmethod
    def train(
        cls,
        token_arrays: Iterable[np.ndarray | Sequence[int]],
        order: int = 3,
        vocab_size: int = GPT2_VOCAB,
        pad_id: int = GPT2_EOT,
    ) -> NGramLM:
        """Count the reference documents' n-grams (each document a 1-d array of token ids)."""
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be in [1, {MAX_ORDER}], got {order!r}")
        if not 2 <= vocab_size <= 1 << BITS:
            raise ValueError(f"vocab_size must be in [2, {1 << BITS}], got {vocab_size!r}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be in [0, {vocab_size}), got {pad_id!r}")
        docs = [d for d in (_as_tokens(t, vocab_size) for t in token_arrays) if len(d)]
        if not docs:
            raise ValueError("train needs at least one non-empty token array")
        keys, lengths, _ = _packed(docs, order, pad_id)
        top_keys, top_counts = np.unique(keys[order - 1], return_counts=True)
        levels = [(top_keys, top_counts)]
        for k in range(order - 1, 0, -1):
            # Continuation count of a k-gram: distinct tokens before it = distinct (k+1)-grams ending in it.
            suffixes = levels[0][0] & np.uint64((1 << (BITS * k)) - 1)
            levels.insert(0, np.unique(suffixes, return_counts=True))
        orders = [_order_from(k, c) for k, c in levels]
        discounts = [_discount(c) for _, c in levels]
        meta = {"tokens": int(lengths.sum()), "documents": len(docs)}
        return cls(orders, discounts, vocab_size, pad_id, meta)

    # --- scoring ------------------------------------------------------------------------------------

    def _log_probs(self, keys: np.ndarray) -> np.ndarray:
        """ln P of each position's last token; keys[k] = the (k+1)-gram ending there."""
        p = np.full(keys.shape[1], 1.0 / self.vocab_size)
        for k, (level, d) in enumerate(zip(self.orders, self.discounts, strict=True)):
            gram = keys[k]
            idx = np.searchsorted(level.keys, gram)
            hit = idx < len(level.keys)
            hit[hit] = level.keys[idx[hit]] == gram[hit]
            count = np.where(hit, level.counts[np.minimum(idx, len(level.keys) - 1)], 0.0)
            ctx = gram >> np.uint64(BITS)
            cidx = np.searchsorted(level.ctx_keys, ctx)
            chit = cidx < len(level.ctx_keys)
            chit[chit] = level.ctx_keys[cidx[chit]] == ctx[chit]
            cidx = np.minimum(cidx, len(level.ctx_keys) - 1)
            total = np.where(chit, level.ctx_total[cidx], 0.0)
            types = np.where(chit, level.ctx_types[cidx], 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                interpolated = (np.maximum(count - d, 0.0) + d * types * p) / total
            p = np.where(total > 0, interpolated, p)
        return np.log(p)

    def token_log_probs(self, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        """ln P(token | up to order-1 previous tokens of the same document) for each token."""
        arr = _as_tokens(tokens, self.vocab_size)
        if not len(arr):
            return np.zeros(0)
        keys, _, _ = _packed([arr], self.order, self.pad_id)
        return self._log_probs(keys)

    def next_token_log_probs(self, context: np.ndarray | Sequence[int]) -> np.ndarray:
        """ln P(w | context) for every w in the vocabulary (the context is left-padded like a document start)."""
        ctx = [int(t) for t in _as_tokens(context, self.vocab_size)][-(self.order - 1) :] if self.order > 1 else []
        ctx = [self.pad_id] * (self.order - 1 - len(ctx)) + ctx
        candidates = np.arange(self.vocab_size, dtype=np.uint64)
        keys = np.zeros((self.order, self.vocab_size), dtype=np.uint64)
        key = candidates.copy()
        keys[0] = key
        for k in range(1, self.order):
            key = key | (np.uint64(ctx[-k]) << np.uint64(BITS * k))
            keys[k] = key
        return self._log_probs(keys)

    def score(self, tokens: np.ndarray | Sequence[int]) -> float:
        """Log-perplexity of one document (mean -ln P per token, nats); nan for an empty document."""
        return float(self.score_batch([tokens])[0])

    def score_batch(self, token_arrays: Sequence[np.ndarray | Sequence[int]]) -> np.ndarray:
        """Log-perplexity per document, vectorised over the whole batch."""
        docs = [_as_tokens(t, self.vocab_size) for t in token_arrays]
        out = np.full(len(docs), np.nan)
        nonempty = [i for i, d in enumerate(docs) if len(d)]
        if not nonempty:
            return out
        keys, lengths, _ = _packed([docs[i] for i in nonempty], self.order, self.pad_id)
        logp = self._log_probs(keys)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        out[nonempty] = -np.add.reduceat(logp, offsets) / lengths
        return out

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Log-perplexity of texts under the GPT-2 tokenizer (corpus.tokenizer.get_encoding)."""
        from corpus.tokenizer import get_encoding

        if self.vocab_size != GPT2_VOCAB:
            raise ValueError(f"score_texts needs a GPT-2 model (vocab {GPT2_VOCAB}), this one has {self.vocab_size}")
        enc = get_encoding()
        return self.score_batch([np.array(enc.encode_ordinary(t), dtype=np.uint64) for t in texts])

    # --- files ----------------------------------------------------------------------------------

    def _manifest(self, files: dict[str, str]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "order": self.order,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "discounts": [float(d) for d in self.discounts],
            "files": files,
            **self.meta,
        }

    @property
    def sha256(self) -> str:
        """Identity of the model: sha256 of its canonical model.json (which holds every array's sha256)."""
        files = {}
        for name, array in self._arrays().items():
            files[f"{name}.npy"] = hashlib.sha256(_npy_bytes(array)).hexdigest()
        return _sha256_json(self._manifest(files))

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for k, level in enumerate(self.orders, start=1):
            out[f"order{k}_keys"] = level.keys.astype(np.uint64)
            out[f"order{k}_counts"] = level.counts.astype(np.uint32)
        return out

    def save(self, directory: str | Path) -> str:
        """Write model.json and the .npy arrays into directory; return the model's sha256."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, array in self._arrays().items():
            data = _npy_bytes(array)
            tmp = path / f".{name}.npy.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path / f"{name}.npy")
            files[f"{name}.npy"] = hashlib.sha256(data).hexdigest()
        manifest = self._manifest(files)
        (path / "model.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
        return _sha256_json(manifest)

    @classmethod
    def load(cls, directory: str | Path, expected_sha256: str | None = None) -> NGramLM:
        """Read and verify a saved model (every file's sha256, and the model's if expected_sha256 is given)."""
        path = Path(directory)
        manifest_path = path / "model.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{manifest_path}: cannot read the model manifest: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise ModelFileError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        digest = _sha256_json(manifest)
        if expected_sha256 is not None and digest != expected_sha256:
            raise ModelFileError(f"{manifest_path}: model sha256 {digest}, expected {expected_sha256}")
        arrays = {}
        for name, want in manifest["files"].items():
            file = path / name
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise ModelFileError(f"{file}: {exc}") from exc
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise ModelFileError(f"{file}: sha256 {got}, manifest says {want}")
            with open(file, "rb") as handle:
                arrays[name.removesuffix(".npy")] = np.load(handle, allow_pickle=False)
        order = int(manifest["order"])
        orders = [_order_from(arrays[f"order{k}_keys"], arrays[f"order{k}_counts"]) for k in range(1, order + 1)]
        meta = {k: v for k, v in manifest.items() if k in ("tokens", "documents")}
        return cls(orders, list(manifest["discounts"]), int(manifest["vocab_size"]), int(manifest["pad_id"]), meta)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


MAD_TO_STD = 1.4826  # 1 / Phi^-1(3/4): MAD * this estimates the standard deviation of normal data


def perplexity_cutoff(log_ppls: Sequence[float] | np.ndarray, n_std: float = 3.0, rule: str = "mean_std") -> float:
    """The drop threshold over a source's finite log-perplexities; inf when there are none.

    "mean_std": mean + n_std * std (population). "median_mad": median + n_std * 1.4826 * median absolute
    deviation, inf when the MAD is 0 (more than half the scores equal: no spread to judge by).
    """
    values = np.asarray(log_ppls, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.inf
    if rule == "mean_std":
        return float(values.mean() + n_std * values.std())
    if rule == "median_mad":
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        return median + n_std * MAD_TO_STD * mad if mad > 0 else math.inf
    raise ValueError(f"perplexity cut-off rule must be 'mean_std' or 'median_mad', got {rule!r}")


def flag_perplexity(
    decisions: Sequence[Decision], log_ppls: Sequence[float] | np.ndarray, cutoff: float
) -> list[Decision]:
    """Record log_perplexity on kept decisions and drop those above the cutoff (`perplexity_too_high`)."""
    if len(decisions) != len(log_ppls):
        raise ValueError(f"{len(decisions)} decisions but {len(log_ppls)} log-perplexities")
    out = []
    for decision, value in zip(decisions, log_ppls, strict=True):
        if not decision.kept:
            out.append(decision)
            continue
        features = {**decision.features, "log_perplexity": float(value), "perplexity_cutoff": float(cutoff)}
        if math.isfinite(value) and value > cutoff:
            out.append(
                dataclasses.replace(decision, kept=False, reason="perplexity_too_high", quality=0.0, features=features)
            )
        else:
            out.append(dataclasses.replace(decision, features=features))
    return out
