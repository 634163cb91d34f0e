"""A migration unit: copy byte ranges of a disk from a source export to a target export.

The orchestrator sends only what must be copied: in a migration's first pass the
allocated (non-zero) extents of the source disk, in later passes the extents its dirty
bitmap marks. The worker reads each range in pieces of at most ``PIECE`` bytes and
writes them at the same offset of the target export; a piece that reads as all zeros is
written as zeros (NBD ``WRITE_ZEROES``: no data cluster on a qcow2 target), so the
target stays thin and a range the guest zeroed since an earlier pass reads as zeros
there too. A unit is idempotent: done again after a redelivery, it writes the same
bytes.
"""

from __future__ import annotations

import time

from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.nbd import NbdClient
from virtbackup.transfer_worker.units import (
    _ZERO,
    RESTORE_CHUNKS_IN_FLIGHT,
    UnitContext,
    _bounded,
    _write_zeroes,
)

#: Bytes read and written at once (one buffer of the worker's pool each).
PIECE = 4 << 20


def pieces(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """``ranges`` cut into ``[offset, length]`` pieces of at most ``PIECE`` bytes.

    Raises ValueError for a range that is empty, negative or beyond ``size`` (the
    disk's size in bytes): the unit fails rather than writing somewhere else."""
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        if offset < 0 or length <= 0 or offset + length > size:
            raise ValueError(f"range [{offset}, {length}] is not within the disk ({size} bytes)")
        end = offset + length
        while offset < end:
            step = min(PIECE, end - offset)
            out.append((offset, step))
            offset += step
    return out


async def migrate_unit(
    unit: TransferUnit, source: NbdClient, target: NbdClient, uctx: UnitContext
) -> UnitResult:
    """Copy ``unit.ranges`` from ``source`` to ``target`` and flush the target.
    ``bytes_read`` counts bytes read from the source, ``bytes_written`` the bytes of
    data written (zero pieces are not counted: they carry no data)."""
    started = time.monotonic()
    counters = {"read": 0, "written": 0}

    async def one(piece: tuple[int, int]) -> None:
        offset, length = piece
        async with uctx.budget.hold(length):
            buf = uctx.buffers.take(PIECE)
            try:
                view = memoryview(buf)[:length]
                await source.readinto(offset, view)
                counters["read"] += length
                if _ZERO.is_zero(buf[:length]):
                    await _write_zeroes(target, offset, length)
                    return
                await target.write(offset, view)
                counters["written"] += length
            finally:
                uctx.buffers.give(buf)

    await _bounded(pieces(unit.ranges, unit.disk_size), one, RESTORE_CHUNKS_IN_FLIGHT)
    await target.flush()
    return UnitResult(
        job_id=unit.job_id,
        unit=unit.unit,
        kind="migrate",
        disk=unit.disk,
        worker=uctx.worker,
        ok=True,
        bytes_read=counters["read"],
        bytes_written=counters["written"],
        seconds=time.monotonic() - started,
    )
