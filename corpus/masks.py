"""The block-diagonal causal attention mask of packed rows, on the CPU or an accelerator.

Packed rows (corpus.packing) carry `segment_ids` (-1 on padding) and `position_ids` restarting at 0 per
piece; `block_causal_mask` turns a batch of them into the [B, 1, L, L] bool mask that
`torch.nn.functional.scaled_dot_product_attention` reads (True = may attend): same piece and not in the
future, and a pad attends to itself only (a query with no allowed key makes SDPA return NaN).

Paths, chosen per call by device, by whether position ids are given and by $CORPUS_MASK_KERNEL
(`MASK_PATHS`):

- "positions" (CUDA default with position ids): in packed rows a piece is a contiguous run whose
  positions rise 0, 1, 2, ... and a pad has position 0, so token i of a row may see token j iff
  0 <= i - j <= position_ids[i]. That is one broadcast comparison, `distances <= position_ids[:, None, :,
  None]`, against a cached [L, L] int16 matrix (i - j on and below the diagonal, int16 max above): one
  kernel launch. On a GPU the loader is host-bound (~350 us per batch of 8 at L=2048 on an H100, GPU
  work being asynchronous), so launches matter more than kernels: Triton's launch alone cost ~54 us of
  host time, as much as its kernel's device time.
- "triton" (CUDA default without position ids): one Triton kernel over the segment ids
  (corpus._mask_kernel), checked against "torch" on first use per device.
- "torch": the segment formula in three torch ops (a segment of its own per pad, equality, causal AND).
- "block_fill" (the CPU's default; not a value of the variable): numpy copies of each piece's triangle
  into calloc'ed zeros, touching sum(l_i^2) <= L^2 cells a row. At B=8, one thread, it took 0.26 / 2.7 ms
  at L=1024 / 2048 (0.5 / 4.0 ms with a first read of the whole mask) against 2.9 / 44 ms for "positions"
  (the CPU casts the int16 matrix to int64 first) and 2.9 / 26 ms for "torch", so the CPU keeps it
  whether or not position ids are given, unless a path is forced.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings

import numpy as np
import torch

ENV_MASK_KERNEL = "CORPUS_MASK_KERNEL"
# auto: the defaults above. positions / torch: that path on any device (positions only when position ids
# are given, else auto). triton: the Triton kernel on CUDA, the default elsewhere.
MASK_PATHS = ("auto", "positions", "triton", "torch")
_KERNEL_STATE: dict[str, str] = {}  # device -> "checked" | "off"


@functools.lru_cache(maxsize=8)
def _causal(length: int, device: torch.device) -> torch.Tensor:
    """The [L, L] lower-triangular bool matrix, made once per (length, device) and never written to."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril_()


def _distance_dtype(length: int) -> torch.dtype:
    """int16 while i - j <= L - 1 stays below int16 max = 32767 (8 MiB at L=2048, a quarter of int64's
    bytes to read per batch row); int32 beyond."""
    return torch.int16 if length <= torch.iinfo(torch.int16).max else torch.int32


@functools.lru_cache(maxsize=8)
def _distances(length: int, device: torch.device) -> torch.Tensor:
    """[L, L]: i - j where j <= i, the dtype's max above the diagonal; made once per (length, device).

    The max above the diagonal exceeds any position a consistent batch has (< L): the future stays closed.
    """
    dtype = _distance_dtype(length)
    index = torch.arange(length, device=device, dtype=torch.int32)
    dist = index[:, None] - index[None, :]
    return dist.masked_fill_(dist < 0, torch.iinfo(dtype).max).to(dtype)


def mask_path(device: torch.device, with_positions: bool) -> str:
    """The path `block_causal_mask` takes on `device` ("positions", "triton", "torch" or "block_fill")."""
    forced = os.environ.get(ENV_MASK_KERNEL, "auto").strip().lower() or "auto"
    if forced not in MASK_PATHS:
        raise ValueError(f"${ENV_MASK_KERNEL}={forced!r}: expected one of {', '.join(MASK_PATHS)}")
    if forced == "torch" or (forced == "positions" and with_positions):
        return forced
    if device.type == "cpu":
        return "block_fill"
    if device.type == "cuda" and (forced == "triton" or not with_positions):
        return "triton"
    return "positions" if with_positions else "torch"


