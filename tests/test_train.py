"""Smoke training on real text (the-verdict.txt).

Most tests remap the text's GPT-2 ids to a compact vocabulary of the ids it uses (1,416 for the whole
file), which keeps the text but makes the output head ~45x cheaper than 50,257 rows, so that a 30-step
run takes about a second on two CPU cores; one test runs the full GPT-2 vocabulary.
"""

import json
import math

import matplotlib.image
import pytest
import torch
from shared_data import shared_text

import corpus.train as train_module
from corpus.config import TrainingConfig
from corpus.tokenizer import get_encoding
from corpus.train import SmokeTrainingError, as_model_batch, loss_chart_png, smoke_train

L = 32
B = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that
    # wait for each other made a 30-step run 9x slower (8.5 s vs 0.9 s measured under load 5).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def verdict_ids() -> torch.Tensor:
    return torch.tensor(get_encoding().encode(shared_text("data/the-verdict.txt")))


@pytest.fixture(scope="module")
def compact(verdict_ids) -> tuple[torch.Tensor, int]:
    uniq, inverse = torch.unique(verdict_ids, return_inverse=True)
    return inverse, len(uniq)


def windows(ids: torch.Tensor) -> tuple[list, list]:
    """Non-overlapping (inputs, targets) windows of L tokens, batches of B: 18 train, 2 validation."""
    n = (len(ids) - 1) // L
    x, y = ids[: n * L].view(n, L), ids[1 : n * L + 1].view(n, L)
    batches = [(x[i : i + B], y[i : i + B]) for i in range(0, n - n % B, B)]
    return batches[:-2], batches[-2:]


def packed(ids: torch.Tensor, doc_len: int = 20) -> list[dict]:
    """Documents of `doc_len` tokens packed greedily into rows of L, labels shifted within a segment."""
    docs = [ids[i : i + doc_len].tolist() for i in range(0, len(ids) - doc_len, doc_len)]
    rows: list[dict] = []
    row = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    for doc in docs:
        while doc:
            room = L - len(row["input_ids"])
            piece, doc = doc[:room], doc[room:]
            seg = len(set(row["segment_ids"]))
            row["input_ids"] += piece
            row["labels"] += [*piece[1:], -100]
            row["position_ids"] += list(range(len(piece)))
            row["segment_ids"] += [seg] * len(piece)
            if len(row["input_ids"]) == L:
                rows.append(row)
                row = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    return [{k: torch.tensor([r[k] for r in rows[i : i + B]]) for k in rows[0]} for i in range(0, len(rows) - B, B)]


def cfg(**kw) -> TrainingConfig:
    return TrainingConfig(**{"steps": 30, "batch_size": B, "d_model": 64, "n_layers": 2, "n_heads": 4, **kw})


def test_windows_loss_falls_and_the_result_is_complete(compact):
    ids, vocab = compact
    assert vocab == 1416
    train, val = windows(ids)
    assert len(train) == 18 and len(val) == 2
    result = smoke_train(train, val, cfg(), max_length=L, seed=0, vocab_size=vocab)
    assert len(result.losses) == 30 and all(math.isfinite(v) for v in result.losses)
    assert result.relative_loss_drop >= 0.05
    assert result.relative_loss_drop == pytest.approx(1 - result.last_loss_mean / result.first_loss_mean)
    assert result.first_loss_mean == pytest.approx(sum(result.losses[:5]) / 5)
    assert result.val_loss_after < result.val_loss_before
    # Untrained logits are near zero, so the first loss is close to ln(vocab) = 7.26.
    assert result.losses[0] == pytest.approx(math.log(vocab), abs=0.05)
    assert (result.device_type, result.precision, result.steps, result.loss_window) == ("cpu", "fp32", 30, 5)
    assert result.loss_tokens == 30 * B * L
    assert result.passes == 2  # 18 batches for 30 steps: the list was iterated twice
    assert result.batch_kinds == {"windows": 30}
    assert result.val_batches == 2
    assert result.param_count == 1416 * 64 + L * 64 + 2 * 49_984 + 128
    assert result.non_embedding_param_count == result.param_count - 1416 * 64
    assert result.peak_memory_kind == "process_peak_rss" and result.peak_memory_bytes > 0
    assert result.tokens_per_s > 0 and 0 <= result.loader_wait_share < 1
    assert result.model is not None
    data = json.loads(json.dumps(result.to_dict()))
    assert "model" not in data and data["config"]["steps"] == 30 and len(data["losses"]) == 30
    again = smoke_train(train, val, cfg(), max_length=L, seed=0, vocab_size=vocab)
    assert again.losses == result.losses  # same seed, same data: the same run


