"""The optimizer side of a run: the learning-rate schedule and AdamW with its parameter groups."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gptcli.training.settings import TrainSettings

if TYPE_CHECKING:
    import torch

    from gptcli.model.gpt import GPTModel
    from gptcli.kernels.train import TrainPlan


def learning_rate(step: int, s: TrainSettings, total_steps: int) -> float:
    """The lr for optimizer step ``step`` (0-based): constant, or nanoGPT's warm-up plus cosine decay."""
    if s.schedule == "constant":
        return s.lr
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    decay_steps = s.decay_steps or total_steps
    if step > decay_steps:
        return s.min_lr
    ratio = (step - s.warmup_steps) / max(1, decay_steps - s.warmup_steps)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.lr - s.min_lr)


def param_groups(model: "GPTModel", s: TrainSettings) -> list[dict]:
    """AdamW groups: every parameter decayed (the book), or only those with 2+ dimensions (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.decay == "all":
        return [{"params": params, "weight_decay": s.weight_decay}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: "GPTModel", s: TrainSettings, plan: "TrainPlan") -> "torch.optim.AdamW":
    """AdamW over ``param_groups``; fused (one kernel per tensor) where the plan says this torch has it."""
    import torch

    return torch.optim.AdamW(param_groups(model, s), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay,
                             **({"fused": True} if plan.fused_adamw else {}))
