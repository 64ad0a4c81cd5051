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
from gptcli import onednn


# Where left-padded rows attend one by one (_attend_rows), for batch invariance. Not on a GPU: its
# matmuls are not batch-invariant anyway, and B small kernels per layer cost time there.
ROW_ATTENTION_DEVICES = ("cpu",)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) with two hooks for faster kernels.

    - ``decode_kernel``: set by ``gptcli.decode_kernels.apply`` for decoding, the kernel measured fastest
      for this weight's shape on this CPU, holding the weight in its own layout (inference only);
    - ``train_kernel``: set by ``gptcli.train_kernels.prepare``, float32 training matmuls through oneDNN
      with their gradients.

    Without either, CPU inference (no autograd) goes through oneDNN's linear, which beat MKL's
    sgemm for one to eight rows on the AMD EPYC measured (bench/batch_invariance.py).
    """

    train_kernel = None  # a function (x, weight, bias) -> x W^T + b, for float32 training
    decode_kernel = None  # a gptcli.decode_kernels.Kernel: kernel(x, bias) -> x W^T + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_kernel is not None:
            return self.decode_kernel(x, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)  # autocast casts x and the weight, and picks the kernel
        if self.train_kernel is not None and torch.is_grad_enabled() and x.dtype == torch.float32:
            return self.train_kernel(x, self.weight, self.bias)
        if (x.device.type == "cpu" and onednn.AVAILABLE and not torch.is_grad_enabled() and x.dtype in onednn.DTYPES
                and not torch.compiler.is_compiling()):
            return onednn.linear(x, self.weight, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    """Biased variance and eps 1e-5, as in GPT-2, so its checkpoints load unchanged. ``bias=False``
    drops the shift, as nanoGPT's ``bias=False`` does."""

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
        self.layers = nn.Sequential(
            Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias),
            GELU(),
            Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias),
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
        self.W_qkv = nn.utils.skip_init(Linear, d_in, 3 * d_out, bias=qkv_bias, device=torch.get_default_device())
        self._init_qkv_in_book_order(d_in, d_out, qkv_bias)
        self.out_proj = Linear(d_out, d_out, bias=bias)
        # Training may set a faster causal attention (gptcli.train_kernels.prepare): a function
        # (q, k, v, dropout_p) -> the same as scaled_dot_product_attention(..., is_causal=True).
        self.train_kernel = None

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

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        pad_rows: list[int] | None = None,
    ) -> torch.Tensor:
        """``mask`` (B|1, 1, T, Tk), True where a query may attend, replaces the causal rule when given.

        ``pad_rows`` (one int per row: its left padding) makes each row attend on its own on the CPU,
        over its real keys only, with the very call a lone sequence makes (``_attend_rows``); ``mask``
        is then not needed for a prefill from position 0 or a one-token step.

        With ``input_pos`` (T,) the new keys and values are written at those cache positions and the
        queries attend over the whole cache under ``mask``: every shape stays the same from step to
        step, which torch.compile needs. Otherwise the cache is filled from ``cache.length`` on.
        """
        B, T, _ = x.shape
        q, k, v = self.W_qkv(x).split(self.d_out, dim=2)  # each (B, T, d_out)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

        past = 0
        if cache is not None and input_pos is not None:
            cache.keys[layer].index_copy_(2, input_pos, k)
            cache.values[layer].index_copy_(2, input_pos, v)
            k, v = cache.keys[layer], cache.values[layer]  # (B, nh, max_len, hs)
        elif cache is not None:
            past = cache.length
            cache.keys[layer][:, :, past : past + T] = k
            cache.values[layer][:, :, past : past + T] = v
            k = cache.keys[layer][:, :, : past + T]  # (B, nh, past+T, hs)
            v = cache.values[layer][:, :, : past + T]

        dropout_p = self.dropout if self.training else 0.0
        if pad_rows is not None and input_pos is None and (past == 0 or T == 1) and \
                x.device.type in ROW_ATTENTION_DEVICES:
            y = _attend_rows(q, k, v, pad_rows, past, dropout_p)
        elif mask is not None and input_pos is not None and torch.compiler.is_compiling() and x.device.type == "cpu":
            # The compiled decode step: plain softmax attention, which Inductor fuses. The CPU flash
            # kernel took ~260 us per call here for one query, a fifth of a 124M bf16 step.
            scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, L)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (weights @ v.float()).to(q.dtype)  # (B, nh, T, hs)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        elif past == 0:
            if self.train_kernel is not None and torch.is_grad_enabled():
                y = self.train_kernel(q, k, v, dropout_p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # One new query sees every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        elif x.device.type in ROW_ATTENTION_DEVICES:
            # Several new queries after a cached prefix (speculative decoding's verify pass): each
            # query attends alone, with the call a one-token step makes (``_attend_queries``).
            y = _attend_queries(q, k, v, past, dropout_p)
        else:
            # Several new queries after a cached prefix: query i sees keys [0, past + i].
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout_p)
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
            bias=cfg.bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim, bias=cfg.bias)
        self.norm2 = LayerNorm(cfg.emb_dim, bias=cfg.bias)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        pad_rows: list[int] | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, mask, input_pos, pad_rows))  # (B, T, emb_dim)
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
                self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
            self.out_head.weight = self.tok_emb.weight
        else:
            self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Re-point the head at tok_emb (needed after ``load_state_dict(assign=True)`` replaces tensors)."""
        if self.cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        *,
        pad: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        last_only: bool = False,
        head: bool = True,
    ) -> torch.Tensor:
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
          (``gptcli.train_kernels.head_loss``).
        """
        B, T = in_idx.shape
        pad_rows = None
        if input_pos is not None:
            assert cache is not None, "input_pos needs a cache"
            positions = input_pos  # (T,)
            key_pos = torch.arange(cache.max_len, device=in_idx.device)  # (L,)
            mask = (key_pos[None, :] <= input_pos[:, None]).view(1, 1, T, cache.max_len)
        else:
            start = cache.length if cache is not None else 0
            if pad is not None:
                pad_rows = pad.tolist()
            longest = start + T - (min(pad_rows) if pad_rows else 0)  # the real length of the longest row
            if longest > self.cfg.context_length:
                raise ValueError(f"sequence of {longest} tokens exceeds context_length {self.cfg.context_length}")
            positions = torch.arange(start, start + T, device=in_idx.device)  # (T,)
            mask = None
            if pad is not None:
                positions, mask = _padded_positions_and_mask(positions, pad, start)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (B, T, emb_dim)
        x = self.drop_emb(x)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache, layer, mask, input_pos, pad_rows)
        if cache is not None and input_pos is None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]  # (B, 1, emb_dim)
        x = self.final_norm(x)  # (B, T, emb_dim)
        return self.out_head(x) if head else x  # (B, T, vocab_size) or (B, T, emb_dim)


