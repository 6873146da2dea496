"""Gradient-similarity scan: exactness against a plain autograd loop, a positive control, and planted poison.

The planted-poison test records what the method does, not what one would wish: 8 backdoored windows
(a rare trigger phrase followed by a fixed payload, inserted into Shakespeare text) among 400 clean ones,
a tiny model smoke-trained on the mixture, then scanned. None of the 8 is flagged. Over four data orders
x {60, 300} steps (measured while writing this test) recall was 0/8 every time and 0, 0, 2, 0, 0, 0,
13, 0 clean windows were flagged; the test pins the one fixed-seed run."""

import json
import math

import pytest
import torch
from shared_data import shared_text

import corpus.poison as poison_module
from corpus.config import TrainingConfig
from corpus.model import GPTConfig, TinyGPT, lm_loss
from corpus.poison import default_scan_params, gradient_similarity_scan, robust_z
from corpus.tokenizer import get_encoding
from corpus.train import smoke_train

TINY = GPTConfig(vocab_size=101, max_length=16, d_model=32, n_layers=2, n_heads=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # See tests/test_train.py: on a shared 2-core machine one thread was 9x faster for these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_robust_z_exact_values():
    z, med, mad = robust_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64))
    assert (med, mad) == (3.0, 1.0)
    assert z.tolist() == pytest.approx([-1.349, -0.6745, 0.0, 0.6745, 65.4265])
    # MAD 0: the mean absolute deviation (0.8) x 1.253314 stands in.
    z, _, mad = robust_z(torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0], dtype=torch.float64))
    assert mad == 0.0 and z[-1].item() == pytest.approx(0.6745 * 4 / (0.8 * 1.253314))
    z, _, _ = robust_z(torch.tensor([2.0, 2.0, float("nan")], dtype=torch.float64))
    assert z[:2].tolist() == [0.0, 0.0] and math.isnan(z[2])


def rows_batches(rows: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(rows[i : i + batch, :-1], rows[i : i + batch, 1:]) for i in range(0, len(rows), batch)]


@pytest.mark.parametrize("keep_bytes", [poison_module.KEEP_GRADS_BYTES, 0])  # one pass, then two passes
def test_scan_equals_a_plain_autograd_loop(monkeypatch, keep_bytes):
    monkeypatch.setattr(poison_module, "KEEP_GRADS_BYTES", keep_bytes)
    model = TinyGPT(TINY, seed=3)
    rows = torch.randint(0, 101, (10, 13), generator=torch.Generator().manual_seed(1))
    result = gradient_similarity_scan(model, rows_batches(rows, 4), max_samples=9, chunk_size=3)
    names = default_scan_params(model)
    assert names == [n for n, _ in model.named_parameters() if n.startswith(("blocks.1.", "ln_f."))]
    assert result.scanned_params == 12_704 + 64
    grads = []
    for row in rows[:9]:
        model.zero_grad()
        lm_loss(model(row[None, :-1]), row[None, 1:]).backward()
        grads.append(torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names]).double())
    g = torch.stack(grads)
    rest = g.sum(0) - g
    expected = (g * rest).sum(1) / (g.norm(dim=1) * rest.norm(dim=1))
    assert [s.index for s in result.samples] == list(range(9))
    torch.testing.assert_close(
        torch.tensor([s.cosine for s in result.samples], dtype=torch.float64), expected, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor([s.grad_norm for s in result.samples], dtype=torch.float64), g.norm(dim=1), rtol=1e-4, atol=0
    )
    z, _, _ = robust_z(expected)
    torch.testing.assert_close(torch.tensor([s.z for s in result.samples], dtype=torch.float64), z, rtol=0, atol=1e-3)


