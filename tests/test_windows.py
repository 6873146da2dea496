import logging
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from corpus.windows import SlidingWindowDataset, WindowBatch, collate_windows, shard_token_ranges, window_count


def seed_windows(ids, max_length, stride):
    """The seed's GPTDatasetV1 loop, on a plain list."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return inputs, targets


def stream(n, seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).integers(0, 50257, size=n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64, np.uint64])
@pytest.mark.parametrize(("max_length", "stride"), [(1, 1), (4, 1), (4, 4), (5, 3), (3, 7), (16, 16), (8, 20)])
def test_windows_equal_seed_loop(dtype, max_length, stride):
    tokens = stream(103, dtype=dtype)
    ids = tokens.tolist()
    inputs, targets = seed_windows(ids, max_length, stride)
    ds = SlidingWindowDataset(tokens, max_length, stride)
    assert len(ds) == len(inputs) == window_count(103, max_length, stride)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == inputs[i] and y.tolist() == targets[i]
    x, y = ds.get_batch(list(range(len(ds))))
    assert x.shape == (len(ds), max_length) and x.dtype == torch.int64
    assert x.tolist() == inputs and y.tolist() == targets


def test_exact_small_windows_and_negative_indices():
    ds = SlidingWindowDataset(np.arange(10, dtype=np.uint16), max_length=3, stride=2)
    # starts range(0, 7, 2) = 0, 2, 4, 6
    assert len(ds) == 4
    assert [ds[i][0].tolist() for i in range(4)] == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]]
    assert ds[3][1].tolist() == [7, 8, 9]
    assert ds[-1][0].tolist() == [6, 7, 8] and ds[-4][0].tolist() == [0, 1, 2]
    assert ds[np.int64(1)][0].tolist() == [2, 3, 4]
    x, y = ds.get_batch([-1, 0, 2])
    assert x.tolist() == [[6, 7, 8], [0, 1, 2], [4, 5, 6]]
    assert y.tolist() == [[7, 8, 9], [1, 2, 3], [5, 6, 7]]
    assert ds.start(-1) == 6


def test_index_errors():
    ds = SlidingWindowDataset(np.arange(10, dtype=np.uint16), max_length=3, stride=2)
    with pytest.raises(IndexError, match="window index 4 out of range for 4 windows"):
        ds[4]
    with pytest.raises(IndexError, match="window index -5 out of range for 4 windows"):
        ds[-5]
    with pytest.raises(IndexError, match="window index 9 out of range for 4 windows"):
        ds.__getitems__([0, 9, 1])
    with pytest.raises(IndexError, match="integers"):
        ds.get_batch([0.5])
    with pytest.raises(TypeError):
        ds[1.0]
    assert ds.get_batch([])[0].shape == (0, 3)


def test_inputs_and_targets_do_not_share_memory():
    ds = SlidingWindowDataset(np.arange(10, dtype=np.uint16), max_length=3, stride=1)
    x, y = ds[0]
    y[0] = -100
    assert x.tolist() == [0, 1, 2]
    xs, ys = ds.get_batch([0, 1])
    ys[:, 0] = -100
    assert xs.tolist() == [[0, 1, 2], [1, 2, 3]]
    assert ds[1][0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0, "stride": 1}, "max_length must be >= 1, got 0"),
        ({"max_length": -3, "stride": 1}, "max_length must be >= 1, got -3"),
        ({"max_length": 4, "stride": 0}, "stride must be >= 1, got 0"),
        ({"max_length": 4, "stride": -2}, "stride must be >= 1, got -2"),
        ({"max_length": 4.0, "stride": 1}, "max_length must be an integer >= 1, got 4.0"),
        ({"max_length": True, "stride": 1}, "max_length must be an integer >= 1, got True"),
        ({"max_length": 20, "stride": 1}, "n_tokens=20 is too few for one window of max_length=20"),
        ({"max_length": 25, "stride": 1}, "n_tokens=20 is too few for one window of max_length=25"),
        ({"max_length": 4, "stride": 4, "vocab_size": 0}, "vocab_size must be >= 1, got 0"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowDataset(np.arange(20, dtype=np.uint16), **kwargs)


def test_bad_token_values():
    tokens = np.arange(100, dtype=np.int64)
    tokens[37] = 50257
    with pytest.raises(ValueError, match=r"token value 50257 at position 37 is outside \[0, 50257\)"):
        SlidingWindowDataset(tokens, 4, 4)
    tokens[37] = -1
    with pytest.raises(ValueError, match=r"token value -1 at position 37 is outside \[0, 50257\)"):
        SlidingWindowDataset(tokens, 4, 4)
    tokens[37] = 99
    with pytest.raises(ValueError, match=r"token value 99 at position 37 is outside \[0, 64\)"):
        SlidingWindowDataset(tokens, 4, 4, vocab_size=64)
    assert len(SlidingWindowDataset(tokens, 4, 4, vocab_size=64, check_tokens=False)) == 24
    with pytest.raises(ValueError, match="tokens must have an integer dtype, got float32"):
        SlidingWindowDataset(np.zeros(10, dtype=np.float32), 4, 4)
    with pytest.raises(ValueError, match=r"tokens must be a 1-D array, got shape \(2, 5\)"):
        SlidingWindowDataset(np.zeros((2, 5), dtype=np.uint16), 4, 4)
    # A list of ints works like the seed's token list.
    assert SlidingWindowDataset(list(range(9)), 4, 4)[1][1].tolist() == [5, 6, 7, 8]


def test_range_check_spans_chunks(monkeypatch):
    import corpus.windows as windows

    monkeypatch.setattr(windows, "RANGE_CHECK_CHUNK", 16)
    tokens = np.zeros(100, dtype=np.uint16)
    tokens[83] = 60000
    with pytest.raises(ValueError, match="token value 60000 at position 83"):
        SlidingWindowDataset(tokens, 4, 4)


def test_overlap_warning(caplog):
    tokens = np.arange(50, dtype=np.uint16)
    with caplog.at_level(logging.WARNING, logger="corpus.windows"):
        SlidingWindowDataset(tokens, 8, 8)
        SlidingWindowDataset(tokens, 8, 20)  # tokens skipped, nothing repeated: no memorisation warning
        SlidingWindowDataset(tokens, 8, 2, warn_overlap=False)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="corpus.windows"):
        SlidingWindowDataset(tokens, 8, 2)
    (record,) = caplog.records
    assert record.name == "corpus.windows" and record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "stride=2 < max_length=8: windows overlap by 6 tokens and each token is trained on up to 4 times per epoch"
    )
    assert "memorisation risk grows" in record.getMessage()


def test_window_count_matches_range():
    for n in range(0, 40):
        for max_length in range(1, 12):
            for stride in range(1, 15):
                assert window_count(n, max_length, stride) == len(range(0, n - max_length, stride))
    with pytest.raises(ValueError, match="n_tokens must be an integer >= 0, got -1"):
        window_count(-1, 4, 4)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        window_count(10, 4, 0)


def test_shard_token_ranges_reproduce_the_stream_windows():
    tokens = stream(400, seed=3)
    checked = 0
    for n in (2, 5, 17, 64, 131, 400):
        for max_length in (1, 3, 8, 16):
            for stride in (1, 2, 5, 8, 17, 40):
                total = window_count(n, max_length, stride)
                if total == 0:
                    with pytest.raises(ValueError, match=f"n_tokens={n} is too few"):
                        shard_token_ranges(n, max_length, stride, 3)
                    continue
                whole = SlidingWindowDataset(tokens[:n], max_length, stride, warn_overlap=False)
                expected_x, expected_y = whole.get_batch(np.arange(total))
                for per_shard in (1, 2, 3, 7, total, total + 5):
                    ranges = shard_token_ranges(n, max_length, stride, per_shard)
                    assert len(ranges) == -(-total // per_shard)
                    xs, ys = [], []
                    for k, (start, end) in enumerate(ranges):
                        assert 0 <= start < end <= n
                        assert start == k * per_shard * stride
                        shard = SlidingWindowDataset(tokens[start:end], max_length, stride, warn_overlap=False)
                        assert len(shard) == min(per_shard, total - k * per_shard)
                        x, y = shard.get_batch(np.arange(len(shard)))
                        xs.append(x)
                        ys.append(y)
                    assert torch.equal(torch.cat(xs), expected_x) and torch.equal(torch.cat(ys), expected_y)
                    checked += 1
    assert checked == 684  # 114 (n, max_length, stride) with windows x 6 shard sizes
    assert shard_token_ranges(10, 3, 2, 3) == [(0, 8), (6, 10)]
    assert shard_token_ranges(20, 3, 5, 2) == [(0, 9), (10, 19)]
    with pytest.raises(ValueError, match="windows_per_shard must be >= 1, got 0"):
        shard_token_ranges(10, 3, 2, 0)


def write_tokens(path, tokens):
    tokens.astype(tokens.dtype.newbyteorder("<")).tofile(path)
    return path


def test_from_file_memmap_and_pickle(tmp_path):
    tokens = stream(1000, seed=5)
    path = write_tokens(tmp_path / "train-00000.bin", tokens)
    ds = SlidingWindowDataset.from_file(path, 16, 16)
    assert isinstance(ds.tokens, np.memmap) and ds.n_tokens == 1000 and len(ds) == 62
    in_memory = SlidingWindowDataset(tokens, 16, 16)
    assert torch.equal(ds.get_batch(range(62))[0], in_memory.get_batch(range(62))[0])
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the path travels, not the 2,000-byte stream
    copy = pickle.loads(blob)
    assert isinstance(copy.tokens, np.memmap)
    assert [t.tolist() for t in copy[61]] == [t.tolist() for t in ds[61]]
    # A worker unpickling after the file shrank must not read past its end through the strided view.
    blob_before = pickle.dumps(ds)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(AssertionError, match="changed since pickling: 31 windows, expected 62"):
        pickle.loads(blob_before)
    write_tokens(path, tokens)
    wide = SlidingWindowDataset.from_file(write_tokens(tmp_path / "w.bin", tokens.astype(np.uint32)), 16, 16, np.uint32)
    assert torch.equal(wide.get_batch([3, 7])[1], ds.get_batch([3, 7])[1])


def test_from_file_errors(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        SlidingWindowDataset.from_file(tmp_path / "empty.bin", 4, 4)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"has 3 bytes, not a multiple of uint16 \(2 bytes\)"):
        SlidingWindowDataset.from_file(tmp_path / "odd.bin", 1, 1)
    with pytest.raises(ValueError, match="does not exist"):
        SlidingWindowDataset.from_file(tmp_path / "missing.bin", 4, 4)
    with pytest.raises(ValueError, match="integer type, got float32"):
        SlidingWindowDataset.from_file(tmp_path / "odd.bin", 4, 4, np.float32)
    bad = np.array([1, 2, 60000, 3, 4, 5], dtype=np.uint16)
    with pytest.raises(ValueError, match="token value 60000 at position 2"):
        SlidingWindowDataset.from_file(write_tokens(tmp_path / "bad.bin", bad), 2, 2)
    with pytest.raises(ValueError, match="n_tokens=6 is too few for one window of max_length=6"):
        SlidingWindowDataset.from_file(write_tokens(tmp_path / "short.bin", bad), 6, 2, check_tokens=False)


def test_dataloader_workers_match_single_process(tmp_path):
    tokens = stream(2000, seed=9)
    ds = SlidingWindowDataset.from_file(write_tokens(tmp_path / "t.bin", tokens), 8, 5, warn_overlap=False)
    single = [tuple(b) for b in DataLoader(ds, batch_size=6)]
    multi = [tuple(b) for b in DataLoader(ds, batch_size=6, num_workers=2)]
    assert len(single) == len(multi) == 67
    for (x1, y1), (x2, y2) in zip(single, multi, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_window_batch_and_collate():
    ds = SlidingWindowDataset(np.arange(10, dtype=np.uint16), max_length=3, stride=2)
    batch = ds.__getitems__([2, 0, -1])
    assert isinstance(batch, WindowBatch) and len(batch) == 3
    assert batch.inputs.tolist() == [[4, 5, 6], [0, 1, 2], [6, 7, 8]]
    assert batch.targets.tolist() == [[5, 6, 7], [1, 2, 3], [7, 8, 9]]
    assert [x.tolist() for x, _ in batch] == [[4, 5, 6], [0, 1, 2], [6, 7, 8]]
    assert batch[-1][1].tolist() == [7, 8, 9] and [y.tolist() for _, y in batch[1:]] == [[1, 2, 3], [7, 8, 9]]
    with pytest.raises(IndexError, match="sample 3 out of range for a batch of 3"):
        batch[3]
    # default_collate (through the Sequence protocol) and collate_windows give the same [inputs, targets].
    slow = torch.utils.data.default_collate(batch)
    fast = collate_windows(batch)
    assert type(slow) is type(fast) is list
    assert all(torch.equal(a, b) for a, b in zip(slow, fast, strict=True))
    assert fast[0] is batch.inputs
    assert collate_windows([(torch.tensor([1]), torch.tensor([2]))])[1].tolist() == [[2]]


def test_pickle_in_memory_dataset_carries_tokens_not_windows():
    tokens = stream(5000, seed=1)
    ds = SlidingWindowDataset(tokens, 256, 1, warn_overlap=False)  # 4,744 windows x 257 tokens if they were pickled
    blob = pickle.dumps(ds)
    assert 10_000 < len(blob) < 12_000  # the 10,000-byte token array and a few fields
    copy = pickle.loads(blob)
    assert torch.equal(copy.get_batch([0, 4743])[1], ds.get_batch([0, 4743])[1])