def test_packed_batches_train_with_their_segments(compact):
    ids, vocab = compact
    batches = packed(ids)
    result = smoke_train(batches[:-1], batches[-1:], cfg(), max_length=L, seed=1, vocab_size=vocab)
    assert result.batch_kinds == {"packed": 30}
    assert result.relative_loss_drop >= 0.05
    per_pass = [int((b["labels"] != -100).sum()) for b in batches[:-1]]
    n = len(per_pass)
    assert result.loss_tokens == sum(per_pass) * (30 // n) + sum(per_pass[: 30 % n])


def test_full_gpt2_vocabulary(verdict_ids):
    train, val = windows(verdict_ids)
    small = cfg(steps=12, d_model=32, batch_size=4, learning_rate=1e-2)
    train = [(x[:4], y[:4]) for x, y in train]
    result = smoke_train(train, val[:1], small, max_length=L, seed=0)
    assert result.losses[0] == pytest.approx(math.log(50257), abs=0.05)
    assert result.relative_loss_drop >= 0.05
    assert result.param_count == 50257 * 32 + L * 32 + 2 * 12_704 + 64


def test_non_finite_loss_raises(compact, monkeypatch):
    ids, vocab = compact
    train, val = windows(ids)
    calls = {"train": 0}
    real = train_module.lm_loss

    def nan_at_step_2(logits, labels):
        loss = real(logits, labels)
        if torch.is_grad_enabled():  # training steps only, not the validation passes
            calls["train"] += 1
            if calls["train"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_module, "lm_loss", nan_at_step_2)
    with pytest.raises(SmokeTrainingError, match=r"not finite at 8 of 10 steps \(first at step 2: nan\)") as exc:
        smoke_train(train, val, cfg(steps=10), max_length=L, seed=0, vocab_size=vocab)
    result = exc.value.result
    assert result is not None and all(math.isfinite(v) for v in result.losses[:2])
    assert json.loads(json.dumps(result.to_dict()))["losses"][2] == "nan"


def test_loss_that_does_not_fall_raises(compact):
    ids, vocab = compact
    train, val = windows(ids)
    with pytest.raises(SmokeTrainingError, match=r"less than training.min_loss_drop = 5.00%") as exc:
        smoke_train(train, val, cfg(steps=10, learning_rate=1e-9), max_length=L, seed=0, vocab_size=vocab)
    assert abs(exc.value.result.relative_loss_drop) < 0.01


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_require_gpu_raises_without_one(compact):
    ids, vocab = compact
    train, val = windows(ids)
    with pytest.raises(SmokeTrainingError, match=r"training\.require_gpu is true but no CUDA GPU is available"):
        smoke_train(train, val, cfg(require_gpu=True), max_length=L, seed=0, vocab_size=vocab)


def test_one_shot_iterator_that_ends_early_raises(compact):
    ids, vocab = compact
    train, val = windows(ids)
    with pytest.raises(SmokeTrainingError, match=r"ended after 3 batches at step 3 of 10 .* one-shot iterator"):
        smoke_train(iter(train[:3]), val, cfg(steps=10), max_length=L, seed=0, vocab_size=vocab)
    with pytest.raises(SmokeTrainingError, match="train_batches yielded no batches"):
        smoke_train([], val, cfg(steps=10), max_length=L, seed=0, vocab_size=vocab)


def test_validation_callable_is_read_once_and_capped(compact):
    ids, vocab = compact
    train, _ = windows(ids)
    calls = []

    def val_source():
        calls.append(1)
        return iter(train)  # 18 batches, capped at eval_batches = 3

    result = smoke_train(train, val_source, cfg(steps=10, eval_batches=3), max_length=L, seed=0, vocab_size=vocab)
    assert calls == [1] and result.val_batches == 3


def test_bad_batches_are_refused():
    x = torch.tensor([[5, 6, 7, 8]])
    y = torch.tensor([[6, 7, 8, 9]])
    assert as_model_batch((x, y), max_length=4, vocab_size=10).kind == "windows"
    with pytest.raises(ValueError, match=r"not the next input token at 3 of 3 .* 3 labels equal the input"):
        as_model_batch((x, x), max_length=4, vocab_size=10)
    with pytest.raises(ValueError, match=r"input_ids\[\(0, 2\)\] = 10 is outside \[0, 10\)"):
        as_model_batch((torch.tensor([[5, 6, 10, 8]]), y), max_length=4, vocab_size=10)
    with pytest.raises(ValueError, match="exceeds the model's max_length 3"):
        as_model_batch((x, y), max_length=3, vocab_size=10)
    with pytest.raises(ValueError, match="must hold integers"):
        as_model_batch((x.float(), y), max_length=4, vocab_size=10)
    with pytest.raises(ValueError, match="no position in the batch has a label"):
        as_model_batch({"input_ids": x, "labels": torch.full((1, 4), -100)}, max_length=4, vocab_size=10)
    leaky = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"attention_mask\(0, 0, 1\) lets a token attend to a later position"):
        as_model_batch({"input_ids": x, "labels": y, "attention_mask": leaky}, max_length=4, vocab_size=10)
    with pytest.raises(ValueError, match=r"position_ids\[\(0, 3\)\] = 4 is outside \[0, 4\)"):
        as_model_batch({"input_ids": x, "labels": y, "position_ids": torch.tensor([[1, 2, 3, 4]])}, max_length=4)


