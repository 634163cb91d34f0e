"""The fixed newstyle handshake, run on a connected non-blocking socket.

Sequence (each step waits for the server's answer, so the socket never holds
unread bytes when the handshake returns and can be handed to a transport):

1. server greeting: ``NBDMAGIC``, ``IHAVEOPT``, handshake flags; the client
   answers with FIXED_NEWSTYLE (and NO_ZEROES when offered);
   with TLS (:func:`negotiate_tls`), NBD_OPT_STARTTLS, then a TLS handshake on the
   socket (client certificate, server certificate checked against the CA and the
   host name); every later option runs inside TLS;
2. NBD_OPT_STRUCTURED_REPLY when asked for (a refusal falls back to simple replies);
3. NBD_OPT_SET_META_CONTEXT for the requested contexts (needs structured replies);
   contexts the server does not grant are simply absent from the result;
4. NBD_OPT_GO with a request for NBD_INFO_BLOCK_SIZE, yielding size, transmission
   flags and block size constraints. A server without NBD_OPT_GO gets
   NBD_OPT_EXPORT_NAME instead.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from typing import Protocol

from . import protocol as p
from .errors import NbdConnectionError, NbdHandshakeError, NbdProtocolError
from .export import BlockSize, ExportInfo

#: Option replies longer than this are treated as a protocol violation.
_MAX_OPTION_REPLY = 16 * 1024 * 1024


class _IO(Protocol):
    async def recv_exactly(self, n: int) -> bytes: ...

    async def send(self, data: bytes) -> None: ...


class _SocketIO:
    """Exact-length reads and writes on a non-blocking socket through the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    async def recv_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            got = await self._loop.sock_recv_into(self._sock, view[pos:])
            if got == 0:
                raise NbdConnectionError("server closed the connection during the handshake")
            pos += got
        return bytes(buf)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)


