"""The release feed ``update/check`` reads: bounded in size and in time, whatever the
server at the configured URL does (here a real HTTP server on loopback that sends its
answer one byte a second)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from virtbackup.gateway.controllers.backend_system import FEED_TIMEOUT, read_feed


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
    writer.write(b"content-length: 100000\r\n\r\n")
    try:
        for _ in range(20):  # each read comes well within the per-read timeout
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(1)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def trickling_url() -> AsyncIterator[str]:
    server = await asyncio.start_server(_trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/releases.json"
    finally:
        server.close()


async def test_a_feed_that_trickles_is_given_up_in_time(trickling_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="release feed") as refused:
        await read_feed(trickling_url)
    took = time.monotonic() - started
    assert took < FEED_TIMEOUT + 2, (took, refused.value)
    assert "within" in str(refused.value), refused.value
