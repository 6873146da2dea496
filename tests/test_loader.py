import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from shared_data import shared_text
from torch.utils.data import DataLoader, Dataset

from corpus.lake import Lake, LakeError
from corpus.loader import ShardLoader, WindowShards, create_dataloader, mask_positions, open_window_shards
from corpus.tokenizer import get_encoding
from corpus.windows import SlidingWindowDataset, shard_token_ranges, window_count


@pytest.fixture(scope="module")
def verdict():
    return shared_text("data/the-verdict.txt")


# --- an independent, straightforward copy of the seed (rasbt's GPTDatasetV1 + create_dataloader_v1) ---


class GPTDatasetV1(Dataset):
    def __init__(self, txt, tokenizer, max_length, stride):
        self.input_ids = []
        self.target_ids = []
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        for i in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[i : i + max_length]))
            self.target_ids.append(torch.tensor(token_ids[i + 1 : i + max_length + 1]))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def seed_dataloader(dataset, batch_size, shuffle, drop_last):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=0)


def test_seed_printed_first_batches(verdict):
    inputs, targets = next(iter(create_dataloader(verdict, batch_size=8, max_length=4, stride=1, shuffle=False)))
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [
        [40, 367, 2885, 1464],
        [367, 2885, 1464, 1807],
        [2885, 1464, 1807, 3619],
        [1464, 1807, 3619, 402],
        [1807, 3619, 402, 271],
        [3619, 402, 271, 10899],
        [402, 271, 10899, 2138],
        [271, 10899, 2138, 257],
    ]
    assert targets.tolist() == [*inputs.tolist()[1:], [10899, 2138, 257, 7026]]
    inputs, targets = next(iter(create_dataloader(verdict, batch_size=8, max_length=4, stride=4, shuffle=False)))
    assert inputs.tolist() == [
        [40, 367, 2885, 1464],
        [1807, 3619, 402, 271],
        [10899, 2138, 257, 7026],
        [15632, 438, 2016, 257],
        [922, 5891, 1576, 438],
        [568, 340, 373, 645],
        [1049, 5975, 284, 502],
        [284, 3285, 326, 11],
    ]
    assert targets.tolist() == [
        [367, 2885, 1464, 1807],
        [3619, 402, 271, 10899],
        [2138, 257, 7026, 15632],
        [438, 2016, 257, 922],
        [5891, 1576, 438, 568],
        [340, 373, 645, 1049],
        [5975, 284, 502, 284],
        [3285, 326, 11, 287],
    ]


CASES = [
    # (max_length, stride, batch_size, drop_last, shuffle)
    (4, 1, 8, True, False),
    (4, 4, 8, False, False),
    (1, 1, 3, False, True),
    (4, 1, 8, True, True),
    (5, 3, 7, False, True),
    (16, 16, 4, True, True),
    (16, 40, 5, False, False),
    (16, 40, 5, False, True),
    (32, 100, 1, True, True),
    (256, 128, 4, True, True),
    (256, 128, 4, False, False),
    (256, 257, 3, False, True),
    (256, 1, 64, False, True),
    (1000, 500, 2, True, True),
    (5000, 1, 16, False, True),
]


@pytest.mark.parametrize(("max_length", "stride", "batch_size", "drop_last", "shuffle"), CASES)
def test_batches_match_seed(verdict, max_length, stride, batch_size, drop_last, shuffle):
    seed_ds = GPTDatasetV1(verdict, get_encoding("gpt2"), max_length, stride)
    for manual_seed in (0, 123) if shuffle else (0,):
        torch.manual_seed(manual_seed)
        expected = list(seed_dataloader(seed_ds, batch_size, shuffle, drop_last))
        rng_after_seed = torch.rand(3)
        torch.manual_seed(manual_seed)
        got = list(create_dataloader(verdict, batch_size, max_length, stride, shuffle, drop_last))
        rng_after_ours = torch.rand(3)
        assert len(got) == len(expected) > 0
        for ours, theirs in zip(got, expected, strict=True):
            assert type(ours) is type(theirs) is list and len(ours) == 2
            for a, b in zip(ours, theirs, strict=True):
                assert a.dtype == b.dtype == torch.int64
                assert a.shape == b.shape
                assert torch.equal(a, b)
        # The same draws from torch's global RNG, so a training script's later randomness is unchanged too.
        assert torch.equal(rng_after_seed, rng_after_ours)