class _StreamIO:
    """Exact-length reads and writes on asyncio streams (the handshake after STARTTLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def recv_exactly(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise NbdConnectionError("server closed the connection during the handshake") from None

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()


def _reply_name(reply: int) -> str:
    try:
        return p.OptionReply(reply).name
    except ValueError:
        return hex(reply)


class _Negotiator:
    def __init__(self, io: _IO) -> None:
        self._io = io

    def use(self, io: _IO) -> None:
        """Continue on ``io`` (the TLS stream after STARTTLS)."""
        self._io = io

    async def send_option(self, option: p.Option, data: bytes = b"") -> None:
        await self._io.send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)

    async def read_reply(self, option: p.Option) -> tuple[int, bytes]:
        """Read one option reply; return (reply type, data)."""
        magic, echoed, reply, length = p.OPTION_REPLY_HEADER.unpack(
            await self._io.recv_exactly(p.OPTION_REPLY_HEADER.size)
        )
        if magic != p.OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"bad option reply magic {magic:#x}")
        if echoed != option:
            raise NbdProtocolError(f"option reply for option {echoed}, expected {option.name}")
        if length > _MAX_OPTION_REPLY:
            raise NbdProtocolError(f"option reply of {length} bytes is too long")
        data = await self._io.recv_exactly(length) if length else b""
        return reply, data

    @staticmethod
    def refused(option: p.Option, reply: int, data: bytes, what: str) -> NbdHandshakeError:
        text = data.decode("utf-8", "replace").strip()
        message = f"server refused {option.name} ({_reply_name(reply)}) {what}"
        if text:
            message += f": {text}"
        return NbdHandshakeError(message, option=option, reply=reply)

    async def starttls(self) -> None:
        """NBD_OPT_STARTTLS; NbdHandshakeError when the server does not offer TLS."""
        await self.send_option(p.Option.STARTTLS)
        reply, data = await self.read_reply(p.Option.STARTTLS)
        if reply != p.OptionReply.ACK:
            raise self.refused(p.Option.STARTTLS, reply, data, "(no TLS on this server)")

    async def structured_replies(self) -> bool:
        await self.send_option(p.Option.STRUCTURED_REPLY)
        reply, data = await self.read_reply(p.Option.STRUCTURED_REPLY)
        if reply == p.OptionReply.ACK:
            return True
        if reply & p.REP_ERROR_BIT and reply not in (
            p.OptionReply.ERR_TLS_REQD,
            p.OptionReply.ERR_SHUTDOWN,
        ):
            return False
        raise self.refused(p.Option.STRUCTURED_REPLY, reply, data, "")

    async def meta_contexts(self, export: bytes, queries: Sequence[str]) -> dict[str, int]:
        body = bytearray(p.U32.pack(len(export)) + export + p.U32.pack(len(queries)))
        for query in queries:
            raw = query.encode()
            body += p.U32.pack(len(raw)) + raw
        await self.send_option(p.Option.SET_META_CONTEXT, bytes(body))
        granted: dict[str, int] = {}
        while True:
            reply, data = await self.read_reply(p.Option.SET_META_CONTEXT)
            if reply == p.OptionReply.ACK:
                return granted
            if reply == p.OptionReply.META_CONTEXT:
                if len(data) < 4:
                    raise NbdProtocolError("short NBD_REP_META_CONTEXT reply")
                (ctx_id,) = p.U32.unpack_from(data)
                granted[data[4:].decode("utf-8", "replace")] = ctx_id
            elif reply == p.OptionReply.ERR_UNSUP:
                return {}
            elif reply & p.REP_ERROR_BIT:
                raise self.refused(
                    p.Option.SET_META_CONTEXT, reply, data, f"for contexts {list(queries)}"
                )
            else:
                raise NbdProtocolError(f"unexpected reply {reply} to SET_META_CONTEXT")

    async def go(self, export: bytes) -> tuple[int, p.TransmissionFlag, BlockSize | None] | None:
        """NBD_OPT_GO; None when the server does not know the option."""
        body = p.U32.pack(len(export)) + export + p.U16.pack(1) + p.U16.pack(p.Info.BLOCK_SIZE)
        await self.send_option(p.Option.GO, body)
        size: int | None = None
        flags = 0
        block: BlockSize | None = None
        while True:
            reply, data = await self.read_reply(p.Option.GO)
            if reply == p.OptionReply.ACK:
                if size is None:
                    raise NbdProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
                return size, p.TransmissionFlag(flags), block
            if reply == p.OptionReply.INFO:
                if len(data) < 2:
                    raise NbdProtocolError("short NBD_REP_INFO reply")
                (info,) = p.U16.unpack_from(data)
                if info == p.Info.EXPORT:
                    if len(data) != 2 + p.INFO_EXPORT.size:
                        raise NbdProtocolError("bad NBD_INFO_EXPORT length")
                    size, flags = p.INFO_EXPORT.unpack_from(data, 2)
                elif info == p.Info.BLOCK_SIZE:
                    if len(data) != 2 + p.INFO_BLOCK_SIZE.size:
                        raise NbdProtocolError("bad NBD_INFO_BLOCK_SIZE length")
                    block = BlockSize(*p.INFO_BLOCK_SIZE.unpack_from(data, 2))
                # NAME, DESCRIPTION and unknown items are not needed.
            elif reply == p.OptionReply.ERR_UNSUP and size is None:
                return None
            elif reply & p.REP_ERROR_BIT:
                raise self.refused(
                    p.Option.GO, reply, data, f"for export {export.decode(errors='replace')!r}"
                )
            else:
                raise NbdProtocolError(f"unexpected reply {reply} to NBD_OPT_GO")

    async def export_name(self, export: bytes, no_zeroes: bool) -> tuple[int, p.TransmissionFlag]:
        """Enter transmission with NBD_OPT_EXPORT_NAME (unknown export: the server hangs up)."""
        await self.send_option(p.Option.EXPORT_NAME, export)
        size, flags = p.INFO_EXPORT.unpack(await self._io.recv_exactly(p.INFO_EXPORT.size))
        if not no_zeroes:
            await self._io.recv_exactly(124)
        return size, p.TransmissionFlag(flags)


async def negotiate(
    sock: socket.socket,
    export: str,
    *,
    structured_replies: bool = True,
    meta_contexts: Sequence[str] = (),
) -> ExportInfo:
    """Run the handshake on ``sock`` and return what was negotiated.

    The socket must be connected and non-blocking. On return it is in the
    transmission phase with nothing left to read. Raises NbdHandshakeError when
    the server refuses (unknown export, TLS required...), NbdConnectionError or
    NbdProtocolError when the connection breaks or the server misbehaves.
    """
    if meta_contexts and not structured_replies:
        raise ValueError("meta contexts need structured replies")
    io = _SocketIO(sock)
    no_zeroes = await _greet(io)
    neg = _Negotiator(io)
    return await _options(neg, export, no_zeroes, structured_replies, meta_contexts)


async def negotiate_tls(
    sock: socket.socket,
    export: str,
    *,
    tls: ssl.SSLContext,
    server_hostname: str,
    structured_replies: bool = True,
    meta_contexts: Sequence[str] = (),
) -> tuple[ExportInfo, asyncio.StreamWriter]:
    """Run the handshake on ``sock`` with NBD_OPT_STARTTLS first; return what was
    negotiated and the stream writer of the TLS transport (in the transmission phase,
    nothing buffered). Keep the writer as long as the transport: a writer that is
    garbage-collected closes its transport.

    ``tls`` is a client context (see :func:`virtbackup.nbd.tls.client_context`): the
    server's certificate is checked against its CA and ``server_hostname``, and the
    client presents the context's certificate. The socket belongs to the transport
    from the STARTTLS on. Raises NbdHandshakeError when the server offers no TLS,
    NbdConnectionError when the TLS handshake fails (a certificate the server or the
    client refuses) or the connection breaks, NbdProtocolError when the server
    misbehaves.
    """
    if meta_contexts and not structured_replies:
        raise ValueError("meta contexts need structured replies")
    plain = _SocketIO(sock)
    no_zeroes = await _greet(plain)
    neg = _Negotiator(plain)
    await neg.starttls()
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError as exc:
        raise NbdConnectionError(f"cannot set up TLS: {exc}") from exc
    try:
        try:
            await writer.start_tls(tls, server_hostname=server_hostname)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise NbdConnectionError(f"TLS handshake failed: {exc}") from exc
        except (OSError, EOFError) as exc:
            raise NbdConnectionError(f"TLS handshake failed: {exc}") from exc
        neg.use(_StreamIO(reader, writer))
        info = await _options(neg, export, no_zeroes, structured_replies, meta_contexts)
    except BaseException:
        writer.transport.abort()
        raise
    return info, writer


async def _greet(io: _IO) -> bool:
    """Read the greeting and answer it; whether NO_ZEROES was agreed."""
    magic, second, hs_flags = _unpack_greeting(await io.recv_exactly(18))
    if magic != p.NBD_MAGIC:
        raise NbdProtocolError(f"not an NBD server (magic {magic:#x})")
    if second == p.OLDSTYLE_MAGIC:
        raise NbdHandshakeError("oldstyle NBD negotiation is not supported")
    if second != p.IHAVEOPT:
        raise NbdProtocolError(f"unknown NBD negotiation magic {second:#x}")
    if not hs_flags & p.HandshakeFlag.FIXED_NEWSTYLE:
        raise NbdHandshakeError("server does not offer fixed newstyle negotiation")
    no_zeroes = bool(hs_flags & p.HandshakeFlag.NO_ZEROES)
    client_flags = p.ClientFlag.FIXED_NEWSTYLE | (p.ClientFlag.NO_ZEROES if no_zeroes else 0)
    await io.send(p.U32.pack(client_flags))
    return no_zeroes


async def _options(
    neg: _Negotiator,
    export: str,
    no_zeroes: bool,
    structured_replies: bool,
    meta_contexts: Sequence[str],
) -> ExportInfo:
    name = export.encode()
    structured = await neg.structured_replies() if structured_replies else False
    contexts: dict[str, int] = {}
    if meta_contexts and structured:
        contexts = await neg.meta_contexts(name, meta_contexts)
    went = await neg.go(name)
    block: BlockSize | None = None
    if went is None:
        size, flags = await neg.export_name(name, no_zeroes)
    else:
        size, flags, block = went
    if not flags & p.TransmissionFlag.HAS_FLAGS:
        flags = p.TransmissionFlag(0)
    return ExportInfo(
        name=export,
        size=size,
        flags=flags,
        structured_replies=structured,
        block_size=block,
        meta_contexts=contexts,
    )


def _unpack_greeting(data: bytes) -> tuple[int, int, int]:
    """Split the 18-byte server greeting into (NBDMAGIC, second magic, handshake flags)."""
    (magic,) = p.U64.unpack_from(data, 0)
    (second,) = p.U64.unpack_from(data, 8)
    (flags,) = p.U16.unpack_from(data, 16)
    return magic, second, flags
