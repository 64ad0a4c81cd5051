"""Where a model's weights come from: ``--weights auto|random|PATH|HUB_ID``.

``load_model`` is the one entry point the commands use. It returns the model ready for inference
(eval mode, on the device, in the dtype) and reports notes through a callback instead of printing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gptcli.config import GPTConfig, resolve_config

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPTModel

Note = Callable[[str], None]


def _ignore(_: str) -> None:
    pass


@dataclass
class LoadedModel:
    model: "GPTModel"
    cfg: GPTConfig
    source: str  # what was loaded, for humans and JSON: "random (seed 123)", a path, a hub id
    device: "torch.device"
    dtype: "torch.dtype"
    load_seconds: float
    notes: list[str] = field(default_factory=list)


def random_model(cfg: GPTConfig, seed: int) -> "GPTModel":
    """Seeded random init on the CPU, drawing in the book's order (so seed 123 gives the book's numbers)."""
    import torch

    from gptcli.model import GPTModel

    torch.manual_seed(seed)
    with torch.device("cpu"):
        return GPTModel(cfg)


def load_model(
    *,
    size: str | None,
    config: str | Path | None,
    weights: str = "auto",
    device: "torch.device",
    dtype: "torch.dtype",
    seed: int = 123,
    note: Note = _ignore,
) -> LoadedModel:
    """Build the model for ``--size``/``--config`` and fill it from ``weights``.

    Raises UserError for anything the user can fix (bad config, bad checkpoint, unknown device).
    """
    start = time.perf_counter()
    notes: list[str] = []

    def say(message: str) -> None:
        notes.append(message)
        note(message)

    cfg = resolve_config(size, config)
    if weights == "auto":
        # Real checkpoints are not wired in yet: auto means random init, said out loud.
        say(f"using random weights (seed {seed}); pass --weights random to silence this note")
        weights = "random"
    if weights != "random":
        from gptcli.errors import UserError

        raise UserError(f"--weights {weights!r}: only 'random' and 'auto' are supported so far")
    model = random_model(cfg, seed)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model=model, cfg=cfg, source=f"random (seed {seed})", device=device, dtype=dtype,
        load_seconds=time.perf_counter() - start, notes=notes,
    )
