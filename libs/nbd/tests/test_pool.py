"""NbdPool: several connections to one export."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from virtbackup.nbd import BASE_ALLOCATION, NbdClient, NbdConnectionError, NbdPool

MiB = 1024 * 1024


async def test_pool_spreads_a_large_read(qemu: Any) -> None:
    data = os.urandom(64 * MiB)
    server = qemu.serve(qemu.image_from(data), read_only=True)
    async with await NbdPool.connect_uri(server.uri, 4) as pool:
        assert len(pool.clients) == 4
        assert pool.info.can_multi_conn
        assert pool.size == len(data)
        buf = bytearray(len(data))
        await pool.readinto(0, buf)
        assert buf == data
        # 64 MiB as 32 requests of 2 MiB, eight on each connection.
        assert [c.requests_sent for c in pool.clients] == [8, 8, 8, 8]


async def test_pool_concurrent_requests_use_every_connection(qemu: Any) -> None:
    data = os.urandom(16 * MiB)
    server = qemu.serve(qemu.image_from(data), read_only=True)
    rng = random.Random(3)
    ranges = [(rng.randrange(0, 15 * MiB), rng.randrange(1, MiB)) for _ in range(200)]
    async with await NbdPool.connect_uri(server.uri, 3, meta_contexts=[BASE_ALLOCATION]) as pool:
        got = await asyncio.gather(*(pool.read(o, n) for o, n in ranges))
        for (offset, length), chunk in zip(ranges, got, strict=True):
            assert chunk == data[offset : offset + length]
        counts = [c.requests_sent for c in pool.clients]
        assert sum(counts) == 200
        assert min(counts) >= 20
        extents = await pool.block_status()
        assert extents[0].offset == 0
        assert extents[-1].end == len(data)


async def test_pool_writes_are_seen_by_a_new_connection(qemu: Any) -> None:
    image = qemu.image(48 * MiB)
    server = qemu.serve(image)
    payload = os.urandom(40 * MiB)
    async with await NbdPool.connect_uri(server.uri, 4) as pool:
        await pool.write(4 * MiB, payload)
        await pool.write_zeroes(10 * MiB, MiB)
        await pool.flush()
        assert sum(c.requests_sent for c in pool.clients) >= 6
    expected = payload[: 6 * MiB] + bytes(MiB) + payload[7 * MiB :]
    async with await NbdClient.connect_uri(server.uri) as nbd:
        assert await nbd.read(4 * MiB, len(payload)) == expected


async def test_pool_open_failure_closes_the_others(qemu: Any) -> None:
    # qemu-nbd serving at most 2 clients: the third handshake never starts.
    server = qemu.serve(qemu.image(MiB), shared=2)
    with pytest.raises(NbdConnectionError):
        await NbdPool.connect_uri(server.uri, 3, timeout=1)
    # The two that were opened were closed again, so two new clients fit.
    async with await NbdPool.connect_uri(server.uri, 2) as pool:
        assert await pool.read(0, 4096) == bytes(4096)