def block_causal_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, L, L] bool, True = may attend: same piece and not in the future; a pad attends to itself only.

    Runs on `segment_ids`' device, so a training step or the loader can build the mask on the accelerator;
    the module docstring lists the paths and their costs. `position_ids` ([B, L] integers, same device)
    let CUDA build the mask in one comparison, `0 <= i - j <= position_ids[b, i]`, read from positions
    alone (segment ids unread). That equals the segment mask only for the packing layout: each piece one
    contiguous run of its segment id, its positions 0, 1, ..., l - 1, and position 0 on every pad. Nothing
    checks this on the device (it would cost a host sync; corpus.train checks batches on the host).
    Positions that do not restart at a piece let it see into the piece before (across documents); a
    restart inside a piece hides its earlier tokens; a pad with position p > 0 sees p tokens before it; a
    negative position leaves a query no key (NaN). The future stays closed for positions below 32767
    (int16 max, L <= 32767).
    """
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, L], got shape {tuple(segment_ids.shape)}")
    if position_ids is not None:
        if position_ids.shape != segment_ids.shape or position_ids.device != segment_ids.device:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} on {position_ids.device} must match segment_ids "
                f"{tuple(segment_ids.shape)} on {segment_ids.device}"
            )
        if position_ids.dtype == torch.bool or position_ids.is_floating_point() or position_ids.is_complex():
            raise ValueError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
    path = mask_path(segment_ids.device, position_ids is not None)
    if path == "positions":
        assert position_ids is not None
        return _position_mask(position_ids)
    if segment_ids.dtype not in (torch.int32, torch.int64):
        segment_ids = segment_ids.long()
    if path == "block_fill":
        filled = _block_fill(segment_ids.numpy())
        if filled is not None:
            return torch.from_numpy(filled)[:, None]
    elif path == "triton":
        mask = _kernel_mask(segment_ids)
        if mask is not None:
            return mask[:, None]
    return _torch_mask(segment_ids)[:, None]


def _position_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] = distances <= positions: one kernel, no host sync.

    int16 distances against int64 positions stay one op: on CUDA the comparison kernel casts while it
    loads; only CPU TensorIterator makes a promoted copy first (an extra aten::to, ~42 ms instead of ~23 ms
    at B=8, L=2048), which is one reason the CPU uses the block fill instead.
    """
    batch, length = position_ids.shape
    return torch.le(_distances(length, position_ids.device), position_ids.reshape(batch, 1, length, 1))


def _torch_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    length = segment_ids.shape[1]
    # Give each pad a segment of its own (-1 - column), so "same segment" alone excludes pad-to-pad.
    seg = torch.where(segment_ids >= 0, segment_ids, _pad_ids(length, segment_ids.device, segment_ids.dtype))
    mask = seg[:, :, None] == seg[:, None, :]
    mask &= _causal(length, segment_ids.device)
    return mask


def _kernel_mask(segment_ids: torch.Tensor) -> torch.Tensor | None:
    """The Triton kernel's [B, L, L] mask, checked against `_torch_mask` on first use; None to fall back."""
    device = str(segment_ids.device)
    if _KERNEL_STATE.get(device) == "off":
        return None
    try:
        from corpus._mask_kernel import block_causal_mask_triton

        mask = block_causal_mask_triton(segment_ids)
    except ImportError:
        _KERNEL_STATE[device] = "off"  # no Triton: the torch formula, silently
        return None
    except Exception as exc:  # a compile or launch failure: say so once, then use torch
        _KERNEL_STATE[device] = "off"
        warnings.warn(f"block_causal_mask: Triton kernel failed on {device} ({exc}); using torch", stacklevel=3)
        return None
    if _KERNEL_STATE.get(device) != "checked":
        if not torch.equal(mask, _torch_mask(segment_ids)):
            _KERNEL_STATE[device] = "off"
            warnings.warn(
                f"block_causal_mask: Triton kernel disagrees with torch on {device}; using torch", stacklevel=3
            )
            return None
        _KERNEL_STATE[device] = "checked"
    return mask


@functools.lru_cache(maxsize=8)
def _pad_ids(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """-1 - column: a segment id of its own for a pad at each position (cached: fewer kernels per batch)."""
    return -1 - torch.arange(length, device=device, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _tri(length: int) -> np.ndarray:
    tri = np.tri(length, dtype=bool)
    tri.flags.writeable = False
    return tri


def _block_fill(segments: np.ndarray) -> np.ndarray | None:
    """[B, L, L] block-diagonal causal mask from segment ids by block copies; None if a piece's ids are not
    one contiguous run (then only the full comparison is right).

    np.zeros gets zeroed pages from calloc and one triangle copy per piece touches sum(l_i^2) <= L^2
    cells a row (the module docstring has the timings).
    """
    batch, length = segments.shape
    mask = np.zeros((batch, length, length), dtype=bool)
    tri = _tri(length)
    for b in range(batch):
        row = segments[b]
        bounds = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), length]
        seen: set[int] = set()
        for lo, hi in itertools.pairwise(bounds):
            piece = int(row[lo])
            if piece < 0:
                idx = np.arange(lo, hi)
                mask[b, idx, idx] = True  # padding: each pad attends to itself only
                continue
            if piece in seen:
                return None
            seen.add(piece)
            mask[b, lo:hi, lo:hi] = tri[: hi - lo, : hi - lo]
    return mask
