"""A tiny GPT for smoke training: just enough model to show that the shards train.

Token + learned position embeddings, `n_layers` pre-norm blocks (LayerNorm -> causal self-attention ->
residual, LayerNorm -> 4x GELU MLP -> residual), a final LayerNorm and an output head tied to the token
embedding. Attention is `scaled_dot_product_attention`: `is_causal=True` for plain windows (the fused
kernels' fast path), or a boolean `attn_mask` [B, 1, L, L] (True = may attend) for packed rows, where a
token must not see the documents packed before it.

Size: GPT-2's 50,257-token vocabulary dominates. At the default d_model 128 the tied embedding alone is
50,257 x 128 = 6.43M parameters while two blocks are 2 x 12 x 128^2 = 0.39M; the whole model is 6.86M
parameters, 0.43M of them outside the token embedding ("non-embedding", the figure usually quoted for
compute). The output head costs 2 x 50,257 x d_model FLOPs per token forward, about 94% of the model's
FLOPs at d_model 128 and 2 layers, which is what bounds CPU speed.

Initialisation is GPT-2's (normal, std 0.02; residual projections 0.02 / sqrt(2 n_layers)) drawn from a
private `torch.Generator` seeded by `seed`, so two models built with the same seed are bit-identical and
building one leaves the global RNG untouched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corpus.config import TrainingConfig

GPT2_VOCAB = 50257
IGNORE_INDEX = -100


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the tiny GPT; `from_training` sizes it from the pipeline's `TrainingConfig`."""

    vocab_size: int = GPT2_VOCAB
    max_length: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_length", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_training(cls, cfg: TrainingConfig, *, max_length: int, vocab_size: int = GPT2_VOCAB) -> GPTConfig:
        return cls(
            vocab_size=vocab_size,
            max_length=max_length,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            dropout=cfg.dropout,
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # [B, L, D] -> [B, H, L, D/H]
        q, k, v = (t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TinyGPT(nn.Module):
    """`forward(input_ids, position_ids=None, attn_mask=None) -> logits [B, L, vocab_size]`."""

    def __init__(self, cfg: GPTConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = cfg
        # The layers' own default init draws from the global RNG; it is overwritten by reset_parameters,
        # so it runs on a forked RNG state and building a model leaves the caller's random stream alone.
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.max_length, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one [vocab, d_model] matrix, counted once
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 initialisation from a private generator: same seed, bit-identical weights."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.proj", "mlp.2")) else 0.02
                if module is self.head:
                    continue  # its weight is tok_emb's, initialised below
                # Drawn on CPU and copied so that the values do not depend on the module's device.
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def param_count(self, *, non_embedding: bool = False) -> int:
        """Parameters, the tied matrix counted once; `non_embedding` leaves out the token embedding."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields the tied tensor once
        return total - self.tok_emb.weight.numel() if non_embedding else total

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, length = input_ids.shape
        assert length <= self.config.max_length, f"sequence length {length} > max_length {self.config.max_length}"
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)
        if attn_mask is not None:
            assert attn_mask.dtype == torch.bool, f"attn_mask must be bool (True = may attend), got {attn_mask.dtype}"
            assert attn_mask.shape[-2:] == (length, length), f"attn_mask {tuple(attn_mask.shape)} vs L={length}"
            # A row with no True gives softmax over nothing = NaN, which backpropagates into every weight
            # (padding rows of a packed batch are such rows). Every causal mask allows the diagonal, so
            # allowing it always changes nothing for a well-formed mask and keeps padding rows finite.
            eye = torch.eye(length, dtype=torch.bool, device=attn_mask.device)
            attn_mask = attn_mask | eye
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.head(self.ln_f(x))

    def save(self, path: str | Path) -> None:
        """Write config + weights; `TinyGPT.load(path)` restores them (weights_only, no pickle code)."""
        torch.save({"config": dataclasses.asdict(self.config), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> TinyGPT:
        blob: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
        model = cls(GPTConfig(**blob["config"]))
        model.load_state_dict(blob["state_dict"])
        return model


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (NaN if there are none)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
