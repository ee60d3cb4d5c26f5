"""A small transformer for sequence classification over a token vocabulary.

Built for the "grokking" tasks (``sampa_ray.data.modadd``: tokens ``[a, b, =]``, label
``(a + b) mod p``), readable top to bottom in the style of nanoGPT:

    tokens (N, T) int64
      -> token embedding + learned position embedding        (N, T, d_model)
      -> ``layers`` pre-LN blocks:  x + attn(ln1(x)),  then  x + mlp(ln2(x))
      -> final LayerNorm -> the last position (the '=' token) -> Linear -> (N, num_classes)

Attention is bidirectional (no causal mask) and hand-written, so it is plain, deterministic
torch on CPU. There is no BatchNorm: a replica's output depends on its parameters and its batch
only. Initialisation (GPT-2's: normal(0, 0.02), zero biases) draws from torch's global RNG, so
``torch.manual_seed`` first makes the parameters reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sampa_ray.errors import UserError

__all__ = ["Transformer", "build"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: one projection to q, k, v; softmax(q k^T / sqrt(d)) v."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (N, T, d) -> (N, heads, T, d / heads)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = self.drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(n, t, d)  # heads side by side again
        return self.drop(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block: attention, then an MLP, each on a residual branch."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token + position embeddings, ``layers`` blocks, final LayerNorm, last-position readout."""

    def __init__(self, num_classes: int, vocab: int, seq_len: int, d_model: int, heads: int,
                 layers: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(d_model, heads, mlp_ratio, dropout)
                                      for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        for m in self.modules():  # GPT-2 init (LayerNorms keep weight 1, bias 0)
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens, longer than seq_len={self.seq_len}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        x = self.ln_f(self.blocks(self.drop(x)))
        return self.head(x[:, -1])  # the last position ('=') reads out the class


def _int(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"model_args.{field}: must be an integer >= {minimum}, got {value!r}")
    return value


def build(num_classes: int, vocab: int | None = None, seq_len: int = 3, d_model: int = 128,
          heads: int = 4, layers: int = 1, mlp_ratio: int = 4,
          dropout: float = 0.0) -> Transformer:
    """The transformer with ``num_classes`` outputs for int64 tokens ``(N, T)``, T <= seq_len;
    ``vocab`` defaults to ``num_classes + 1`` (the '=' token is ``num_classes``). A bad argument
    is a one-line UserError naming it."""
    num_classes = _int("num_classes", num_classes, 1)
    vocab = _int("vocab", num_classes + 1 if vocab is None else vocab, 1)
    seq_len, layers = _int("seq_len", seq_len, 1), _int("layers", layers, 1)
    d_model, mlp_ratio = _int("d_model", d_model, 1), _int("mlp_ratio", mlp_ratio, 1)
    if _int("heads", heads, 1) and d_model % heads:
        raise UserError(f"model_args.heads: must divide d_model={d_model}, got {heads!r}")
    if (isinstance(dropout, bool) or not isinstance(dropout, int | float)
            or not 0.0 <= dropout < 1.0):
        raise UserError(f"model_args.dropout: must be a number in [0, 1), got {dropout!r}")
    return Transformer(num_classes, vocab, seq_len, d_model, heads, layers, mlp_ratio,
                       float(dropout))
