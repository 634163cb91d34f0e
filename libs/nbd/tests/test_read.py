"""Reads: exact content, holes, in-place reads, splitting, errors, cancellation."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from virtbackup.nbd import NbdClient, NbdCommandError, NbdError
from virtbackup.nbd import protocol as p

MiB = 1024 * 1024


def content(size: int, data_ranges: list[tuple[int, int]]) -> bytes:
    """Random bytes in ``data_ranges``, zeros elsewhere."""
    buf = bytearray(size)
    for offset, length in data_ranges:
        buf[offset : offset + length] = os.urandom(length)
    return bytes(buf)


@pytest.fixture
def disk(qemu: Any) -> tuple[str, bytes]:
    """16 MiB of random data with holes, served by qemu-nbd."""
    data = content(16 * MiB, [(0, 64 * 1024), (MiB + 12345, 3 * MiB), (9 * MiB, 5 * MiB)])
    server = qemu.serve(qemu.image_from(data), read_only=True)
    return server.uri, data


@pytest.mark.parametrize("structured", [True, False])
async def test_whole_disk_equals_content(disk: tuple[str, bytes], structured: bool) -> None:
    uri, data = disk
    async with await NbdClient.connect_uri(uri, structured_replies=structured) as nbd:
        assert nbd.info.structured_replies is structured
        assert await nbd.read(0, len(data)) == data
        # Unaligned ranges straddling data and holes.
        for offset, length in [(MiB + 12000, 1000), (4 * MiB + 12000, 2 * MiB), (1, 3)]:
            assert await nbd.read(offset, length) == data[offset : offset + length]


async def test_holes_read_as_zeros_into_dirty_buffer(qemu: Any) -> None:
    """OFFSET_HOLE chunks must zero the caller's buffer, not leave it as it was."""
    server = qemu.serve(qemu.image(8 * MiB, [(0xAB, MiB, 4 * MiB)]))
    async with await NbdClient.connect_uri(server.uri) as nbd:
        buf = bytearray(b"\xff") * (8 * MiB)
        await nbd.readinto(0, buf)
        assert buf[:MiB] == bytes(MiB)
        assert buf[MiB : 5 * MiB] == b"\xab" * (4 * MiB)
        assert buf[5 * MiB :] == bytes(3 * MiB)


async def test_readinto_memoryview_slice(disk: tuple[str, bytes]) -> None:
    uri, data = disk
    async with await NbdClient.connect_uri(uri) as nbd:
        backing = bytearray(b"\xee") * (6 * MiB)
        view = memoryview(backing)[MiB : 5 * MiB]
        await nbd.readinto(8 * MiB, view)
        assert backing[MiB : 5 * MiB] == data[8 * MiB : 12 * MiB]
        assert backing[:MiB] == b"\xee" * MiB
        assert backing[5 * MiB :] == b"\xee" * MiB
        with pytest.raises(TypeError, match="read-only"):
            await nbd.readinto(0, memoryview(b"immutable"))


async def test_read_past_end_then_still_usable(disk: tuple[str, bytes]) -> None:
    uri, data = disk
    for structured in (True, False):
        async with await NbdClient.connect_uri(uri, structured_replies=structured) as nbd:
            with pytest.raises(NbdCommandError) as info:
                await nbd.read(len(data) - 4096, 8192)
            err = info.value
            assert err.errno == p.EINVAL
            assert err.command == p.Command.READ
            assert err.retryable is False
            assert "EINVAL" in str(err)
            if structured:
                assert "EOF" in err.message  # qemu's text travels in the ERROR chunk
            assert not nbd.closed
            assert await nbd.read(len(data) - 4096, 4096) == data[-4096:]


async def test_large_reads_are_split(qemu: Any) -> None:
    size = 72 * MiB
    data = content(size, [(0, 20 * MiB), (40 * MiB, 30 * MiB)])
    server = qemu.serve(qemu.image_from(data), read_only=True)
    async with await NbdClient.connect_uri(server.uri, request_size=64 * MiB) as nbd:
        assert nbd.info.max_payload == 32 * MiB
        assert nbd.request_size == 32 * MiB  # capped at the server's maximum
        # The server really refuses one request above its maximum...
        buf = memoryview(bytearray(33 * MiB))
        future = await nbd._conn.submit(p.Command.READ, 0, len(buf), buf=buf)
        with pytest.raises(NbdCommandError):
            await future
        # ...so the client splits: 72 MiB in three requests sent at once.
        before = nbd.requests_sent
        out = bytearray(size - 1)
        await nbd.readinto(1, out)
        assert nbd.requests_sent - before == 3
        assert out == data[1:]
    # By default reads go out as 2 MiB requests.
    async with await NbdClient.connect_uri(server.uri) as nbd:
        assert nbd.request_size == 2 * MiB
        out = bytearray(size)
        await nbd.readinto(0, out)
        assert nbd.requests_sent == 36
        assert out == data


async def test_many_pipelined_reads(disk: tuple[str, bytes]) -> None:
    uri, data = disk
    rng = random.Random(7)
    ranges = [(rng.randrange(0, len(data) - 70000), rng.randrange(1, 70000)) for _ in range(300)]
    async with await NbdClient.connect_uri(uri, max_in_flight=32) as nbd:
        results = await asyncio.gather(*(nbd.read(o, n) for o, n in ranges))
        assert nbd.requests_sent == 300
        for (offset, length), got in zip(ranges, results, strict=True):
            assert got == data[offset : offset + length]


async def test_cancelled_read_leaves_buffer_and_connection_alone(disk: tuple[str, bytes]) -> None:
    uri, data = disk
    async with await NbdClient.connect_uri(uri) as nbd:
        buf = bytearray(b"\x01") * (16 * MiB)
        view = memoryview(buf)
        # Sent, then cancelled before the loop could receive a byte of the reply.
        future = await nbd._conn.submit(p.Command.READ, 0, len(buf), buf=view)
        future.cancel()
        assert nbd.in_flight == 1
        # Later replies are served while the cancelled one is drained and discarded.
        assert await nbd.read(9 * MiB, 5 * MiB) == data[9 * MiB : 14 * MiB]
        for _ in range(500):
            if nbd.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert nbd.in_flight == 0
        assert buf == b"\x01" * (16 * MiB)

        # The same through a task cancelled while it waits.
        task = asyncio.create_task(nbd.readinto(0, buf))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snapshot = bytes(buf)
        for _ in range(500):
            if nbd.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert bytes(buf) == snapshot
        assert await nbd.read(0, MiB) == data[:MiB]


async def test_concurrent_read_errors_do_not_disturb_others(disk: tuple[str, bytes]) -> None:
    uri, data = disk
    async with await NbdClient.connect_uri(uri) as nbd:
        good = [nbd.read(i * MiB, MiB) for i in range(16)]
        bad = [nbd.read(len(data) + i, 10) for i in range(5)]
        results = await asyncio.gather(*good, *bad, return_exceptions=True)
        for i, got in enumerate(results[:16]):
            assert got == data[i * MiB : (i + 1) * MiB]
        assert all(isinstance(r, NbdError) for r in results[16:])
