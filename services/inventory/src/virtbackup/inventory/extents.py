"""The extent maps of a begun backup's exports, read over NBD for the orchestrator's plan.

Right after ``virDomainBackupBegin`` the inventory reads, per exported disk, the
``base:allocation`` map and (in an incremental backup) the dirty bitmap's map, and
returns them with the export (``DiskExport.allocation`` / ``.dirty``), so that the
orchestrator plans without touching NBD.

The maps travel in one bus reply, which NATS caps (1 MiB by default). A map is a list
of ``[offset, length, flags]`` with neighbours of equal flags merged; a fragmented disk
can still have hundreds of thousands of extents. When the maps of a reply hold more than
:data:`MAX_EXTENTS` together, the longest map is widened to whole aligned blocks
(:func:`widen`, from :data:`FIRST_BLOCK` and doubling) until they fit. Widening is
conservative: a block holds data or is dirty if any byte of it does, so a plan reads more
but never misses a change. While the block size is at most the repository's chunk size
(a power of two, like the block sizes), plans come out exactly as from the exact maps.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from virtbackup.contracts.v1.inventory import Extent
from virtbackup.nbd import BASE_ALLOCATION, NbdClient
from virtbackup.nbd import Extent as NbdExtent

#: The most extents the maps of one ``BackupBegun`` hold together (about 30 bytes each
#: in JSON at worst: under 0.5 MiB).
MAX_EXTENTS: Final = 16_384
#: The first block size maps are widened to when they do not fit.
FIRST_BLOCK: Final = 64 * 1024


@dataclass
class ExtentMap:
    """One map of one disk. ``dirty`` tells how a widened block's flags combine: a
    dirty-bitmap bit is set if it is set anywhere in the block (OR), an allocation bit
    (hole, zero) only if it is set everywhere (AND). ``block`` is 1 while exact."""

    extents: list[Extent]
    dirty: bool
    block: int = 1


@dataclass
class DiskMaps:
    """What NBD says about one export: its size in bytes and its maps."""

    size: int
    allocation: ExtentMap
    dirty: ExtentMap | None


def from_nbd(extents: Iterable[NbdExtent]) -> list[Extent]:
    """NBD client extents as contract extents, empty ones dropped, equal neighbours merged."""
    out: list[Extent] = []
    for ext in extents:
        if ext.length > 0:
            _append(out, ext.offset, ext.length, ext.flags)
    return out


async def read_maps(
    nbd_url: str,
    bitmap_context: str | None,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> DiskMaps:
    """Read the size and maps of the export at ``nbd_url``: ``base:allocation``, and
    ``bitmap_context`` (e.g. ``qemu:dirty-bitmap:backup-vda``) when given; ``tls`` is
    the client context for an ``nbds://`` export.

    Raises ``virtbackup.nbd.NbdError`` when the export cannot be reached (within
    ``timeout`` seconds for the connection) or does not offer a context."""
    contexts = [BASE_ALLOCATION] + ([bitmap_context] if bitmap_context else [])
    async with await NbdClient.connect_uri(
        nbd_url, meta_contexts=contexts, timeout=timeout, tls=tls
    ) as nbd:
        allocation = from_nbd(await nbd.block_status(context=BASE_ALLOCATION))
        dirty = from_nbd(await nbd.block_status(context=bitmap_context)) if bitmap_context else None
        return DiskMaps(
            size=nbd.size,
            allocation=ExtentMap(allocation, dirty=False),
            dirty=ExtentMap(dirty, dirty=True) if dirty is not None else None,
        )


def fit(maps: Sequence[ExtentMap], limit: int = MAX_EXTENTS) -> None:
    """Widen the longest of ``maps`` (in place) until they hold at most ``limit``
    extents together; ``limit`` must be at least ``len(maps)``."""
    if limit < len(maps):
        raise ValueError(f"cannot fit {len(maps)} maps into {limit} extents")
    while sum(len(m.extents) for m in maps) > limit:
        longest = max(maps, key=lambda m: len(m.extents))
        longest.block = FIRST_BLOCK if longest.block < FIRST_BLOCK else longest.block * 2
        longest.extents = widen(longest.extents, longest.block, dirty=longest.dirty)


def widen(extents: Sequence[Extent], block: int, *, dirty: bool) -> list[Extent]:
    """The map ``extents`` (sorted, contiguous) at a resolution of ``block`` bytes.

    Every block wholly inside one extent keeps its flags; a block that several extents
    share gets their flags combined, OR for a dirty bitmap (``dirty``), else AND (an
    allocation map: zero or a hole only if all of it is). The first and last block may
    be partial when the map does not start or end on a block boundary."""
    out: list[Extent] = []
    if not extents:
        return out
    count = len(extents)
    end = extents[-1].offset + extents[-1].length
    pos = extents[0].offset
    i = 0
    while pos < end:
        ext = extents[i]  # ext.offset <= pos < its end
        ext_end = ext.offset + ext.length
        block_end = min((pos // block + 1) * block, end)
        if ext_end >= block_end:
            # Every whole block from pos on that the extent covers keeps its flags.
            stop = end if ext_end == end else ext_end // block * block
            _append(out, pos, stop - pos, ext.flags)
            pos = stop
        else:
            flags = ext.flags
            j = i + 1
            while j < count and extents[j].offset < block_end:
                flags = flags | extents[j].flags if dirty else flags & extents[j].flags
                j += 1
            _append(out, pos, block_end - pos, flags)
            pos = block_end
        while i < count and extents[i].offset + extents[i].length <= pos:
            i += 1
    return out


def _append(out: list[Extent], offset: int, length: int, flags: int) -> None:
    if out:
        last = out[-1]
        if last.flags == flags and last.offset + last.length == offset:
            out[-1] = Extent(last.offset, last.length + length, flags)
            return
    out.append(Extent(offset, length, flags))
