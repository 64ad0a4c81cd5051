"""Decode kernels for the Linear layers, chosen by measuring on the CPU in front of us.

Decoding multiplies one row (or a few) by every weight matrix, a memory-bound job whose fastest
form depends on the CPU, the dtype, the matrix's shape and the number of rows: on an Intel Xeon
MKL's ``F.linear`` beat oneDNN for one row and lost for eight, on an AMD EPYC oneDNN's packed
weights won both. So ``tune`` times the candidates once on this machine and ``apply`` puts the
winner of each weight shape into the model (``KernelLinear``); the choice is cached on disk
(``cache_path``), keyed by CPU model, torch version, thread count, dtype and shape.

The candidates (``Kernel`` subclasses), each one object per layer holding the weight in its own layout:

- ``onednn``: oneDNN's linear over weights packed once into its blocked layout. A lone row is
  multiplied as two equal rows, because oneDNN's one-row kernel rounds differently from its
  many-row one (see ``onednn_linear``). Under torch.compile it is one opaque op in the graph.
- ``blas``: ``F.linear`` on the weight as stored, (out, in) or a transposed view of a checkpoint's
  (in, out), so it costs no copy; torch hands it to MKL.
- ``blas-t``: ``x @ W`` with W stored (in, out), a copy when the checkpoint stored (out, in).

Each is timed over enough layers of a shape to stream from memory as decoding does, with one row
and with eight. A row's result must not depend on how many rows share the call (``--each-line``
promises each row the ids it gets alone), so eager decoding only takes a kernel that is
row-invariant by the way it is called (``Kernel.row_invariant``: oneDNN, never given one row alone)
and whose rows also matched their lone results here, 2 to 8 rows; among those the cost is the time
of one row plus an eighth of the time of eight rows (one token alone plus one token's share of a
batch). MKL's ``F.linear`` is not such a kernel: in float32 its rows differ from 2 or 4 rows on, and
in bfloat16 they matched for some inputs and not for others. A compiled decode step (``--compile``,
one sequence, never batched) takes the fastest one-row candidate: each is one opaque call in
Inductor's graph, so the same measurement serves it.

Inductor's own reduction (an element-wise multiply and sum that it vectorises, which
``--compile`` used before) is not a candidate: timing it needs a compile per shape (9 s for 124M,
against the 3 s budget), and timed alone it picked shapes where the whole step then ran slower
(124M bfloat16 on the AMD EPYC: every layer on it 72 tok/s, every layer on packed oneDNN 155).

Tuning runs only on the CPU, in inference mode, and is skipped with ``GPTCLI_NO_TUNE=1`` (the CLI's
``--no-tune``): every layer then takes ``DEFAULT_KERNEL``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcli.kernels import onednn

EAGER = "eager"
COMPILED = "compiled"
DEFAULT_KERNEL = "onednn"  # the winner on the AMD EPYC measured (BENCHMARKS.md)
CACHE_VERSION = 4  # 4: oneDNN's entries say whether unpacked weights give its bits
NO_TUNE_ENV = "GPTCLI_NO_TUNE"
BATCH_ROWS = 8  # --each-line's default batch
SAMPLE_BYTES = 256 * 2**20  # weights a candidate is timed over: more than a CPU's cache, so they stream as in decoding
REPEATS = 3

# Packed oneDNN weights are opaque tensors that Inductor can only use as graph constants; a compiled
# step passes an index into this list instead, through a custom op Inductor leaves as one call.
# Slots are reused lowest first, so the same model gets the same indices (and compiled graph) each run.
_PACKED: list[torch.Tensor | None] = []
_RESERVED = torch.empty(0)  # a slot whose packing is under way
_SLOTS = threading.Lock()


def _reserve_slot() -> int:
    with _SLOTS:
        for i, packed in enumerate(_PACKED):
            if packed is None:
                _PACKED[i] = _RESERVED
                return i
        _PACKED.append(_RESERVED)
        return len(_PACKED) - 1


def _free_slot(handle: int) -> None:
    with _SLOTS:
        _PACKED[handle] = None


# The op a compiled step calls. A compiled step decodes one sequence, so nothing compares its rows
# with a batch's: it multiplies the lone row as it is (20 us a call against 37 for the pair through
# torch.library.custom_op, 0.7 ms of a 124M step). Defined with torch.library.Library, whose calls
# cost less than custom_op's.
_LIBRARY = torch.library.Library("gptcli", "FRAGMENT")  # gptcli.kernels.train defines training ops there too
_LIBRARY.define("decode_linear(Tensor x, Tensor? bias, int handle, int out_features) -> Tensor")


def _onednn_linear_rows(x: torch.Tensor, bias: torch.Tensor | None, handle: int, out_features: int) -> torch.Tensor:
    weight = _PACKED[handle]
    assert weight is not None and weight is not _RESERVED, "a released packed weight was used"
    y = onednn.linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], out_features)


_LIBRARY.impl("decode_linear", _onednn_linear_rows, "CPU")


@torch.library.register_fake("gptcli::decode_linear")
def _(x: torch.Tensor, bias: torch.Tensor | None, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class Kernel:
    """One Linear layer's weight in the layout a kernel wants, and that kernel: ``kernel(x, bias)``."""

    name = ""
    # Whether a row's result is the same alone and among any number of rows, by how the kernel is
    # called (not just on the inputs the tuner happened to try): only such kernels serve eager
    # decoding, which --each-line batches.
    row_invariant = False

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.copies_weight = True  # whether it holds the weight in a layout of its own (the plain one can go)

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return True

    def prepare(self) -> "Kernel":
        """Put the weight in this kernel's layout (the costly part; ``prepare_all`` runs it on threads)."""
        return self

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop what this kernel allocated (the tuner calls it on the losers)."""


class OneDNN(Kernel):
    name = "onednn"
    row_invariant = True  # never one row alone (onednn_linear); bench/batch_invariance.py checks 2..512 rows

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.handle = _reserve_slot()
        self._source: torch.Tensor | None = weight.detach()
        # The packed weight lives as long as this kernel (the model that holds it), not the process.
        self._finalizer = weakref.finalize(self, _free_slot, self.handle)

    def prepare(self) -> "OneDNN":
        # From (out, in) row-major: packing a transposed view directly gave a layout that oneDNN
        # reorders again on every call (8 ms instead of 0.4 for 1558M's (1600, 6400)).
        source = self._source
        if source is not None:
            try:
                _PACKED[self.handle] = torch.ops.mkldnn._reorder_linear_weight(source.contiguous(), BATCH_ROWS)
            except BaseException:
                self._finalizer()
                raise
            self._source = None  # after the packed weight is in place: __call__ reads them in the other order
        return self

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return onednn.AVAILABLE and weight.device.type == "cpu" and weight.dtype in onednn.DTYPES

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.gptcli.decode_linear(x, bias, self.handle, self.out_features)
        # Until a background packer (``apply(lazy=True)``) is done with this layer, oneDNN multiplies the
        # weight as stored, which the tuner checked gives the packed weight's bits (``same_unpacked``).
        # ``prepare`` puts the packed weight in place before it drops the source, so None means packed.
        source = self._source
        weight = source if source is not None else _PACKED[self.handle]
        return onednn.linear(x, weight, bias, self.out_features)

    def release(self) -> None:
        self._finalizer()


class Blas(Kernel):
    name = "blas"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.weight = weight.detach()  # (out, in), contiguous or a view of (in, out): no copy
        self.copies_weight = False

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class BlasTransposed(Kernel):
    name = "blas-t"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.weight_t = weight.detach().t()  # (in, out): a view until ``prepare``
        self.copies_weight = weight.is_contiguous()  # stored (out, in): ``prepare`` copies it

    def prepare(self) -> "BlasTransposed":
        self.weight_t = self.weight_t.contiguous()  # a copy only if stored (out, in)
        return self

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return weight.is_contiguous()  # a transposed view already is (in, out): that is ``blas``

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x @ self.weight_t  # (..., out)
        return y if bias is None else y + bias


KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (OneDNN, Blas, BlasTransposed)}


def candidates(weight: torch.Tensor) -> list[str]:
    """The kernels that can run this weight, the default first."""
    names = [n for n, k in KERNELS.items() if k.available(weight)]
    return sorted(names, key=lambda n: n != DEFAULT_KERNEL)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Choice:
    """The kernel for one weight shape, and what the tuner saw (microseconds per call)."""

    kernel: str
    measured: dict[str, dict[str, float | bool]] = field(default_factory=dict)  # name -> {one, batch, invariant}


@dataclass
class DecodePlan:
    """A kernel per weight shape key (``shape_key``), how long tuning took and where the choice came from."""

    mode: str
    choices: dict[str, Choice]
    tune_s: float = 0.0
    source: str = "default"  # "measured", "cache" or "default"

    def kernel_for(self, weight: torch.Tensor) -> str:
        choice = self.choices.get(shape_key(weight))
        if choice is not None and KERNELS[choice.kernel].available(weight):
            return choice.kernel
        return candidates(weight)[0]

    def same_unpacked(self, weight: torch.Tensor) -> bool:
        """Whether oneDNN was measured to give this shape the same bits on its weight as stored as packed."""
        choice = self.choices.get(shape_key(weight))
        return bool(choice is not None and choice.kernel == OneDNN.name
                    and choice.measured.get(OneDNN.name, {}).get("same_unpacked"))

    def summary(self) -> dict[str, str]:
        return {key: c.kernel for key, c in self.choices.items()}

    def to_dict(self) -> dict:
        """What was chosen and what was measured (microseconds per call), for --json and inspect."""
        return {"mode": self.mode, "source": self.source, "tune_s": round(self.tune_s, 6),
                "choices": {key: {"kernel": c.kernel, "measured": c.measured} for key, c in self.choices.items()}}

    def explain(self) -> list[str]:
        """A line per weight shape: the kernel taken, each candidate's times, and why (for --stats)."""
        lines = []
        for key, c in sorted(self.choices.items()):
            parts = []
            for name, m in c.measured.items():
                why = ""
                if not serves(self.mode, name, m):
                    why = ", rows depend on the batch: not for eager decoding"
                elif m.get("same_unpacked"):
                    why = ", same bits unpacked: decodes while packing"
                parts.append(f"{name} {float(m['one']):.1f} us 1 row / {float(m['batch']):.1f} us {BATCH_ROWS} rows{why}")
            taken = f"{c.kernel} (cost: 1 row + 1/{BATCH_ROWS} of {BATCH_ROWS} rows)" if self.mode == EAGER else \
                f"{c.kernel} (cost: 1 row)"
            lines.append(f"{key}: {taken}; " + "; ".join(parts) if parts else f"{key}: {c.kernel} (not measured)")
        return lines


