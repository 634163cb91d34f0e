"""BLOCK_STATUS: base:allocation against nbdinfo --map, dirty bitmaps, partial replies."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from virtbackup.nbd import BASE_ALLOCATION, Extent, NbdClient, NbdCommandError, coalesce

MiB = 1024 * 1024
KiB = 1024
BITMAP = "qemu:dirty-bitmap:bm0"


def merged(triples: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return [(e.offset, e.length, e.flags) for e in coalesce(Extent(*t) for t in triples)]


async def test_allocation_matches_qemu_io_writes_and_nbdinfo(qemu: Any, nbdinfo: Any) -> None:
    image = qemu.image(
        64 * MiB,
        writes=[(0xAB, MiB, 4 * MiB), (0x11, 10 * MiB, 64 * KiB), (0x22, 63 * MiB, MiB)],
        zero_writes=[(20 * MiB, 2 * MiB)],
    )
    server = qemu.serve(image)
    async with await NbdClient.connect_uri(server.uri, meta_contexts=[BASE_ALLOCATION]) as nbd:
        extents = await nbd.block_status()
        got = [tuple(e) for e in extents]
        assert got == merged(nbdinfo.map(server.uri))
        data = [(e.offset, e.length) for e in extents if not e.is_zero]
        assert data == [(MiB, 4 * MiB), (10 * MiB, 64 * KiB), (63 * MiB, MiB)]
        assert all(e.is_hole for e in extents if e.is_zero and e.offset != 20 * MiB)
        # The explicitly zeroed range reads as zeros (allocated or not).
        zeroed = [e for e in extents if e.offset <= 20 * MiB < e.end]
        assert zeroed[0].is_zero
        # Extents tile the disk exactly.
        assert extents[0].offset == 0
        assert extents[-1].end == nbd.size
        assert all(a.end == b.offset for a, b in itertools.pairwise(extents))


async def test_sub_range_is_clipped(qemu: Any) -> None:
    server = qemu.serve(qemu.image(16 * MiB, [(0xAB, 4 * MiB, 4 * MiB)]))
    async with await NbdClient.connect_uri(server.uri, meta_contexts=[BASE_ALLOCATION]) as nbd:
        got = await nbd.block_status(3 * MiB, 2 * MiB)
        assert [(e.offset, e.length, e.is_zero) for e in got] == [
            (3 * MiB, MiB, True),
            (4 * MiB, MiB, False),
        ]
        got = await nbd.block_status(5 * MiB + 7, 100)
        assert got == [Extent(5 * MiB + 7, 100, 0)]


async def test_req_one_forces_iteration(qemu: Any) -> None:
    """With REQ_ONE the server describes one extent per request; the client asks again."""
    writes = [(0x40 + i, i * 2 * MiB, MiB) for i in range(8)]
    server = qemu.serve(qemu.image(16 * MiB, writes))
    async with await NbdClient.connect_uri(server.uri, meta_contexts=[BASE_ALLOCATION]) as nbd:
        before = nbd.requests_sent
        full = await nbd.block_status()
        assert nbd.requests_sent - before == 1
        before = nbd.requests_sent
        one = await nbd.block_status(req_one=True)
        assert nbd.requests_sent - before == 16
        assert one == full
        assert [e.offset for e in full if not e.is_zero] == [i * 2 * MiB for i in range(8)]


async def test_dirty_bitmap_covers_exactly_the_written_ranges(qemu: Any, nbdinfo: Any) -> None:
    image = qemu.image(
        64 * MiB,
        writes=[(0xCD, 4 * MiB, 2 * MiB), (0xEF, 20 * MiB, 64 * KiB)],
        bitmap="bm0",
    )
    server = qemu.serve(image, read_only=True, bitmap="bm0")
    async with await NbdClient.connect_uri(
        server.uri, meta_contexts=[BASE_ALLOCATION, BITMAP]
    ) as nbd:
        assert set(nbd.meta_contexts) == {BASE_ALLOCATION, BITMAP}
        dirty = await nbd.block_status(context=BITMAP)
        assert [(e.offset, e.length) for e in dirty if e.is_dirty] == [
            (4 * MiB, 2 * MiB),
            (20 * MiB, 64 * KiB),
        ]
        assert [tuple(e) for e in dirty] == merged(nbdinfo.map(server.uri, BITMAP))
        # The other context of the same replies is still right.
        alloc = await nbd.block_status(context=BASE_ALLOCATION)
        assert [(e.offset, e.length) for e in alloc if not e.is_zero] == [
            (4 * MiB, 2 * MiB),
            (20 * MiB, 64 * KiB),
        ]
        assert await nbd.read(4 * MiB, 2 * MiB) == b"\xcd" * (2 * MiB)


async def test_block_status_past_end_is_an_error(qemu: Any) -> None:
    server = qemu.serve(qemu.image(MiB))
    async with await NbdClient.connect_uri(server.uri, meta_contexts=[BASE_ALLOCATION]) as nbd:
        with pytest.raises(NbdCommandError):
            await nbd.block_status(0, 2 * MiB)
        assert await nbd.block_status() == [Extent(0, MiB, 3)]
