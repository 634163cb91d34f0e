"""NbdClient: one connection to one export, with the commands a backup needs.

Offsets and lengths are in bytes. Reads and writes are cut into requests of
``request_size`` bytes (2 MiB by default, never above the export's maximum
payload) that are all sent at once and run in parallel on the connection:
against QEMU, a 32 MiB read as 16 pipelined 2 MiB requests is about twice as
fast as one 32 MiB request, because the server works on several at a time.
Callers should still ask for large ranges (4 MiB and more) at once. Requests should be aligned to
:attr:`ExportInfo.min_block` (1 for QEMU unless the image needs direct I/O);
the client does not do read-modify-write for unaligned requests.

Any number of coroutines may use one client concurrently; their requests are
pipelined on the same connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

from . import protocol as p
from .connection import NbdConnection, RequestResult, TlsNbdConnection
from .errors import NbdConnectionError, NbdProtocolError, NbdUnsupportedError
from .export import ExportInfo
from .extents import Extent, coalesce
from .handshake import negotiate, negotiate_tls
from .uri import NbdUri

#: Default size of the requests reads and writes are cut into.
DEFAULT_REQUEST_SIZE = 2 * 1024 * 1024

#: Bytes-like objects accepted as write payloads.
ReadableBuffer = bytes | bytearray | memoryview
#: Bytes-like objects a read can fill in place.
WritableBuffer = bytearray | memoryview


def writable_view(buf: WritableBuffer) -> memoryview:
    """A flat byte view of ``buf``; TypeError when it is read-only or not contiguous."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.readonly:
        raise TypeError("read buffer is read-only")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def readable_view(data: ReadableBuffer) -> memoryview:
    """A flat byte view of ``data``."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def split_range(offset: int, length: int, piece: int) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` pieces of at most ``piece`` bytes covering the range."""
    end = offset + length
    while offset < end:
        n = min(piece, end - offset)
        yield offset, n
        offset += n


