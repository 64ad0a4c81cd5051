"""GPT-2 in PyTorch, with the names of "Build a Large Language Model (From Scratch)", chapter 4.

Differences from the book's code are for speed only and leave the maths unchanged:
- Q, K and V are one fused projection (``W_qkv``), initialised in the book's order
  (W_query, W_key, W_value) so that seeded random weights equal the book's.
- attention runs through ``scaled_dot_product_attention`` (``causal_attention``);
- an optional key/value cache (``KVCache``) lets decoding feed one token at a time.

Speed is applied from outside, as in gpt-fast: ``gptcli.kernels`` swaps the plain ``nn.Linear`` layers
for its own, and decoders pass attention functions of the same maths (``gptcli.model.attention``).
Model code never prints; it only computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcli.config import GPTConfig
from gptcli.model.kv_cache import KVCache


class LayerNorm(nn.Module):
    """Biased variance and eps 1e-5, as GPT-2's (its weights load unchanged); ``bias=False`` drops the shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

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
        gelu = GELU() if cfg.gelu == "tanh" else nn.GELU()  # the book's (GPT-2's) GELU, or nanoGPT's exact one
        self.layers = nn.Sequential(nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias), gelu,
                                    nn.Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class Context:
    """What every layer of one forward call shares (``GPTModel.forward`` makes it)."""

    cache: KVCache | None = None
    past: int = 0  # positions already in the cache; the new tokens follow them
    input_pos: torch.Tensor | None = None  # (T,) cache positions to write (the static-shape compiled step)
    mask: torch.Tensor | None = None  # (B|1, 1, T, Tk), True where a query may attend; None: causal
    pad_rows: list[int] | None = None  # each row's left padding, for attention that takes rows alone
    attend: "Attention | None" = None  # None: causal_attention


# (q, k, v, context, dropout_p) -> (B, nh, T, hs): q (B, nh, T, hs) against k, v (B, nh, Tk, hs)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Context, float], torch.Tensor]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v, where query i of T sees the keys up to its own position (``ctx.mask``'s
    keys when given), through scaled_dot_product_attention."""
    if ctx.mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, dropout_p=dropout_p)
    T, past = q.shape[2], k.shape[2] - q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new query sees every cached position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    causal = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, past+T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout_p)


NO_CONTEXT = Context()


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False,
                 bias: bool = True):
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
        self.out_proj = nn.Linear(d_out, d_out, bias=bias)

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

    def forward(self, x: torch.Tensor, ctx: Context = NO_CONTEXT, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.W_qkv(x).split(self.d_out, dim=2)  # each (B, T, d_out)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v, ctx.past, ctx.input_pos)  # (B, nh, Tk, hs)
        attend = ctx.attend or causal_attention
        y = attend(q, k, v, ctx, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.d_out)  # (B, T, d_out)
        return self.out_proj(y)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(d_in=cfg.emb_dim, d_out=cfg.emb_dim, context_length=cfg.context_length,
                                      num_heads=cfg.n_heads, dropout=cfg.drop_rate, qkv_bias=cfg.qkv_bias,
                                      bias=cfg.bias)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim, bias=cfg.bias)
        self.norm2 = LayerNorm(cfg.emb_dim, bias=cfg.bias)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, ctx: Context = NO_CONTEXT, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), ctx, layer))  # (B, T, emb_dim)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = _embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = _embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, bias=cfg.bias)
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

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None, *, pad: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, last_only: bool = False, head: bool = True,
                attention: Attention | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T); (B, 1, vocab_size) with ``last_only``.

        - ``cache``: ``in_idx`` continues the cached positions and the cache is extended.
        - ``pad`` (B,): how many left-padding tokens each row starts with. Their positions do not
          count (a row's first real token is at position 0) and no real token attends to them.
        - ``input_pos`` (T,): the static-shape decode step for torch.compile (batch rows unpadded):
          write at these cache positions and attend over the whole cache. ``cache.length`` is not
          touched; the caller tracks it.
        - ``last_only``: apply the output head to the last position only (a prompt's prefill needs
          nothing else, and the head is the largest matrix).
        - ``head=False``: the final-normed hidden states (B, T, emb_dim) instead of logits, for callers
          that apply ``out_head`` to a few positions only (scoring) or fuse it with the loss
          (``gptcli.kernels.train.head_loss``).
        - ``attention``: another function with ``causal_attention``'s maths (``gptcli.model.attention``).
        """
        B, T = in_idx.shape
        start = cache.length if cache is not None and input_pos is None else 0
        pad_rows = pad.tolist() if pad is not None else None
        if input_pos is not None:
            assert cache is not None, "input_pos needs a cache"
            positions = input_pos  # (T,)
            key_pos = torch.arange(cache.max_len, device=in_idx.device)  # (L,)
            mask = (key_pos[None, :] <= input_pos[:, None]).view(1, 1, T, cache.max_len)
        else:
            longest = start + T - (min(pad_rows) if pad_rows else 0)  # the real length of the longest row
            if longest > self.cfg.context_length:
                raise ValueError(f"sequence of {longest} tokens exceeds context_length {self.cfg.context_length}")
            positions = torch.arange(start, start + T, device=in_idx.device)  # (T,)
            mask = None
            if pad is not None:
                positions, mask = _padded_positions_and_mask(positions, pad, start)
        ctx = Context(cache, start, input_pos, mask, pad_rows, attention)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (B, T, emb_dim)
        x = self.drop_emb(x)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, ctx, layer)
        if cache is not None and input_pos is None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]  # (B, 1, emb_dim)
        x = self.final_norm(x)  # (B, T, emb_dim)
        return self.out_head(x) if head else x  # (B, T, vocab_size) or (B, T, emb_dim)


def _padded_positions_and_mask(positions: torch.Tensor, pad: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row positions (B, T) and attention mask (B, 1, T, start+T) for left-padded rows.

    A real token attends causally to the real tokens of its row. A padding token attends only to
    itself: a query with every key masked would give NaN, and NaN in a padding token's value would
    leak into real rows through a zero attention weight (0 * NaN = NaN).
    """
    row_pos = (positions[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
    key = torch.arange(start + positions.shape[0], device=pad.device)  # (Tk,)
    causal = key[None, :] <= positions[:, None]  # (T, Tk)
    is_self = key[None, :] == positions[:, None]  # (T, Tk)
    real_key = key[None, :] >= pad[:, None]  # (B, Tk)
    mask = causal[None] & (real_key[:, None, :] | is_self[None])  # (B, T, Tk)
    return row_pos, mask[:, None]


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding; on the meta device without its init, which draws nothing there anyway but whose
    ``normal_`` meta kernel imports torch._dynamo: a second or more on every checkpoint load."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def build_model(cfg: GPTConfig, device: str | torch.device = "meta") -> GPTModel:
    """A GPTModel on ``device``; on meta (the default) nothing is allocated or drawn."""
    with torch.device(device):
        return GPTModel(cfg)
