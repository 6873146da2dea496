"""Smoke training: a few AdamW steps of a tiny GPT over the shards, to show that the data trains.

The loop checks every batch before the model sees it (ids in the vocabulary, labels the next token,
no attention to later positions), runs `cfg.steps` optimizer steps, cycling the batch iterable if it
ends early, and fails with a `SmokeTrainingError` that states the numbers when a loss is not finite or
the training loss did not fall by `cfg.min_loss_drop`:

    k = min(cfg.loss_window, steps // 2)            (5 by default)
    relative_drop = (mean(loss[:k]) - mean(loss[-k:])) / mean(loss[:k])
    pass iff relative_drop >= cfg.min_loss_drop     (0.05 by default)

Averaging k steps at each end makes the check robust to one noisy batch; a model that learns anything
drops from ln(50257) = 10.8 nats by far more than 5% in 50 steps at lr 3e-3.

Two batch kinds: `(inputs, targets)` windows (or a `WindowBatch` with `.inputs`/`.targets`) train with
the causal fast path (`is_causal=True`); dicts from packing (`input_ids`, `labels` with -100 where no
loss, `position_ids`, `segment_ids`, optional bool `attention_mask` [B, 1, L, L]) train with their
positions and mask; without `attention_mask` the mask is built on the device from `segment_ids` (same
segment and not in the future; a pad attends to itself only), on CUDA in one comparison of the
`position_ids` (corpus.masks), which is why the check requires them to follow the packing layout.

On CUDA: bf16 autocast, pinned host tensors copied with `non_blocking=True`, per-step losses kept on
the device and read once at the end (a `.item()` per step would stall the host every step), and
`torch.cuda.max_memory_allocated` as peak memory. On CPU: fp32 and the process's peak RSS. Throughput
counts only tokens that got a loss; loader wait is the time spent inside `next()` of the batch iterator,
its share is of the whole loop's wall time.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from corpus.charts import new_chart, png_bytes
from corpus.config import TrainingConfig
from corpus.masks import block_causal_mask, mask_path
from corpus.model import GPT2_VOCAB, IGNORE_INDEX, GPTConfig, TinyGPT, lm_loss

Batch = tuple[Any, Any] | Mapping[str, Any]


class SmokeTrainingError(RuntimeError):
    """The smoke training failed; the message states the numbers, `result` holds them when training ran."""

    def __init__(self, message: str, result: SmokeResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ModelBatch:
    """A checked batch in the model's terms; see `attention()` for the mask the model gets."""

    input_ids: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64, -100 = no loss
    position_ids: torch.Tensor | None  # [B, L] int64
    segment_ids: torch.Tensor | None  # [B, L] int64, < 0 = padding
    attn_mask: torch.Tensor | None  # [B, 1, L, L] bool, True = may attend, as the batch gave it
    kind: str  # "windows" | "packed"

    def attention(self) -> torch.Tensor | None:
        """The batch's mask; else one built from `segment_ids` (and `position_ids`) on their device; else None.

        Building it after the copy to the GPU moves B x L instead of B x L x L values across PCIe
        (at B=8, L=2,048: 128 KiB of ids instead of a 32 MiB mask). A pad gets a segment of its own.
        With position ids, CUDA reads the mask from them alone; `as_model_batch` checked their layout.
        """
        if self.attn_mask is not None or self.segment_ids is None:
            return self.attn_mask
        return block_causal_mask(self.segment_ids, self.position_ids)

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> ModelBatch:
        """Copy to `device`; host tensors are pinned first on CUDA so that the copy is asynchronous."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if device.type == "cuda" and t.device.type == "cpu":
                if not t.is_pinned():
                    t = t.pin_memory()
                return t.to(device, non_blocking=True)
            return t.to(device)

        return ModelBatch(
            input_ids=move(self.input_ids),  # type: ignore[arg-type]
            labels=move(self.labels),  # type: ignore[arg-type]
            position_ids=move(self.position_ids),
            segment_ids=move(self.segment_ids),
            attn_mask=move(self.attn_mask),
            kind=self.kind,
        )

    def rows(self, start: int, stop: int) -> ModelBatch:
        return ModelBatch(
            input_ids=self.input_ids[start:stop],
            labels=self.labels[start:stop],
            position_ids=None if self.position_ids is None else self.position_ids[start:stop],
            segment_ids=None if self.segment_ids is None else self.segment_ids[start:stop],
            attn_mask=None if self.attn_mask is None else self.attn_mask[start:stop],
            kind=self.kind,
        )


def _int_tensor(value: Any, name: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(torch.int64)


def _check_range(t: torch.Tensor, name: str, low: int, high: int, *, allow: int | None = None) -> None:
    """Values in [low, high), or equal to `allow`."""
    bad = (t < low) | (t >= high)
    if allow is not None:
        bad &= t != allow
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}[{pos}] = {int(t[pos])} is outside [{low}, {high})")


def as_model_batch(batch: Batch, *, vocab_size: int = GPT2_VOCAB, max_length: int, check: bool = True) -> ModelBatch:
    """Normalise a windows tuple or a packed dict to a `ModelBatch`; `check` validates it (ValueError)."""
    extras: Mapping[str, Any]
    if isinstance(batch, Mapping):
        missing = [k for k in ("input_ids", "labels") if k not in batch]
        if missing:
            raise ValueError(f"packed batch lacks key(s) {missing}; it has {sorted(batch)}")
        input_ids = _int_tensor(batch["input_ids"], "input_ids")
        labels = _int_tensor(batch["labels"], "labels")
        kind, extras = "packed", batch
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        input_ids = _int_tensor(batch[0], "inputs")
        labels = _int_tensor(batch[1], "targets")
        kind, extras = "windows", {}
    elif hasattr(batch, "inputs") and hasattr(batch, "targets"):  # corpus.windows.WindowBatch
        input_ids = _int_tensor(batch.inputs, "inputs")
        labels = _int_tensor(batch.targets, "targets")
        kind, extras = "windows", {}
    else:
        raise ValueError(
            f"a batch is an (inputs, targets) pair, a WindowBatch or a dict with input_ids/labels, got {type(batch)}"
        )
    if input_ids.dim() != 2 or input_ids.shape != labels.shape or input_ids.numel() == 0:
        raise ValueError(f"inputs {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must be equal [B, L]")
    b, length = input_ids.shape
    if length > max_length:
        raise ValueError(f"sequence length {length} exceeds the model's max_length {max_length}")
    position_ids = None
    if extras.get("position_ids") is not None:
        position_ids = _int_tensor(extras["position_ids"], "position_ids").expand(b, length)
    segment_ids = None
    if extras.get("segment_ids") is not None:
        segment_ids = _int_tensor(extras["segment_ids"], "segment_ids").expand(b, length)
    attn_mask = None
    if extras.get("attention_mask") is not None:
        attn_mask = torch.as_tensor(extras["attention_mask"])
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be bool (True = may attend), got {attn_mask.dtype}")
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        if tuple(attn_mask.shape) != (b, 1, length, length):
            raise ValueError(f"attention_mask has shape {tuple(attn_mask.shape)}, expected {(b, 1, length, length)}")
    if check:
        _check_range(input_ids, "input_ids", 0, vocab_size)
        _check_range(labels, "labels", 0, vocab_size, allow=IGNORE_INDEX)
        if position_ids is not None:
            _check_range(position_ids, "position_ids", 0, max_length)
            if segment_ids is not None and attn_mask is None:  # the mask will be built from these positions
                _check_packing_layout(segment_ids, position_ids)
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError("no position in the batch has a label (all -100), so it carries no loss")
        if attn_mask is not None and bool(torch.triu(attn_mask.squeeze(1), diagonal=1).any()):
            pos = tuple(int(i) for i in torch.triu(attn_mask.squeeze(1), diagonal=1).nonzero()[0])
            raise ValueError(f"attention_mask{pos} lets a token attend to a later position (a label leak)")
        _check_next_token(input_ids, labels, segment_ids)
    return ModelBatch(input_ids, labels, position_ids, segment_ids, attn_mask, kind)


def _check_packing_layout(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    """Each piece one run of its segment id with positions 0, 1, 2, ...; position 0 on padding (id < 0).

    `block_causal_mask` builds the mask from position ids on CUDA and from segment ids on the CPU; the two
    agree only on this layout, and positions that do not restart at a piece would open it to the piece
    before it, another document, without any error.
    """
    seg = segment_ids.clamp(min=-1)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    column = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    run_start = torch.where(starts, column, 0).cummax(dim=1).values
    expected = torch.where(seg >= 0, column - run_start, 0)
    wrong = position_ids != expected
    if bool(wrong.any()):
        pos = tuple(int(i) for i in wrong.nonzero()[0])
        raise ValueError(
            f"position_ids{pos} = {int(position_ids[pos])}, expected {int(expected[pos])}: positions must restart "
            "at 0 where the segment id changes and rise by 1 within it (0 on padding), as packing writes them"
        )
    ordered = seg.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1 - (ordered[:, 0] < 0).long()
    runs = (starts & (seg >= 0)).sum(dim=1)
    if bool((runs != distinct).any()):
        row = int((runs != distinct).nonzero()[0, 0])
        raise ValueError(f"segment_ids row {row}: a segment id comes back after another; a piece must be one run")


def _check_next_token(input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None) -> None:
    """labels[t] must be input_ids[t + 1] wherever both lie in one segment and t has a label.

    This catches unshifted labels (the Hugging Face convention, where the model shifts), with which the
    loss falls to ~0 by copying the input and the smoke test would pass on broken data.
    """
    checked = labels[:, :-1] != IGNORE_INDEX
    if segment_ids is not None:
        checked &= segment_ids[:, :-1] == segment_ids[:, 1:]
    wrong = checked & (labels[:, :-1] != input_ids[:, 1:])
    if bool(wrong.any()):
        n_checked = int(checked.sum())
        unshifted = int((checked & (labels[:, :-1] == input_ids[:, :-1])).sum())
        pos = tuple(int(i) for i in wrong.nonzero()[0])
        raise ValueError(
            f"labels are not the next input token at {int(wrong.sum())} of {n_checked} positions (first at {pos}); "
            f"{unshifted} labels equal the input at the same position. Expected labels[t] == input_ids[t + 1]."
        )


@dataclass
class SmokeResult:
    """What one smoke training measured; `to_dict()` is JSON-serializable (the model is left out)."""

    device_type: str
    device_name: str
    precision: str
    steps: int
    losses: list[float]
    loss_window: int
    first_loss_mean: float
    last_loss_mean: float
    relative_loss_drop: float
    min_loss_drop: float
    val_loss_before: float | None
    val_loss_after: float | None
    val_batches: int
    loss_tokens: int
    tokens_per_s: float
    loop_s: float
    loader_wait_s: float
    loader_wait_share: float
    check_s: float
    passes: int
    batch_kinds: dict[str, int]
    peak_memory_bytes: int
    peak_memory_kind: str
    param_count: int
    non_embedding_param_count: int
    seed: int
    config: dict[str, Any]
    model: TinyGPT | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        # JSON has no NaN/inf: a non-finite figure becomes its string form ("nan", "inf").
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = str(value)
        out["losses"] = [v if math.isfinite(v) else str(v) for v in self.losses]
        return out


def resolve_device(device: str | torch.device | None, *, require_gpu: bool) -> torch.device:
    """CUDA when available, else CPU; `require_gpu` without a usable GPU is a `SmokeTrainingError`."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SmokeTrainingError(f"device {dev} asked for, but torch.cuda.is_available() is False")
    if require_gpu and dev.type != "cuda":
        why = "no CUDA GPU is available" if not torch.cuda.is_available() else f"device={device!r} was asked for"
        raise SmokeTrainingError(
            f"training.require_gpu is true but {why} (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); install a CUDA build of torch (make setup TORCH_INDEX=...) or set "
            "training.require_gpu: false"
        )
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _autocast(dev: torch.device) -> tuple[AbstractContextManager[Any], str]:
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16-autocast"
    return nullcontext(), "fp32"


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports KiB, macOS bytes