async def wait_all(futures: Sequence[asyncio.Future[RequestResult]]) -> None:
    """Wait for every future; then raise the first failure, if any.

    Waiting for all of them (not only up to the first error) guarantees that no
    request still writes into a caller's buffer after this returns. Cancelling
    the waiter cancels the futures, which makes the connection discard their data.
    """
    if len(futures) == 1:
        await futures[0]
        return
    results = await asyncio.gather(*futures, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def check_range(offset: int, length: int) -> None:
    """ValueError for a negative offset or length."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length ({offset}, {length})")


class NbdClient:
    """One NBD connection in the transmission phase.

    Create with :meth:`connect` or :meth:`connect_uri`; use as an async context
    manager or call :meth:`disconnect`. Errors: :class:`NbdCommandError` when the
    server refuses a request (the connection stays usable),
    :class:`NbdConnectionError` when the connection is gone,
    :class:`NbdUnsupportedError` when the export does not offer the operation.
    """

    def __init__(
        self, connection: NbdConnection, *, request_size: int = DEFAULT_REQUEST_SIZE
    ) -> None:
        if request_size < 1:
            raise ValueError("request_size must be positive")
        self._conn = connection
        info = connection.info
        align = info.min_block
        self._request_size = max(align, min(request_size, info.max_payload) // align * align)

    # --- opening -------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
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
    ) -> NbdClient:
        """Connect over TCP (``host``, ``port``) or a Unix socket (``socket_path``).

        ``meta_contexts`` are the contexts to negotiate for :meth:`block_status`
        (for example ``"base:allocation"``, ``"qemu:dirty-bitmap:backup-vda"``);
        the ones the server grants are in ``info.meta_contexts``. ``timeout``
        bounds connecting plus the handshake. ``max_in_flight`` bounds the
        requests pipelined on the connection; ``request_size`` is the size
        reads and writes are cut into.

        With ``tls`` (a client context, :func:`virtbackup.nbd.tls.client_context`)
        the client asks for TLS before anything else (NBD_OPT_STARTTLS) and presents
        the context's certificate; the server's certificate must be signed by the
        context's CA and name ``tls_hostname`` (default: ``host``; required for a
        Unix socket). A server without TLS is refused with NbdHandshakeError, a TLS
        handshake that fails (either side refuses a certificate) raises
        NbdConnectionError.
        """
        if (host is None) == (socket_path is None):
            raise ValueError("pass exactly one of host or socket_path")
        if meta_contexts and not structured_replies:
            raise ValueError("meta contexts need structured replies")
        where = socket_path if socket_path is not None else f"{host}:{port}"
        hostname = tls_hostname or host
        if tls is not None and not hostname:
            raise ValueError("TLS over a Unix socket needs tls_hostname")
        sock: socket.socket | None = None
        conn: NbdConnection
        try:
            async with asyncio.timeout(timeout):
                if socket_path is not None:
                    sock = await _connect_unix(socket_path)
                else:
                    assert host is not None
                    sock = await _connect_tcp(host, port)
                if tls is None:
                    info = await negotiate(
                        sock,
                        export,
                        structured_replies=structured_replies,
                        meta_contexts=meta_contexts,
                    )
                    conn = NbdConnection(sock, info, max_in_flight=max_in_flight)
                else:
                    assert hostname is not None
                    info, writer = await negotiate_tls(
                        sock,
                        export,
                        tls=tls,
                        server_hostname=hostname,
                        structured_replies=structured_replies,
                        meta_contexts=meta_contexts,
                    )
                    sock = None  # the transport's now
                    conn = TlsNbdConnection(writer, info, max_in_flight=max_in_flight)
        except TimeoutError as exc:
            if sock is not None:
                sock.close()
            raise NbdConnectionError(f"timed out connecting to NBD server {where}") from exc
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise NbdConnectionError(f"cannot connect to NBD server {where}: {exc}") from exc
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return cls(conn, request_size=request_size)

    @classmethod
    async def connect_uri(
        cls,
        uri: str | NbdUri,
        *,
        meta_contexts: Sequence[str] = (),
        structured_replies: bool = True,
        max_in_flight: int = 64,
        request_size: int = DEFAULT_REQUEST_SIZE,
        timeout: float | None = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> NbdClient:
        """Connect to ``nbd://host:port/export`` or ``nbd+unix:///export?socket=PATH``,
        or with TLS to ``nbds://`` and ``nbds+unix://`` (these need ``tls``, else
        ValueError; ``tls`` with a plain ``nbd://`` URI uses TLS too). See :meth:`connect`."""
        target = uri if isinstance(uri, NbdUri) else NbdUri.parse(uri)
        if target.tls and tls is None:
            raise ValueError(f"{target} needs TLS: pass a client context (tls=...)")
        return await cls.connect(
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

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # --- what was negotiated -------------------------------------------------------

    @property
    def info(self) -> ExportInfo:
        """Size, flags, block sizes and meta contexts of the export."""
        return self._conn.info

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self._conn.info.size

    @property
    def meta_contexts(self) -> Mapping[str, int]:
        """Granted meta contexts (name to id)."""
        return self._conn.info.meta_contexts

    @property
    def request_size(self) -> int:
        """Reads and writes are sent as requests of at most this many bytes."""
        return self._request_size

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return self._conn.in_flight

    @property
    def requests_sent(self) -> int:
        """Requests sent on this connection so far (a large read or write counts its pieces)."""
        return self._conn.requests_sent

    @property
    def closed(self) -> bool:
        """True once disconnected or lost."""
        return self._conn.closed

    # --- commands ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; holes read as zeros.

        Convenience over :meth:`readinto`, which avoids the final copy.
        """
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    async def readinto(self, offset: int, buf: WritableBuffer) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes read at ``offset``, in place.

        Data is received directly into ``buf`` (no intermediate copy for large
        reads). The buffer must not be used until this returns. On error,
        ``buf`` holds partial data.
        """
        view = writable_view(buf)
        check_range(offset, len(view))
        futures = await self._start_reads(offset, view, self._request_size)
        await wait_all(futures)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` the data is durable on return.

        The data is sent from ``data`` itself (no copy): do not change it until
        this returns. If the call is cancelled, requests already queued are still
        sent from ``data`` and the range's content is undefined.
        """
        view = readable_view(data)
        check_range(offset, len(view))
        flags = self._write_flags(fua)
        futures: list[asyncio.Future[RequestResult]] = []
        try:
            for start, n in split_range(0, len(view), self._request_size):
                futures.append(
                    await self._start_write(offset + start, view[start : start + n], flags)
                )
        except BaseException:
            _cancel(futures)
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
        """Make the range read as zeros.

        The server may punch a hole unless ``no_hole``; with ``fast_zero`` it fails
        (ENOTSUP) instead of falling back to a slow write of zeros.
        """
        check_range(offset, length)
        info = self.info
        if not info.can_write_zeroes:
            raise NbdUnsupportedError("the export does not support WRITE_ZEROES")
        flags = self._write_flags(fua)
        if no_hole:
            flags |= p.CommandFlag.NO_HOLE
        if fast_zero:
            if not info.can_fast_zero:
                raise NbdUnsupportedError("the export does not support FAST_ZERO")
            flags |= p.CommandFlag.FAST_ZERO
        await self._ranged(p.Command.WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard the range (advisory: it may or may not read as zeros afterwards)."""
        check_range(offset, length)
        if not self.info.can_trim:
            raise NbdUnsupportedError("the export does not support TRIM")
        await self._ranged(p.Command.TRIM, offset, length, self._write_flags(fua))

    async def flush(self) -> None:
        """Make every completed write durable. A no-op when the server has no flush."""
        if not self.info.can_flush:
            return
        await wait_all([await self._conn.submit(p.Command.FLUSH, 0, 0)])

    async def block_status(
        self,
        offset: int = 0,
        length: int | None = None,
        context: str = p.BASE_ALLOCATION,
        *,
        req_one: bool = False,
    ) -> list[Extent]:
        """Extents of ``context`` covering ``[offset, offset + length)`` (default: to the end).

        The server may describe less than asked per request; the client asks
        again from where it stopped until the range is covered. Extents are
        clipped to the range and neighbours with equal flags are merged.
        Raises NbdUnsupportedError when ``context`` was not negotiated.
        """
        ctx_id = self.meta_contexts.get(context)
        if ctx_id is None:
            raise NbdUnsupportedError(f"meta context {context!r} was not negotiated")
        if length is None:
            length = self.size - offset
        check_range(offset, length)
        flags = p.CommandFlag.REQ_ONE if req_one else 0
        end = offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            n = min(end - pos, p.MAX_REQUEST_LENGTH)
            future = await self._conn.submit(p.Command.BLOCK_STATUS, pos, n, flags=flags)
            result = await future
            extents = result.get(ctx_id) if result is not None else None
            if not extents:
                raise NbdProtocolError(f"BLOCK_STATUS reply without extents for {context!r}")
            for ext in extents:
                if ext.offset >= end:
                    break
                if ext.offset + ext.length > end:
                    ext = Extent(ext.offset, end - ext.offset, ext.flags)
                out.append(ext)
            pos = out[-1].offset + out[-1].length
        return coalesce(out)

    async def disconnect(self) -> None:
        """Wait for pending requests, send NBD_CMD_DISC and close. Idempotent."""
        await self._conn.disconnect()

    def abort(self) -> None:
        """Drop the connection without waiting; pending requests fail."""
        self._conn.abort()

    # --- building blocks (also used by NbdPool) ------------------------------------

    def _write_flags(self, fua: bool) -> int:
        info = self.info
        if info.read_only:
            raise NbdUnsupportedError("the export is read-only")
        if fua:
            if not info.can_fua:
                raise NbdUnsupportedError("the export does not support FUA")
            return p.CommandFlag.FUA
        return 0

    async def _start_read(self, offset: int, view: memoryview) -> asyncio.Future[RequestResult]:
        return await self._conn.submit(p.Command.READ, offset, len(view), buf=view)

    async def _start_write(
        self, offset: int, view: memoryview, flags: int
    ) -> asyncio.Future[RequestResult]:
        return await self._conn.submit(
            p.Command.WRITE, offset, len(view), flags=flags, payload=view
        )

    async def _start_reads(
        self, offset: int, view: memoryview, piece: int
    ) -> list[asyncio.Future[RequestResult]]:
        futures: list[asyncio.Future[RequestResult]] = []
        try:
            for start, n in split_range(0, len(view), piece):
                futures.append(await self._start_read(offset + start, view[start : start + n]))
        except BaseException:
            _cancel(futures)
            raise
        return futures

    async def _ranged(self, command: p.Command, offset: int, length: int, flags: int) -> None:
        futures: list[asyncio.Future[RequestResult]] = []
        try:
            for start, n in split_range(offset, length, p.MAX_REQUEST_LENGTH):
                futures.append(await self._conn.submit(command, start, n, flags=flags))
        except BaseException:
            _cancel(futures)
            raise
        if futures:
            await wait_all(futures)


def _cancel(futures: Sequence[asyncio.Future[RequestResult]]) -> None:
    for future in futures:
        future.cancel()


async def _connect_tcp(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last if last is not None else OSError(f"no address for {host}")


async def _connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock
