"""Decode kernels for the Linear layers, chosen by measuring on the CPU in front of us.

Decoding multiplies one row (or a few) by every weight matrix, a memory-bound job whose fastest
form depends on the CPU, the dtype, the matrix's shape and the number of rows: on an Intel Xeon
MKL's ``F.linear`` beat oneDNN for one row and lost for eight, on an AMD EPYC oneDNN's packed
weights won both. So ``tune`` times the candidates once on this machine and ``apply`` puts the
winner of each weight shape into the model (``Linear.decode_kernel``); the choice is cached on disk
(``cache_path``), keyed by CPU model, torch version, thread count, dtype and shape.

The candidates (``Kernel`` subclasses), each one object per layer holding the weight in its own layout:

- ``onednn``: oneDNN's linear over weights packed once into its blocked layout. A lone row is
  multiplied as two equal rows, because oneDNN's one-row kernel rounds differently from its
  many-row one (see ``_onednn_linear``). Under torch.compile it is one opaque op in the graph.
- ``blas``: ``F.linear`` on the weight as stored, (out, in) or a transposed view of a checkpoint's
  (in, out), so it costs no copy; torch hands it to MKL.
- ``blas-t``: ``x @ W`` with W stored (in, out), a copy when the checkpoint stored (out, in).
- ``reduce`` (compiled steps only): an element-wise multiply and a sum, which Inductor turns into
  its own vectorised reduction and fuses with the ops around it.

A row's result must not depend on how many rows share the call (``--each-line`` promises each row
the ids it gets alone), so a candidate whose row 0 differs alone, among 3 and among 8 rows is never
chosen for eager decoding. Among the rest the cost is the time of one row plus an eighth of the
time of eight rows: one token alone plus one token's share of a batch.

Tuning runs only on the CPU, in inference mode, and is skipped with ``GPTCLI_NO_TUNE=1`` (the CLI's
``--no-tune``): every layer then takes ``DEFAULT_KERNEL``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EAGER = "eager"
COMPILED = "compiled"
DEFAULT_KERNEL = {EAGER: "onednn", COMPILED: "onednn"}  # the winners on the AMD EPYC measured (BENCHMARKS.md)
CACHE_VERSION = 1
NO_TUNE_ENV = "GPTCLI_NO_TUNE"
BATCH_ROWS = 8  # --each-line's default batch
SAMPLE_BYTES = 256 * 2**20  # weights a candidate is timed over: more than a CPU's cache, so they stream as in decoding
REPEATS = 3

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The candidates


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """oneDNN's linear over the rows of ``x`` (..., in), never with a single row.

    oneDNN gives a row the same bits among 2, 3, ... or 512 rows, but runs a lone row through a
    matrix-vector kernel whose rounding differs by ~1e-6, so one row is multiplied as two equal
    rows and the first is kept. With packed weights two rows cost what one did
    (bench/batch_invariance.py).
    """
    if x.numel() == x.shape[-1]:
        pair = x.reshape(1, x.shape[-1]).expand(2, -1).contiguous()  # (2, in)
        y = torch.ops.mkldnn._linear_pointwise(pair, weight, bias, "none", [], "")  # (2, out)
        return y[:1].view(*x.shape[:-1], out_features)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# Packed oneDNN weights are opaque tensors that Inductor can only use as graph constants; a compiled
# step passes an index into this list instead, through a custom op Inductor leaves as one call.
_PACKED: list[torch.Tensor | None] = []


@torch.library.custom_op("gptcli::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, bias: torch.Tensor | None, handle: int, out_features: int) -> torch.Tensor:
    weight = _PACKED[handle]
    assert weight is not None, "a released packed weight was used"
    return _onednn_linear(x, weight, bias, out_features)


@_onednn_linear_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class Kernel:
    """One Linear layer's weight in the layout a kernel wants, and that kernel: ``kernel(x, bias)``."""

    name = ""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape

    @staticmethod
    def available(weight: torch.Tensor, mode: str) -> bool:
        return True

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop what this kernel allocated (the tuner calls it on the losers)."""


class OneDNN(Kernel):
    name = "onednn"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_ROWS)
        self.handle = len(_PACKED)
        _PACKED.append(packed)

    @staticmethod
    def available(weight: torch.Tensor, mode: str) -> bool:
        return _ONEDNN and weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.gptcli.onednn_linear(x, bias, self.handle, self.out_features)
        return _onednn_linear(x, _PACKED[self.handle], bias, self.out_features)

    def release(self) -> None:
        _PACKED[self.handle] = None


class Blas(Kernel):
    name = "blas"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.weight = weight.detach()  # (out, in), contiguous or a view of (in, out): no copy

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class BlasTransposed(Kernel):
    name = "blas-t"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.weight_t = weight.detach().t().contiguous()  # (in, out); a copy only if stored (out, in)

    @staticmethod
    def available(weight: torch.Tensor, mode: str) -> bool:
        return weight.is_contiguous()  # a transposed view already is (in, out): that is ``blas``

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x @ self.weight_t  # (..., out)
        return y if bias is None else y + bias


class Reduce(Kernel):
    """One row under torch.compile: multiply and sum, accumulated in float32, which Inductor fuses
    into a vectorised reduction. In eager mode that form would allocate an (out, in) temporary, so
    eager calls (the prompt's prefill) take ``F.linear``."""

    name = "reduce"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.weight = weight.detach()

    @staticmethod
    def available(weight: torch.Tensor, mode: str) -> bool:
        return mode == COMPILED

    @staticmethod
    def compute(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)  # (..., 1, out)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            return self.compute(x, self.weight, bias)
        return F.linear(x, self.weight, bias)


KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (OneDNN, Blas, BlasTransposed, Reduce)}


