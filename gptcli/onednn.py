"""oneDNN's fused linear, the one matrix kernel both decoding and training lean on on the CPU.

A leaf module: it imports only torch, so ``model.py``, ``decode_kernels.py`` and ``train_kernels.py``
can all use it without importing each other.
"""

from __future__ import annotations

import torch

# oneDNN's fused linear and its weight packing: in CPU builds of torch with mkldnn (all the official ones).
AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
             and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
DTYPES = (torch.float32, torch.bfloat16)


def linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN: x (..., in), weight (out, in) or packed -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """oneDNN's linear over the rows of ``x`` (..., in), never with a single row.

    oneDNN gives a row the same bits among 2, 3, ... or 512 rows, but runs a lone row through a
    matrix-vector kernel whose rounding differs by ~1e-6, so one row is multiplied as two equal
    rows and the first is kept. With packed weights two rows cost what one did
    (bench/batch_invariance.py).
    """
    if x.numel() == x.shape[-1]:
        pair = x.reshape(1, x.shape[-1]).expand(2, -1).contiguous()  # (2, in)
        return linear_pointwise(pair, weight, bias)[:1].view(*x.shape[:-1], out_features)  # (..., out)
    return linear_pointwise(x.contiguous(), weight, bias)
