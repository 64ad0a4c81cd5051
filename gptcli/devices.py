"""Which device and dtype a command runs on: ``--device auto|cpu|cuda|mps`` and ``--dtype auto|float32|bfloat16|float16``.

Names are checked without torch (``check_device_name``, ``check_dtype_name``) so a typo fails fast;
resolving them imports torch lazily.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")

# --dtype auto on the CPU is float32: exact, and bfloat16 buys little there. Measured on this
# project's 2-core CI CPU (AMD EPYC, torch 2.13, 124M, greedy, 128 new tokens, medians of 5
# interleaved rounds; bench/decode.py, BENCHMARKS.md): eager float32 35.8 tok/s, eager bfloat16
# 40.0 tok/s (+12%, the bf16 matmul kernels run at ~12 GB/s against ~20 for float32). bfloat16's
# logits differ from float32's by up to 1.4% of the largest logit and its greedy ids diverged on
# 3 of 10 prompts within 32 tokens (bench/quant_accuracy.py). Ask for --dtype bfloat16 (or
# --compile, where bfloat16 reaches 98 tok/s) when speed matters more than exactness.
CPU_AUTO_DTYPE = "float32"


def check_device_name(name: str) -> str:
    """``name`` lower-cased if it is a device we know (auto, cpu, cuda, cuda:N, mps); else UserError."""
    wanted = name.strip().lower()
    if wanted in DEVICES or _CUDA_INDEX.match(wanted):
        return wanted
    raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")


def check_dtype_name(name: str) -> str:
    wanted = name.strip().lower()
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    wanted = aliases.get(wanted, wanted)
    if wanted in DTYPES:
        return wanted
    raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> "torch.device":
    """The torch device for ``--device``. auto: cuda, then mps, then cpu. A device that isn't there is a UserError."""
    import torch

    wanted = check_device_name(name)
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {name}: CUDA is not available ({why}); use --device cpu or auto")
        index = int(wanted.split(":")[1]) if ":" in wanted else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if not _mps_available():
        raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu or auto")
    return torch.device("mps")


def resolve_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """The torch dtype for ``--dtype`` on ``device``.

    auto: bfloat16 on a CUDA GPU that supports it (else float16), float16 on MPS, float32 on the CPU
    (measured; see ``CPU_AUTO_DTYPE``).
    """
    import torch

    wanted = check_dtype_name(name)
    if wanted == "auto":
        if device.type == "cuda":
            wanted = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device.type == "mps":
            wanted = "float16"
        else:
            wanted = CPU_AUTO_DTYPE
    return getattr(torch, wanted)


def dtype_name(dtype: "torch.dtype") -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")
