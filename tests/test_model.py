import pytest
import torch

from corpus.config import TrainingConfig
from corpus.model import GPTConfig, TinyGPT, lm_loss

SMALL = GPTConfig(vocab_size=101, max_length=16, d_model=32, n_layers=2, n_heads=4)


def tokens(shape: tuple[int, ...], seed: int = 0, high: int = 101) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_tied_head():
    model = TinyGPT(SMALL, seed=1)
    logits = model(tokens((3, 10)))
    assert logits.shape == (3, 10, 101)
    assert model.head.weight is model.tok_emb.weight
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_param_count_counts_the_tied_matrix_once():
    # tok 101x32 = 3232, pos 16x32 = 512, per block: 2 LayerNorms 128 + qkv 3168 + proj 1056 + MLP 4224 + 4128
    # = 12704, two blocks 25408, final LayerNorm 64.
    model = TinyGPT(SMALL)
    assert model.param_count() == 3232 + 512 + 25408 + 64 == 29216
    assert model.param_count(non_embedding=True) == 29216 - 3232


def test_default_size():
    model = TinyGPT(GPTConfig.from_training(TrainingConfig(), max_length=256))
    assert model.config == GPTConfig(vocab_size=50257, max_length=256, d_model=64, n_layers=2, n_heads=4)
    assert model.param_count() == 3_332_928  # 50257 x 64 = 3,216,448 of them in the token embedding
    assert model.param_count(non_embedding=True) == 116_480


def test_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = TinyGPT(SMALL, seed=7), TinyGPT(SMALL, seed=7), TinyGPT(SMALL, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert a.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert torch.equal(a.ln_f.weight, torch.ones(32))


@torch.no_grad()
def test_future_tokens_do_not_change_past_logits():
    model = TinyGPT(SMALL, seed=2).eval()
    x = tokens((2, 12), seed=3)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 101
    lx, ly = model(x), model(y)
    torch.testing.assert_close(lx[:, :7], ly[:, :7], rtol=0, atol=1e-6)
    assert (lx[:, 7:] - ly[:, 7:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


@torch.no_grad()
def test_explicit_causal_mask_equals_is_causal():
    model = TinyGPT(SMALL, seed=3).eval()
    x = tokens((2, 12), seed=4)
    mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    torch.testing.assert_close(model(x, attn_mask=mask), model(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_packed_segments_match_running_each_document_alone():
    model = TinyGPT(SMALL, seed=4).eval()
    doc_a, doc_b = tokens((1, 5), seed=5), tokens((1, 7), seed=6)
    packed = torch.cat([doc_a, doc_b], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    mask = ((segments[:, :, None] == segments[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()).unsqueeze(1)
    out = model(packed, position_ids=positions, attn_mask=mask)
    torch.testing.assert_close(out[:, :5], model(doc_a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(doc_b), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padding_rows_with_an_all_false_mask_stay_finite():
    model = TinyGPT(SMALL, seed=5).eval()
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[:, :, 4:, :] = False  # two padding positions that may attend to nothing
    assert torch.isfinite(model(tokens((1, 6)), attn_mask=mask)).all()


def test_lm_loss_ignores_minus_100():
    logits = torch.randn(2, 4, 101, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, -100, 4], [-100, -100, 7, 8]])
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    assert lm_loss(logits, torch.full((2, 4), -100)).isnan()


def test_save_and_load_round_trip(tmp_path):
    model = TinyGPT(SMALL, seed=6).eval()
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = TinyGPT.load(path).eval()
    assert loaded.config == SMALL
    assert loaded.head.weight is loaded.tok_emb.weight
    x = tokens((2, 9))
    assert torch.equal(loaded(x), model(x))


def test_config_validation():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be a multiple of n_heads \(4\)"):
        GPTConfig(d_model=30)
    with pytest.raises(ValueError, match=r"GPTConfig\.dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"GPTConfig\.max_length must be >= 1, got 0"):
        GPTConfig(max_length=0)
    assert GPTConfig.from_training(TrainingConfig(d_model=64, dropout=0.1), max_length=32).dropout == 0.1
