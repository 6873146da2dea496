"""Training-side data loading: the seed-compatible DataLoader, verified window shards, a resumable loader.

- `create_dataloader` is a drop-in for the seed's `create_dataloader_v1`: same GPT-2 tokens, same
  windows, a torch DataLoader over a `SlidingWindowDataset`, so batches (and, with shuffle=True, the
  RandomSampler's draws from torch's global RNG) are identical, at 2 bytes per token instead of the
  seed's ~5 KiB per window at L=256 (two int64 tensors of 2 KiB plus their Python objects).
- `open_window_shards` opens a `training_windows` lake version: every shard file listed in the manifest
  is re-hashed (sha256, ~1-2 GB/s) before anything is served, token and window counts are checked, and
  the shards are memory-mapped, so a tampered or truncated shard is refused instead of trained on.
  `open_packed_shards` does the same for a `packed_sequences` version (all splits' shard files re-hashed).
- `ShardLoader` iterates any batched dataset in a permutation fixed by (seed, epoch), split disjointly
  across data-parallel ranks, optionally masking 1-3 target tokens per sample (memorisation control), and
  can resume at exactly the next unseen batch from `state_dict()`. Batches are gathered with one
  vectorised fancy-index per shard; the only Python loops are over batches and shards, never samples.
  With `device=` it hands batches over on that device (pinned, non-blocking copies to CUDA), and with
  `build_mask=True` it builds the packed rows' block-diagonal causal mask there
  (corpus.masks.block_causal_mask of `segment_ids` and `position_ids`). On CUDA that is one broadcast
  comparison of the position ids against a cached distance matrix, a single launch, because the loop is
  host-bound: the Triton kernel over segment ids (~54 us on an H100 at B=8, L=2048) cost as much host time
  to launch, and the mask cost 32% of the loader's throughput with it (benchmarks/gpu.py). On the CPU the
  pieces' triangles are copied block by block (benchmarks/packing.py).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from corpus.lake import LakeError, Version, read_version
from corpus.layout import PACKED_FILES, packed_shards
from corpus.masks import block_causal_mask, mask_path
from corpus.packing import PackedDataset, open_packed
from corpus.tokenizer import ENDOFTEXT, get_encoding
from corpus.windows import (
    IndexLike,
    SlidingWindowDataset,
    WindowBatch,
    collate_windows,
    normalize_indices,
    warn_if_overlapping,
    window_count,
)

logger = logging.getLogger("corpus.loader")

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
SHARD_KEYS = ("path", "split", "tokens", "windows", "first_window")
Batch = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def create_dataloader(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's `create_dataloader_v1`, batch for batch, without a tensor per window."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ids = get_encoding("gpt2").encode(txt, allowed_special={ENDOFTEXT})
    # GPT-2's 50,257 ids fit uint16 (max 65,535): 2 bytes per token instead of a Python int's 28.
    tokens = np.asarray(ids, dtype=np.uint16)
    dataset = SlidingWindowDataset(tokens, max_length, stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_windows,
    )


class WindowShards(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split of a `training_windows` version: its shards' windows, concatenated in manifest order."""

    def __init__(self, shards: Sequence[SlidingWindowDataset], *, split: str, version: Version | None = None) -> None:
        if not shards:
            raise ValueError(f"split {split!r} has no shards")
        self.shards = list(shards)
        self.split = split
        self.version = version
        self.max_length = self.shards[0].max_length
        self.stride = self.shards[0].stride
        for shard in self.shards:
            assert (shard.max_length, shard.stride) == (self.max_length, self.stride), (
                f"{shard!r} differs from max_length={self.max_length}, stride={self.stride}"
            )
        # offsets[k] is the global index of shard k's first window; offsets[-1] the total.
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        where = self.version.path if self.version is not None else "memory"
        return f"WindowShards({where}, split={self.split!r}, shards={len(self.shards)}, windows={len(self)})"

    def locate(self, index: int) -> tuple[int, int, int]:
        """(shard number, window index within the shard, token offset within the shard file) of a window."""
        (i,) = normalize_indices([index], len(self))
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        local = int(i - self.offsets[shard])
        return shard, local, local * self.stride

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, local, _ = self.locate(index)
        return self.shards[shard][local]

    def get_batch(self, indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (inputs, targets), int64 [B, max_length]: one fancy-index per shard the batch touches."""
        idx = normalize_indices(indices, len(self))
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        if len(idx) and (which == which[0]).all():  # the common case: the whole batch in one shard
            return self.shards[which[0]].get_batch(idx - self.offsets[which[0]])
        inputs = torch.empty((len(idx), self.max_length), dtype=torch.int64)
        targets = torch.empty((len(idx), self.max_length), dtype=torch.int64)
        for shard in np.unique(which):
            rows = np.flatnonzero(which == shard)
            x, y = self.shards[shard].get_batch(idx[rows] - self.offsets[shard])
            sel = torch.from_numpy(rows)
            inputs[sel] = x
            targets[sel] = y
        return inputs, targets

    def __getitems__(self, indices: list[int]) -> WindowBatch:
        return WindowBatch(*self.get_batch(indices))


def _manifest_field(extra: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in extra:
        raise LakeError(f"{path}: manifest extra has no {key!r} field (a training_windows manifest needs it)")
    return extra[key]


def open_window_shards(manifest_path: str | Path, split: str = "train", verify: bool = True) -> WindowShards:
    """A split of a `training_windows` version as a Dataset, its shard files re-hashed first when verify.

    The manifest's `extra` holds max_length, stride, dtype, vocab_size and `shards`, a list of
    {path, split, tokens, windows, first_window}; first_window counts windows within the split, in list order.
    """
    version = read_version(manifest_path)
    where = version.manifest_path
    extra = version.extra
    max_length = _manifest_field(extra, "max_length", where)
    stride = _manifest_field(extra, "stride", where)
    dtype_name = _manifest_field(extra, "dtype", where)
    vocab_size = _manifest_field(extra, "vocab_size", where)
    entries = _manifest_field(extra, "shards", where)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LakeError(f"{where}: extra.shards must be a list of objects, got {type(entries).__name__}")
    for number, entry in enumerate(entries):
        missing = [key for key in SHARD_KEYS if key not in entry]
        if missing:
            raise LakeError(f"{where}: extra.shards[{number}] has no {', '.join(map(repr, missing))}")
    splits = sorted({e["split"] for e in entries})
    chosen = [e for e in entries if e["split"] == split]
    if not chosen:
        raise ValueError(f"split {split!r} is not in {where} (splits: {', '.join(splits) or 'none'})")
    try:
        dtype = np.dtype(dtype_name).newbyteorder("<")
    except TypeError as exc:
        raise LakeError(f"{where}: extra.dtype {dtype_name!r} is not a numpy dtype") from exc
    if verify:
        # Every shard of the version, not only this split's: a version is verified as a whole, before any
        # byte of it is served.
        version.verify_files([e["path"] for e in entries])
    shards = []
    expected_first = 0
    for entry in chosen:
        path = version.file(entry["path"])
        size = path.stat().st_size if path.is_file() else None
        if size != entry["tokens"] * dtype.itemsize:
            raise LakeError(
                f"{path}: {size} bytes, but the manifest says {entry['tokens']} tokens of {dtype} "
                f"({entry['tokens'] * dtype.itemsize} bytes)"
            )
        if entry["first_window"] != expected_first:
            raise LakeError(
                f"{path}: manifest first_window {entry['first_window']}, but the earlier {split} shards "
                f"hold {expected_first} windows"
            )
        try:
            shard = SlidingWindowDataset.from_file(
                path, max_length, stride, dtype, vocab_size=vocab_size, warn_overlap=False
            )
        except ValueError as exc:  # from_file names the shard; a bad shard is a lake problem, not bad input
            raise LakeError(f"{exc} (shard of {where})") from exc
        if len(shard) != entry["windows"]:
            raise LakeError(
                f"{path}: {entry['tokens']} tokens make {len(shard)} windows of max_length={max_length}, "
                f"stride={stride}, but the manifest says {entry['windows']}"
            )
        assert len(shard) == window_count(entry["tokens"], max_length, stride), f"{path}: window count drifted"
        shards.append(shard)
        expected_first += len(shard)
    warn_if_overlapping(max_length, stride)
    return WindowShards(shards, split=split, version=version)


def open_packed_shards(
    manifest: str | Path | Version, split: str = "train", *, verify: bool = True, with_mask: bool = False
) -> PackedDataset:
    """A split of a `packed_sequences` version as one PackedDataset (its shards in row order).

    `manifest` is the version's manifest.json path or an opened Version. With `verify` every packed file
    of the version, all splits, is re-hashed first (as `open_window_shards` does): a version is verified
    as a whole before any byte of it is served. Without `with_mask` batches carry no attention mask: the
    training step or `ShardLoader(build_mask=True)` builds it where the batch is.
    """
    version = manifest if isinstance(manifest, Version) else read_version(manifest)
    splits = version.extra.get("splits")
    if not isinstance(splits, Mapping):
        raise LakeError(f"{version.manifest_path}: manifest extra has no 'splits' (not a packed_sequences manifest)")
    shards = packed_shards(version, split)
    if not shards:
        have = [name for name in splits if packed_shards(version, name)]
        raise ValueError(
            f"split {split!r} has no packed rows in {version.manifest_path} "
            f"(splits with rows: {', '.join(have) or 'none'})"
        )
    if verify:
        every = [shard["dir"] for name in splits for shard in packed_shards(version, name)]
        version.verify_files([f"{directory}/{name}.npy" for directory in every for name in PACKED_FILES])
    dataset = open_packed([version.path / shard["dir"] for shard in shards], with_mask=with_mask)
    dataset.version = version
    dataset.split = split
    return dataset


class BatchedDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitems__(self, indices: list[int]) -> Any: ...


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: a bijective 64-bit hash, vectorised (uint64 arithmetic wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@functools.lru_cache(maxsize=8)
def _position_hashes(length: int) -> npt.NDArray[np.uint64]:
    return _mix64(np.arange(1, length + 1, dtype=np.uint64))


def mask_positions(
    seed: int,
    epoch: int,
    sample_indices: npt.NDArray[np.int64],
    length: int,
    lo: int,
    hi: int,
    eligible: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.bool_]:
    """[B, length] mask with lo..hi True per row, a function of (seed, epoch, sample index) only.

    A counter-based hash instead of one RNG per sample keeps it vectorised and independent of batch
    composition, rank and resume point: sample i is masked the same way wherever it is served. Each row's
    positions are ranked by their hash and the first lo..hi are masked; only the hi smallest are found
    (argpartition, O(L) per row, not a sort). With `eligible` [B, length], positions where it is False
    (targets that are already -100: padding, piece ends) are never chosen, so a row has min(count,
    eligible positions) masked and the mask always removes real targets. Rows whose positions are all
    eligible get the same mask as without `eligible`.
    """
    assert 0 <= lo <= hi <= length, f"mask range {lo}..{hi} for length {length}"
    n = len(sample_indices)
    base = _mix64(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(epoch))
    keys = _mix64(base ^ (_mix64(sample_indices.astype(np.uint64) + np.uint64(1)) * _GOLDEN))
    counts = lo + (keys % np.uint64(hi - lo + 1)).astype(np.int64)
    mask = np.zeros((n, length), dtype=bool)
    if hi == 0 or n == 0:
        return mask
    # Distinct per row: _mix64 is a bijection and the XOR-ed position hashes are distinct.
    position_keys = _mix64(keys[:, None] ^ _position_hashes(length)[None, :])
    if eligible is not None:
        assert eligible.shape == (n, length), f"eligible {eligible.shape} for {n} rows of {length}"
        position_keys[~eligible] = np.iinfo(np.uint64).max  # ranked last; excluded below
    if hi < length:
        smallest = np.argpartition(position_keys, hi - 1, axis=1)[:, :hi]
    else:
        smallest = np.broadcast_to(np.arange(length), (n, length))
    by_key = np.argsort(np.take_along_axis(position_keys, smallest, axis=1), axis=1)
    order = np.take_along_axis(smallest, by_key, axis=1)  # [B, hi]: each row's hi first positions, in order
    chosen = np.arange(hi)[None, :] < counts[:, None]
    if eligible is not None:
        chosen &= np.take_along_axis(eligible, order, axis=1)
    rows = np.broadcast_to(np.arange(n)[:, None], (n, hi))
    mask[rows[chosen], order[chosen]] = True
    return mask


class ShardLoader:
    """Deterministic, resumable, rank-sharded batches over a dataset with `__len__` and `__getitems__`.

    Epoch e serves a permutation of all samples fixed by (seed, e) (or 0..n-1 without shuffle); rank r of
    world_size gets every world_size-th sample of it, so ranks are disjoint and together complete. Batches
    come from `dataset.get_batch(indices)` when it exists, else `dataset.__getitems__(indices)`, which may
    return stacked `(inputs, targets)`, a dict of stacked tensors, or a list of samples (then collated).
    Iterating continues the current epoch from its next unseen batch; once an epoch is done, the next
    iteration starts epoch + 1. `last_indices` holds the dataset indices of the batch last served.
    `device` moves every batch there (pinned and non-blocking for CUDA); `build_mask` adds a packed batch's
    `attention_mask` (corpus.masks.block_causal_mask of its `segment_ids` and, when it has them, its
    `position_ids`) on that device.
    """

    def __init__(
        self,
        dataset: BatchedDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        mask_tokens: tuple[int, int] | None = None,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        build_mask: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        if mask_tokens is not None:
            lo, hi = mask_tokens
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
                raise ValueError(f"mask_tokens must be (lo, hi) with 0 <= lo <= hi and hi >= 1, got {mask_tokens!r}")
            mask_tokens = (lo, hi)
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.mask_tokens = mask_tokens
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        self.build_mask = bool(build_mask)
        if self.build_mask:  # a bad $CORPUS_MASK_KERNEL fails here, not at the first batch
            mask_path(self.device or torch.device("cpu"), isinstance(dataset, PackedDataset))
        # Copies to a GPU come from pinned memory so that they can overlap with compute (non_blocking).
        on_gpu = self.device is not None and self.device.type == "cuda"
        self.pin_memory = (pin_memory or on_gpu) and torch.cuda.is_available()
        self.epoch = 0
        self.next_batch = 0
        self._restored = False  # load_state_dict ran and no batch or set_epoch came since
        self.last_indices: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._cache: tuple[int, npt.NDArray[np.int64], int] | None = None
        counts = [len(range(r, self.num_samples, world_size)) for r in range(world_size)]
        per_rank = [self._batches_for(c, min(counts)) for c in counts]
        self._most_batches = max(per_rank)  # of any rank, every epoch: a state another rank saved may be there
        if 0 in per_rank:  # on every rank: one rank without batches would leave the others' collectives waiting
            empty = per_rank.index(0)
            raise ValueError(
                f"no batches: {self.num_samples} samples over world_size={world_size} ranks give rank {empty} "
                f"{counts[empty]} samples, fewer than batch_size={batch_size} with drop_last={drop_last}"
            )
        if len(set(per_rank)) > 1:
            logger.warning(
                "ranks serve %d to %d batches per epoch (%d samples over %d ranks, drop_last=False): a rank with "
                "fewer batches leaves data-parallel collectives waiting; use drop_last=True for equal steps",
                min(per_rank),
                max(per_rank),
                self.num_samples,
                world_size,
            )

    def _batches_for(self, count: int, fewest: int) -> int:
        # drop_last: every rank stops at the same full-batch count, so data-parallel steps stay in lockstep.
        return fewest // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __len__(self) -> int:
        """Batches this rank serves per epoch."""
        return self._rank_order(self.epoch)[1]

    def set_epoch(self, epoch: int, *, restart: bool = False) -> None:
        """Serve epoch `epoch` from its first batch at the next iteration.

        One exception, for the `DistributedSampler` pattern (`loader.set_epoch(epoch)` before each epoch's
        loop): right after `load_state_dict`, setting the restored epoch keeps its place, so the resumed
        loop serves the unseen batches instead of the epoch's first ones again (`restart=True` replays it).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        keep = self._restored and epoch == self.epoch and not restart
        self._restored = False
        if not keep:
            self.epoch = epoch
            self.next_batch = 0

    def epoch_order(self, epoch: int) -> npt.NDArray[np.int64]:
        """All sample indices of epoch `epoch`, in serving order, before the split across ranks."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).astype(np.int64)

    def _rank_order(self, epoch: int) -> tuple[npt.NDArray[np.int64], int]:
        """This rank's sample order for `epoch` and its number of batches (cached for the current epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            mine = self.epoch_order(epoch)[self.rank :: self.world_size]
            n_batches = self._batches_for(len(mine), self.num_samples // self.world_size)
            self._cache = (epoch, mine, n_batches)
        return self._cache[1], self._cache[2]

    def epoch_batches(self, epoch: int) -> list[npt.NDArray[np.int64]]:
        """This rank's batches of epoch `epoch`, as arrays of dataset indices (for tracing; iteration slices lazily)."""
        mine, n_batches = self._rank_order(epoch)
        return [mine[k * self.batch_size : (k + 1) * self.batch_size] for k in range(n_batches)]

    def __iter__(self) -> Iterator[Batch]:
        mine, n_batches = self._rank_order(self.epoch)
        if self.next_batch >= n_batches:
            self.set_epoch(self.epoch + 1)
            mine, n_batches = self._rank_order(self.epoch)
        self._restored = False
        while self.next_batch < n_batches:
            start = self.next_batch * self.batch_size
            indices = mine[start : start + self.batch_size]
            batch = self.fetch(indices, self.epoch)
            self.next_batch += 1
            self.last_indices = indices
            yield batch

    def fetch(self, indices: npt.NDArray[np.int64], epoch: int) -> Batch:
        """These indices' batch; target-masked for `epoch` (mask_tokens), pinned, moved and masked as configured."""
        get_batch = getattr(self.dataset, "get_batch", None)
        raw = get_batch(indices) if callable(get_batch) else self.dataset.__getitems__(indices.tolist())
        batch = _as_stacked(raw, len(indices))
        if self.mask_tokens is not None:
            batch = self._mask(batch, indices, epoch)
        if self.pin_memory:
            batch = _map_tensors(batch, torch.Tensor.pin_memory)
        if self.device is not None:
            device = self.device
            batch = _map_tensors(batch, lambda t: t.to(device, non_blocking=True))
        if self.build_mask:
            batch = self._attention_mask(batch)
        return batch

    def _attention_mask(self, batch: Batch) -> Batch:
        """Add `attention_mask` [B, 1, L, L] built from `segment_ids` (and `position_ids`) where the batch now is.

        The position ids of a packed batch let CUDA build the mask in one launch; the loader trusts that
        they follow the packing layout (corpus.packing writes them so), as checking would stall the host.
        """
        if not isinstance(batch, dict) or "segment_ids" not in batch:
            have = sorted(batch) if isinstance(batch, dict) else f"a tuple of {len(batch)} tensors"
            raise ValueError(f"build_mask needs packed batches with 'segment_ids', got {have}")
        if "attention_mask" in batch:
            return batch  # the dataset built one already (PackedDataset(with_mask=True))
        # Position ids give the mask in one op on CUDA, but only for the packing layout: trusted from a
        # PackedDataset, which writes it; any other dataset's batches get the segment-id mask.
        positions = batch.get("position_ids") if isinstance(self.dataset, PackedDataset) else None
        return {**batch, "attention_mask": block_causal_mask(batch["segment_ids"], positions)}

    def _mask(self, batch: Batch, indices: npt.NDArray[np.int64], epoch: int) -> Batch:
        assert self.mask_tokens is not None
        if isinstance(batch, dict):
            key = "targets" if "targets" in batch else "labels" if "labels" in batch else None
            if key is None:
                raise ValueError(f"mask_tokens needs a 'targets' or 'labels' tensor, batch has {sorted(batch)}")
            targets = batch[key]
        else:
            if len(batch) < 2:
                raise ValueError(f"mask_tokens needs (inputs, targets) batches, got {len(batch)} tensor(s)")
            targets = batch[1]
        lo, hi = self.mask_tokens
        length = targets.shape[-1]
        if hi > length:
            raise ValueError(f"mask_tokens hi={hi} exceeds the {length} target positions per sample")
        eligible = (targets != IGNORE_INDEX).numpy()  # padding and piece ends carry no target to hide
        mask = torch.from_numpy(mask_positions(self.seed, epoch, indices, length, lo, hi, eligible))
        masked = targets.masked_fill(mask, IGNORE_INDEX)  # a new tensor: the dataset's memory stays untouched
        if isinstance(batch, dict):
            return {**batch, key: masked}
        return (batch[0], masked, *batch[2:])

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: resuming from it serves exactly the batches not yet served.

        `dataset` names the data (the lake version and split of shards opened from a manifest, else None).
        `rank` is informational: ranks step in lockstep, so the state rank 0 saves resumes every rank.
        """
        return {
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "dataset": _dataset_id(self.dataset),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "mask_tokens": list(self.mask_tokens) if self.mask_tokens is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`; ValueError when the state was made with other settings or data."""
        mine = self.state_dict()
        for key in mine:
            if key not in state and key not in ("dataset", "rank"):  # states saved before they were recorded
                raise ValueError(f"loader state has no {key!r}")
        for key in ("seed", "num_samples", "batch_size", "shuffle", "drop_last", "world_size", "mask_tokens"):
            theirs = list(state[key]) if key == "mask_tokens" and state[key] is not None else state[key]
            if theirs != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r}, but this loader has {key}={mine[key]!r}")
        theirs, ours = state.get("dataset"), mine["dataset"]
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"loader state was saved over {theirs}, but this loader serves {ours}")
        epoch, next_batch = state["epoch"], state["next_batch"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"loader state has epoch={epoch!r}, expected an integer >= 0")
        if not isinstance(next_batch, int) or not 0 <= next_batch <= self._most_batches:
            raise ValueError(f"loader state has next_batch={next_batch!r}, expected 0..{self._most_batches}")
        # With drop_last=False a rank may have one batch fewer than the rank that saved the state: at the end
        # of the epoch for that rank is the end of it here too.
        if next_batch >= self._rank_order(epoch)[1]:
            epoch, next_batch = epoch + 1, 0  # a finished epoch: the next one, where iteration would go on
        self.epoch = epoch
        self.next_batch = next_batch
        self._restored = True