def _attend_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_rows: list[int], past: int, dropout_p: float
) -> torch.Tensor:
    """Attention (B, nh, T, hs) for left-padded rows, each row by itself over its real keys.

    Row b's real keys are cache positions [pad_rows[b], past + T). Each row makes exactly the call a
    lone sequence of those tokens makes in ``MultiHeadAttention.forward`` (causal for a prefill from
    position 0, unmasked for a one-token step), on the same shapes, so its result does not depend on
    the other rows or on its padding: one call for the whole batch under a mask summed the
    softmax over a row's keys in another grouping (the padding shifts them across vector lanes and
    kernel blocks), which moved logits by ~1e-5 and, now and then, a sampled id. The outputs of
    padding positions are zeros; no real token ever attends to them.
    """
    T = q.shape[2]
    if past == 0:
        y = torch.zeros_like(q)
        for b, p in enumerate(pad_rows):
            if p < T:
                y[b : b + 1, :, p:] = F.scaled_dot_product_attention(
                    q[b : b + 1, :, p:], k[b : b + 1, :, p:], v[b : b + 1, :, p:], dropout_p=dropout_p, is_causal=True)
        return y
    return torch.cat([
        F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, p:], v[b : b + 1, :, p:], dropout_p=dropout_p)
        for b, p in enumerate(pad_rows)
    ])  # (B, nh, 1, hs)


def _attend_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, dropout_p: float) -> torch.Tensor:
    """Attention (B, nh, T, hs) for T new queries after ``past`` cached positions, one query at a time.

    Query i sees keys [0, past + i] and makes exactly the unmasked call a one-token cached step
    makes at that position, so its output has the same bits as that step's: one call for all T
    queries under a causal mask rounded differently (~1e-6 in float32), and speculative decoding
    promises the ids of plain decoding.
    """
    T = q.shape[2]
    return torch.cat([
        F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, : past + i + 1], v[:, :, : past + i + 1],
                                       dropout_p=dropout_p)
        for i in range(T)
    ], dim=2)  # (B, nh, T, hs)


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
