"""Sliding (input, target) windows over a flat token array, by index arithmetic.

Window i starts at token s = i * stride; its input is tokens[s : s + L] and its target tokens[s + 1 : s + L + 1],
with starts `range(0, n_tokens - L, stride)`: exactly the seed's `GPTDatasetV1`. Nothing is stored per
window. The seed keeps two tensors per window in Python lists: 5.0 GiB and 73-118 s to build at L=256,
stride=1 on 1M tokens (benchmarks/windows.py); here memory is the token array itself (2 MB as uint16) or a
read-only memory map of a shard file.

A batch is one fancy index into a read-only strided view of shape (windows, L + 1) over the same buffer
(row i = window i's L + 1 tokens, no copy), so each row is one contiguous copy: ~1 us for 8 x 257 uint16
tokens and ~8 us for 512, against ~4 us and ~200 us gathering `starts[:, None] + arange(L + 1)` element
by element. Construction is O(1) in the number of windows; the token range check is one min/max pass in
16M-token chunks, skipped when the dtype cannot exceed the vocabulary.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, default_collate

from corpus.tokenizer import N_VOCAB

logger = logging.getLogger("corpus.windows")

# Tokens per min/max pass of the range check: 32 MB of uint16, so temporaries stay bounded on huge memmaps.
RANGE_CHECK_CHUNK = 1 << 24

Window = tuple[torch.Tensor, torch.Tensor]
IndexLike = Sequence[int] | npt.NDArray[np.integer] | range | Iterable[int]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def window_count(n_tokens: int, max_length: int, stride: int) -> int:
    """len(range(0, n_tokens - max_length, stride)): the seed's number of windows, without the range."""
    max_length = _positive_int("max_length", max_length)
    stride = _positive_int("stride", stride)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an integer >= 0, got {n_tokens!r}")
    return max(0, -(-(int(n_tokens) - max_length) // stride))


def shard_token_ranges(n_tokens: int, max_length: int, stride: int, windows_per_shard: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) whose windows, shard after shard, are exactly the stream's windows, in order.

    Shard k holds windows [k*W, min((k+1)*W, total)): tokens from its first window's start, k*W*stride,
    to its last window's start + L + 1. Neighbouring shards share L + 1 - stride tokens when stride <= L.
    """
    windows_per_shard = _positive_int("windows_per_shard", windows_per_shard)
    total = window_count(n_tokens, max_length, stride)
    if total == 0:
        raise ValueError(
            f"n_tokens={n_tokens} is too few for one window of max_length={max_length}: "
            f"need at least max_length + 1 = {max_length + 1} tokens"
        )
    ranges = []
    for first in range(0, total, windows_per_shard):
        last = min(first + windows_per_shard, total) - 1
        ranges.append((first * stride, last * stride + max_length + 1))
    assert ranges[-1][1] <= n_tokens, f"last shard ends at {ranges[-1][1]}, past the stream's {n_tokens} tokens"
    return ranges


def warn_if_overlapping(max_length: int, stride: int) -> None:
    """Log the seed's memorisation warning when windows overlap (stride < max_length)."""
    if stride < max_length:
        logger.warning(
            "stride=%d < max_length=%d: windows overlap by %d tokens and each token is trained on up to %d times "
            "per epoch; memorisation risk grows with the overlap (rare strings such as keys and phone numbers "
            "are learnt verbatim). Use stride >= max_length unless data is scarce.",
            stride,
            max_length,
            max_length - stride,
            math.ceil(max_length / stride),
        )
    elif stride > max_length + 1:
        # Not a warning: the seed recommends strides up to 4 x max_length against verbatim leakage.
        logger.info(
            "stride=%d > max_length + 1 = %d: %d of every %d tokens are in no window (%.1f%% of the stream unused)",
            stride,
            max_length + 1,
            stride - max_length - 1,
            stride,
            100.0 * (stride - max_length - 1) / stride,
        )


def check_token_range(tokens: npt.NDArray[np.integer], vocab_size: int) -> None:
    """ValueError naming the first token outside [0, vocab_size) and its position."""
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return  # e.g. uint8 under a 50,257 vocabulary: nothing can be out of range
    for lo in range(0, tokens.shape[0], RANGE_CHECK_CHUNK):
        chunk = tokens[lo : lo + RANGE_CHECK_CHUNK]
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= vocab_size:
            bad = (chunk < 0) | (chunk >= vocab_size)
            position = int(np.argmax(bad))
            raise ValueError(
                f"token value {int(chunk[position])} at position {lo + position} is outside [0, {vocab_size})"
            )


def normalize_indices(indices: IndexLike, n: int) -> npt.NDArray[np.int64]:
    """Window indices as int64, negatives counted from the end like Python; IndexError names the first bad one."""
    if isinstance(indices, range):
        idx = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
    elif isinstance(indices, np.ndarray | torch.Tensor | Sequence):
        idx = np.asarray(indices)
    else:
        idx = np.fromiter(indices, dtype=np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise IndexError(
            f"window indices must be a flat sequence of integers, got dtype {idx.dtype}, shape {idx.shape}"
        )
    # A DataLoader passes a list of B Python ints once per batch: Python's min/max take ~0.5 us on it at
    # B=8, numpy's two reductions and masks below ~5 us.
    lo, hi = (min(indices), max(indices)) if isinstance(indices, list) else (int(idx.min()), int(idx.max()))
    if lo >= 0 and hi < n:
        return idx.astype(np.int64, copy=False)
    out = idx.astype(np.int64)
    out = np.where(out < 0, out + n, out)
    bad = (out < 0) | (out >= n)
    if bad.any():
        raise IndexError(f"window index {int(idx[np.argmax(bad)])} out of range for {n} windows")
    return out


class WindowBatch(Sequence[Window]):
    """B windows fetched at once: `inputs` and `targets` are (B, L) int64 tensors.

    torch's DataLoader hands what `__getitems__` returns to its collate_fn. As a sequence this yields
    per-sample (input, target) rows, so `default_collate` stacks it into the seed's `[inputs, targets]`;
    `collate_windows` returns the same two tensors without the B row views and the copy.
    """

    __slots__ = ("_pairs", "inputs", "targets")

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        assert inputs.shape == targets.shape, f"inputs {tuple(inputs.shape)} vs targets {tuple(targets.shape)}"
        self.inputs = inputs
        self.targets = targets
        self._pairs: list[Window] | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @overload
    def __getitem__(self, i: int) -> Window: ...
    @overload
    def __getitem__(self, i: slice) -> list[Window]: ...
    def __getitem__(self, i: int | slice) -> Window | list[Window]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = operator.index(i)
        if not -n <= j < n:
            raise IndexError(f"sample {i} out of range for a batch of {n}")
        return self.inputs[j], self.targets[j]

    def __iter__(self) -> Iterator[Window]:
        # default_collate iterates twice (a length check, then zip), and a row view costs ~1 us: make them once.
        if self._pairs is None:
            self._pairs = list(zip(self.inputs.unbind(0), self.targets.unbind(0), strict=True))
        return iter(self._pairs)

    def __repr__(self) -> str:
        return f"WindowBatch(batch={len(self)}, max_length={self.inputs.shape[1]})"


def collate_windows(batch: Any) -> Any:
    """`default_collate` with a fast path for a `WindowBatch`: the seed's `[inputs, targets]` list as is."""
    if isinstance(batch, WindowBatch):
        return [batch.inputs, batch.targets]
    return default_collate(batch)


class SlidingWindowDataset(Dataset[Window]):
    """The seed's windows over a flat token array (any int dtype, a list, or a memory map), computed on access."""

    def __init__(
        self,
        tokens: npt.NDArray[np.integer] | Sequence[int],
        max_length: int,
        stride: int,
        vocab_size: int = N_VOCAB,
        *,
        check_tokens: bool = True,
        warn_overlap: bool = True,
    ) -> None:
        self.max_length = _positive_int("max_length", max_length)
        self.stride = _positive_int("stride", stride)
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        array = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            raise ValueError(f"tokens must have an integer dtype, got {array.dtype}")
        n = int(array.shape[0])
        if n < self.max_length + 1:
            raise ValueError(
                f"n_tokens={n} is too few for one window of max_length={self.max_length}: "
                f"need at least max_length + 1 = {self.max_length + 1} tokens"
            )
        if check_tokens:
            check_token_range(array, self.vocab_size)
        self._tokens = array
        self._n_windows = window_count(n, self.max_length, self.stride)
        self._file: tuple[str, str] | None = None  # (path, dtype) when opened by from_file: pickled by reference
        self._rows = self._strided_rows()
        if warn_overlap:
            warn_if_overlapping(self.max_length, self.stride)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        max_length: int,
        stride: int,
        dtype: npt.DTypeLike = np.uint16,
        *,
        vocab_size: int = N_VOCAB,
        check_tokens: bool = True,
        warn_overlap: bool = True,
    ) -> SlidingWindowDataset:
        """Windows over a flat binary token file, memory-mapped read-only (pages load on access)."""
        file = Path(path)
        dt = np.dtype(dtype).newbyteorder("<")  # shard files are little-endian whatever the host
        if dt.kind not in "iu":
            raise ValueError(f"{file}: dtype must be an integer type, got {dt}")
        if not file.is_file():
            raise ValueError(f"token file {file} does not exist")
        size = file.stat().st_size
        if size == 0:
            raise ValueError(f"{file}: token file is empty (n_tokens=0)")
        if size % dt.itemsize:
            raise ValueError(f"{file}: has {size} bytes, not a multiple of {dt} ({dt.itemsize} bytes)")
        tokens = np.memmap(file, dtype=dt, mode="r")
        try:
            ds = cls(tokens, max_length, stride, vocab_size, check_tokens=check_tokens, warn_overlap=warn_overlap)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from exc
        ds._file = (str(file), dt.str)
        return ds

    def _strided_rows(self) -> npt.NDArray[np.integer]:
        # Row i is window i's L + 1 tokens: a read-only view of the token buffer, no memory of its own.
        step = self._tokens.strides[0]
        return np.lib.stride_tricks.as_strided(
            self._tokens,
            shape=(self._n_windows, self.max_length + 1),
            strides=(step * self.stride, step),
            writeable=False,
        )

    @property
    def tokens(self) -> npt.NDArray[np.integer]:
        return self._tokens

    @property
    def n_tokens(self) -> int:
        return int(self._tokens.shape[0])

    def __len__(self) -> int:
        return self._n_windows

    def start(self, index: int) -> int:
        """Token offset of window `index` (negative counts from the end)."""
        return int(normalize_indices([operator.index(index)], self._n_windows)[0]) * self.stride

    def __getitem__(self, index: int) -> Window:
        s = self.start(index)
        # astype copies: input and target never share memory, so masking one in place cannot touch the other.
        return (
            torch.from_numpy(self._tokens[s : s + self.max_length].astype(np.int64)),
            torch.from_numpy(self._tokens[s + 1 : s + self.max_length + 1].astype(np.int64)),
        )

    def rows(self, indices: IndexLike) -> npt.NDArray[np.integer]:
        """(B, L + 1) token rows of the given windows, in the token dtype: one fancy index, one copy."""
        return self._rows[normalize_indices(indices, self._n_windows)]

    def get_batch(self, indices: IndexLike) -> Window:
        """Stacked (inputs, targets), int64 (B, max_length), each contiguous and with its own memory."""
        rows = self.rows(indices)
        return (
            torch.from_numpy(rows[:, :-1].astype(np.int64, order="C")),
            torch.from_numpy(rows[:, 1:].astype(np.int64, order="C")),
        )

    def __getitems__(self, indices: list[int]) -> WindowBatch:
        return WindowBatch(*self.get_batch(indices))

    def __repr__(self) -> str:
        source = self._file[0] if self._file else f"array[{self._tokens.dtype}]"
        return (
            f"SlidingWindowDataset({source}, n_tokens={self.n_tokens}, max_length={self.max_length}, "
            f"stride={self.stride}, windows={self._n_windows})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The strided view would pickle as a full (windows, L + 1) copy, and a memory map as its whole
        # content; DataLoader workers under spawn get the file's path instead and map it themselves.
        state = dict(self.__dict__)
        del state["_rows"]
        if self._file is not None:
            del state["_tokens"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_tokens" not in state:
            path, dtype = state["_file"]
            self._tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
            # The strided view trusts _n_windows: a file that shrank since pickling would be read out of bounds.
            n = window_count(self._tokens.shape[0], self.max_length, self.stride)
            assert n == self._n_windows, f"{path} changed since pickling: {n} windows, expected {self._n_windows}"
        self._rows = self._strided_rows()