def _materialize_val(
    val_batches: Sequence[Batch] | Callable[[], Iterable[Batch]], limit: int, vocab_size: int, max_length: int
) -> list[ModelBatch]:
    """At most `limit` checked validation batches, kept so that before and after see the same ones."""
    source = val_batches() if callable(val_batches) else val_batches
    out: list[ModelBatch] = []
    for i, raw in enumerate(source):
        if i >= limit:
            break
        try:
            out.append(as_model_batch(raw, vocab_size=vocab_size, max_length=max_length))
        except ValueError as exc:
            raise SmokeTrainingError(f"validation batch {i}: {exc}") from exc
    return out


@torch.no_grad()
def evaluate(model: TinyGPT, batches: Sequence[ModelBatch], device: torch.device) -> float | None:
    """Mean loss per labelled token over `batches` (token-weighted), or None when there are none."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    autocast, _ = _autocast(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch in batches:
        b = batch.to(device)
        with autocast:
            logits = model(b.input_ids, b.position_ids, b.attention())
        n = batch.loss_tokens
        total += lm_loss(logits, b.labels).double() * n
        tokens += n
    model.train(was_training)
    return float(total) / tokens


def smoke_train(
    train_batches: Iterable[Batch],
    val_batches: Sequence[Batch] | Callable[[], Iterable[Batch]],
    cfg: TrainingConfig,
    *,
    max_length: int,
    device: str | torch.device | None = None,
    seed: int,
    vocab_size: int = GPT2_VOCAB,
) -> SmokeResult:
    """Train a fresh tiny GPT for `cfg.steps` steps; raise `SmokeTrainingError` unless the loss fell.

    `train_batches` is re-iterated when it ends before `cfg.steps` (so it must be re-iterable, e.g. a
    list or a loader, not a one-shot generator, when it holds fewer batches than steps). The first
    `cfg.eval_batches` of `val_batches` (a sequence, or a callable returning an iterable) are evaluated
    before and after training.
    """
    if cfg.steps < 2:
        raise ValueError(f"training.steps must be >= 2 to compare first and last losses, got {cfg.steps}")
    dev = resolve_device(device, require_gpu=cfg.require_gpu)
    mask_path(dev, with_positions=True)  # a bad $CORPUS_MASK_KERNEL fails before the model is built
    autocast, precision = _autocast(dev)
    model_cfg = GPTConfig.from_training(cfg, max_length=max_length, vocab_size=vocab_size)
    val = _materialize_val(val_batches, cfg.eval_batches, vocab_size, max_length)
    if not val:
        warnings.warn(
            "smoke_train: val_batches is empty, so there is no validation loss before/after training",
            stacklevel=2,
        )
    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):  # dropout draws from a seeded, private RNG state
        torch.manual_seed(seed)
        model = TinyGPT(model_cfg, seed=seed).to(dev)
        # fused AdamW is one kernel per step on CUDA; the CPU path is the reference for-each kernel.
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0, fused=dev.type == "cuda"
        )
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        val_before = evaluate(model, val, dev)
        model.train()
        step_losses: list[torch.Tensor] = []
        kinds: dict[str, int] = {}
        tokens = 0
        wait_s = 0.0
        check_s = 0.0
        passes = 1
        in_pass = 0
        iterator: Iterator[Batch] = iter(train_batches)
        t_loop = time.perf_counter()
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            try:
                raw = next(iterator)
            except StopIteration:
                if in_pass == 0:
                    raise SmokeTrainingError("train_batches yielded no batches") from None
                ended_after = in_pass
                iterator, passes, in_pass = iter(train_batches), passes + 1, 0
                try:
                    raw = next(iterator)
                except StopIteration:
                    raise SmokeTrainingError(
                        f"train_batches ended after {ended_after} batches at step {step} of {cfg.steps} and "
                        "yielded nothing when iterated again; pass a re-iterable (a list or a loader), not a "
                        "one-shot iterator"
                    ) from None
            t1 = time.perf_counter()
            wait_s += t1 - t0
            in_pass += 1
            try:
                batch = as_model_batch(raw, vocab_size=vocab_size, max_length=max_length)
            except ValueError as exc:
                raise SmokeTrainingError(f"train batch at step {step}: {exc}") from exc
            check_s += time.perf_counter() - t1
            kinds[batch.kind] = kinds.get(batch.kind, 0) + 1
            tokens += batch.loss_tokens
            b = batch.to(dev)
            with autocast:
                logits = model(b.input_ids, b.position_ids, b.attention())
            loss = lm_loss(logits, b.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step_losses.append(loss.detach())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        loop_s = time.perf_counter() - t_loop
        losses = torch.stack(step_losses).double().cpu().tolist()
        val_after = evaluate(model, val, dev)
    if dev.type == "cuda":
        peak, peak_kind = int(torch.cuda.max_memory_allocated(dev)), "cuda_max_memory_allocated"
    else:
        peak, peak_kind = _peak_rss_bytes(), "process_peak_rss"
    k = min(cfg.loss_window, cfg.steps // 2)
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k
    drop = (first - last) / first if first > 0 and math.isfinite(first) and math.isfinite(last) else float("nan")
    result = SmokeResult(
        device_type=dev.type,
        device_name=device_name(dev),
        precision=precision,
        steps=cfg.steps,
        losses=losses,
        loss_window=k,
        first_loss_mean=first,
        last_loss_mean=last,
        relative_loss_drop=drop,
        min_loss_drop=cfg.min_loss_drop,
        val_loss_before=val_before,
        val_loss_after=val_after,
        val_batches=len(val),
        loss_tokens=tokens,
        tokens_per_s=tokens / loop_s if loop_s > 0 else float("nan"),
        loop_s=loop_s,
        loader_wait_s=wait_s,
        loader_wait_share=wait_s / loop_s if loop_s > 0 else float("nan"),
        check_s=check_s,
        passes=passes,
        batch_kinds=kinds,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        param_count=model.param_count(),
        non_embedding_param_count=model.param_count(non_embedding=True),
        seed=seed,
        config=dataclasses.asdict(cfg),
        model=model,
    )
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise SmokeTrainingError(
            f"training loss is not finite at {len(bad)} of {cfg.steps} steps (first at step {bad[0]}: "
            f"{losses[bad[0]]}); lr {cfg.learning_rate}",
            result,
        )
    for name, value in (("before", val_before), ("after", val_after)):
        if value is not None and not math.isfinite(value):
            raise SmokeTrainingError(f"validation loss {name} training is not finite: {value}", result)
    if not drop >= cfg.min_loss_drop:
        raise SmokeTrainingError(
            f"training loss fell by {drop:.2%} (mean of first {k} steps {first:.4f} -> mean of last {k} "
            f"steps {last:.4f}), less than training.min_loss_drop = {cfg.min_loss_drop:.2%}",
            result,
        )
    return result


def loss_chart_png(
    losses: Sequence[float], title: str, *, val_before: float | None = None, val_after: float | None = None
) -> bytes:
    """A 480x240 PNG line chart of the per-step loss (matplotlib Agg, no pyplot global state)."""
    fig, ax = new_chart()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, [v if math.isfinite(v) else float("nan") for v in losses], lw=1.2, label="train")
    if val_before is not None and val_after is not None and steps:
        ax.plot([steps[0], steps[-1]], [val_before, val_after], "o--", ms=3, lw=0.8, label="validation")
        ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss (nats/token)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return png_bytes(fig)
