"""Weight-only quantization of the Linear layers: int8 (one scale per output channel) and int4
(a scale and a zero point per group of input channels).

Decoding at batch 1 reads every weight once per token, so int8 weights (1 byte) move a quarter of
the bytes of float32, and int4 (half a byte, plus its group scales) about an eighth. Activations
stay in floating point: on CPU the kernel ``torch._weight_int8pack_mm`` wants bfloat16 activations
(with float32 ones it ran 5x slower here), so int8 runs with ``--dtype bfloat16``; the embeddings
and norms stay in that dtype too. int4 follows the same rule (see Int4Linear).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcli.errors import UserError

Release = Callable[[torch.Tensor], None]  # called with a float weight nothing needs any more


class Int8Linear(nn.Module):
    """y = (x @ W_int8.T) * scale + bias, with W_int8 = round(W / scale), scale = max|W_row| / 127."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        self.register_buffer("weight", weight_int8)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gemm_template = amx_template()  # decided here: torch.compile cannot trace the probe

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int8Linear":
        w = linear.weight.detach().float()  # (out, in)
        # Round the scales to the activation dtype first, so the int8 values fit the scales in use.
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(dtype)  # (out,)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(q, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.device.type == "cpu" and self.gemm_template:
            # The weight-only int8 pattern Inductor recognises: with frozen weights and max-autotune
            # (COMPILE_OPTIONS) its C++ GEMM template multiplies the int8 weights with AMX
            # micro-kernels, 200 against 135 tok/s for 124M on the Intel Xeon.
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        elif torch.compiler.is_compiling() and x.shape[-2] == 1:
            # The element-wise form Inductor turns into a vectorised reduction: 78% of the int8
            # bandwidth limit on the AMD EPYC (AVX-512, no AMX), 53% on the Intel Xeon.
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


# torch.compile's options for a model with Int8Linear layers on a CPU with AMX: frozen weights (so
# Inductor may pack them) and its C++ GEMM template, chosen by measuring. Cold compiles take longer
# (35-45 against 27 s for 124M); the on-disk cache keeps them (~6 s warm).
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def amx_template() -> bool:
    """Whether compiled int8 steps take Inductor's C++ GEMM template: on CPUs with AMX tiles, where it
    was measured (Intel Xeon); elsewhere the element-wise form stays, measured fastest on the AMD EPYC."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def compile_options(model: nn.Module, device: torch.device) -> dict | None:
    """``COMPILE_OPTIONS`` for an int8 model on a CPU with AMX, else None (torch.compile's defaults)."""
    if device.type == "cpu" and any(isinstance(m, Int8Linear) and m.gemm_template for m in model.modules()):
        return dict(COMPILE_OPTIONS)
    return None


def quantize_int8(model: nn.Module, dtype: torch.dtype, release: Release | None = None) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) by an Int8Linear; returns the model.

    A head tied to the token embedding gets its own int8 copy; the embedding stays in ``dtype``
    for the lookup. ``release(weight)`` is called on each float weight once quantized (see
    ``_released``).
    """
    if dtype == torch.float32:
        raise UserError("--quantize int8 needs --dtype bfloat16 or float16 activations (int8 kernels take those)")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child, dtype))
                _released(model, child, release)
    return model


def _released(model: nn.Module, linear: nn.Linear, release: Release | None) -> None:
    """Hand a quantized layer's float weight to ``release`` (a memory-mapped checkpoint's pages go back,
    so quantizing 1558M never holds its float weights whole), unless an embedding still uses it."""
    if release is not None and all(m.weight is not linear.weight for m in model.modules()
                                   if isinstance(m, nn.Embedding)):
        release(linear.weight)


INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
INT4_DEFAULT_GROUP_SIZE = 32
_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu wants out_features divisible by 16


def int4_group_quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (min/max) 4-bit quantization of ``weight`` (N, K) in groups of ``group_size`` inputs.

    Returns ``q`` (N, K) int32 in 0..15 and ``scales_and_zeros`` (K / group_size, N, 2) in ``dtype``,
    the layout of torch's CPU int4 kernel, which dequantizes w = (q - 8) * scale + zero.
    """
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    # Round scale and zero to the activation dtype first, so q is chosen for the values in use.
    scales = ((hi - lo).clamp(min=1e-8) / 15.0).to(dtype)  # (N, G)
    zeros = (lo + 8.0 * scales.float()).to(dtype)  # (N, G): the value of q = 8
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8.0).clamp(0, 15)
    q = q.to(torch.int32).reshape(n, k)  # (N, K)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return q, scales_and_zeros


