"""The worker's memory allocator: chunk-sized buffers from the heap, kept when freed.

A worker allocates and frees buffers of a few MiB all the time (chunk blobs read from a
destination, decompressed chunks, compressed ones). With glibc's defaults many of them
are fresh memory: a new ``mmap``, or heap that the previous ``free`` gave back to the
system. Each then costs page faults, page zeroing and unmapping again: about a fifth
of a worker's CPU during a restore of the benchmark VM (``perf``). With the mmap
threshold at 32 MiB (glibc's maximum) and trimming off, freed buffers are reused: in
A/B runs of that restore, the workers' CPU fell by 10-20% (2.4-2.7 s to 2.1-2.3 s) and
their peak memory rose by about 25 MiB (what the heaps keep between units).

With trimming off, every heap keeps what it once held, and glibc gives each thread that
allocates at the same time as another a heap (an arena) of its own, up to 8 per core: a
buffer freed by one thread (a chunk blob read by a destination thread, a compressed one
made on a hashing thread) does not serve another's next allocation. So the worker's
threads share :data:`ARENA_MAX` arenas: on the benchmark (2 workers, a full backup of
2 GiB, an incremental, a restore) a worker's arenas besides the main heap held 59-68 MiB
after the three steps instead of 97-116 MiB (with one arena: 29, but the main heap grew
by as much). The threads allocate a few buffers per chunk, so sharing costs no
measurable lock contention.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
#: Allocations below this come from the heap (32 MiB, the most glibc accepts).
MMAP_THRESHOLD: Final = 32 << 20
#: Free heap is given back to the system only above this (in effect: never).
TRIM_THRESHOLD: Final = 1 << 30
#: Arenas (heaps) all threads share: the main one and one for the others.
ARENA_MAX: Final = 2


def keep_large_buffers() -> bool:
    """Set this process's allocator as the module docstring says. Returns whether it
    took: False where the C library has no ``mallopt`` that accepts them (not glibc),
    which changes nothing else. Call it before the threads that allocate start: an
    arena a thread already has stays its own."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        bool(mallopt(param, value))
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_ARENA_MAX, ARENA_MAX),
        )
    )
