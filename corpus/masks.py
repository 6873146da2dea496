"""The block-diagonal causal attention mask of packed rows, on the CPU or an accelerator.

Packed rows (corpus.packing) carry `segment_ids` (-1 on padding) and `position_ids` restarting at 0 per
piece; `block_causal_mask` turns a batch of them into the [B, 1, L, L] bool mask that
`torch.nn.functional.scaled_dot_product_attention` reads (True = may attend): same piece and not in the
future, and a pad attends to itself only (a query with no allowed key makes SDPA return NaN).
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings

import numpy as np
import torch


@functools.lru_cache(maxsize=8)
def _causal(length: int, device: torch.device) -> torch.Tensor:
    """The [L, L] lower-triangular bool matrix, made once per (length, device) and never written to."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril_()


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool, True = may attend: same piece and not in the future; a pad attends to itself only.

    Runs on `segment_ids`' device, so a training step or the loader can build the mask on the accelerator.
    Padding gets its diagonal because a query with no allowed key makes scaled_dot_product_attention
    return NaN. On a CUDA GPU with Triton: one kernel that writes each tile once (corpus._mask_kernel;
    $CORPUS_MASK_KERNEL=torch turns it off). Elsewhere on a GPU: one broadcast comparison and one in-place AND
    with a cached causal matrix. On the CPU, where those full passes cost 50-160 ms at B=8, L=2048, the
    pieces' triangles are copied block by block instead (`_block_fill`, ~5 ms), the same mask whenever a
    row's segment ids are contiguous runs, as packing writes them.
    """
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, L], got shape {tuple(segment_ids.shape)}")
    if segment_ids.dtype not in (torch.int32, torch.int64):
        segment_ids = segment_ids.long()
    if segment_ids.device.type == "cpu":
        filled = _block_fill(segment_ids.numpy())
        if filled is not None:
            return torch.from_numpy(filled)[:, None]
    elif segment_ids.device.type == "cuda" and os.environ.get(ENV_MASK_KERNEL, "triton") != "torch":
        mask = _kernel_mask(segment_ids)
        if mask is not None:
            return mask[:, None]
    return _torch_mask(segment_ids)[:, None]


ENV_MASK_KERNEL = "CORPUS_MASK_KERNEL"
_KERNEL_STATE: dict[str, str] = {}  # device -> "checked" | "off"


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
    cells a row: at B=8, L=2048 this took 5 ms with one thread against 50-160 ms for the full passes.
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