def candidates(weight: torch.Tensor, mode: str) -> list[str]:
    """The kernels that can run this weight in this mode, the default first."""
    names = [n for n, k in KERNELS.items() if k.available(weight, mode)]
    default = DEFAULT_KERNEL[mode]
    return sorted(names, key=lambda n: n != default)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Choice:
    """The kernel for one weight shape, and what the tuner saw (microseconds per call)."""

    kernel: str
    measured: dict[str, dict[str, float | bool]] = field(default_factory=dict)  # name -> {one, batch, invariant}

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "measured": self.measured}


@dataclass
class Plan:
    """A kernel per weight shape key (``shape_key``), how long tuning took and where the choice came from."""

    mode: str
    choices: dict[str, Choice]
    tune_s: float = 0.0
    source: str = "default"  # "measured", "cache" or "default"

    def kernel_for(self, weight: torch.Tensor) -> str:
        choice = self.choices.get(shape_key(weight))
        if choice is not None and KERNELS[choice.kernel].available(weight, self.mode):
            return choice.kernel
        return candidates(weight, self.mode)[0]

    def summary(self) -> dict[str, str]:
        return {key: c.kernel for key, c in self.choices.items()}


def shape_key(weight: torch.Tensor) -> str:
    """(out, in), dtype and storage orientation: what decides a kernel's speed."""
    out, inp = weight.shape
    layout = "out,in" if weight.is_contiguous() else "in,out"
    return f"{out}x{inp} {str(weight.dtype).removeprefix('torch.')} {layout}"


def _machine_key(mode: str) -> str:
    from gptcli.devices import cpu_model

    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {mode}"


