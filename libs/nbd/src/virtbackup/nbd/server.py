"""A read-only NBD server: fixed newstyle, TLS mandatory, structured replies, block status.

It serves :class:`Export` objects whose bytes come from an :class:`ExportSource` (for
VirtBackup, a restore point's disk decoded chunk by chunk), to any NBD client: ``nbdinfo``,
``nbdcopy``, ``qemu-img``, ``qemu-nbd --connect``, ``nbdfuse`` and :class:`NbdClient`.
It follows the NBD protocol document (NetworkBlockDevice/nbd ``doc/proto.md``):

Handshake (FORCEDTLS mode):
    the server greets with FIXED_NEWSTYLE and NO_ZEROES; a client that does not answer
    FIXED_NEWSTYLE, or sets unknown flags, is dropped. Until TLS is up every option but
    ``NBD_OPT_STARTTLS`` and ``NBD_OPT_ABORT`` is answered ``NBD_REP_ERR_TLS_REQD``, and
    ``NBD_OPT_EXPORT_NAME`` (which cannot be refused) closes the connection (proto.md,
    "TLS support": FORCEDTLS). libnbd shows ``NBD_REP_ERR_TLS_REQD`` to a plain client as
    "Operation not supported" (its errno for it), with :data:`TLS_REQUIRED` in its debug
    log; qemu says "TLS negotiation required". The TLS
    handshake requires a client certificate the context's CA signed; ``allow_peer`` then
    sees the certificate (DER) and may refuse it (e.g. every certificate but one). After
    TLS: ``NBD_OPT_LIST``, ``NBD_OPT_INFO``/``NBD_OPT_GO`` (``NBD_INFO_EXPORT`` always;
    ``NBD_INFO_NAME``, ``NBD_INFO_DESCRIPTION`` and ``NBD_INFO_BLOCK_SIZE`` when asked),
    ``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_LIST_META_CONTEXT`` and
    ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation``), ``NBD_OPT_EXPORT_NAME``,
    ``NBD_OPT_ABORT``; other options get ``NBD_REP_ERR_UNSUP``. The empty export name
    means the only export when there is exactly one.

Transmission:
    exports are read-only (``NBD_FLAG_READ_ONLY``, ``NBD_FLAG_SEND_FLUSH``,
    ``NBD_FLAG_CAN_MULTI_CONN``). ``NBD_CMD_READ`` answers with data chunks and, for
    ranges the source reports as zero, ``NBD_REPLY_TYPE_OFFSET_HOLE`` chunks (structured
    replies) or zero bytes (simple replies); ``NBD_CMD_BLOCK_STATUS`` reports
    ``base:allocation`` from the source (zero ranges as hole and zero);
    ``NBD_CMD_FLUSH`` succeeds; ``NBD_CMD_WRITE`` (its payload is read and discarded),
    ``NBD_CMD_TRIM``, ``NBD_CMD_WRITE_ZEROES`` and ``NBD_CMD_RESIZE`` fail with EPERM;
    ``NBD_CMD_DISC`` ends the connection once the requests in flight are answered;
    anything else, and ranges past the end, fail with EINVAL. A source error fails the
    read with EIO (and a message, with structured replies). Up to ``max_in_flight``
    requests per connection are worked on at once; their replies may come in any order.

:meth:`NbdServer.close` stops listening and drops every connection at once (an export
whose lifetime ended must not be read any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from . import protocol as p
from .export import BlockSize
from .extents import Extent, coalesce

log = logging.getLogger(__name__)

#: Option data longer than this closes the connection (no option of ours needs more).
MAX_OPTION_DATA: Final = 64 * 1024
#: Options a client may send before entering transmission.
MAX_OPTIONS: Final = 256
#: Seconds from accepting a connection to the end of its handshake.
HANDSHAKE_TIMEOUT: Final = 30.0
#: The message of ``NBD_REP_ERR_TLS_REQD``, the answer to every option but STARTTLS and
#: ABORT before TLS.
TLS_REQUIRED: Final = "TLS is required: connect with nbds:// and the export's certificates"
#: The largest read or write payload a client may ask for (also what
#: ``NBD_INFO_BLOCK_SIZE`` states as the maximum).
MAX_PAYLOAD: Final = p.DEFAULT_MAX_PAYLOAD
#: Block size constraints announced by default: any alignment, 4 KiB preferred.
DEFAULT_BLOCK_SIZE: Final = BlockSize(1, 4096, MAX_PAYLOAD)
#: Most descriptors one block status reply carries.
MAX_DESCRIPTORS: Final = 1 << 16
#: The id of ``base:allocation`` after NBD_OPT_SET_META_CONTEXT.
BASE_ALLOCATION_ID: Final = 1

_TRANSMISSION_FLAGS: Final = (
    p.TransmissionFlag.HAS_FLAGS
    | p.TransmissionFlag.READ_ONLY
    | p.TransmissionFlag.SEND_FLUSH
    | p.TransmissionFlag.CAN_MULTI_CONN
)
_READ_ONLY_COMMANDS: Final = frozenset(
    {p.Command.WRITE, p.Command.TRIM, p.Command.WRITE_ZEROES, p.Command.RESIZE}
)


class SourceError(Exception):
    """An :class:`ExportSource` cannot produce the bytes asked for (a chunk is missing or
    corrupt, the storage is away): the request fails with EIO and this message."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a read: ``length`` bytes at ``offset``, ``data`` (exactly ``length``
    bytes) or ``None`` when they are all zero."""

    offset: int
    length: int
    data: bytes | memoryview | None


class ExportSource(Protocol):
    """The bytes of an export."""

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        ...

    async def read(self, offset: int, length: int) -> Sequence[Segment]:
        """The range ``[offset, offset + length)`` (inside the export, ``length > 0``)
        as consecutive segments covering it exactly, in order. Raises SourceError."""
        ...

    def allocation(self, offset: int, length: int) -> Sequence[Extent]:
        """``base:allocation`` of the range: consecutive extents from ``offset`` covering
        at least its first byte, flags ``STATE_HOLE | STATE_ZERO`` where the bytes are
        all zero and ``0`` where they are data. Must not block."""
        ...


@dataclass(frozen=True, slots=True)
class Export:
    """One export of a server: its name (what clients ask for), its bytes and a line for
    people (``NBD_INFO_DESCRIPTION``, ``nbdinfo`` shows it)."""

    name: str
    source: ExportSource
    description: str = ""


PeerCheck = Callable[[bytes], bool]


class _Close(Exception):
    """End this connection now (protocol violation, refused client, abort)."""


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    tls: bool = False
    no_zeroes: bool = False
    structured: bool = False
    #: (export name, granted contexts) from the last NBD_OPT_SET_META_CONTEXT.
    contexts: tuple[str, tuple[str, ...]] = ("", ())
    export: Export | None = None
    #: base:allocation was granted for the export in transmission.
    allocation: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class NbdServer:
    """Serves ``exports`` (by name) over TCP with TLS required.

    ``tls`` is a server context that requires client certificates (see
    :func:`virtbackup.nbd.tls.server_context`); ``allow_peer``, when given, is asked
    about each client's certificate (DER) after the TLS handshake and a client it
    refuses is disconnected before any option. ``max_connections`` bounds the
    connections served at once (more are closed at once); ``max_in_flight`` the
    requests worked on at once per connection.
    """

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        tls: ssl.SSLContext,
        allow_peer: PeerCheck | None = None,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        max_connections: int = 16,
        max_in_flight: int = 16,
    ) -> None:
        if tls.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the TLS context must require client certificates")
        self.exports: Mapping[str, Export] = {e.name: e for e in exports}
        if len(self.exports) != len(exports):
            raise ValueError("export names must be unique")
        self.tls = tls
        self.allow_peer = allow_peer
        self.block_size = block_size
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (``0``: a free port); returns the address bound.
        Raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def connections(self) -> int:
        """Connections open now (in the handshake or in transmission)."""
        return len(self._conns)

    async def close(self) -> None:
        """Stop listening and drop every connection, without waiting for requests in
        flight. Idempotent."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- one connection ----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peername = writer.get_extra_info("peername")
        conn = _Conn(reader, writer, peer=f"{peername[0]}:{peername[1]}" if peername else "?")
        if self._closed or len(self._conns) >= self.max_connections:
            writer.transport.abort()
            return
        assert task is not None
        self._handlers.add(task)
        self._conns.add(conn)
        graceful = False
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await self._handshake(conn)
            except TimeoutError:
                log.info("NBD client %s: no handshake within %s s", conn.peer, HANDSHAKE_TIMEOUT)
                return
            await self._transmission(conn)
            graceful = True  # NBD_CMD_DISC
        except (_Close, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("NBD client %s: unexpected error", conn.peer)
        finally:
            for t in conn.tasks:
                t.cancel()
            self._conns.discard(conn)
            self._handlers.discard(task)
            if graceful and not self._closed:
                # A soft disconnect: close the TLS session, then the connection.
                writer.close()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await writer.wait_closed()
            writer.transport.abort()

    # --- handshake ---------------------------------------------------------------------

    async def _send_reply(self, conn: _Conn, option: int, reply: int, data: bytes = b"") -> None:
        conn.writer.write(
            p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(data))
        )
        if data:
            conn.writer.write(data)
        await conn.writer.drain()

    async def _error(self, conn: _Conn, option: int, reply: p.OptionReply, message: str) -> None:
        await self._send_reply(conn, option, reply, message.encode())

    async def _handshake(self, conn: _Conn) -> None:
        conn.writer.write(
            p.U64.pack(p.NBD_MAGIC)
            + p.U64.pack(p.IHAVEOPT)
            + p.U16.pack(p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES)
        )
        await conn.writer.drain()
        (client_flags,) = p.U32.unpack(await conn.reader.readexactly(4))
        known = p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES
        if client_flags & ~known or not client_flags & p.ClientFlag.FIXED_NEWSTYLE:
            raise _Close("client flags")
        conn.no_zeroes = bool(client_flags & p.ClientFlag.NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = p.OPTION_HEADER.unpack(
                await conn.reader.readexactly(p.OPTION_HEADER.size)
            )
            if magic != p.IHAVEOPT or length > MAX_OPTION_DATA:
                raise _Close("bad option header")
            data = await conn.reader.readexactly(length) if length else b""
            if await self._option(conn, option, data):
                return
        raise _Close("too many options")

    async def _option(self, conn: _Conn, option: int, data: bytes) -> bool:
        """Answer one option; True once the connection enters transmission."""
        if option == p.Option.ABORT:
            with contextlib.suppress(ConnectionError, OSError):
                await self._send_reply(conn, option, p.OptionReply.ACK)
            raise _Close("abort")
        if not conn.tls:
            if option == p.Option.STARTTLS:
                if data:
                    await self._error(
                        conn, option, p.OptionReply.ERR_INVALID, "STARTTLS has no data"
                    )
                    return False
                await self._starttls(conn)
                return False
            if option == p.Option.EXPORT_NAME:
                raise _Close("NBD_OPT_EXPORT_NAME before TLS")
            await self._error(conn, option, p.OptionReply.ERR_TLS_REQD, TLS_REQUIRED)
            return False
        if option == p.Option.STARTTLS:
            await self._error(conn, option, p.OptionReply.ERR_INVALID, "TLS is already on")
        elif option == p.Option.LIST:
            await self._list(conn, data)
        elif option == p.Option.STRUCTURED_REPLY:
            if data:
                await self._error(conn, option, p.OptionReply.ERR_INVALID, "option has no data")
            else:
                conn.structured = True
                await self._send_reply(conn, option, p.OptionReply.ACK)
        elif option in (p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT):
            await self._meta_context(conn, p.Option(option), data)
        elif option in (p.Option.INFO, p.Option.GO):
            return await self._info(conn, p.Option(option), data)
        elif option == p.Option.EXPORT_NAME:
            export = self._find(data.decode("utf-8", "replace"))
            if export is None:
                raise _Close("unknown export")
            self._enter(conn, export)
            head = p.INFO_EXPORT.pack(export.source.size, _TRANSMISSION_FLAGS)
            conn.writer.write(head if conn.no_zeroes else head + bytes(124))
            await conn.writer.drain()
            return True
        else:
            await self._error(conn, option, p.OptionReply.ERR_UNSUP, f"option {option} unsupported")
        return False

    async def _starttls(self, conn: _Conn) -> None:
        if conn.reader._buffer:  # type: ignore[attr-defined]
            raise _Close("data sent before the STARTTLS reply")  # pipelined: not allowed
        # No await between the reply and start_tls (which pauses reading at once): the
        # client's TLS hello cannot land in the plain-text reader.
        conn.writer.write(
            p.OPTION_REPLY_HEADER.pack(
                p.OPTION_REPLY_MAGIC, p.Option.STARTTLS, p.OptionReply.ACK, 0
            )
        )
        try:
            await conn.writer.start_tls(self.tls)
        except (ssl.SSLError, OSError, ConnectionError) as exc:
            log.info("NBD client %s: TLS handshake failed: %s", conn.peer, exc)
            raise _Close("TLS") from None
        ssl_object = conn.writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise _Close("no client certificate")
        if self.allow_peer is not None and not self.allow_peer(der):
            log.warning("NBD client %s: its certificate is not the one of this export", conn.peer)
            raise _Close("certificate refused")
        conn.tls = True

    def _find(self, name: str) -> Export | None:
        if not name and len(self.exports) == 1:
            return next(iter(self.exports.values()))
        return self.exports.get(name)

    async def _list(self, conn: _Conn, data: bytes) -> None:
        if data:
            await self._error(conn, p.Option.LIST, p.OptionReply.ERR_INVALID, "LIST has no data")
            return
        for export in self.exports.values():
            name = export.name.encode()
            body = p.U32.pack(len(name)) + name + export.description.encode()
            await self._send_reply(conn, p.Option.LIST, p.OptionReply.SERVER, body)
        await self._send_reply(conn, p.Option.LIST, p.OptionReply.ACK)

    async def _meta_context(self, conn: _Conn, option: p.Option, data: bytes) -> None:
        if not conn.structured:
            await self._error(
                conn, option, p.OptionReply.ERR_INVALID, "negotiate structured replies first"
            )
            return
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            await self._error(conn, option, p.OptionReply.ERR_INVALID, str(exc))
            return
        if self._find(name) is None:
            await self._error(conn, option, p.OptionReply.ERR_UNKNOWN, f"no export {name!r}")
            return
        listing = option == p.Option.LIST_META_CONTEXT
        matched: list[str] = []
        if listing and not queries:
            matched = [p.BASE_ALLOCATION]
        for query in queries:
            if query in ("base:", p.BASE_ALLOCATION) and p.BASE_ALLOCATION not in matched:
                matched.append(p.BASE_ALLOCATION)
        for context in matched:
            ctx_id = 0 if listing else BASE_ALLOCATION_ID
            body = p.U32.pack(ctx_id) + context.encode()
            await self._send_reply(conn, option, p.OptionReply.META_CONTEXT, body)
        if not listing:
            conn.contexts = (name, tuple(matched))
        await self._send_reply(conn, option, p.OptionReply.ACK)

    async def _info(self, conn: _Conn, option: p.Option, data: bytes) -> bool:
        try:
            name, infos = _parse_info_request(data)
        except ValueError as exc:
            await self._error(conn, option, p.OptionReply.ERR_INVALID, str(exc))
            return False
        export = self._find(name)
        if export is None:
            await self._error(conn, option, p.OptionReply.ERR_UNKNOWN, f"no export {name!r}")
            return False
        reply = p.OptionReply.INFO
        body = p.U16.pack(p.Info.EXPORT) + p.INFO_EXPORT.pack(
            export.source.size, _TRANSMISSION_FLAGS
        )
        await self._send_reply(conn, option, reply, body)
        if p.Info.NAME in infos:
            await self._send_reply(
                conn, option, reply, p.U16.pack(p.Info.NAME) + export.name.encode()
            )
        if p.Info.DESCRIPTION in infos and export.description:
            desc = p.U16.pack(p.Info.DESCRIPTION) + export.description.encode()
            await self._send_reply(conn, option, reply, desc)
        if p.Info.BLOCK_SIZE in infos:
            bs = self.block_size
            body = p.U16.pack(p.Info.BLOCK_SIZE) + p.INFO_BLOCK_SIZE.pack(
                bs.minimum, bs.preferred, bs.maximum
            )
            await self._send_reply(conn, option, reply, body)
        await self._send_reply(conn, option, p.OptionReply.ACK)
        if option == p.Option.GO:
            self._enter(conn, export)
            return True
        return False

    def _enter(self, conn: _Conn, export: Export) -> None:
        conn.export = export
        ctx_name, contexts = conn.contexts
        conn.allocation = (
            conn.structured and p.BASE_ALLOCATION in contexts and self._find(ctx_name) is export
        )

    # --- transmission ------------------------------------------------------------------

    async def _transmission(self, conn: _Conn) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)
        while True:
            header = await conn.reader.readexactly(p.REQUEST.size)
            magic, flags, kind, cookie, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise _Close("bad request magic")
            if kind == p.Command.DISC:
                if conn.tasks:
                    await asyncio.gather(*conn.tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await conn.writer.drain()
                return
            if kind == p.Command.WRITE:
                await _discard(conn.reader, length)
            await slots.acquire()
            task = asyncio.create_task(self._request(conn, flags, kind, cookie, offset, length))
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _request(
        self, conn: _Conn, flags: int, kind: int, cookie: int, offset: int, length: int
    ) -> None:
        export = conn.export
        assert export is not None
        size = export.source.size
        try:
            if kind == p.Command.READ:
                await self._read(conn, export, cookie, offset, length)
            elif kind == p.Command.BLOCK_STATUS:
                if not conn.allocation or length == 0 or offset + length > size:
                    self._simple(conn, cookie, p.EINVAL)
                else:
                    try:
                        self._block_status(conn, export, cookie, offset, length, flags)
                    except Exception:  # a bug in the source: fail this request only
                        log.exception("NBD block status at %s (+%s) failed", offset, length)
                        self._simple(conn, cookie, p.EIO)
            elif kind == p.Command.FLUSH:
                self._simple(conn, cookie, 0)
            elif kind in _READ_ONLY_COMMANDS:
                self._simple(conn, cookie, p.EPERM)
            else:
                self._simple(conn, cookie, p.EINVAL)
            await conn.writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            conn.writer.transport.abort()

    def _simple(self, conn: _Conn, cookie: int, error: int, data: bytes = b"") -> None:
        conn.writer.write(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def _chunk(self, conn: _Conn, cookie: int, kind: int, payload: bytes, done: bool) -> None:
        flags = p.REPLY_FLAG_DONE if done else 0
        conn.writer.write(
            p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
            + payload
        )

    def _read_error(self, conn: _Conn, cookie: int, error: int, message: str) -> None:
        if conn.structured:
            text = message.encode()[:4096]
            payload = p.ERROR_HEAD.pack(error, len(text)) + text
            self._chunk(conn, cookie, p.ReplyType.ERROR, payload, done=True)
        else:
            self._simple(conn, cookie, error)

    async def _read(
        self, conn: _Conn, export: Export, cookie: int, offset: int, length: int
    ) -> None:
        size = export.source.size
        if length == 0 or length > MAX_PAYLOAD or offset + length > size:
            self._read_error(
                conn, cookie, p.EINVAL, f"read of {length} bytes at {offset} (size {size})"
            )
            return
        try:
            segments = await export.source.read(offset, length)
        except SourceError as exc:
            log.warning("NBD read at %s (+%s) failed: %s", offset, length, exc)
            self._read_error(conn, cookie, p.EIO, str(exc))
            return
        except Exception:  # a bug in the source: fail the request, keep the connection
            log.exception("NBD read at %s (+%s) failed", offset, length)
            self._read_error(conn, cookie, p.EIO, "internal error")
            return
        if not conn.structured:
            parts = [s.data if s.data is not None else bytes(s.length) for s in segments]
            self._simple(conn, cookie, 0, b"".join(parts))
            return
        last = len(segments) - 1
        for i, seg in enumerate(segments):
            if seg.data is None:
                payload = p.OFFSET_HOLE.pack(seg.offset, seg.length)
                self._chunk(conn, cookie, p.ReplyType.OFFSET_HOLE, payload, done=i == last)
            else:
                flags = p.REPLY_FLAG_DONE if i == last else 0
                conn.writer.write(
                    p.STRUCTURED_REPLY.pack(
                        p.STRUCTURED_REPLY_MAGIC,
                        flags,
                        p.ReplyType.OFFSET_DATA,
                        cookie,
                        8 + seg.length,
                    )
                    + p.U64.pack(seg.offset)
                )
                conn.writer.write(seg.data)

    def _block_status(
        self, conn: _Conn, export: Export, cookie: int, offset: int, length: int, flags: int
    ) -> None:
        end = offset + length
        descriptors = bytearray(p.U32.pack(BASE_ALLOCATION_ID))
        count = 0
        limit = 1 if flags & p.CommandFlag.REQ_ONE else MAX_DESCRIPTORS
        position = offset
        for ext in coalesce(export.source.allocation(offset, length)):
            start = max(ext.offset, position)
            stop = min(ext.end, end)
            if stop <= start:
                continue
            if start != position:
                break  # a source must not leave gaps; report what is contiguous
            descriptors += p.BLOCK_DESCRIPTOR.pack(stop - start, ext.flags)
            position = stop
            count += 1
            if count >= limit or position >= end:
                break
        if count == 0:
            self._simple(conn, cookie, p.EIO)
            return
        self._chunk(conn, cookie, p.ReplyType.BLOCK_STATUS, bytes(descriptors), done=True)


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    """Read and drop a write's payload (refused, but it is on the wire)."""
    if length > MAX_PAYLOAD:
        raise _Close("write payload too large")
    while length:
        piece = await reader.readexactly(min(length, 1 << 20))
        length -= len(piece)


def _take(data: bytes, pos: int, fmt: struct.Struct, what: str) -> tuple[int, int]:
    if pos + fmt.size > len(data):
        raise ValueError(f"truncated {what}")
    (value,) = fmt.unpack_from(data, pos)
    return int(value), pos + fmt.size


def _take_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    length, pos = _take(data, pos, p.U32, f"{what} length")
    if length > 4096 or pos + length > len(data):
        raise ValueError(f"bad {what} length")
    try:
        text = data[pos : pos + length].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
    return text, pos + length


def _parse_info_request(data: bytes) -> tuple[str, set[int]]:
    """NBD_OPT_INFO/GO data: export name, then the information items asked for."""
    name, pos = _take_string(data, 0, "export name")
    count, pos = _take(data, pos, p.U16, "information request count")
    if len(data) != pos + 2 * count:
        raise ValueError("information requests do not match their count")
    return name, {struct.unpack_from(">H", data, pos + 2 * i)[0] for i in range(count)}


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: export name, then the queries."""
    name, pos = _take_string(data, 0, "export name")
    count, pos = _take(data, pos, p.U32, "query count")
    queries = []
    for _ in range(count):
        query, pos = _take_string(data, pos, "query")
        queries.append(query)
    if pos != len(data):
        raise ValueError("trailing data after the queries")
    return name, queries
