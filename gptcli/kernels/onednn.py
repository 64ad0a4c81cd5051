"""oneDNN's fused linear, the one matrix kernel both decoding and training lean on on the CPU, and
``InferenceLinear``, the swap that gives a model's ``nn.Linear`` layers its row-invariant inference.

A leaf module: it imports only torch, so ``decode_kernels.py`` and ``train_kernels.py`` can both use
it without importing each other.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class InferenceLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose CPU inference (no autograd) goes through
    oneDNN's ``linear``: a row gets the same bits alone or among up to 8 rows, and it beat MKL's sgemm
    for one to eight rows on the AMD EPYC measured (bench/batch_invariance.py). Training, autocast and
    compiled graphs take F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and AVAILABLE and not torch.is_grad_enabled() and x.dtype in DTYPES
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return linear(x, self.weight, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module, cls: type, only: Callable[[nn.Module], bool] = lambda m: True) -> list[nn.Module]:
    """Make each ``nn.Linear`` of ``model`` (that ``only`` accepts) a ``cls``, a subclass of nn.Linear that
    adds no parameters: the same object, so parameters, their names and a tied head stay as they are.
    Returns the layers swapped."""
    swapped = [m for m in model.modules() if isinstance(m, nn.Linear) and only(m)]
    for m in swapped:
        m.__class__ = cls
    return swapped


def use_for_inference(model: nn.Module) -> nn.Module:
    """Give the plain ``nn.Linear`` layers of ``model`` row-invariant CPU inference (``InferenceLinear``);
    layers another module already swapped (decode, training or quantized kernels) keep theirs."""
    swap_linears(model, InferenceLinear, only=lambda m: type(m) is nn.Linear)
    return model
