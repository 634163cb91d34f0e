"""Extents returned by NBD_CMD_BLOCK_STATUS.

An extent is a byte range of the export with the flags a meta context reports
for it. The meaning of ``flags`` depends on the context:

- ``base:allocation``: bit 0 :data:`~virtbackup.nbd.protocol.STATE_HOLE` (not
  allocated), bit 1 :data:`~virtbackup.nbd.protocol.STATE_ZERO` (reads as zeros);
- ``qemu:dirty-bitmap:NAME``: bit 0 :data:`~virtbackup.nbd.protocol.STATE_DIRTY`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .protocol import STATE_DIRTY, STATE_HOLE, STATE_ZERO


class Extent(NamedTuple):
    """``(offset, length, flags)`` of one contiguous range with the same status."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        """The first byte after the extent."""
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        """``base:allocation``: the range reads as zeros."""
        return bool(self.flags & STATE_ZERO)

    @property
    def is_hole(self) -> bool:
        """``base:allocation``: the range is not allocated."""
        return bool(self.flags & STATE_HOLE)

    @property
    def is_dirty(self) -> bool:
        """``qemu:dirty-bitmap:*``: the range changed since the bitmap was started."""
        return bool(self.flags & STATE_DIRTY)


def coalesce(extents: Iterable[Extent]) -> list[Extent]:
    """Merge neighbouring extents that touch and have equal flags.

    The input must be sorted by offset and must not overlap. Servers split
    extents as their internal structures dictate (qcow2 clusters, request
    boundaries); merging gives the same answer for the same content.
    """
    out: list[Extent] = []
    for ext in extents:
        if out:
            last = out[-1]
            if last.flags == ext.flags and last.offset + last.length == ext.offset:
                out[-1] = Extent(last.offset, last.length + ext.length, last.flags)
                continue
        out.append(ext)
    return out
