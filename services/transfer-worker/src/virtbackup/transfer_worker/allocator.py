"""The worker's memory allocator: chunk-sized buffers from the heap, kept when freed.

A worker allocates and frees buffers of a few MiB all the time (chunk blobs read from a
destination, decompressed chunks, compressed ones). With glibc's defaults many of them
are fresh memory: a new ``mmap``, or heap that the previous ``free`` gave back to the
system. Each then costs page faults, page zeroing and unmapping again: about a fifth
of a worker's CPU during a restore of the benchmark VM (``perf``). With the mmap
threshold at 32 MiB (glibc's maximum) and trimming off, freed buffers are reused: in
A/B runs of that restore, the workers' CPU fell by 10-20% (2.4-2.7 s to 2.1-2.3 s) and
their peak memory rose by about 25 MiB (what the heaps keep between units).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
#: Allocations below this come from the heap (32 MiB, the most glibc accepts).
MMAP_THRESHOLD: Final = 32 << 20
#: Free heap is given back to the system only above this (in effect: never).
TRIM_THRESHOLD: Final = 1 << 30


def keep_large_buffers() -> bool:
    """Set this process's allocator as the module docstring says. Returns whether it
    took: False where the C library has no ``mallopt`` that accepts them (not glibc),
    which changes nothing else."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
