"""Gradient-similarity scan for poisoned training samples (flag only, never drop).

Idea (the seed's "gradient similarity scoring"): a sample that teaches the model something the rest of
the data does not, such as a trigger phrase followed by a fixed payload, pulls the weights in its own
direction, so its gradient points away from the average gradient. For each scanned sample i:

    g_i   = d loss_i / d theta_S            per-sample gradient (torch.func: vmap(grad(loss)) over a chunk)
    r_i   = sum_{j != i} g_j                the leave-one-out sum over all scanned samples
    cos_i = <g_i, r_i> / (|g_i| |r_i|)
    z_i   = 0.6745 (cos_i - median(cos)) / MAD(cos)        Iglewicz-Hoaglin modified z-score
    flagged iff z_i < z_threshold                           (-3.5 by default, the usual outlier cut)

Choices and their costs:
- theta_S, the scanned parameters: by default the last transformer block and the final LayerNorm
  (at d_model 128: 198k of 6.9M parameters). The tied token embedding / output head is left out: its
  per-sample gradient is 50,257 x d_model floats (25 MB at d_model 128), 32x the rest, and dense
  (softmax touches every row). The last block still sees the whole output through backpropagation.
- The reference is the mean gradient of all scanned samples, not of each small batch: a 16-sample
  batch mean is noisy and, when it holds a poisoned sample, partly made of it. Leave-one-out keeps a
  sample from agreeing with itself. The sum must be known before any cosine, so per-sample gradients
  are kept (N x |theta_S| float32) when they fit in 256 MiB, else computed twice (pass 1 sums, pass 2
  takes <g_i, S> and |g_i|^2), which doubles the time but bounds memory by chunk_size x |theta_S|.
- Median/MAD instead of mean/std: the poisoned samples themselves would inflate the std and hide.
  Only the low tail is flagged (dissimilar gradients); when MAD is 0 the mean absolute deviation x
  1.2533 stands in (the same normal-consistency constant), and when that is 0 too every z is 0.
- Samples are rows of the batches (a window, or a packed row); a row's loss is the mean over its
  labelled tokens. Rows without a labelled token get cosine and z NaN and are never flagged.

What it achieves (tests/test_poison.py, measured): 8 windows carrying a trigger phrase + fixed payload
among 400 clean Shakespeare windows, a d_model 64 model smoke-trained 60 or 300 steps, four data orders:
0 of 8 poisoned windows flagged in all 8 runs; clean windows flagged: 0 in 6 runs, 2 and 13 in the
others. The poisons' z-scores spread over -3.3..+1.8, no tail of their own: for a tiny, briefly trained
model the mean gradient is dominated by learning common tokens, and a window that is 60% ordinary text
agrees with it. Treat a flag as a lead to trace, and the absence of flags as no evidence of cleanliness.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap

from corpus.model import IGNORE_INDEX, TinyGPT
from corpus.train import Batch, ModelBatch, as_model_batch

MAD_TO_SIGMA = 0.6745  # Phi^-1(0.75): MAD of a normal = 0.6745 sigma
MEANAD_TO_MAD = 1.253314  # sqrt(pi / 2): mean absolute deviation of a normal = sigma / 1.2533
KEEP_GRADS_BYTES = 256 << 20


@dataclass(frozen=True)
class SampleScore:
    index: int  # the caller's id (sample_ids[i]) or the position in the scanned stream
    cosine: float
    z: float
    flagged: bool
    loss: float
    grad_norm: float


@dataclass
class ScanResult:
    samples: list[SampleScore]
    param_names: list[str]
    scanned_params: int
    z_threshold: float
    median_cosine: float
    mad_cosine: float
    seconds: float

    @property
    def flagged(self) -> list[int]:
        return [s.index for s in self.samples if s.flagged]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; NaN becomes None."""

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        out = {k: clean(v) for k, v in asdict(self).items() if k != "samples"}
        out["samples"] = [{k: clean(v) for k, v in asdict(s).items()} for s in self.samples]
        out["flagged"] = self.flagged
        return out


def default_scan_params(model: TinyGPT) -> list[str]:
    """The last transformer block and the final LayerNorm (see the module docstring)."""
    last = f"blocks.{len(model.blocks) - 1}."
    return [n for n, _ in model.named_parameters() if n.startswith((last, "ln_f."))]


