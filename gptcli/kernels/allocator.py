"""glibc malloc settings for training on the CPU: freed tensor memory stays in the heap for the next step.

torch's CPU tensors come straight from ``malloc``; nothing caches them as the CUDA allocator does.
glibc serves a large block (above its mmap threshold, which starts at 128 KiB and grows with what is
freed) with a fresh ``mmap`` and gives the heap's free top back to the kernel past its trim threshold.
A training step allocates and frees hundreds of activation-sized blocks, so each step faulted its
memory in again, page by page: nanoGPT's shakespeare-char model, bfloat16, 2 threads on the Intel
Xeon, made 3,500-3,750 page faults a step and ran 21 ms a step; with the settings below about 40
and 16.5 ms (``bench/train.py``; ``tests/test_allocator.py`` counts the faults). Decoding allocates
little and measured the same either way, so only training sets them (``gptcli.kernels.train.prepare``).

The settings are process-wide, last for the process, and act only where the C library is glibc.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap: glibc's own ceiling for the mmap threshold on 64-bit
# systems (32 MiB), which its dynamic threshold would reach only after freeing such a block.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the heap's top is kept up to this much rather than returned to the kernel.
TRIM_THRESHOLD = 512 * 1024 * 1024

_applied = False


def _glibc() -> "ctypes.CDLL | None":
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # absent in musl, whose mallopt does nothing
        return libc
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether this process's C library is glibc (the settings mean something)."""
    return _glibc() is not None


def keep_freed_memory() -> bool:
    """Serve blocks up to ``MMAP_THRESHOLD`` from the heap and keep up to ``TRIM_THRESHOLD`` of freed
    memory there. True when glibc took both settings (now or earlier in this process)."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