def int4_dequantize(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 (N, K) weights that ``int4_group_quantize``'s output stands for."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    w = (q.float().reshape(n, k // group_size, group_size) - 8.0) * sz[..., :1] + sz[..., 1:]
    return w.reshape(n, k)


class Int4Linear(nn.Module):
    """y = x @ W.T + bias, W stored as 4-bit integers with a scale and zero per group of inputs.

    On the CPU it runs torch's kernel ``aten._weight_int4pack_mm_for_cpu``, which has a meta
    implementation, so it traces under torch.compile (as an external call). Its shapes: in_features
    divisible by the group size (32, 64, 128 or 256) and out_features by 16; other out_features
    (GPT-2's vocabulary of 50257) are padded with zero rows and the output sliced back, 15 rows more
    for the head. The kernel takes float32 activations too, but ran ~40x slower with them than with
    bfloat16 here, so int4 keeps int8's rule: bfloat16 or float16 activations.
    Elsewhere (CUDA, MPS) the weight is kept as plain nibbles and dequantized on the fly: correct,
    not faster than bfloat16.
    """

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, group_size: int, cpu_kernel: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.cpu_kernel = cpu_kernel
        # (N_padded, K / 2) uint8: the CPU kernel's layout, or else two nibbles a byte, low one first.
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K / group, N_padded, 2)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, group_size: int = INT4_DEFAULT_GROUP_SIZE,
                    cpu_kernel: bool | None = None) -> "Int4Linear":
        n, k = linear.weight.shape
        check_int4_shape(k, group_size)
        w = linear.weight.detach()  # (N, K)
        if cpu_kernel is None:
            cpu_kernel = w.device.type == "cpu"
        padded = -n % _INT4_N_MULTIPLE if cpu_kernel else 0
        if padded:
            w = torch.cat([w, w.new_zeros(padded, k)])  # (N_padded, K)
        q, scales_and_zeros = int4_group_quantize(w, group_size, dtype)
        if cpu_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # innerKTiles: unused on CPU
        else:
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (N, K / 2)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(packed, scales_and_zeros, bias, k, n, group_size, cpu_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel:
            x2 = x.reshape(-1, self.in_features)  # (M, K)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
            if y.shape[-1] != self.out_features:
                y = y[:, : self.out_features]  # drop the padding rows
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y

    def dequantized(self) -> torch.Tensor:
        """The (N, K) float32 weights, from the plain-nibble layout (not the CPU kernel's)."""
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).reshape(self.out_features, self.in_features)
        return int4_dequantize(q, self.scales_and_zeros, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


def int4_group_size(scheme: str) -> int | None:
    """The group size a ``--quantize`` value names: ``int4`` (the default) or ``int4-gN``; else None."""
    if scheme == "int4":
        return INT4_DEFAULT_GROUP_SIZE
    if scheme.startswith("int4-g") and scheme[len("int4-g"):] in {str(g) for g in INT4_GROUP_SIZES}:
        return int(scheme[len("int4-g"):])
    return None


def check_int4_shape(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        raise UserError(f"int4 group size must be one of {sizes}, got {group_size}")
    if in_features % group_size:
        raise UserError(f"int4 needs each Linear's in_features divisible by the group size {group_size}; "
                        f"got a layer with {in_features}")


def quantize_int4(model: nn.Module, dtype: torch.dtype, group_size: int = INT4_DEFAULT_GROUP_SIZE,
                  release: Release | None = None) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) by an Int4Linear; returns the model.

    As with int8, a head tied to the token embedding gets its own int4 copy and the embedding stays
    in ``dtype``. The shapes are checked before any layer is replaced, so a refusal leaves the model whole.
    """
    if dtype == torch.float32:
        raise UserError("--quantize int4 needs --dtype bfloat16 or float16 activations (int4 kernels take those)")
    linears = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if isinstance(child, nn.Linear)]
    for _, _, child in linears:
        check_int4_shape(child.in_features, group_size)
    for module, name, child in linears:
        setattr(module, name, Int4Linear.from_linear(child, dtype, group_size))
        _released(model, child, release)
    return model
