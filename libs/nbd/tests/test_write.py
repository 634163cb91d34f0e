"""Writes, zeroing, trim and flush, checked through the client and through qemu-io."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from virtbackup.nbd import BASE_ALLOCATION, NbdClient, NbdCommandError, NbdUnsupportedError

MiB = 1024 * 1024


async def test_write_then_read_back(qemu: Any) -> None:
    image = qemu.image(16 * MiB)
    server = qemu.serve(image)
    async with await NbdClient.connect_uri(server.uri) as nbd:
        payload = os.urandom(3 * MiB + 17)
        await nbd.write(MiB - 5, payload)
        await nbd.write(8 * MiB, b"\xcd" * MiB, fua=True)
        await nbd.write(10 * MiB, memoryview(bytearray(b"\x3c" * MiB)))
        await nbd.flush()
        assert await nbd.read(MiB - 5, len(payload)) == payload
        assert await nbd.read(MiB - 10, 5) == bytes(5)
    # A second tool sees the same bytes on disk.
    assert qemu.qemu_io_read(image, 0xCD, 8 * MiB, MiB)
    assert qemu.qemu_io_read(image, 0x3C, 10 * MiB, MiB)
    assert not qemu.qemu_io_read(image, 0xCD, 9 * MiB, MiB)


async def test_large_write_is_split(qemu: Any) -> None:
    image = qemu.image(80 * MiB)
    server = qemu.serve(image)
    payload = os.urandom(70 * MiB)
    async with await NbdClient.connect_uri(server.uri, request_size=40 * MiB) as nbd:
        before = nbd.requests_sent
        await nbd.write(5 * MiB, payload)
        assert nbd.requests_sent - before == 3  # 32 + 32 + 6 MiB
        await nbd.flush()
        assert await nbd.read(5 * MiB, len(payload)) == payload


async def test_write_zeroes_and_trim(qemu: Any) -> None:
    image = qemu.image(16 * MiB, [(0xAB, 0, 16 * MiB)])
    server = qemu.serve(image)
    async with await NbdClient.connect_uri(server.uri, meta_contexts=[BASE_ALLOCATION]) as nbd:
        assert all(not e.is_zero for e in await nbd.block_status())
        await nbd.write_zeroes(2 * MiB, 2 * MiB)
        await nbd.write_zeroes(6 * MiB, MiB, no_hole=True, fua=True)
        await nbd.write_zeroes(8 * MiB + 100, 1000)
        await nbd.trim(12 * MiB, 2 * MiB)
        await nbd.flush()
        data = await nbd.read(0, 16 * MiB)
        assert data[2 * MiB : 4 * MiB] == bytes(2 * MiB)
        assert data[6 * MiB : 7 * MiB] == bytes(MiB)
        assert data[8 * MiB + 100 : 8 * MiB + 1100] == bytes(1000)
        assert data[8 * MiB + 1100 : 9 * MiB] == b"\xab" * (MiB - 1100)
        assert data[: 2 * MiB] == b"\xab" * (2 * MiB)
        extents = await nbd.block_status(2 * MiB, 2 * MiB)
        assert [(e.offset, e.length, e.is_zero) for e in extents] == [(2 * MiB, 2 * MiB, True)]
    assert qemu.qemu_io_read(image, 0x00, 2 * MiB, 2 * MiB)
    assert qemu.qemu_io_read(image, 0xAB, 4 * MiB, 2 * MiB)


async def test_fast_zero_flag_is_accepted(qemu: Any) -> None:
    server = qemu.serve(qemu.image(4 * MiB, [(0xAB, 0, 4 * MiB)]))
    async with await NbdClient.connect_uri(server.uri) as nbd:
        assert nbd.info.can_fast_zero
        error: NbdCommandError | None = None
        try:
            await nbd.write_zeroes(0, MiB, fast_zero=True)
        except NbdCommandError as exc:  # allowed answer: zeroing would not be fast
            error = exc
        if error is not None:
            assert error.errno == 95
        else:
            assert await nbd.read(0, MiB) == bytes(MiB)


async def test_write_past_end_then_still_usable(qemu: Any) -> None:
    server = qemu.serve(qemu.image(MiB))
    async with await NbdClient.connect_uri(server.uri) as nbd:
        with pytest.raises(NbdCommandError) as info:
            await nbd.write(MiB - 512, b"\x01" * 1024)
        assert info.value.errno in (22, 28)  # EINVAL or ENOSPC
        await nbd.write(MiB - 512, b"\x02" * 512)
        assert await nbd.read(MiB - 512, 512) == b"\x02" * 512


async def test_concurrent_writes_and_reads(qemu: Any) -> None:
    image = qemu.image(32 * MiB)
    server = qemu.serve(image)
    blocks = {i: os.urandom(256 * 1024) for i in range(64)}
    async with await NbdClient.connect_uri(server.uri) as nbd:
        await asyncio.gather(*(nbd.write(i * 512 * 1024, b) for i, b in blocks.items()))
        got = await asyncio.gather(*(nbd.read(i * 512 * 1024, 256 * 1024) for i in blocks))
        assert got == list(blocks.values())


async def test_unsupported_flags_are_refused_locally(qemu: Any) -> None:
    server = qemu.serve(qemu.image(MiB), read_only=True)
    async with await NbdClient.connect_uri(server.uri) as nbd:
        with pytest.raises(NbdUnsupportedError):
            await nbd.trim(0, 4096)
        assert nbd.requests_sent == 0
        await nbd.flush()  # allowed on a read-only export: nothing to make durable
