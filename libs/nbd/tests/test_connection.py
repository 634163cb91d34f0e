"""Connection lifecycle: graceful disconnect, lost server, use after close."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from virtbackup.nbd import NbdClient, NbdConnectionError
from virtbackup.nbd import protocol as p

MiB = 1024 * 1024


async def test_disconnect_waits_for_pending_requests(qemu: Any) -> None:
    data = os.urandom(8 * MiB)
    server = qemu.serve(qemu.image_from(data), read_only=True)
    nbd = await NbdClient.connect_uri(server.uri)
    tasks = [asyncio.create_task(nbd.read(i * MiB, MiB)) for i in range(8)]
    await asyncio.sleep(0)
    assert nbd.in_flight == 8
    await nbd.disconnect()
    assert nbd.closed
    # Every reply arrived before the connection closed.
    got = await asyncio.gather(*tasks)
    assert got == [data[i * MiB : (i + 1) * MiB] for i in range(8)]
    await nbd.disconnect()  # idempotent
    with pytest.raises(NbdConnectionError, match="closed by the client"):
        await nbd.read(0, 512)


async def test_server_death_fails_pending_and_later_requests(qemu: Any) -> None:
    server = qemu.serve(qemu.image(64 * MiB, [(0xAB, 0, 64 * MiB)]))
    nbd = await NbdClient.connect_uri(server.uri)
    bufs = [memoryview(bytearray(32 * MiB)) for _ in range(8)]
    futures = [
        await nbd._conn.submit(p.Command.READ, (i % 2) * 32 * MiB, 32 * MiB, buf=b)
        for i, b in enumerate(bufs)
    ]
    os.kill(server.pid, signal.SIGKILL)
    results = await asyncio.gather(*futures, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures, "the server died before answering everything"
    assert all(isinstance(f, NbdConnectionError) and f.retryable for f in failures)
    assert nbd.closed
    assert nbd.in_flight == 0
    with pytest.raises(NbdConnectionError):
        await nbd.read(0, 512)
    await nbd.disconnect()


async def test_abort_fails_pending_requests(qemu: Any) -> None:
    server = qemu.serve(qemu.image(64 * MiB, [(0xAB, 0, 64 * MiB)]))
    nbd = await NbdClient.connect_uri(server.uri)
    task = asyncio.create_task(nbd.read(0, 32 * MiB))
    await asyncio.sleep(0)
    nbd.abort()
    with pytest.raises(NbdConnectionError, match="aborted"):
        await task
    assert nbd.closed
    # The server survives a client that vanished and serves the next one.
    async with await NbdClient.connect_uri(server.uri) as again:
        assert await again.read(0, 4) == b"\xab" * 4


async def test_small_pipelined_replies_are_not_delayed(qemu: Any) -> None:
    """qemu-nbd leaves Nagle on; without quick ACKs a second small reply waits ~40 ms."""
    server = qemu.serve(qemu.image(16 * MiB))
    data = os.urandom(64 * 1024)
    latencies = []
    async with await NbdClient.connect_uri(server.uri) as nbd:
        for i in range(40):
            start = asyncio.get_running_loop().time()
            await asyncio.gather(*(nbd.write((i * 4 + k) * len(data), data) for k in range(4)))
            latencies.append(asyncio.get_running_loop().time() - start)
        assert await nbd.read(0, len(data)) == data
    # Loaded machines hiccup now and then; the bug stalls a quarter to all of them.
    stalled = [t for t in latencies if t > 0.03]
    assert len(stalled) <= 5, f"{len(stalled)} of 40 batches took over 30 ms: {stalled}"
