"""Attention functions with ``gptcli.model.gpt.causal_attention``'s maths, for callers that need more than its
one call: decoders pass one to ``GPTModel.forward(attention=...)``. Leaf of the model: imports only it.

- ``row_invariant``: on the CPU, each row of a padded batch and each of several new queries attends
  with the very call a lone one-token step makes, so a row's bits do not depend on the batch or on
  how many tokens were fed at once (``--each-line``, ``serve`` and speculative decoding promise that);
- ``explicit_softmax``: plain softmax attention for the compiled decode step, which Inductor fuses;
- ``invariant_on(device)``: the function decoders use on ``device``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptcli.model.gpt import Attention, Context, causal_attention

# Where decoders take rows and queries one by one, for batch invariance. Not on a GPU: its matmuls are
# not batch-invariant anyway, and B small kernels per layer cost time there.
ROW_ATTENTION_DEVICES = ("cpu",)


def row_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, dropout_p: float) -> torch.Tensor:
    """Padded rows each alone (a prefill from position 0, or a one-token step), several queries after a
    cached prefix each alone; anything else as ``causal_attention``."""
    T = q.shape[2]
    if ctx.pad_rows is not None and ctx.input_pos is None and (ctx.past == 0 or T == 1):
        return attend_rows(q, k, v, ctx.pad_rows, ctx.past, dropout_p)
    if ctx.mask is None and ctx.past > 0 and T > 1:
        return attend_queries(q, k, v, ctx.past, dropout_p)
    return causal_attention(q, k, v, ctx, dropout_p)


def explicit_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, dropout_p: float) -> torch.Tensor:
    """The compiled decode step's attention under ``ctx.mask``, written out so Inductor fuses it: the CPU
    flash kernel took ~260 us per call here for one query, a fifth of a 124M bfloat16 step."""
    assert ctx.mask is not None and dropout_p == 0.0, "the compiled step attends under its mask, without dropout"
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, L)
    weights = scores.masked_fill(~ctx.mask, float("-inf")).softmax(dim=-1)
    return (weights @ v.float()).to(q.dtype)  # (B, nh, T, hs)


def invariant_on(device: torch.device) -> Attention:
    """The attention decoders and batched scoring pass to the model on ``device``: row_invariant on the
    CPU, causal_attention elsewhere."""
    return row_invariant if device.type in ROW_ATTENTION_DEVICES else causal_attention


def for_compiled_step(device: torch.device) -> Attention:
    """The attention of ``torch.compile``'d decode steps on ``device``."""
    return explicit_softmax if device.type == "cpu" else causal_attention


def attend_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_rows: list[int], past: int, dropout_p: float
) -> torch.Tensor:
    """Attention (B, nh, T, hs) for left-padded rows, each row by itself over its real keys.

    Row b's real keys are cache positions [pad_rows[b], past + T). Each row makes exactly the call a
    lone sequence of those tokens makes in ``causal_attention`` (causal for a prefill from
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


def attend_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, dropout_p: float) -> torch.Tensor:
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
