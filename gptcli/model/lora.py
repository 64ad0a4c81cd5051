"""LoRA, as appendix E of the book writes it: ``LoRALayer`` and ``LinearWithLoRA``.

``LinearWithLoRA(linear, rank, alpha)`` computes ``linear(x) + alpha * (x @ A @ B)``, with A (in, rank)
drawn like an nn.Linear weight (kaiming-uniform, a=sqrt(5)) and B (rank, out) zeros, so a new adapter
changes nothing until it trains. ``add_lora`` wraps a model's Linear layers (the book's
``replace_linear_with_lora``); ``merge_lora`` folds each adapter back into its weight,
W + alpha * (A @ B)^T, and puts the plain Linear back.

One difference of layout, none of maths: gptcli's attention fuses the book's W_query, W_key and
W_value into one ``W_qkv``, so its adapter holds three (``parts=3``), each of rank ``rank`` over its
own third of the outputs, drawn in the book's order: what three separate adapters compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# A name inside every adapter tensor's name: "trf_blocks.0.att.W_qkv.lora.A".
LORA_MARK = ".lora."


class LoRALayer(nn.Module):
    """alpha * (x @ A @ B) for ``parts`` independent adapters side by side (their outputs concatenated)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, parts: int = 1):
        super().__init__()
        self.parts = parts
        self.alpha = alpha
        self.A = nn.Parameter(torch.empty(parts, in_dim, rank))  # (parts, in, rank)
        if not self.A.is_meta:
            for i in range(parts):  # each as the book's (in_dim, rank) tensor: fan-in is rank
                nn.init.kaiming_uniform_(self.A[i], a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(parts, rank, out_dim // parts))  # (parts, rank, out/parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts == 1:
            return self.alpha * (x @ self.A[0] @ self.B[0])  # (..., out)
        h = torch.einsum("...i,pir->...pr", x, self.A)  # (..., parts, rank)
        return self.alpha * torch.einsum("...pr,pro->...po", h, self.B).flatten(-2)  # (..., out)

    def delta(self) -> torch.Tensor:
        """The change to the Linear weight (out, in): alpha * (A @ B)^T, part by part."""
        return self.alpha * torch.cat([(self.A[i] @ self.B[i]).t() for i in range(self.parts)], dim=0)


class LinearWithLoRA(nn.Module):
    """The book's wrapper: the frozen ``linear`` plus its adapter."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, parts: int = 1):
        super().__init__()
        self.linear = linear
        with torch.device(linear.weight.device):
            self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def _targets(model: nn.Module, include_head: bool) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, Linear, name) for every Linear in the transformer blocks, in module order, and
    the head if asked."""
    found = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, LinearWithLoRA):
            continue
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and (name.startswith("trf_blocks.") or (include_head and name == "out_head")):
                found.append((parent, attr, child, name))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, *, include_head: bool = False) -> list[str]:
    """Wrap the model's Linear layers in LinearWithLoRA (in module order, so a seed draws the same A);
    the head only with ``include_head``. Returns the wrapped layers' names."""
    targets = _targets(model, include_head)
    for parent, attr, child, _ in targets:
        parts = 3 if attr == "W_qkv" else 1  # the book's W_query, W_key, W_value: one adapter each
        setattr(parent, attr, LinearWithLoRA(child, rank, alpha, parts))
    return [name for *_, name in targets]


def lora_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear weight (W + alpha * (A @ B)^T) and unwrap it: the plain model."""
    for name, wrapper in lora_layers(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            delta = wrapper.lora.delta().to(wrapper.linear.weight.dtype)
            wrapper.linear.weight.add_(delta)
        setattr(parent, attr, wrapper.linear)
    return model


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (``...W_qkv.lora.A``), on the CPU."""
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items() if LORA_MARK in name}