def _dataset_id(dataset: object) -> str | None:
    """'asset/partition/version:split' for shards opened from a lake manifest; None for other datasets."""
    version, split = getattr(dataset, "version", None), getattr(dataset, "split", None)
    if not isinstance(version, Version):
        return None
    return f"{version.asset}/{version.partition}/{version.version}:{split}"


def _as_stacked(raw: Any, size: int) -> Batch:
    """Normalise a dataset's batch to a tuple or dict of tensors with leading dimension `size`."""
    if isinstance(raw, Mapping):
        batch: Batch = {str(k): torch.as_tensor(v) for k, v in raw.items()}
        tensors = list(batch.values())
    elif isinstance(raw, tuple) and raw and all(isinstance(t, torch.Tensor) for t in raw):
        batch = raw
        tensors = list(raw)
    elif isinstance(raw, WindowBatch):
        batch = (raw.inputs, raw.targets)
        tensors = list(batch)
    elif isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
        if len(raw) != size:
            raise ValueError(f"__getitems__ returned {len(raw)} samples for {size} indices")
        collated = default_collate(raw)
        return _as_stacked(tuple(collated) if isinstance(collated, list) else collated, size)
    else:
        raise ValueError(
            f"__getitems__ must return (inputs, targets), a dict of tensors or a list of samples, got {type(raw)}"
        )
    for tensor in tensors:
        if tensor.ndim == 0 or tensor.shape[0] != size:
            raise ValueError(f"batch tensor of shape {tuple(tensor.shape)} does not have {size} rows")
    return batch


def _map_tensors(batch: Batch, fn: Any) -> Batch:
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    return tuple(fn(t) for t in batch)
