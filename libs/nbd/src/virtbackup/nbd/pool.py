"""NbdPool: several connections to one export, requests spread across them.

QEMU's NBD server handles a bounded number of requests per connection at a time
and one connection is served by one coroutine context on the server, so reading
a disk over N connections goes faster than over one. The pool opens N clients,
checks that they see the same export, and cuts reads and writes into requests
of ``request_size`` bytes, each sent to the connection with the fewest requests
in flight.

Consistency: with ``can_multi_conn`` (libvirt's backup export, read-only
exports) every connection sees every completed write, and one flush covers the
writes made on all of them. Without it the pool flushes every connection in
:meth:`flush`; callers must still not read a range through the pool while a
write to it is in flight, as with any NBD client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any

from . import protocol as p
from .client import (
    DEFAULT_REQUEST_SIZE,
    NbdClient,
    ReadableBuffer,
    WritableBuffer,
    check_range,
    readable_view,
    split_range,
    wait_all,
    writable_view,
)
from .connection import RequestResult
from .errors import NbdHandshakeError, NbdUnsupportedError
from .export import ExportInfo
from .extents import Extent
from .uri import NbdUri


class NbdPool:
    """``connections`` clients of one export behind the :class:`NbdClient` commands.

    Create with :meth:`connect` or :meth:`connect_uri`; close with
    :meth:`disconnect` or ``async with``. Any number of coroutines may use the
    pool concurrently.
    """

    def __init__(self, clients: Sequence[NbdClient]) -> None:
        if not clients:
            raise ValueError("a pool needs at least one client")
        first = clients[0].info
        for client in clients[1:]:
            other = client.info
            if (other.size, other.flags, other.meta_contexts) != (
                first.size,
                first.flags,
                first.meta_contexts,
            ):
                raise NbdHandshakeError("the connections of the pool see different exports")
        self._clients = tuple(clients)
        self._next = 0

    @classmethod
    async def connect(
        cls,
        connections: int = 4,
        *,
        host: str | None = None,
        port: int = p.DEFAULT_PORT,
        socket_path: str | None = None,
        export: str = "",
        meta_contexts: Sequence[str] = (),
        structured_replies: bool = True,
        max_in_flight: int = 64,
        request_size: int = DEFAULT_REQUEST_SIZE,
        timeout: float | None = 30.0,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
    ) -> NbdPool:
        """Open ``connections`` clients concurrently (see :meth:`NbdClient.connect`).

        If any of them fails, the others are closed and the error is raised.
        """
        if connections < 1:
            raise ValueError("connections must be at least 1")
        results = await asyncio.gather(
            *(
                NbdClient.connect(
                    host=host,
                    port=port,
                    socket_path=socket_path,
                    export=export,
                    meta_contexts=meta_contexts,
                    structured_replies=structured_replies,
                    max_in_flight=max_in_flight,
                    request_size=request_size,
                    timeout=timeout,
                    tls=tls,
                    tls_hostname=tls_hostname,
                )
                for _ in range(connections)
            ),
            return_exceptions=True,
        )
        clients = [r for r in results if isinstance(r, NbdClient)]
        failures = [r for r in results if not isinstance(r, NbdClient)]
        try:
            if failures:
                raise failures[0]
            return cls(clients)
        except BaseException:
            await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
            raise

    @classmethod
    async def connect_uri(
        cls,
        uri: str | NbdUri,
        connections: int = 4,
        *,
        meta_contexts: Sequence[str] = (),
        structured_replies: bool = True,
        max_in_flight: int = 64,
        request_size: int = DEFAULT_REQUEST_SIZE,
        timeout: float | None = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> NbdPool:
        """Open ``connections`` clients to an ``nbd[s]://`` or ``nbd[s]+unix://`` URI
        (TLS as in :meth:`NbdClient.connect_uri`)."""
        target = uri if isinstance(uri, NbdUri) else NbdUri.parse(uri)
        if target.tls and tls is None:
            raise ValueError(f"{target} needs TLS: pass a client context (tls=...)")
        return await cls.connect(
            connections,
            host=target.host,
            port=target.port,
            socket_path=target.socket,
            export=target.export,
            meta_contexts=meta_contexts,
            structured_replies=structured_replies,
            max_in_flight=max_in_flight,
            request_size=request_size,
            timeout=timeout,
            tls=tls,
            tls_hostname=target.tls_hostname,
        )

    async def __aenter__(self) -> NbdPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    @property
    def clients(self) -> tuple[NbdClient, ...]:
        """The pool's connections."""
        return self._clients

    @property
    def info(self) -> ExportInfo:
        """What the first connection negotiated (all connections agree)."""
        return self._clients[0].info

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.info.size

    def pick(self) -> NbdClient:
        """The open client with the fewest requests in flight (round robin among equals)."""
        clients = self._clients
        count = len(clients)
        start = self._next
        self._next = (start + 1) % count
        best = clients[start]
        for i in range(1, count):
            client = clients[(start + i) % count]
            if best.closed or (not client.closed and client.in_flight < best.in_flight):
                best = client
        return best

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (see :meth:`NbdClient.read`)."""
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    async def readinto(self, offset: int, buf: WritableBuffer) -> None:
        """Fill ``buf`` from ``offset``; large reads are spread over the connections."""
        view = writable_view(buf)
        check_range(offset, len(view))
        futures: list[asyncio.Future[RequestResult]] = []
        try:
            for start, n in split_range(0, len(view), self._clients[0].request_size):
                piece = view[start : start + n]
                futures.append(await self.pick()._start_read(offset + start, piece))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        await wait_all(futures)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; large writes are spread over the connections."""
        view = readable_view(data)
        check_range(offset, len(view))
        flags = self._clients[0]._write_flags(fua)
        futures: list[asyncio.Future[RequestResult]] = []
        try:
            for start, n in split_range(0, len(view), self._clients[0].request_size):
                piece = view[start : start + n]
                futures.append(await self.pick()._start_write(offset + start, piece, flags))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        await wait_all(futures)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        fua: bool = False,
        no_hole: bool = False,
        fast_zero: bool = False,
    ) -> None:
        """See :meth:`NbdClient.write_zeroes`."""
        await self.pick().write_zeroes(
            offset, length, fua=fua, no_hole=no_hole, fast_zero=fast_zero
        )

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """See :meth:`NbdClient.trim`."""
        await self.pick().trim(offset, length, fua=fua)

    async def flush(self) -> None:
        """Make completed writes durable: one flush with multi-conn, else one per connection."""
        if not self.info.can_flush:
            return
        if self.info.can_multi_conn:
            await self.pick().flush()
            return
        await _gather_all([c.flush() for c in self._clients])

    async def block_status(
        self,
        offset: int = 0,
        length: int | None = None,
        context: str = p.BASE_ALLOCATION,
        *,
        req_one: bool = False,
    ) -> list[Extent]:
        """See :meth:`NbdClient.block_status`."""
        if context not in self.info.meta_contexts:
            raise NbdUnsupportedError(f"meta context {context!r} was not negotiated")
        return await self.pick().block_status(offset, length, context, req_one=req_one)

    async def disconnect(self) -> None:
        """Disconnect every connection (each waits for its pending requests)."""
        await _gather_all([c.disconnect() for c in self._clients])


async def _gather_all(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
