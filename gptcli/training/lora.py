"""LoRA in a training run (appendix E), for any task: applied once the model is built, before the
trainer swaps in its kernels (they reach the Linear inside each ``LinearWithLoRA``).

``apply_lora`` wraps every Linear of the transformer blocks (``gptcli.model.lora.add_lora``: the book's
``replace_linear_with_lora``) and freezes everything else, so only the adapters train, and a
classifier's new head, which has nothing to adapt from. ``trainable_for`` sets ``requires_grad`` as a
run's settings say (a resumed run rebuilds its model first, then calls it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gptcli.errors import UserError
from gptcli.training.settings import TrainSettings

if TYPE_CHECKING:
    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel


def check_lora(settings: TrainSettings, cfg: "GPTConfig", has_base: bool) -> None:
    """A rank of 1 up to the layer width (emb_dim: the narrowest side of every wrapped Linear), and
    weights to adapt."""
    if not settings.lora:
        return
    if settings.lora > cfg.emb_dim:
        raise UserError(f"--lora {settings.lora}: the rank must be 1 to the layer width {cfg.emb_dim} (emb_dim of "
                        f"{cfg.name}); the book uses 16")
    if not has_base:
        raise UserError("--lora adapts existing weights: pass --weights (auto for OpenAI's GPT-2, a run folder, a "
                        "file, a Hub id, or random for an untrained base)")


def trainable_for(model: "GPTModel", settings: TrainSettings) -> None:
    """``requires_grad`` as the run trains: LoRA: the adapters (and a classifier's head); classify: the
    book's last block, final LayerNorm and head, or ``--trainable``; language modelling: everything."""
    if settings.lora:
        for name, p in model.named_parameters():
            p.requires_grad_(".lora." in name or (settings.task == "classify" and name.startswith("out_head.")))
        return
    if settings.task == "classify":
        from gptcli.classify import set_trainable

        set_trainable(model, settings.trainable or "last-block")
        return
    for p in model.parameters():
        p.requires_grad_(True)


def apply_lora(model: "GPTModel", settings: TrainSettings) -> list[str]:
    """Wrap the blocks' Linear layers (A drawn from torch's global RNG, B zeros) and freeze the rest; the
    names of the wrapped layers."""
    from gptcli.model.lora import add_lora

    names = add_lora(model, settings.lora, float(settings.lora_alpha))
    trainable_for(model, settings)
    return names
