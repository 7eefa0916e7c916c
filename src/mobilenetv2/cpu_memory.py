"""Large CPU tensors and glibc's malloc. glibc serves a block over its mmap threshold (at most 32 MiB, however it
adapts) from fresh pages and unmaps it when freed, and gives the top of its heap back to the kernel once that is
over its trim threshold. A training step frees and allocates the same activations every step, so each step
page-faults and zeroes them anew: on a 2-core AMD EPYC VM, 165,000-227,000 page faults and 0.3-0.4 s of system
time in a 1-s 224-px step (benchmarks/cpu_memory.py). Raising both thresholds keeps freed blocks in the heap for the
next step. The process then holds its peak memory until `release_freed_memory`, which the runtime calls on teardown.
Other C libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30  # bytes: a block under 1 GiB comes from the heap and goes back to it
TRIM_ABOVE = (1 << 31) - 1  # bytes of free heap top before glibc trims it on its own (its int maximum)


def _glibc():
    """The process's own C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Keep freed blocks under 1 GiB in the heap for reuse; whether glibc took both settings."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))


def release_freed_memory() -> None:
    """Give the heap's free memory back to the kernel now (the settings stay: glibc has no way back to its adaptive
    thresholds)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
