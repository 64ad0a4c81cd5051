"""The front door for running a model: from the options every inference command shares to a model
ready to decode with. Never prints.

``load_for_inference`` is what ``generate``, ``score``, ``inspect --prompt``, ``serve`` and the
benchmarks call: it sets the thread count, resolves device and dtype, loads the weights (memory-mapped
when they will be prepared for decoding), quantizes when asked and, on the CPU, gives every Linear
layer the kernel measured fastest for its shape (``gptcli.kernels.decode``). What is about a terminal
(a note that kernels are being measured) reaches the caller through callbacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from gptcli.config import GPTConfig
    from gptcli.kernels.decode import DecodePlan
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

Note = Callable[[str], None]


def _ignore(_message: str) -> None:
    pass


@dataclass(frozen=True)
class InferenceOptions:
    """What the inference commands share: ``--size/--config/--weights/--device/--dtype/--seed/--quantize/
    --threads/--no-tune``, plus which decode kernels to choose.

    ``kernels``: ``"eager"`` (one step at a time, the default), ``"compiled"`` (``--compile``'s steps),
    or None for plain Linear layers read into memory (``inspect``: nothing is decoded).
    ``seed`` seeds random weights (``--weights random``); sampling has its own seed.
    """

    size: str | None = None
    config: str | Path | None = None
    weights: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 123
    quantize: str | None = None
    threads: int | None = None
    kernels: str | None = "eager"
    tune: bool = True


@dataclass(frozen=True)
class Runtime:
    """A model ready to decode with, and what a caller reports about it. Built once; never changed."""

    model: "GPTModel"
    cfg: "GPTConfig"
    tokenizer: "Tokenizer"
    device: "torch.device"
    dtype: "torch.dtype"  # the activations' dtype (bfloat16 for --quantize with --dtype auto)
    source: str  # what was loaded, for humans and JSON: "random (seed 123)", a path, a hub id
    checkpoint: Path | None  # the local .safetensors file; None for random weights
    load_seconds: float  # loading and preparing, tuning included
    notes: tuple[str, ...] = ()
    kernel_plan: "DecodePlan | None" = None  # the decode kernels chosen; None: plain layers
    kernel_counts: dict[str, int] = field(default_factory=dict)  # layers per kernel
    quantize: str | None = None

    @property
    def tune_seconds(self) -> float | None:
        """Seconds spent measuring kernels in this load; None when they came from the cache or defaults."""
        plan = self.kernel_plan
        return plan.tune_s if plan is not None and plan.source == "measured" else None


def activation_dtype(dtype_name: str, device: "torch.device", quantize: str | None) -> "torch.dtype":
    """``--dtype`` on ``device``; with ``--quantize`` and ``auto`` on the CPU, bfloat16 (the quantized
    kernels take half-precision activations)."""
    import torch

    from gptcli.devices import resolve_dtype

    dtype = resolve_dtype(dtype_name, device)
    if quantize and dtype == torch.float32 and dtype_name == "auto":
        return torch.bfloat16
    return dtype


def load_for_inference(options: InferenceOptions, *, note: Note = _ignore,
                       on_measure: Callable[[], None] | None = None) -> Runtime:
    """Load and prepare a model as ``options`` say; UserError for anything the user can fix.

    ``note`` receives the loader's notes (no released weights, a config mismatch, ...);
    ``on_measure`` is called just before this CPU's kernels are measured (the first run of a model
    shape: 0.5-2.5 s), so a terminal can say why it waits.
    """
    from gptcli.kernels.decode import will_measure
    from gptcli.devices import configure_threads, resolve_device
    from gptcli.kernels.prepare import load_dtype, prepare_model
    from gptcli.weights import load_model

    configure_threads(options.threads)
    device = resolve_device(options.device)
    dtype = activation_dtype(options.dtype, device, options.quantize)
    loaded = load_model(size=options.size, config=options.config, weights=options.weights, device=device,
                        dtype=load_dtype(options.quantize, device, dtype), seed=options.seed, note=note,
                        mapped=options.kernels is not None)
    start = time.perf_counter()
    if (on_measure is not None and options.kernels and device.type == "cpu" and not options.quantize
            and options.tune and will_measure(loaded.model)):
        on_measure()
    prepared = prepare_model(loaded.model, device, dtype, quantize=options.quantize, kernels=options.kernels,
                             tune=options.tune)
    return Runtime(
        model=prepared.model, cfg=loaded.cfg, tokenizer=loaded.tokenizer, device=device, dtype=dtype,
        source=loaded.source, checkpoint=loaded.checkpoint,
        load_seconds=loaded.load_seconds + time.perf_counter() - start, notes=tuple(loaded.notes),
        kernel_plan=prepared.plan, kernel_counts=dict(prepared.counts), quantize=options.quantize,
    )