def test_bad_train_batch_names_the_step(compact):
    ids, vocab = compact
    train, val = windows(ids)
    broken = [*train[:2], (train[2][0], train[2][0])]
    with pytest.raises(SmokeTrainingError, match="train batch at step 2: labels are not the next input token"):
        smoke_train(broken, val, cfg(steps=10), max_length=L, seed=0, vocab_size=vocab)


def test_mask_is_built_from_segment_ids():
    batch = as_model_batch(
        {
            "input_ids": torch.tensor([[1, 2, 3, 4]]),
            "labels": torch.tensor([[2, -100, 4, -100]]),
            "position_ids": torch.tensor([[0, 1, 0, 1]]),
            "segment_ids": torch.tensor([[0, 0, 1, 1]]),
        },
        max_length=4,
        vocab_size=10,
    )
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert batch.kind == "packed" and batch.attn_mask is None
    assert torch.equal(batch.attention(), expected.view(1, 1, 4, 4))
    assert batch.loss_tokens == 2


def test_loss_chart_png():
    png = loss_chart_png([10.8, 9.0, 7.5, 6.9], "smoke training", val_before=10.8, val_after=7.1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(__import__("io").BytesIO(png)).shape == (240, 480, 4)
    assert png == loss_chart_png([10.8, 9.0, 7.5, 6.9], "smoke training", val_before=10.8, val_after=7.1)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match=r"training.grad_clip must be >= 0 \(0 disables clipping\), got -1"):
        TrainingConfig(grad_clip=-1)
    with pytest.raises(ValueError, match=r"training.dropout must be in \[0, 1\), got 1.0"):
        TrainingConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"training\.scan_z_threshold must be < 0"):
        TrainingConfig(scan_z_threshold=0.0)
    with pytest.raises(ValueError, match=r"training\.loss_window must be >= 1, got 0"):
        TrainingConfig(loss_window=0)
    with pytest.raises(ValueError, match=r"training\.steps must be >= 2"):
        smoke_train([], [], TrainingConfig(steps=1), max_length=L, seed=0)


def test_padding_gets_a_segment_of_its_own_and_window_objects_are_accepted():
    batch = as_model_batch(
        {
            "input_ids": torch.tensor([[1, 2, 0, 0]]),
            "labels": torch.tensor([[2, -100, -100, -100]]),
            "segment_ids": torch.tensor([[0, 0, -1, -1]]),
        },
        max_length=4,
        vocab_size=10,
    )
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(batch.attention(), expected.view(1, 1, 4, 4))

    class WindowBatchLike:  # corpus.windows.WindowBatch's shape: .inputs and .targets, [B, L]
        inputs = torch.tensor([[5, 6, 7]])
        targets = torch.tensor([[6, 7, 8]])

    window = as_model_batch(WindowBatchLike(), max_length=3, vocab_size=10)
    assert window.kind == "windows" and window.attention() is None and window.loss_tokens == 3


def test_divergent_learning_rate_is_caught(compact):
    ids, vocab = compact
    train, val = windows(ids)
    with pytest.raises(SmokeTrainingError, match=r"not finite at 9 of 10 steps \(first at step 1: nan\); lr 1000000.0"):
        smoke_train(train, val, cfg(steps=10, learning_rate=1e6), max_length=L, seed=0, vocab_size=vocab)
