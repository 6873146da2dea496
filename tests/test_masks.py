from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_packing import reference_mask

from corpus import masks
from corpus.config import TrainingConfig
from corpus.loader import ShardLoader
from corpus.masks import ENV_MASK_KERNEL, block_causal_mask, mask_path
from corpus.model import GPTConfig, TinyGPT
from corpus.packing import PackedDataset, PackedRows, pack
from corpus.train import as_model_batch, smoke_train

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here runs on a GPU


def packed_rows(lengths: list[int], max_length: int, seed: int = 0, high: int = 50000) -> PackedRows:
    """`corpus.packing.pack` of random documents of these lengths (gaps of 1 token between them)."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lens + 1) - (lens + 1)
    stream = rng.integers(0, high, size=int((lens + 1).sum()), dtype=np.int64)
    return pack(stream, starts, lens, max_length, pad_id=0)


@st.composite
def packed_batches(draw: st.DrawFn) -> tuple[PackedRows, torch.dtype]:
    max_length = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(0, 2 * max_length), min_size=1, max_size=12))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return packed_rows(lengths, max_length, seed=draw(st.integers(0, 2**16))), dtype


# --- the position formula -----------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packed_batches())
def test_position_mask_equals_the_segment_formula(case: tuple[PackedRows, torch.dtype]) -> None:
    rows, dtype = case
    assume(rows.num_rows > 0)
    segments = torch.from_numpy(np.asarray(rows.segment_ids)).to(dtype)
    positions = torch.from_numpy(np.asarray(rows.position_ids)).to(dtype)
    # _position_mask is the code CUDA runs by default; here the same torch ops on CPU tensors.
    from_positions = masks._position_mask(positions)
    length = rows.tokens.shape[1]
    assert from_positions.dtype == torch.bool and from_positions.shape == (rows.num_rows, 1, length, length)
    assert torch.equal(from_positions, masks._torch_mask(segments)[:, None])
    assert np.array_equal(from_positions[:, 0].numpy(), reference_mask(rows.segment_ids.astype(np.int64)))
    assert torch.equal(block_causal_mask(segments, positions), from_positions)  # the CPU default, block fill


def test_distances_exact_values_and_dtype() -> None:
    top = torch.iinfo(torch.int16).max
    expected = [[0, top, top, top], [1, 0, top, top], [2, 1, 0, top], [3, 2, 1, 0]]
    dist = masks._distances(4, CPU)
    assert dist.dtype == torch.int16 and dist.tolist() == expected
    assert masks._distances(4, CPU) is dist  # cached per (length, device)
    assert masks._distance_dtype(32767) == torch.int16  # i - j <= 32766 < int16 max
    assert masks._distance_dtype(32768) == torch.int32


def test_position_mask_exact_values_and_pads() -> None:
    # Row 0: pieces of 2 and 3 tokens, then a pad; row 1: all padding.
    positions = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 0, 0, 0, 0, 0]])
    mask = masks._position_mask(positions)[:, 0].int().tolist()
    assert mask[0] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask[1] == torch.eye(6, dtype=torch.int32).tolist()


def test_inconsistent_positions_give_the_documented_masks() -> None:
    """What the block_causal_mask docstring promises for positions outside the packing layout."""
    no_restart = masks._position_mask(torch.tensor([[0, 1, 2, 3]]))[0, 0]  # two pieces, positions run on
    assert no_restart.tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()  # sees the piece before
    pad_with_position = masks._position_mask(torch.tensor([[0, 1, 2]]))[0, 0, 2]
    assert pad_with_position.tolist() == [True, True, True]
    negative = masks._position_mask(torch.tensor([[0, -1, 1]]))[0, 0]
    assert not negative[1].any()  # no key at all: SDPA would give NaN
    below = masks._position_mask(torch.tensor([[32766, 0, 0]]))[0, 0]
    assert below[0].tolist() == [True, False, False]  # the future stays closed below int16 max
    at_max = masks._position_mask(torch.tensor([[32767, 0, 0]]))[0, 0]
    assert at_max[0].tolist() == [True, True, True]  # int16 max and above: the future opens


def test_bad_inputs_are_value_errors() -> None:
    segments = torch.zeros(2, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"position_ids \(2, 4\) on cpu must match segment_ids \(2, 5\) on cpu"):
        block_causal_mask(segments, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"position_ids must hold integers, got dtype torch\.float32"):
        block_causal_mask(segments, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, L\], got shape \(5,\)"):
        block_causal_mask(segments[0], torch.zeros(5, dtype=torch.int64))


# --- path selection -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "device", "with_positions", "path"),
    [
        (None, CPU, True, "block_fill"),
        (None, CPU, False, "block_fill"),
        ("", CPU, True, "block_fill"),
        ("auto", CUDA, True, "positions"),
        (None, CUDA, False, "triton"),
        ("positions", CPU, True, "positions"),
        ("positions", CPU, False, "block_fill"),
        ("positions", CUDA, False, "triton"),
        ("triton", CUDA, True, "triton"),
        ("triton", CPU, True, "block_fill"),
        ("torch", CPU, True, "torch"),
        ("torch", CUDA, True, "torch"),
        (None, torch.device("meta"), True, "positions"),
        (None, torch.device("meta"), False, "torch"),
    ],
)
def test_env_selects_the_path(
    monkeypatch: pytest.MonkeyPatch, env: str | None, device: torch.device, with_positions: bool, path: str
) -> None:
    if env is None:
        monkeypatch.delenv(ENV_MASK_KERNEL, raising=False)
    else:
        monkeypatch.setenv(ENV_MASK_KERNEL, env)
    assert mask_path(device, with_positions) == path


def test_env_value_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MASK_KERNEL, "cuda")
    with pytest.raises(ValueError, match=r"\$CORPUS_MASK_KERNEL='cuda': expected one of auto, positions, triton"):
        block_causal_mask(torch.zeros(1, 3, dtype=torch.int32))


@pytest.mark.parametrize(("env", "from_positions"), [("positions", True), ("torch", False), ("auto", False)])
def test_env_path_is_the_one_that_runs(monkeypatch: pytest.MonkeyPatch, env: str, from_positions: bool) -> None:
    # Positions that run on across two pieces tell the paths apart: the positions path opens piece 1 to piece 0.
    monkeypatch.setenv(ENV_MASK_KERNEL, env)
    segments = torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)
    mask = block_causal_mask(segments, torch.tensor([[0, 1, 2, 3]]))
    assert mask.shape == (1, 1, 4, 4) and bool(mask[0, 0, 2, 0]) is from_positions


# --- loader and model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["auto", "positions", "torch"])
def test_loader_mask_on_cpu_is_unchanged(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv(ENV_MASK_KERNEL, env)
    rows = packed_rows([30, 2, 17, 9, 64, 1, 40, 3, 3, 12, 5], 32, seed=8)
    built = list(ShardLoader(PackedDataset(rows), 3, seed=4, device="cpu", build_mask=True))
    assert len(built) > 1
    for batch in built:
        assert isinstance(batch, dict)
        expected = masks._torch_mask(batch["segment_ids"])[:, None]  # the segment formula, as before
        assert torch.equal(batch["attention_mask"], expected)
        assert np.array_equal(expected[:, 0].numpy(), reference_mask(batch["segment_ids"].long().numpy()))


@torch.no_grad()
def test_mask_from_positions_isolates_documents_in_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MASK_KERNEL, "positions")
    lengths = [9, 14, 5, 20, 3, 11, 7, 32]
    vocab, max_length = 64, 32
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, vocab, n) for n in lengths]
    stream = np.concatenate([np.append(d, vocab - 1) for d in docs])
    starts = np.cumsum(np.asarray(lengths) + 1) - (np.asarray(lengths) + 1)
    rows = pack(stream, starts, np.asarray(lengths), max_length, pad_id=0)
    assert rows.num_rows < len(lengths) and (rows.segment_ids == -1).any()  # packing and padding both occur
    model = TinyGPT(GPTConfig(vocab_size=vocab, max_length=max_length, d_model=32, n_heads=2), seed=1).eval()
    (batch,) = ShardLoader(PackedDataset(rows), rows.num_rows, shuffle=False, device="cpu", build_mask=True)
    assert isinstance(batch, dict)
    together = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    assert torch.isfinite(together).all()  # pads attend to themselves: no NaN
    for doc, tokens in enumerate(docs):
        (piece,) = np.flatnonzero(rows.piece_doc == doc)
        row, lo = int(rows.piece_row[piece]), int(rows.piece_start[piece])
        alone = model(torch.from_numpy(tokens)[None])[0]
        torch.testing.assert_close(together[row, lo : lo + len(tokens)], alone, rtol=1e-5, atol=1e-5)


# --- the training check that guards the position path ------------------------------------------------


def _packed_batch(position_ids: list[int], segment_ids: list[int]) -> dict[str, torch.Tensor]:
    """Six tokens 1..6 whose labels are the next token inside the first pieces."""
    return {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]),
        "labels": torch.tensor([[2, -100, 4, 5, -100, -100]]),
        "position_ids": torch.tensor([position_ids]),
        "segment_ids": torch.tensor([segment_ids]),
    }


def test_training_batches_must_follow_the_packing_layout() -> None:
    good = as_model_batch(_packed_batch([0, 1, 0, 1, 2, 0], [0, 0, 1, 1, 1, -1]), max_length=8, vocab_size=10)
    assert torch.equal(good.attention(), masks._torch_mask(good.segment_ids)[:, None])
    with pytest.raises(ValueError, match=r"position_ids\(0, 2\) = 2, expected 0: positions must restart at 0"):
        as_model_batch(_packed_batch([0, 1, 2, 3, 4, 0], [0, 0, 1, 1, 1, -1]), max_length=8, vocab_size=10)
    with pytest.raises(ValueError, match=r"position_ids\(0, 5\) = 3, expected 0"):
        as_model_batch(_packed_batch([0, 1, 0, 1, 2, 3], [0, 0, 1, 1, 1, -1]), max_length=8, vocab_size=10)
    with pytest.raises(ValueError, match="segment_ids row 0: a segment id comes back after another"):
        as_model_batch(_packed_batch([0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 0, -1]), max_length=8, vocab_size=10)


def test_a_batch_with_its_own_mask_needs_no_packing_layout() -> None:
    """Positions are checked only when the mask will be built from them, not when the batch brings one."""
    batch = _packed_batch([5, 6, 0, 1, 2, 0], [0, 0, 1, 1, 1, -1])  # a continuation piece: absolute positions
    batch["attention_mask"] = masks._torch_mask(batch["segment_ids"])[:, None]
    model_batch = as_model_batch(batch, max_length=8, vocab_size=10)
    assert torch.equal(model_batch.attention(), batch["attention_mask"])


class _OtherPacked:
    """A packed-like dataset that is not a PackedDataset: its positions do not restart per segment."""

    def __len__(self) -> int:
        return 4

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]] * len(indices), dtype=torch.int32)
        return {
            "input_ids": torch.zeros(len(indices), 8, dtype=torch.int64),
            "labels": torch.zeros(len(indices), 8, dtype=torch.int64),
            "segment_ids": segments,
            "position_ids": torch.arange(8).expand(len(indices), 8).clone(),
        }


@pytest.mark.parametrize("env", ["auto", "positions"])
def test_loader_reads_positions_only_from_packed_datasets(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv(ENV_MASK_KERNEL, env)
    for batch in ShardLoader(_OtherPacked(), 2, shuffle=False, build_mask=True):
        assert isinstance(batch, dict)
        assert torch.equal(batch["attention_mask"], masks._torch_mask(batch["segment_ids"])[:, None])


def test_bad_env_value_fails_when_the_loader_or_training_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at the first batch, after the shards were verified and the model built."""
    monkeypatch.setenv(ENV_MASK_KERNEL, "flash")
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\$CORPUS_MASK_KERNEL='flash'"):
        ShardLoader(dataset, 2, build_mask=True)  # type: ignore[arg-type]
    ShardLoader(dataset, 2)  # type: ignore[arg-type]  # no mask asked for: the variable is not read
    with pytest.raises(ValueError, match=r"\$CORPUS_MASK_KERNEL='flash'"):
        smoke_train([], [], TrainingConfig(), max_length=3, seed=0)
