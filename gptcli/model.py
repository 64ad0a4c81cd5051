"""GPT-2 in PyTorch, with the names of "Build a Large Language Model (From Scratch)", chapter 4.

Differences from the book's code are for speed only and leave the maths unchanged:
- Q, K and V are one fused projection (``W_qkv``), initialised in the book's order
  (W_query, W_key, W_value) so that seeded random weights equal the book's.
- attention runs through ``scaled_dot_product_attention``;
- an optional key/value cache (``KVCache``) lets decoding feed one token at a time.

Model code never prints; it only computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcli.config import GPTConfig


class LayerNorm(nn.Module):
    """Biased variance and eps 1e-5, as in GPT-2, so its checkpoints load unchanged."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same as the book's (x - mean) / sqrt(var + eps) * scale + shift, in one kernel.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """The tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class KVCache:
    """Keys and values of every layer for the positions seen so far.

    ``keys[l]`` and ``values[l]`` are (B, nh, max_len, hs); positions [0, length) are filled.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls, cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> "KVCache":
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads  # hs
        self.context_length = context_length
        self.dropout = dropout
        # The book's W_query, W_key and W_value, stacked as rows [q; k; v] of one matrix.
        # skip_init: nn.Linear's own init would draw numbers the book never draws.
        self.W_qkv = nn.utils.skip_init(nn.Linear, d_in, 3 * d_out, bias=qkv_bias, device=torch.get_default_device())
        self._init_qkv_in_book_order(d_in, d_out, qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    @torch.no_grad()
    def _init_qkv_in_book_order(self, d_in: int, d_out: int, qkv_bias: bool) -> None:
        # Draw the numbers three nn.Linear(d_in, d_out) layers would draw, in the same order:
        # weight then bias, for W_query, then W_key, then W_value.
        weight = self.W_qkv.weight
        if weight.is_meta:
            return
        for i in range(3):
            rows = slice(i * d_out, (i + 1) * d_out)
            nn.init.kaiming_uniform_(weight[rows], a=math.sqrt(5))
            if qkv_bias:
                bound = 1 / math.sqrt(d_in)
                nn.init.uniform_(self.W_qkv.bias[rows], -bound, bound)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.W_qkv(x).split(self.d_out, dim=2)  # each (B, T, d_out)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

        past = 0
        if cache is not None:
            past = cache.length
            cache.keys[layer][:, :, past : past + T] = k
            cache.values[layer][:, :, past : past + T] = v
            k = cache.keys[layer][:, :, : past + T]  # (B, nh, past+T, hs)
            v = cache.values[layer][:, :, : past + T]

        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # One new query sees every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # Several new queries after a cached prefix: query i sees keys [0, past + i].
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, self.d_out)  # (B, T, d_out)
        return self.out_proj(y)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer))  # (B, T, emb_dim)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        if cfg.tie_weights:
            # Shares tok_emb's matrix; build the Linear on meta so no throwaway weight is drawn.
            with torch.device("meta"):
                self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
            self.out_head.weight = self.tok_emb.weight
        else:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Re-point the head at tok_emb (needed after ``load_state_dict(assign=True)`` replaces tensors)."""
        if self.cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T).

        With a cache, ``in_idx`` continues the cached positions and the cache is extended.
        """
        B, T = in_idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length {self.cfg.context_length}")
        positions = torch.arange(start, start + T, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (B, T, emb_dim)
        x = self.drop_emb(x)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length = start + T
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab_size)


def build_model(cfg: GPTConfig, device: str | torch.device = "meta") -> GPTModel:
    """A GPTModel on ``device``; on meta (the default) nothing is allocated or drawn."""
    with torch.device(device):
        return GPTModel(cfg)
