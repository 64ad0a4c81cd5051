"""Which device and dtype a command runs on: ``--device auto|cpu|cuda|mps`` and ``--dtype auto|float32|bfloat16|float16``.

Names are checked without torch (``check_device_name``, ``check_dtype_name``) so a typo fails fast;
resolving them imports torch lazily.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")

# --dtype auto on the CPU is float32: exact (the ids of the book's code and of transformers).
# bfloat16 is faster: measured on this project's 2-core CI CPU (AMD EPYC, torch 2.13, 124M, greedy,
# 128 new tokens, one thread, medians of 3 interleaved rounds; bench/decode.py, BENCHMARKS.md),
# eager float32 63.9 tok/s and eager bfloat16 104.4 tok/s with packed oneDNN weights (before
# packing, 35.8 and 40.0 with two threads). But bfloat16's logits differ from float32's by up to
# 1.4% of the largest logit and its greedy ids diverged on 3 of 10 prompts within 32 tokens
# (bench/quant_accuracy.py). Ask for --dtype bfloat16 when speed matters more than exactness.
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


def proc_field(path: str, key: str) -> str | None:
    """The value after ``key:`` in a /proc file of ``key: value`` lines (cpuinfo, meminfo, status);
    None where the file or the key is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def proc_kib(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file, in bytes."""
    value = proc_field(path, key)
    return int(value.split()[0]) * 1024 if value else None


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo; the platform's word for it elsewhere."""
    name = proc_field("/proc/cpuinfo", "model name")
    if name:
        return name
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def libc():
    """glibc through ctypes (malloc_trim, madvise), loaded once; None where there is none."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError, TypeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuSample:
    """Busy and total jiffies of the CPUs in our affinity mask, our own CPU seconds, and when."""

    wall: float
    busy: int
    total: int
    own: float


def parse_proc_stat(text: str, cpus: set[int] | None) -> tuple[int, int]:
    """(busy, total) jiffies summed over the ``cpuN`` lines of /proc/stat for ``cpus`` (all when None).

    Idle and iowait are not busy; steal is (a hypervisor gave the core to someone else).
    """
    busy = total = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or (cpus is not None and int(name[3:]) not in cpus):
            continue
        fields = [int(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(fields)
        busy += sum(fields) - sum(fields[3:5])
    return busy, total


def cpu_sample() -> CpuSample | None:
    """A snapshot for ``busy_cores_of_others``; None where there is no /proc/stat (macOS, Windows)."""
    try:
        with open("/proc/stat") as f:
            text = f.read()
        cpus = os.sched_getaffinity(0)
    except (OSError, AttributeError):
        return None
    busy, total = parse_proc_stat(text, cpus)
    times = os.times()
    return CpuSample(time.monotonic(), busy, total, times.user + times.system)


def busy_cores_of_others(start: CpuSample, end: CpuSample) -> float:
    """How many of our cores other processes kept busy between two samples, on average.

    The busy time of the cores in our affinity mask, less our own CPU time (all our threads).
    """
    wall = end.wall - start.wall
    if wall <= 0 or end.total <= start.total:
        return 0.0
    cores_busy = (end.busy - start.busy) / (end.total - start.total) * available_cores()  # busy cores, ours too
    return max(0.0, cores_busy - (end.own - start.own) / wall)


def threads_for(cores: int, busy_others: float) -> int:
    """The cores nobody else is using, at least one: a core held by another busy process counts from half use.

    OpenMP threads spin while they wait for each other, so a thread whose core is taken stalls every
    step: on this project's 2-core AMD EPYC, 124M decoded at 25 tok/s with 2 threads beside one busy
    process, against 48 with 1 thread (80 and 47 when idle); bench/threads.py, BENCHMARKS.md.
    """
    return max(1, cores - int(busy_others + 0.5))


# Measured from here to configure_threads: the CLI imports this module before torch, so the window
# spans the import of torch and costs no waiting. A window that is too short or too old (a
# long-running process) is replaced by a fresh sample of MIN_WINDOW_S.
_SINCE = cpu_sample()
MIN_WINDOW_S = 0.1
MAX_WINDOW_S = 10.0


def _busy_others_now() -> float:
    global _SINCE
    start = _SINCE
    if start is None or not MIN_WINDOW_S <= time.monotonic() - start.wall <= MAX_WINDOW_S:
        start = cpu_sample()
        if start is None:
            return 0.0
        time.sleep(MIN_WINDOW_S)
    end = cpu_sample()
    _SINCE = end
    return 0.0 if end is None else busy_cores_of_others(start, end)


def configure_threads(requested: int | None = None) -> int:
    """Set torch's CPU thread counts for this process; returns the intra-op count now in use.

    ``requested`` (``--threads N``) wins; then ``OMP_NUM_THREADS`` when set (torch read it at import).
    Otherwise the cores in the affinity mask that other processes are not keeping busy
    (``threads_for``), at least one. Inter-op threads are set to 1: gptcli runs one op at a time, so
    more would only add idle threads.
    """
    import torch

    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be 1 or more, got {requested}")
        threads = requested
    else:
        threads = _env_threads() or threads_for(available_cores(), _busy_others_now())
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can be set once per process, before inter-op work starts: already done
        pass
    return torch.get_num_threads()


def _env_threads() -> int | None:
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None