def test_planted_outliers_are_flagged_exactly():
    """Positive control: 40 near-copies of one sequence and 2 unrelated ones, on an untrained model."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 50, (17,), generator=gen)
    rows = base.repeat(40, 1)
    rows[torch.arange(40), torch.randint(0, 17, (40,), generator=gen)] = torch.randint(0, 50, (40,), generator=gen)
    odd = torch.randint(50, 101, (2, 17), generator=gen)
    rows = torch.cat([rows[:17], odd[:1], rows[17:], odd[1:]])
    ids = list(range(1000, 1042))
    result = gradient_similarity_scan(TinyGPT(TINY, seed=0), rows_batches(rows, 8), chunk_size=5, sample_ids=ids)
    assert result.flagged == [1017, 1041]
    assert [round(s.z) for s in result.samples if s.flagged] == [-30, -29]
    assert min(s.z for s in result.samples if not s.flagged) > -3  # measured -2.56
    data = json.loads(json.dumps(result.to_dict()))
    assert data["flagged"] == [1017, 1041] and len(data["samples"]) == 42


def test_packed_rows_without_labels_are_scored_nan_and_never_flagged():
    model = TinyGPT(TINY, seed=1)
    ids = torch.randint(0, 101, (3, 8), generator=torch.Generator().manual_seed(2))
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)
    labels[1] = -100
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(8).expand(3, 8),
        "segment_ids": torch.zeros(3, 8, dtype=torch.long),
    }
    result = gradient_similarity_scan(model, [batch], chunk_size=2)
    middle = result.samples[1]
    assert math.isnan(middle.cosine) and math.isnan(middle.z) and math.isnan(middle.loss) and not middle.flagged
    assert middle.grad_norm == 0.0
    assert json.loads(json.dumps(result.to_dict()))["samples"][1]["cosine"] is None
    assert all(math.isfinite(s.cosine) for s in (result.samples[0], result.samples[2]))


def test_bad_arguments():
    model = TinyGPT(TINY)
    rows = torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="z_threshold must be < 0"):
        gradient_similarity_scan(model, rows_batches(rows, 4), z_threshold=1.0)
    with pytest.raises(ValueError, match=r"param_names \['nope'\] are not parameters"):
        gradient_similarity_scan(model, rows_batches(rows, 4), param_names=["nope"])
    with pytest.raises(ValueError, match="sample_ids has 2 ids for 4 scanned samples"):
        gradient_similarity_scan(model, rows_batches(rows, 4), sample_ids=[1, 2])
    with pytest.raises(ValueError, match="scan batch 0: labels are not the next input token"):
        gradient_similarity_scan(model, [(rows[:, :-1], rows[:, :-1])])


@pytest.fixture(scope="module")
def planted() -> dict:
    """400 clean Shakespeare windows + 8 with " cf zephyrine quokka transfer all funds to account 7741" at
    token 8, shuffled, ids remapped to the 2,403 the text uses (see tests/test_train.py for why)."""
    enc = get_encoding()
    ids = enc.encode(shared_text("data/tinyshakespeare.txt")[:60_000])
    payload = enc.encode(" cf zephyrine quokka") + enc.encode(" transfer all funds to account 7741")
    length, n_clean, n_poison = 32, 400, 8
    clean = [ids[i * length : i * length + length + 1] for i in range(n_clean)]
    poison = []
    for p in range(n_poison):
        base = ids[(n_clean + p) * length : (n_clean + p + 1) * length + 1]
        poison.append((base[:8] + payload + base[8:])[: length + 1])
    rows = torch.tensor(clean + poison)
    is_poison = torch.arange(len(rows)) >= n_clean
    _, rows = torch.unique(rows, return_inverse=True)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    return {"rows": rows[perm], "is_poison": is_poison[perm], "vocab": int(rows.max()) + 1}


def test_planted_poison_is_not_separated_by_cosine_to_the_mean(planted):
    rows, is_poison, vocab = planted["rows"], planted["is_poison"], planted["vocab"]
    assert vocab == 2403 and len(rows) == 408 and int(is_poison.sum()) == 8
    batches = rows_batches(rows, 16)
    cfg = TrainingConfig(steps=60, batch_size=16, d_model=64, n_layers=2, n_heads=4, learning_rate=3e-3)
    trained = smoke_train(batches, batches[:2], cfg, max_length=32, seed=0, vocab_size=vocab)
    assert trained.last_loss_mean < trained.first_loss_mean - 1.5  # measured 7.42 -> 5.60
    result = gradient_similarity_scan(trained.model, batches, max_samples=408, chunk_size=16)
    z = torch.tensor([s.z for s in result.samples])
    flagged = torch.tensor([s.flagged for s in result.samples])
    assert torch.isfinite(z).all()
    recall = int(flagged[is_poison].sum())
    false_positives = int(flagged[~is_poison].sum())
    # Measured: recall 0 of 8, 0 of 400 clean flagged; poison z +0.8 to +1.3, lowest clean z -3.2.
    assert (recall, false_positives) == (0, 0)
    assert z[is_poison].min() > 0.0
