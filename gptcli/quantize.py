"""Weight-only int8 quantization of the Linear layers, one scale per output channel.

Decoding at batch 1 reads every weight once per token, so int8 weights (1 byte) move a quarter of
the bytes of float32. Activations stay in floating point: on CPU the kernel
``torch._weight_int8pack_mm`` wants bfloat16 activations (with float32 ones it ran 5x slower here),
so int8 runs with ``--dtype bfloat16``; the embeddings and norms stay in that dtype too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcli.errors import UserError


class Int8Linear(nn.Module):
    """y = (x @ W_int8.T) * scale + bias, with W_int8 = round(W / scale), scale = max|W_row| / 127."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        self.register_buffer("weight", weight_int8)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int8Linear":
        w = linear.weight.detach().float()  # (out, in)
        # Round the scales to the activation dtype first, so the int8 values fit the scales in use.
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(dtype)  # (out,)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(q, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            # The element-wise form Inductor turns into a vectorised reduction (see model.Linear).
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1) * self.scales.float()
            y = y.to(x.dtype)
        elif x.device.type in ("cpu", "mps"):
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales).view(*x.shape[:-1], self.out_features)
        else:
            # No int8 weight-only kernel here: dequantize on the fly (correct, not faster than bf16).
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) by an Int8Linear; returns the model.

    A head tied to the token embedding gets its own int8 copy; the embedding stays in ``dtype``
    for the lookup.
    """
    if dtype == torch.float32:
        raise UserError("--quantize int8 needs --dtype bfloat16 or float16 activations (int8 kernels take those)")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child, dtype))
    return model
