"""A loaded model made ready to decode with, in place: quantized Linear layers (``gptcli.kernels.quantize``),
the kernels measured fastest on this CPU (``gptcli.kernels.decode``) or the row-invariant CPU linear
(``gptcli.kernels.onednn``). Torch-free to import: the CLI checks ``--quantize`` against ``QUANTIZE_SCHEMES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

    from gptcli.kernels.decode import DecodePlan
    from gptcli.model.gpt import GPTModel


@dataclass
class Prepared:
    """A model made ready to decode with, and the kernels it got (``gptcli.kernels.decode``)."""

    model: "GPTModel"
    plan: "DecodePlan | None" = None  # None: plain Linear layers (not the CPU, quantized, or kernels=None)
    counts: dict[str, int] = field(default_factory=dict)  # layers per kernel


# What prepare_model's quantize takes (gptcli.kernels.quantize.int4_group_size), spelled out: the CLI checks it without torch.
QUANTIZE_SCHEMES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g256")


def load_dtype(quantize: str | None, device: "torch.device", dtype: "torch.dtype") -> "torch.dtype":
    """The dtype to load weights in before ``prepare_model``: float32 when quantizing on the CPU, so
    each layer is quantized straight from the mapped file, with no half-precision copy of the whole
    model first (1558M int8 peaked at 5.3 GB that way); ``dtype`` otherwise."""
    import torch

    return torch.float32 if quantize and device.type == "cpu" else dtype


def prepare_model(
    model: "GPTModel", device: "torch.device", dtype: "torch.dtype", quantize: str | None = None,
    kernels: str | None = None, tune: bool = True,
) -> Prepared:
    """Make a loaded model ready to decode with, in place.

    ``quantize="int8"``: weight-only int8 Linear layers; ``"int4"``: weight-only int4 in groups of
    ``INT4_DEFAULT_GROUP_SIZE`` inputs (``"int4-gN"``: groups of N), with a fast kernel on the CPU
    only (see gptcli.kernels.quantize). A model loaded in float32 (memory-mapped: each layer's pages go back
    once quantized) is quantized from float32 and the rest cast to ``dtype``.
    ``kernels``: on the CPU, give each Linear layer the kernel measured fastest for its shape on this
    CPU (``gptcli.kernels.decode``; ``"eager"`` or ``"compiled"`` for ``--compile``'s steps), measured once
    and cached on disk; ``tune=False`` (``--no-tune``) takes the defaults without measuring.
    Inference only: a layer whose kernel copied the weight releases the plain one (and, for a model
    loaded ``mapped``, gives the file's pages under it back).
    """
    from gptcli.kernels.quantize import int4_group_size, quantize_int4, quantize_int8

    mapping = getattr(model, "mapped_file", None)
    release = mapping.release if mapping is not None else None
    from gptcli.kernels.onednn import use_for_inference

    use_for_inference(model)  # row-invariant oneDNN on the CPU; quantized or tuned layers replace it below
    if quantize is not None:
        if quantize == "int8":
            quantize_int8(model, dtype, release)
        elif int4_group_size(quantize):
            quantize_int4(model, dtype, group_size=int4_group_size(quantize), release=release)
        else:
            raise UserError(f"unknown --quantize {quantize!r}; choose int8, int4 or int4-g32/64/128/256")
        model.to(dtype)  # what stays in floating point (embeddings, norms, biases), if loaded in float32
        if mapping is not None:
            mapping.release(mapping.bytes)  # nothing reads the file any more
        return Prepared(model)
    if kernels is None or device.type != "cpu":
        return Prepared(model)
    from gptcli.kernels import decode as kernel_choice

    plan = kernel_choice.tune(model, kernels, enabled=tune)
    # Mapped weights are read lazily anyway: pack them behind the first tokens rather than before.
    return Prepared(model, plan, kernel_choice.apply(model, plan, release, lazy=mapping is not None))