def shape_key(weight: torch.Tensor) -> str:
    """(out, in), dtype and storage orientation: what decides a kernel's speed."""
    out, inp = weight.shape
    layout = "out,in" if weight.is_contiguous() else "in,out"
    return f"{out}x{inp} {str(weight.dtype).removeprefix('torch.')} {layout}"


def _machine_key() -> str:
    from gptcli.devices import cpu_model

    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cache_path() -> Path:
    """``kernels.json`` in gptcli's cache folder (``gptcli.cache.cache_root``)."""
    from gptcli.cache import cache_root

    return cache_root() / "kernels.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("machines"), dict)
            and all(isinstance(entry, dict) for entry in data["machines"].values())):
        return {}  # another version, or not written by us: measure again (and overwrite it)
    return data


def _write_cache(path: Path, data: dict) -> None:
    """Atomically; a cache that cannot be written only means tuning again next time."""
    try:
        from gptcli.files import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))
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


def prepare_all(kernels: Sequence[Kernel]) -> Iterator[Kernel]:
    """``kernel.prepare()`` for each, two at a time on threads (packing is single-threaded, and the
    ops release the GIL: 1558M's packing took 25 ms a matrix serially, 18 on two threads); yields
    them in order as they are done."""
    from concurrent.futures import ThreadPoolExecutor

    if len(kernels) < 2:
        yield from (k.prepare() for k in kernels)
        return
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gptcli-pack") as pool:
        yield from pool.map(lambda k: k.prepare(), kernels)


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