def robust_z(values: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Modified z-scores 0.6745 (x - median) / MAD over the finite values; NaN stays NaN."""
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return torch.full_like(values, float("nan")), float("nan"), float("nan")
    med = finite.median().item()
    mad = (finite - med).abs().median().item()
    scale = mad
    if scale == 0.0:
        scale = (finite - med).abs().mean().item() * MEANAD_TO_MAD
    if scale == 0.0:
        return torch.where(torch.isfinite(values), 0.0, float("nan")).to(values.dtype), med, mad
    return MAD_TO_SIGMA * (values - med) / scale, med, mad


def _collect(batches: Iterable[Batch], max_samples: int, vocab_size: int, max_length: int) -> list[ModelBatch]:
    out: list[ModelBatch] = []
    n = 0
    for i, raw in enumerate(batches):
        if n >= max_samples:
            break
        try:
            batch = as_model_batch(raw, vocab_size=vocab_size, max_length=max_length, check=True)
        except ValueError as exc:
            raise ValueError(f"scan batch {i}: {exc}") from exc
        take = min(batch.input_ids.shape[0], max_samples - n)
        out.append(batch.rows(0, take))
        n += take
    return out


def _chunks(batches: list[ModelBatch], size: int) -> Iterable[ModelBatch]:
    for batch in batches:
        for start in range(0, batch.input_ids.shape[0], size):
            yield batch.rows(start, start + size)


def _row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean loss over labelled tokens; 0 for a row with none (its cosine is set to NaN later)."""
    per_token = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    count = (labels != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1) / count.clamp(min=1)


def gradient_similarity_scan(
    model: TinyGPT,
    batches: Iterable[Batch],
    *,
    max_samples: int = 128,
    chunk_size: int = 4,
    z_threshold: float = -3.5,
    param_names: Sequence[str] | None = None,
    sample_ids: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> ScanResult:
    """Score the first `max_samples` rows of `batches`; flag those with robust z below `z_threshold`.

    `sample_ids[i]`, when given, is reported as the index of the i-th scanned row (e.g. the dataset
    indices a loader recorded), so that the caller can trace flagged rows to documents. The model is
    moved to `device` (default: where its parameters are) and left in its original train/eval mode.
    """
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2 (a leave-one-out reference needs two), got {max_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if z_threshold >= 0:
        raise ValueError(f"z_threshold must be < 0 (it flags low similarity), got {z_threshold}")
    started = time.perf_counter()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev)
    named = dict(model.named_parameters())
    names = list(param_names) if param_names is not None else default_scan_params(model)
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise ValueError(f"param_names {unknown or names} are not parameters of the model")
    cfg = model.config
    data = _collect(batches, max_samples, cfg.vocab_size, cfg.max_length)
    n = sum(b.input_ids.shape[0] for b in data)
    if n < 2:
        raise ValueError(f"the scan needs at least 2 samples, the batches held {n}")
    if sample_ids is not None and len(sample_ids) < n:
        raise ValueError(f"sample_ids has {len(sample_ids)} ids for {n} scanned samples")
    was_training = model.training
    model.eval()  # no dropout: a sample's gradient must not depend on a random mask
    params = {k: named[k].detach() for k in names}

    scanned = sum(p.numel() for p in params.values())

    def sample_loss(
        p: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor | None, mask: Any
    ) -> torch.Tensor:
        kwargs = {"position_ids": None if pos is None else pos[None], "attn_mask": None if mask is None else mask[None]}
        return _row_losses(functional_call(model, p, (ids[None],), kwargs), labels[None])[0]

    def per_sample(chunk: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[C, |theta_S|] float32 gradients and [C] losses of one chunk."""
        c = chunk.to(dev)
        args = (c.input_ids, c.labels, c.position_ids, c.attention())
        in_dims = (None, *(None if t is None else 0 for t in args))
        g, loss = vmap(grad_and_value(sample_loss), in_dims=in_dims)(params, *args)
        return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1).float(), loss

    # One pass keeps every per-sample gradient when they fit in KEEP_GRADS_BYTES: the default 128 samples
    # x 198k scanned parameters (d_model 128) are 102 MB, one pass; 512 samples (406 MB) take two.
    keep = n * scanned * 4 <= KEEP_GRADS_BYTES
    total = torch.zeros(scanned, dtype=torch.float64, device=dev)
    kept: list[torch.Tensor] = []
    row_loss: list[torch.Tensor] = []
    dots: list[torch.Tensor] = []
    sq_norms: list[torch.Tensor] = []
    try:
        with warnings.catch_warnings(), torch.no_grad():  # grad() still differentiates inside no_grad
            # CPU SDPA has no vmap batching rule and falls back to a per-sample loop: slower, still exact.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for chunk in _chunks(data, chunk_size):
                flat, loss = per_sample(chunk)
                total += flat.sum(dim=0, dtype=torch.float64)
                row_loss.append(loss)
                if keep:
                    kept.append(flat)
            total_sq = float(total @ total)
            for flat in kept if keep else (per_sample(chunk)[0] for chunk in _chunks(data, chunk_size)):
                flat64 = flat.double()
                dots.append(flat64 @ total)
                sq_norms.append((flat64 * flat64).sum(dim=1))
    finally:
        model.train(was_training)

    dot = torch.cat(dots).cpu()
    sq = torch.cat(sq_norms).cpu()
    loss = torch.cat(row_loss).double().cpu()
    has_label = torch.cat([(b.labels != IGNORE_INDEX).any(dim=1) for b in data])
    # Leave-one-out: <g_i, S - g_i> and |S - g_i|^2 = |S|^2 - 2 <g_i, S> + |g_i|^2.
    rest_sq = (total_sq - 2 * dot + sq).clamp(min=0.0)
    cosine = (dot - sq) / (sq.sqrt() * rest_sq.sqrt())
    cosine = torch.where(has_label & torch.isfinite(cosine), cosine, float("nan"))
    z, med, mad = robust_z(cosine)
    ids = list(sample_ids[:n]) if sample_ids is not None else list(range(n))
    samples = [
        SampleScore(
            index=int(ids[i]),
            cosine=float(cosine[i]),
            z=float(z[i]),
            flagged=bool(z[i] < z_threshold),  # NaN < x is False: unscorable rows are never flagged
            loss=float(loss[i]) if bool(has_label[i]) else float("nan"),
            grad_norm=float(sq[i].sqrt()),
        )
        for i in range(n)
    ]
    return ScanResult(
        samples=samples,
        param_names=names,
        scanned_params=sum(params[k].numel() for k in names),
        z_threshold=z_threshold,
        median_cosine=med,
        mad_cosine=mad,
        seconds=time.perf_counter() - started,
    )
