"""A tiny causal Transformer for the copying task.

The attention projections are named ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` and
the MLP projections ``fc_in`` and ``fc_out``, so peft's ``target_modules`` finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "TinyTransformer", "ATTENTION_MODULES", "MLP_MODULES"]

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("fc_in", "fc_out")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the Transformer (the vocabulary includes the separator and padding)."""

    vocab_size: int = 26
    max_len: int = 24
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 128


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with bias-free projections."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, x):
        batch, length, width = x.shape
        return x.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)

    def forward(self, x):
        """``x``: (batch, length, d_model) -> (batch, length, d_model)."""
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """Pre-norm Transformer block: attention then a GELU MLP, both residual."""

    def __init__(self, config):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config.d_model, config.n_heads)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.fc_in = nn.Linear(config.d_model, config.d_mlp)
        self.fc_out = nn.Linear(config.d_mlp, config.d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_mlp(x))))


class TinyTransformer(nn.Module):
    """Decoder-only Transformer with learned positions; returns next-token logits.

    Parameters
    ----------
    config : ModelConfig
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_len, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, tokens):
        """``tokens``: (batch, length) int64 -> logits (batch, length, vocab_size)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for layer in self.layers:
            x = layer(x)
        return self.unembed(self.ln_final(x))
