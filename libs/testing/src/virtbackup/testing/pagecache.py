"""Looking into the page cache: how tests see that data went past it (``O_DIRECT`` chunk
files, ``qemu-nbd --cache=none`` restore exports)."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

__all__ = ["resident_pages"]


def resident_pages(path: Path) -> int:
    """How many pages of the file at ``path`` are in the page cache (``mincore`` on a
    shared mapping of it). The file must be non-empty and writable (``r+b``); ``OSError``
    if ``mincore`` fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), size) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor
    return sum(b & 1 for b in vec.raw)