def cache_path() -> Path:
    """``$GPTCLI_CACHE_DIR/kernels.json``, else under ``$XDG_CACHE_HOME`` (default ``~/.cache``)/gptcli."""
    root = os.environ.get("GPTCLI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "gptcli")
    return Path(root).expanduser() / "kernels.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomically; a cache that cannot be written only means tuning again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def tuning_disabled() -> bool:
    return os.environ.get(NO_TUNE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _sample(groups: dict[str, list[nn.Module]]) -> dict[str, list[nn.Module]]:
    """The layers of each shape to time: enough of them to outgrow the CPU's caches, not all of a
    large model (each candidate holds its own copy of them while it is timed)."""
    out = {}
    for key, layers in groups.items():
        size = layers[0].weight.numel() * layers[0].weight.element_size()
        out[key] = layers[: max(1, min(len(layers), math.ceil(SAMPLE_BYTES / max(size, 1))))]
    return out


def _time_sweeps(kernels: Sequence[Kernel], biases: Sequence[torch.Tensor | None], x: torch.Tensor,
                 call: Callable[[Kernel, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> float:
    """Microseconds per call: the best of ``REPEATS`` sweeps over the layers, one call each."""
    best = math.inf
    for _ in range(REPEATS + 1):  # the first sweep warms up (page faults, oneDNN's primitive cache)
        start = time.perf_counter()
        for kernel, bias in zip(kernels, biases):
            call(kernel, x, bias)
        best = min(best, time.perf_counter() - start)
    return best / len(kernels) * 1e6


def _invariant(kernel: Kernel, bias: torch.Tensor | None, xs: Sequence[torch.Tensor],
               call: Callable[[Kernel, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> bool:
    """Row 0's bits alone, among 3 rows and among 8 (the rows of ``xs`` share their first row)."""
    alone = call(kernel, xs[0], bias)[0]
    return all(torch.equal(alone, call(kernel, x, bias)[0]) for x in xs[1:])


def _eager_call(kernel: Kernel, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return kernel(x, bias)


def _reduce_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return Reduce.compute(x, weight, bias)


def _compiled_call(name: str) -> Callable[[Kernel, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Kernel ``name``'s call as a compiled decode step makes it. Only ``reduce`` needs compiling to be
    timed (one graph per shape, the weight an input); the others are one opaque call in the graph."""
    if name == Reduce.name:
        fn = torch.compile(_reduce_step, fullgraph=True, dynamic=False)
        return lambda kernel, x, bias: fn(x, kernel.weight, bias)
    if name == OneDNN.name:
        return lambda kernel, x, bias: torch.ops.gptcli.onednn_linear(x, bias, kernel.handle, kernel.out_features)
    return _eager_call


def measure(layers: Sequence[nn.Module], name: str, mode: str, dtype: torch.dtype) -> dict[str, float | bool]:
    """Time kernel ``name`` over ``layers`` (one shape): one row, and (eager) a batch of 8 rows."""
    weight = layers[0].weight
    kernels = [KERNELS[name](layer.weight) for layer in layers]
    biases = [layer.bias.detach() if layer.bias is not None else None for layer in layers]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(BATCH_ROWS, weight.shape[1], generator=gen).to(dtype)  # (8, in)
    try:
        if mode == COMPILED:
            one = _time_sweeps(kernels, biases, rows[:1].view(1, 1, -1), _compiled_call(name))  # (1, 1, in)
            return {"one": round(one, 2)}
        one = _time_sweeps(kernels, biases, rows[:1], _eager_call)
        batch = _time_sweeps(kernels, biases, rows, _eager_call)
        invariant = _invariant(kernels[0], biases[0], (rows[:1], rows[:3], rows), _eager_call)
        return {"one": round(one, 2), "batch": round(batch, 2), "invariant": invariant}
    finally:
        for kernel in kernels:
            kernel.release()


def cost(measured: dict[str, float | bool]) -> float:
    """One row alone plus one row's share of a batch of 8 (eager); the one-row time (compiled)."""
    return float(measured["one"]) + float(measured.get("batch", 0.0)) / BATCH_ROWS


def choose(measured: dict[str, dict[str, float | bool]], mode: str) -> str:
    """The cheapest candidate; in eager mode only among those whose rows do not depend on the batch."""
    usable = {n: m for n, m in measured.items() if mode == COMPILED or m.get("invariant")}
    if not usable:
        return next(iter(measured))  # the default, first: nothing is invariant here
    return min(usable, key=lambda n: cost(usable[n]))


def linear_layers(model: nn.Module) -> list[nn.Module]:
    from gptcli.model import Linear

    return [m for m in model.modules() if isinstance(m, Linear) and not m.weight.is_meta]


def _groups(layers: Sequence[nn.Module]) -> dict[str, list[nn.Module]]:
    groups: dict[str, list[nn.Module]] = {}
    for layer in layers:
        groups.setdefault(shape_key(layer.weight), []).append(layer)
    return groups


def _cached_choices(mode: str) -> dict:
    return _read_cache(cache_path()).get("machines", {}).get(_machine_key(mode), {})


def will_measure(model: nn.Module, mode: str = EAGER) -> bool:
    """Whether ``tune`` would time kernels now (nothing cached for one of the model's shapes)."""
    layers = linear_layers(model)
    if tuning_disabled() or not layers or layers[0].weight.device.type != "cpu":
        return False
    known = _cached_choices(mode)
    return any(key not in known for key in _groups(layers))


def tune(model: nn.Module, mode: str = EAGER, *, enabled: bool = True, use_cache: bool = True) -> Plan:
    """A kernel for each weight shape of ``model``'s Linear layers: from the cache, else measured now.

    Only CPU models are tuned; elsewhere, with ``enabled=False`` or with ``GPTCLI_NO_TUNE`` set, the
    plan is the defaults.
    """
    layers = linear_layers(model)
    if not enabled or tuning_disabled() or not layers or layers[0].weight.device.type != "cpu":
        return Plan(mode, {}, source="default")
    groups = _groups(layers)
    start = time.perf_counter()
    path = cache_path()
    cache = _read_cache(path) if use_cache else {}
    machine = cache.get("machines", {}).get(_machine_key(mode), {})
    choices: dict[str, Choice] = {}
    todo = {}
    for key, group in groups.items():
        known = machine.get(key)
        if isinstance(known, dict) and known.get("kernel") in candidates(group[0].weight, mode):
            choices[key] = Choice(known["kernel"], known.get("measured", {}))
        else:
            todo[key] = group
    if todo:
        dtype = layers[0].weight.dtype
        with torch.inference_mode():
            for key, group in _sample(todo).items():
                measured = {name: measure(group, name, mode, dtype) for name in candidates(group[0].weight, mode)}
                choices[key] = Choice(choose(measured, mode), measured)
        if use_cache:
            cache = _read_cache(path) or {"version": CACHE_VERSION, "machines": {}}
            entry = cache.setdefault("machines", {}).setdefault(_machine_key(mode), {})
            entry.update({key: choices[key].to_json() for key in todo})
            _write_cache(path, cache)
    return Plan(mode, choices, tune_s=time.perf_counter() - start, source="measured" if todo else "cache")


def apply(model: nn.Module, plan: Plan, release: Callable[[torch.Tensor], None] | None = None) -> dict[str, int]:
    """Give every Linear layer its planned kernel (``Linear.decode_kernel``); counts per kernel.

    A kernel that copied the weight into its own layout leaves the plain weight behind: it is then
    replaced by a meta tensor of the same shape (a later use fails loudly), unless another module
    still needs it (a head tied to the token embedding). ``release(tensor)`` is called on each
    dropped weight first (``gptcli.weights`` uses it to give a file mapping's pages back).
    From here on the model decodes only: no training, saving or moving.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    counts: dict[str, int] = {}
    for layer in linear_layers(model):
        name = plan.kernel_for(layer.weight)
        kernel = KERNELS[name](layer.weight)
        layer.decode_kernel = kernel
        counts[name] = counts.get(name, 0) + 1
        copied = not (isinstance(kernel, (Blas, Reduce)) or (isinstance(kernel, BlasTransposed)
                                                             and not layer.weight.is_contiguous()))
        if copied and id(layer.weight) not in embedding_weights:
            if release is not None:
                release(layer.weight)
            layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
            return_freed_memory()
    return counts


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    After a load that freed large buffers, glibc serves matrices under 32 MB from its heap and keeps
    them there once freed: packing 124M's weights (oneDNN) one by one then left ~190 MB of freed plain weights
    in the process's memory (peak RSS 1079 MB against 887 MB when trimmed after each layer).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))


def kernel_names() -> Iterable[str]:
    return KERNELS.keys()