def _invariant(kernel: Kernel, bias: torch.Tensor | None, rows: torch.Tensor,
               call: Callable[[Kernel, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> bool:
    """Every row's bits the same alone and among the first 2..8 rows of ``rows`` (8, in)."""
    alone = [call(kernel, rows[i : i + 1], bias)[0] for i in range(rows.shape[0])]
    return all(torch.equal(call(kernel, rows[:m], bias)[i], alone[i])
               for m in range(2, rows.shape[0] + 1) for i in range(m))


# Row counts at which the weight as stored must give the packed weight's bits before a layer may decode
# on it while packing (``apply(lazy=True)``); 1 and 2 for decoding, the rest for prompts. Float32 only:
# bfloat16 weights stored (in, out) gave other bits at 8 to 512 rows (Intel Xeon, oneDNN in torch 2.13).
UNPACKED_ROWS = (1, 2, 3, 8, 16, 33, 64, 128)
LAZY_DTYPES = (torch.float32,)


def _same_unpacked(packed: Kernel, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if weight.dtype not in LAZY_DTYPES:
        return False
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(max(UNPACKED_ROWS), weight.shape[1], generator=gen).to(weight.dtype)
    return all(torch.equal(onednn.linear(probe[:m], weight.detach(), bias, weight.shape[0]), packed(probe[:m], bias))
               for m in UNPACKED_ROWS)


def _eager_call(kernel: Kernel, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return kernel(x, bias)


def measure(layers: Sequence[nn.Module], name: str, dtype: torch.dtype) -> dict[str, float | bool]:
    """Time kernel ``name`` over ``layers`` (one shape) with one row and with 8; are its rows batch-invariant?"""
    weight = layers[0].weight
    kernels = list(prepare_all([KERNELS[name](layer.weight) for layer in layers]))
    biases = [layer.bias.detach() if layer.bias is not None else None for layer in layers]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(BATCH_ROWS, weight.shape[1], generator=gen).to(dtype)  # (8, in)
    try:
        one = _time_sweeps(kernels, biases, rows[:1], _eager_call)
        batch = _time_sweeps(kernels, biases, rows, _eager_call)
        # Only a kernel invariant by construction can serve eager decoding; checking the others would
        # cost 1558M's tuning a second for nothing (bench/batch_invariance.py shows them anyway).
        invariant = KERNELS[name].row_invariant and _invariant(kernels[0], biases[0], rows, _eager_call)
        result = {"one": round(one, 2), "batch": round(batch, 2), "invariant": invariant}
        if name == OneDNN.name:
            result["same_unpacked"] = _same_unpacked(kernels[0], weight, biases[0])
        return result
    finally:
        for kernel in kernels:
            kernel.release()


def cost(measured: dict[str, float | bool], mode: str) -> float:
    """Eager: one row alone plus one row's share of a batch of 8. Compiled (one sequence): one row."""
    one = float(measured["one"])
    return one if mode == COMPILED else one + float(measured["batch"]) / BATCH_ROWS


def serves(mode: str, name: str, measured: dict[str, float | bool]) -> bool:
    """Whether kernel ``name`` may serve ``mode``: any kernel a compiled step (one sequence); eager
    decoding only one whose rows cannot depend on the batch (``Kernel.row_invariant``) and did not here
    (the measured check)."""
    return mode == COMPILED or (KERNELS[name].row_invariant and bool(measured.get("invariant")))


def choose(measured: dict[str, dict[str, float | bool]], mode: str) -> str:
    """The cheapest candidate among those that may serve ``mode`` (``serves``)."""
    usable = {n: m for n, m in measured.items() if serves(mode, n, m)}
    if not usable:
        return next(iter(measured))  # the default, first: nothing is invariant here
    return min(usable, key=lambda n: cost(usable[n], mode))


def linear_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.is_meta]


class KernelLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict) that multiplies with its planned ``kernel``
    (``apply`` swaps the model's layers for these); inference only."""

    kernel: Kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.bias)


def _groups(layers: Sequence[nn.Module]) -> dict[str, list[nn.Module]]:
    groups: dict[str, list[nn.Module]] = {}
    for layer in layers:
        groups.setdefault(shape_key(layer.weight), []).append(layer)
    return groups


def _tunable(layers: Sequence[nn.Module]) -> bool:
    return not tuning_disabled() and bool(layers) and layers[0].weight.device.type == "cpu"


def cached_measurements() -> dict:
    """What this machine (CPU model, torch version, thread count) has measured so far, by key."""
    return _read_cache(cache_path()).get("machines", {}).get(_machine_key(), {})


def cache_measurements(entries: dict[str, dict]) -> None:
    """Add ``entries`` (key -> measurement) to this machine's part of the cache file (the decode
    kernels' and ``gptcli.kernels.train``'s alike)."""
    path = cache_path()
    cache = _read_cache(path) or {"version": CACHE_VERSION, "machines": {}}
    cache.setdefault("machines", {}).setdefault(_machine_key(), {}).update(entries)
    _write_cache(path, cache)


def _usable(known: object, weight: torch.Tensor) -> bool:
    """A cached entry with a well-formed measurement of every candidate this weight has."""

    def well_formed(m: object) -> bool:
        return (isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)
                                            for k in ("one", "batch")) and isinstance(m.get("invariant"), bool))

    return isinstance(known, dict) and all(well_formed(known.get(n)) for n in candidates(weight))


def will_measure(model: nn.Module) -> bool:
    """Whether ``tune`` would time kernels now (nothing cached for one of the model's shapes)."""
    layers = linear_layers(model)
    if not _tunable(layers):
        return False
    known = cached_measurements()
    return any(not _usable(known.get(key), group[0].weight) for key, group in _groups(layers).items())


def tune(model: nn.Module, mode: str = EAGER, *, enabled: bool = True, use_cache: bool = True) -> DecodePlan:
    """A kernel for each weight shape of ``model``'s Linear layers: from the cache, else measured now.

    Only CPU models are tuned; elsewhere, with ``enabled=False`` or with ``GPTCLI_NO_TUNE`` set, the
    plan is the defaults.
    """
    layers = linear_layers(model)
    if not enabled or not _tunable(layers):
        return DecodePlan(mode, {}, source="default")
    groups = _groups(layers)
    start = time.perf_counter()
    known = cached_measurements() if use_cache else {}
    measurements: dict[str, dict] = {}
    todo = {}
    for key, group in groups.items():
        if _usable(known.get(key), group[0].weight):
            measurements[key] = {n: known[key][n] for n in candidates(group[0].weight)}
        else:
            todo[key] = group
    if todo:
        dtype = layers[0].weight.dtype
        with torch.inference_mode():
            for key, group in _sample(todo).items():
                measurements[key] = {name: measure(group, name, dtype) for name in candidates(group[0].weight)}
        if use_cache:
            cache_measurements({key: measurements[key] for key in todo})
    choices = {key: Choice(choose(m, mode), m) for key, m in measurements.items()}
    return DecodePlan(mode, choices, tune_s=time.perf_counter() - start, source="measured" if todo else "cache")


def apply(model: nn.Module, plan: DecodePlan, release: Callable[[torch.Tensor], None] | None = None,
          lazy: bool = False) -> dict[str, int]:
    """Make every Linear layer a ``KernelLinear`` with its planned kernel; counts per kernel.

    A kernel that copied the weight into its own layout leaves the plain weight behind: it is then
    replaced by a meta tensor of the same shape (a later use fails loudly), unless another module
    still needs it (a head tied to the token embedding). ``release(tensor)`` is called on each
    dropped weight first (``gptcli.weights`` uses it to give a file mapping's pages back).
    From here on the model decodes only: no training, saving or moving.

    ``lazy`` (eager plans): the layers whose oneDNN kernel the tuner found to give the same bits on
    the weight as stored as on the packed one (``same_unpacked``) start on the weight as stored, and a
    background thread packs them one by one (``model.packer``, a ``BackgroundPacker``), so the first
    token does not wait for packing a large model's weights and no token's ids depend on when each
    layer switches.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def drop_plain(layer: nn.Module, kernel: Kernel) -> None:
        if kernel.copies_weight and id(layer.weight) not in embedding_weights:
            if release is not None:
                release(layer.weight)
            layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
            return_freed_memory()

    counts: dict[str, int] = {}
    layers = linear_layers(model)
    kernels = [KERNELS[plan.kernel_for(layer.weight)](layer.weight) for layer in layers]
    later = [lazy and plan.mode == EAGER and isinstance(k, OneDNN) and plan.same_unpacked(layer.weight)
             for layer, k in zip(layers, kernels)]
    now = [(layer, k) for layer, k, waits in zip(layers, kernels, later) if not waits]
    for (layer, _), kernel in zip(now, prepare_all([k for _, k in now])):
        _install(layer, kernel)
        drop_plain(layer, kernel)
    pending = [(layer, k) for layer, k, waits in zip(layers, kernels, later) if waits]
    for layer, kernel in pending:
        _install(layer, kernel)
    model.packer = None
    if pending:
        model.packer = BackgroundPacker(pending, drop_plain)
        # Packing beside the first forward (a prompt's) slowed it 2x on 2 cores: start after it.
        def start_packing(*_: object) -> None:  # a forward hook: returning None keeps the output
            hook.remove()
            model.packer.start()

        hook = model.register_forward_hook(start_packing)
    for kernel in kernels:
        counts[kernel.name] = counts.get(kernel.name, 0) + 1
    return counts


def _install(layer: nn.Module, kernel: Kernel) -> None:
    layer.__class__ = KernelLinear  # the same module: parameters and a tied head stay
    layer.kernel = kernel


class BackgroundPacker:
    """Packs layers' oneDNN weights on a thread of its own, in model order, while they already decode
    on their weights as stored; each layer switches when its packing is done (``OneDNN.__call__``).
    At exit it stops after the matrix under way."""

    _live: "set[BackgroundPacker]" = set()
    _lock = threading.Lock()
    autostart = True  # tests turn it off to switch layers at chosen steps with ``pack_next``

    def __init__(self, pending: Sequence[tuple[nn.Module, "OneDNN"]],
                 finished: Callable[[nn.Module, Kernel], None]):
        self.total = len(pending)
        self.packed = 0
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.seconds: float | None = None  # how long packing took, once done
        self._pending = list(pending)
        self._finished = finished
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptcli-pack", daemon=True)

    def start(self) -> None:
        """Start packing on the thread (once; not when ``autostart`` is off)."""
        if self.autostart and not self._thread.is_alive() and not self._done.is_set():
            with self._lock:
                self._live.add(self)
            self.started = time.perf_counter()
            self._thread.start()

    def pack_next(self) -> bool:
        """Pack the next layer (on the calling thread); whether any are left."""
        if self.packed < self.total:
            layer, kernel = self._pending[self.packed]
            kernel.prepare()
            self._finished(layer, kernel)
            self._pending[self.packed] = None  # type: ignore[call-overload] - let the layer go
            self.packed += 1
        if self.packed == self.total and not self._done.is_set():
            self.seconds = time.perf_counter() - self.started
            self._done.set()
        return self.packed < self.total

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.pack_next():
                pass
        except BaseException as exc:  # noqa: BLE001 - the unpacked layers keep working, only slower
            self.error = exc
            self._done.set()
        finally:
            with self._lock:
                self._live.discard(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every layer is packed (or packing failed); whether it is done."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @classmethod
    def stop_all(cls) -> None:
        with cls._lock:
            live = list(cls._live)
        for packer in live:
            packer.stop()


atexit.register(BackgroundPacker.stop_all)  # never tear the interpreter down under a packing thread


def wait_packed(model: nn.Module, timeout: float | None = None) -> bool:
    """Block until ``model``'s background packing (``apply(lazy=True)``) is done; True when none is left."""
    packer = getattr(model, "packer", None)
    return packer is None or packer.wait(timeout)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    After a load that freed large buffers, glibc serves matrices under 32 MB from its heap and keeps
    them there once freed: packing 124M's weights (oneDNN) one by one then left ~190 MB of freed plain weights
    in the process's memory (peak RSS 1079 MB against 887 MB when trimmed after each layer).
    """
    from gptcli.devices import libc

    c = libc()
    if c is not None:
        c.malloc_trim(0)


def describe(counts: dict[str, int]) -> str:
    """``onednn x48, blas x1``: layers per kernel, for --stats."""
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