@pytest.mark.parametrize(("max_length", "stride", "batch_size"), [(4, 1, 8), (16, 40, 5), (256, 128, 3)])
def test_plain_dataloader_with_default_collate_matches_seed(verdict, max_length, stride, batch_size):
    """Any torch DataLoader over the dataset (default_collate, __getitems__) gives the seed's batches."""
    tokens = np.asarray(get_encoding().encode(verdict, allowed_special={"<|endoftext|>"}), dtype=np.uint16)
    ours = SlidingWindowDataset(tokens, max_length, stride, warn_overlap=False)
    seed = GPTDatasetV1(verdict, get_encoding("gpt2"), max_length, stride)
    torch.manual_seed(5)
    expected = list(seed_dataloader(seed, batch_size, True, False))
    torch.manual_seed(5)
    got = list(DataLoader(ours, batch_size=batch_size, shuffle=True))
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey) and x.dtype == torch.int64


def test_dataloader_workers(verdict):
    single = list(create_dataloader(verdict, batch_size=8, max_length=16, stride=16, shuffle=False))
    multi = list(create_dataloader(verdict, batch_size=8, max_length=16, stride=16, shuffle=False, num_workers=2))
    assert len(single) == len(multi) == 40
    for (x1, y1), (x2, y2) in zip(single, multi, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_dataloader_bad_input(verdict):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        create_dataloader(verdict, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got -2"):
        create_dataloader(verdict, batch_size=-2)
    # "Hello, world." is 4 GPT-2 tokens: the seed silently yields no batch, here it is an error.
    assert len(get_encoding().encode("Hello, world.")) == 4
    with pytest.raises(ValueError, match="n_tokens=4 is too few for one window of max_length=4"):
        create_dataloader("Hello, world.", max_length=4, stride=1)
    with pytest.raises(ValueError, match="n_tokens=0 is too few"):
        create_dataloader("", max_length=1)
    (x, y) = next(iter(create_dataloader("Hello, world.", batch_size=1, max_length=3, stride=1, shuffle=False)))
    assert x.tolist() == [[15496, 11, 995]] and y.tolist() == [[11, 995, 13]]
    (x, _) = next(iter(create_dataloader("a<|endoftext|>b", batch_size=1, max_length=2, shuffle=False)))
    assert x.tolist() == [[64, 50256]]
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        create_dataloader(verdict, stride=0)


# --- the verified shard loader ---

L, S, W = 8, 5, 7


def build_version(root, train, validation, windows_per_shard=W, tamper_extra=None):
    lake = Lake(root)
    shards = []
    with lake.writer("training_windows") as writer:
        for split, tokens in (("train", train), ("validation", validation)):
            first = 0
            for k, (start, end) in enumerate(shard_token_ranges(len(tokens), L, S, windows_per_shard)):
                name = f"{split}-{k:05d}.bin"
                tokens[start:end].astype("<u2").tofile(writer.path(name))
                windows = window_count(end - start, L, S)
                shards.append(
                    {"path": name, "split": split, "tokens": end - start, "windows": windows, "first_window": first}
                )
                first += windows
        extra = {"max_length": L, "stride": S, "dtype": "uint16", "vocab_size": 50257, "shards": shards}
        if tamper_extra:
            tamper_extra(extra)
        return writer.commit(code_version="test", config={"max_length": L, "stride": S}, extra=extra)


@pytest.fixture
def streams():
    rng = np.random.default_rng(42)
    return rng.integers(0, 50257, size=300).astype(np.uint16), rng.integers(0, 50257, size=60).astype(np.uint16)


@pytest.fixture
def version(tmp_path, streams):
    return build_version(tmp_path / "lake", *streams)


def test_open_window_shards_equals_the_whole_stream(version, streams):
    train, validation = streams
    shards = open_window_shards(version.manifest_path, "train")
    whole = SlidingWindowDataset(train, L, S, warn_overlap=False)
    assert isinstance(shards, WindowShards)
    assert len(shards) == len(whole) == 59 and len(shards.shards) == 9
    everything = np.arange(59)
    for a, b in zip(shards.get_batch(everything), whole.get_batch(everything), strict=True):
        assert torch.equal(a, b)
    # A batch across shard boundaries, out of order, with a negative index.
    picks = [58, 0, 6, 7, 13, 14, -2, 30]
    for a, b in zip(shards.get_batch(picks), whole.get_batch(picks), strict=True):
        assert torch.equal(a, b)
    assert [t.tolist() for t in shards[20]] == [t.tolist() for t in whole[20]]
    assert shards.locate(20) == (2, 6, 30)
    assert shards.locate(-1) == (8, 2, 10)
    with pytest.raises(IndexError, match="window index 59 out of range for 59 windows"):
        shards[59]
    batch = next(iter(DataLoader(shards, batch_size=4)))
    assert torch.equal(batch[0], whole.get_batch([0, 1, 2, 3])[0])
    val = open_window_shards(version.manifest_path, "validation")
    assert len(val) == 11 and torch.equal(
        val.get_batch([10])[1], torch.from_numpy(validation[51:59].astype(np.int64))[None]
    )


def open_shards_reference(version):
    """Shard 3's windows (global 21..27) as written, before any tampering."""
    tokens = np.fromfile(version.path / "train-00003.bin", dtype="<u2")
    return SlidingWindowDataset(tokens, L, S, warn_overlap=False).get_batch(range(7))[0]


def test_open_window_shards_refuses_tampered_shard(version):
    shard = version.path / "train-00003.bin"
    before = open_shards_reference(version)
    data = bytearray(shard.read_bytes())
    expected = version.files["train-00003.bin"]["sha256"]
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(LakeError) as info:
        open_window_shards(version.manifest_path)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert actual != expected
    assert str(info.value) == f"{shard}: sha256 {actual}, expected {expected}"
    # Without verification it opens, and would serve the flipped token: verify=True is the default for that.
    flipped = open_window_shards(version.manifest_path, verify=False)
    assert not torch.equal(flipped.get_batch(range(21, 28))[0], before)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(LakeError, match=r"train-00003.bin: 76 bytes, but the manifest says 39 tokens"):
        open_window_shards(version.manifest_path, verify=False)


def test_open_window_shards_refuses_tampered_validation_for_train(version):
    shard = version.path / "validation-00000.bin"
    shard.write_bytes(shard.read_bytes()[::-1])
    with pytest.raises(LakeError, match=r"validation-00000.bin: sha256 [0-9a-f]{64}, expected"):
        open_window_shards(version.manifest_path, "train")


def test_open_window_shards_bad_manifests(tmp_path, streams):
    def wrong_windows(extra):
        extra["shards"][1]["windows"] = 6

    v = build_version(tmp_path / "a", *streams, tamper_extra=wrong_windows)
    with pytest.raises(
        LakeError, match=r"train-00001.bin: 39 tokens make 7 windows of max_length=8, stride=5, but the"
    ):
        open_window_shards(v.manifest_path)

    def wrong_first(extra):
        extra["shards"][1]["first_window"] = 8

    v = build_version(tmp_path / "b", *streams, tamper_extra=wrong_first)
    with pytest.raises(
        LakeError, match=r"train-00001.bin: manifest first_window 8, but the earlier train shards hold 7"
    ):
        open_window_shards(v.manifest_path)

    def no_stride(extra):
        del extra["stride"]

    v = build_version(tmp_path / "c", *streams, tamper_extra=no_stride)
    with pytest.raises(LakeError, match="manifest extra has no 'stride' field"):
        open_window_shards(v.manifest_path)

    def small_vocab(extra):
        extra["vocab_size"] = 100

    v = build_version(tmp_path / "d", *streams, tamper_extra=small_vocab)
    with pytest.raises(
        LakeError,
        match=r"train-00000.bin: token value \d+ at position \d+ is outside \[0, 100\) \(shard of .*manifest",
    ):
        open_window_shards(v.manifest_path)
    v = build_version(tmp_path / "e", *streams)
    with pytest.raises(ValueError, match=r"split 'test' is not in .* \(splits: train, validation\)"):
        open_window_shards(v.manifest_path, "test")
    manifest = json.loads(v.manifest_path.read_text())
    manifest["extra"]["stride"] = 4
    v.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(LakeError, match="manifest content hashes to"):
        open_window_shards(v.manifest_path)


def test_overlap_warning_once_per_open(version, caplog):
    with caplog.at_level(logging.WARNING):
        open_window_shards(version.manifest_path)
    assert [r.name for r in caplog.records] == ["corpus.windows"]


# --- ShardLoader ---


def collect(loader, limit=None):
    out = []
    for batch in loader:
        out.append((tuple(t.clone() for t in batch), loader.last_indices.copy()))
        if limit is not None and len(out) == limit:
            break
    return out


def test_shard_loader_serves_the_permutation(version, streams):
    shards = open_window_shards(version.manifest_path)
    whole = SlidingWindowDataset(streams[0], L, S, warn_overlap=False)
    loader = ShardLoader(shards, batch_size=8, seed=7)
    assert len(loader) == 8
    epoch0 = collect(loader)
    assert [len(ix) for _, ix in epoch0] == [8] * 7 + [3]
    order = np.concatenate([ix for _, ix in epoch0])
    assert sorted(order.tolist()) == list(range(59))
    assert order.tolist() == np.random.default_rng([7, 0]).permutation(59).tolist()
    assert [b.tolist() for b in loader.epoch_batches(0)] == [ix.tolist() for _, ix in epoch0]
    for (x, y), ix in epoch0:
        ex, ey = whole.get_batch(ix)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # The next iteration is epoch 1, a different permutation; set_epoch(0) replays epoch 0 exactly.
    epoch1 = np.concatenate([ix for _, ix in collect(loader)])
    assert loader.epoch == 1 and epoch1.tolist() != order.tolist() and sorted(epoch1.tolist()) == list(range(59))
    loader.set_epoch(0)
    assert np.concatenate([ix for _, ix in collect(loader)]).tolist() == order.tolist()
    plain = ShardLoader(shards, batch_size=8, shuffle=False, drop_last=True)
    assert np.concatenate([ix for _, ix in collect(plain)]).tolist() == list(range(56))


@pytest.mark.parametrize("stop_after", [0, 1, 3, 7, 8])
def test_shard_loader_resume(version, stop_after):
    shards = open_window_shards(version.manifest_path)
    make = lambda: ShardLoader(shards, batch_size=8, seed=11, mask_tokens=(1, 3))  # noqa: E731
    reference = make()
    uninterrupted = collect(reference) + collect(reference)  # epochs 0 and 1
    first = make()
    head = collect(first, limit=stop_after) if stop_after else []
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are JSON-safe
    assert (state["epoch"], state["next_batch"]) == (0, stop_after)
    resumed = make()
    resumed.load_state_dict(state)
    tail = []
    while len(head) + len(tail) < len(uninterrupted):
        tail += collect(resumed, limit=len(uninterrupted) - len(head) - len(tail))
    assert len(uninterrupted) == 16
    for ((x1, y1), i1), ((x2, y2), i2) in zip(head + tail, uninterrupted, strict=True):
        assert i1.tolist() == i2.tolist() and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_load_state_dict_refuses_other_settings(version):
    shards = open_window_shards(version.manifest_path)
    state = ShardLoader(shards, batch_size=8, seed=1).state_dict()
    with pytest.raises(ValueError, match="loader state has seed=1, but this loader has seed=2"):
        ShardLoader(shards, batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="loader state has batch_size=8, but this loader has batch_size=4"):
        ShardLoader(shards, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"next_batch=9, expected 0\.\.8"):
        ShardLoader(shards, batch_size=8, seed=1).load_state_dict({**state, "next_batch": 9})


@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(59, 3, 4), (60, 4, 5), (10, 3, 1), (59, 1, 8)])
def test_rank_sharding_disjoint_and_complete(n, world_size, batch_size):
    data = SlidingWindowDataset(np.arange(n + L, dtype=np.uint16), L, 1, warn_overlap=False)
    assert len(data) == n
    served = []
    for rank in range(world_size):
        loader = ShardLoader(data, batch_size, seed=3, rank=rank, world_size=world_size)
        indices = [ix for _, ix in collect(loader)]
        mine = np.concatenate(indices).tolist()
        served.append(mine)
        assert len(mine) == len(range(rank, n, world_size))
    flat = [i for part in served for i in part]
    assert len(flat) == len(set(flat)) == n and sorted(flat) == list(range(n))
    # drop_last: every rank serves the same number of full batches, still disjoint.
    counts, seen = set(), set()
    for rank in range(world_size):
        loader = ShardLoader(data, batch_size, seed=3, rank=rank, world_size=world_size, drop_last=True)
        batches = [ix for _, ix in collect(loader)]
        counts.add(len(batches))
        assert all(len(ix) == batch_size for ix in batches)
        for ix in batches:
            assert seen.isdisjoint(ix.tolist())
            seen.update(ix.tolist())
    assert counts == {(n // world_size) // batch_size}


def test_rank_errors_and_unequal_warning(caplog):
    data = SlidingWindowDataset(np.arange(20, dtype=np.uint16), 4, 4)
    assert len(data) == 4
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
        ShardLoader(data, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        ShardLoader(data, 2, world_size=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        ShardLoader(data, 0)
    with pytest.raises(ValueError, match="no batches: 4 samples over world_size=1 ranks give rank 0 4 samples"):
        ShardLoader(data, 5, drop_last=True)
    with pytest.raises(
        ValueError, match=r"mask_tokens must be \(lo, hi\) with 0 <= lo <= hi and hi >= 1, got \(3, 1\)"
    ):
        ShardLoader(data, 2, mask_tokens=(3, 1))
    with caplog.at_level(logging.WARNING, logger="corpus.loader"):
        ShardLoader(data, 1, world_size=3)  # 4 samples over 3 ranks: 2, 1, 1 batches
    assert "ranks serve 1 to 2 batches per epoch" in caplog.text


def test_token_masking(version):
    shards = open_window_shards(version.manifest_path)
    plain = ShardLoader(shards, batch_size=8, seed=5)
    masked = ShardLoader(shards, batch_size=8, seed=5, mask_tokens=(1, 3))
    again = ShardLoader(shards, batch_size=8, seed=5, mask_tokens=(1, 3))
    per_sample = {}
    for ((x0, y0), i0), ((x1, y1), i1), ((_, y2), _) in zip(
        collect(plain), collect(masked), collect(again), strict=True
    ):
        assert i0.tolist() == i1.tolist() and torch.equal(x0, x1)
        assert torch.equal(y1, y2)  # deterministic for (seed, epoch, sample)
        hit = y1 == -100
        assert torch.equal(y1[~hit], y0[~hit])  # nothing else changed
        for row, index in zip(hit, i1.tolist(), strict=True):
            per_sample[index] = row.nonzero().flatten().tolist()
    counts = [len(v) for v in per_sample.values()]
    assert len(per_sample) == 59 and set(counts) == {1, 2, 3}
    # The mask belongs to the sample, not the batch: another batch size and rank split give the same one.
    for rank in range(2):
        other = ShardLoader(shards, batch_size=3, seed=5, mask_tokens=(1, 3), rank=rank, world_size=2)
        for (_, y), ix in collect(other):
            for row, index in zip(y == -100, ix.tolist(), strict=True):
                assert row.nonzero().flatten().tolist() == per_sample[index]
    # A new epoch masks afresh; the dataset's own tensors are never modified.
    assert not (shards.get_batch(range(59))[1] == -100).any()
    m1 = mask_positions(5, 1, np.arange(59), L, 1, 3)
    m0 = mask_positions(5, 0, np.arange(59), L, 1, 3)
    assert [row.nonzero()[0].tolist() for row in m0] == [per_sample[i] for i in range(59)]
    assert not np.array_equal(m0, m1) and set(m1.sum(axis=1).tolist()) == {1, 2, 3}
    # Exact values pin the hash: a change would silently change every training run's masks.
    assert m0.sum(axis=1)[:10].tolist() == EXPECTED_COUNTS
    assert [row.nonzero()[0].tolist() for row in m0[:3]] == EXPECTED_POSITIONS
    with pytest.raises(ValueError, match="mask_tokens hi=9 exceeds the 8 target positions"):
        next(iter(ShardLoader(shards, batch_size=2, mask_tokens=(1, 9))))
    exact = mask_positions(0, 0, np.arange(5), 4, 4, 4)
    assert exact.all()


EXPECTED_COUNTS = [3, 1, 1, 3, 3, 3, 2, 3, 3, 2]
EXPECTED_POSITIONS = [[2, 4, 6], [1], [4]]


class DictDataset:
    """A packed-style dataset whose __getitems__ returns a dict of stacked tensors."""

    def __init__(self, n, length):
        self.data = torch.arange(n * length).reshape(n, length)

    def __len__(self):
        return len(self.data)

    def __getitems__(self, indices):
        rows = self.data[torch.tensor(indices)]
        return {"input_ids": rows, "labels": rows + 1, "segment_ids": torch.zeros_like(rows)}


class NoTargets(DictDataset):
    def __getitems__(self, indices):
        return {"input_ids": self.data[torch.tensor(indices)]}


class SampleListDataset:
    """A plain torch-style dataset: __getitems__ returns one (x, y) per index."""

    def __len__(self):
        return 10

    def __getitems__(self, indices):
        return [(torch.tensor([i, i]), torch.tensor(i * 10)) for i in indices]


def test_shard_loader_generic_datasets():
    loader = ShardLoader(DictDataset(12, 6), batch_size=5, seed=2, mask_tokens=(2, 2))
    batches = [(b, loader.last_indices.copy()) for b in loader]
    assert [len(ix) for _, ix in batches] == [5, 5, 2]
    for batch, ix in batches:
        assert sorted(batch) == ["input_ids", "labels", "segment_ids"]
        assert batch["input_ids"][:, 0].tolist() == (torch.tensor(ix) * 6).tolist()
        assert ((batch["labels"] == -100).sum(dim=1) == 2).all()
    loader = ShardLoader(SampleListDataset(), batch_size=4, shuffle=False, pin_memory=True)
    batches = list(loader)
    assert loader.pin_memory == torch.cuda.is_available()
    assert batches[0][0].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]] and batches[0][1].tolist() == [0, 10, 20, 30]
    assert batches[2][1].tolist() == [80, 90]
    with pytest.raises(ValueError, match="needs a 'targets' or 'labels' tensor"):
        next(iter(ShardLoader(NoTargets(4, 4), batch_size=2, mask_tokens=(1, 1))))
