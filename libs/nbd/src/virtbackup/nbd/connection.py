"""The transmission phase of one NBD connection: pipelined requests, one reply parser.

:class:`NbdConnection` owns the connected socket after the handshake. Requests
are sent as they are submitted, each with its own cookie, and any number may be
in flight (bounded by ``max_in_flight``). Replies are parsed as the bytes
arrive and complete the request's future; they may come in any order and, with
structured replies, in several chunks per request.

No copies on the data path: read payloads are received straight into the
caller's buffer (while the parser is inside a data chunk and holds no staged
bytes, ``recv_into`` targets the caller's memoryview), and write payloads are
sent from the caller's buffer with ``sendmsg``. Headers and small payloads go
through a staging buffer that is parsed in bulk, so small replies cost no
extra system calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections import deque
from typing import TypeAlias

from . import protocol as p
from .errors import NbdCommandError, NbdConnectionError, NbdError, NbdProtocolError
from .export import ExportInfo
from .extents import Extent

#: Result of a request's future: extents by context id for BLOCK_STATUS, else None.
BlockStatusResult: TypeAlias = dict[int, list[Extent]]
RequestResult: TypeAlias = BlockStatusResult | None

_HEADER = 0  # waiting for a reply header
_PAYLOAD = 1  # waiting for ``_need`` bytes of a chunk payload in the staging buffer
_DATA = 2  # delivering ``_remaining`` bytes of read data to ``_sink``

_STAGE_SIZE = 256 * 1024
#: At most this much is received into the staging buffer at once while between
#: chunks, so that little of a following read payload is staged and copied.
_STAGE_WINDOW = 64 * 1024
_MIN_FREE = 4096
#: Receive calls per readiness event before yielding to other callbacks.
_RECV_PER_EVENT = 16
#: Buffers per sendmsg call.
_IOV_MAX = 64
_TCP_QUICKACK: int = getattr(socket, "TCP_QUICKACK", 0)  # 0: not on this platform
#: A non-data chunk (block status, error) bigger than this is a protocol violation.
_MAX_CHUNK = 64 * 1024 * 1024
_WRITE_HIGH_WATER = 16 * 1024 * 1024
_WRITE_LOW_WATER = 4 * 1024 * 1024

_ZEROES = memoryview(bytes(1 << 20))


def _fill_zero(view: memoryview, start: int, length: int) -> None:
    end = start + length
    chunk = len(_ZEROES)
    while start < end:
        n = min(chunk, end - start)
        view[start : start + n] = _ZEROES[:n]
        start += n


class _Request:
    """One request in flight, until its final reply chunk."""

    __slots__ = (
        "buf",
        "command",
        "cookie",
        "error",
        "extents",
        "future",
        "length",
        "offset",
        "received",
    )

    def __init__(
        self,
        cookie: int,
        command: p.Command,
        offset: int,
        length: int,
        future: asyncio.Future[RequestResult],
        buf: memoryview | None,
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.future = future
        self.buf = buf
        self.received = 0
        self.error: NbdError | None = None
        self.extents: BlockStatusResult | None = {} if command == p.Command.BLOCK_STATUS else None


class NbdConnection:
    """Transmission phase of one negotiated connection, on a non-blocking socket.

    The connection drives the socket itself through the loop's reader and
    writer callbacks (no asyncio transport): write payloads are sent from the
    caller's buffer with ``sendmsg`` (header and data in one call, no copy), and
    each readiness event receives as much as the socket holds.

    Contract:
    - :meth:`submit` queues the request before it returns and returns a future
      that completes when the last reply chunk arrived: with None, with the
      extents of a BLOCK_STATUS, or with :class:`NbdCommandError` (the
      connection stays usable).
    - Cancelling a request's future makes the parser discard the rest of its
      data instead of writing into the caller's buffer. A write payload that
      was queued is still sent in full (the protocol has no way to stop it):
      after cancelling a write, the range's content is undefined.
    - When the connection is lost or the server breaks the protocol, every
      pending future fails with :class:`NbdConnectionError` and so does every
      later :meth:`submit`.
    """

    _sock: socket.socket | None

    def __init__(self, sock: socket.socket, info: ExportInfo, *, max_in_flight: int = 64) -> None:
        self._setup(info, max_in_flight)
        self._sock = sock
        self._fd = sock.fileno()
        self._quickack = _TCP_QUICKACK != 0 and sock.family in (
            socket.AF_INET,
            socket.AF_INET6,
        )
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._on_readable)

    def _setup(self, info: ExportInfo, max_in_flight: int) -> None:
        """The state every connection has, whatever carries its bytes."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.info = info
        self._loop = asyncio.get_running_loop()
        self._sock = None
        self._pending: dict[int, _Request] = {}
        self._next_cookie = 1
        self.requests_sent = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._error: NbdConnectionError | None = None
        # sending
        self._out: deque[memoryview] = deque()
        self._out_size = 0
        self._writable = asyncio.Event()  # queued bytes below the high-water mark
        self._writable.set()
        self._drained = asyncio.Event()  # nothing queued
        self._drained.set()
        # reply parser
        self._buf = bytearray(_STAGE_SIZE)
        self._view = memoryview(self._buf)
        self._rpos = 0
        self._wpos = 0
        self._state = _HEADER
        self._cur: _Request | None = None
        self._chunk_flags = 0
        self._chunk_type = 0
        self._need = 0
        self._data_len = 0
        self._sink: memoryview | None = None
        self._sink_pos = 0
        self._remaining = 0
        self._done_after_data = False
        self._direct = False

    # --- state ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet fully answered."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        """True once the connection is closing or lost; no request can be sent."""
        return self._error is not None

    # --- socket I/O ----------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is not None and self._quickack:
            # Servers that leave Nagle on (QEMU does) hold back a small reply until
            # the previous one is acknowledged, and Linux delays that ACK by up to
            # 40 ms: acknowledge at once instead. Linux resets the mode, so re-arm
            # it on every event.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        for _ in range(_RECV_PER_EVENT):
            if sock is None or self._sock is None:
                return
            buf = self._get_buffer()
            want = len(buf)
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._connection_lost(exc)
                return
            del buf
            if n == 0:
                self._connection_lost(None)
                return
            self._buffer_updated(n)
            if n < want:
                return  # the socket is (most likely) empty: wait for the next event

    def _write(self, header: bytes, payload: memoryview | None) -> None:
        """Send ``header`` and ``payload`` now, queueing what the socket does not take."""
        sock = self._sock
        if sock is None:
            return
        chunks = [memoryview(header)] if payload is None else [memoryview(header), payload]
        if not self._out:
            try:
                sent = sock.sendmsg(chunks) if payload is not None else sock.send(header)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._connection_lost(exc)
                return
            for chunk in chunks:
                size = len(chunk)
                if sent >= size:
                    sent -= size
                    continue
                self._queue(chunk[sent:] if sent else chunk)
                sent = 0
            if self._out:
                self._loop.add_writer(self._fd, self._on_writable)
        else:
            for chunk in chunks:
                self._queue(chunk)

    def _queue(self, chunk: memoryview) -> None:
        self._out.append(chunk)
        self._out_size += len(chunk)
        self._drained.clear()
        if self._out_size > _WRITE_HIGH_WATER:
            self._writable.clear()

    def _on_writable(self) -> None:
        sock = self._sock
        out = self._out
        while sock is not None and out:
            chunks = list(itertools.islice(out, _IOV_MAX))
            try:
                sent = sock.sendmsg(chunks)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._connection_lost(exc)
                return
            self._out_size -= sent
            full = sent < sum(map(len, chunks))
            while sent:
                head = out[0]
                if sent >= len(head):
                    out.popleft()
                    sent -= len(head)
                else:
                    out[0] = head[sent:]
                    sent = 0
            if full:
                break  # the socket takes no more for now
        if not out:
            self._loop.remove_writer(self._fd)
            self._drained.set()
        if self._out_size <= _WRITE_LOW_WATER:
            self._writable.set()

    def _close_socket(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._out.clear()
        self._out_size = 0
        self._drained.set()
        sock.close()

    def _connection_lost(self, exc: BaseException | None) -> None:
        self._close_socket()
        if self._error is None:
            text = "NBD connection lost"
            self._error = NbdConnectionError(f"{text}: {exc}" if exc else text)
        self._fail_pending(self._error)
        self._writable.set()

    def _get_buffer(self) -> memoryview:
        if self._state == _DATA and self._rpos == self._wpos and self._sink is not None:
            cur = self._cur
            if cur is not None and not cur.future.done():
                self._direct = True
                pos = self._sink_pos
                return self._sink[pos : pos + self._remaining]
            self._sink = None  # request cancelled: discard the rest of its data
        self._direct = False
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0
        elif len(self._buf) - self._wpos < _MIN_FREE:
            self._compact()
        if self._state == _PAYLOAD:
            return self._view[self._wpos :]
        return self._view[self._wpos : self._wpos + _STAGE_WINDOW]

    def _buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._direct = False
            self._sink_pos += nbytes
            self._remaining -= nbytes
            if self._remaining == 0:
                self._data_done()
            return
        self._wpos += nbytes
        try:
            self._parse()
        except NbdProtocolError as exc:
            self._fail(exc)

    # --- requests ------------------------------------------------------------------

    async def submit(
        self,
        command: p.Command,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        payload: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> asyncio.Future[RequestResult]:
        """Send one request; return the future of its reply.

        ``payload`` is the data of a WRITE (``len(payload) == length``), sent
        from that memory: it must stay unchanged until the future is done.
        ``buf`` receives the data of a READ (``len(buf) == length``) and must
        stay alive and unused until the future is done. Waits for a free slot
        when ``max_in_flight`` requests are pending, and for the send queue to
        drain when it holds more than 16 MiB.
        """
        self._check_open()
        await self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            self._check_open()
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        future: asyncio.Future[RequestResult] = self._loop.create_future()
        self._pending[cookie] = _Request(cookie, command, offset, length, future, buf)
        self._idle.clear()
        self.requests_sent += 1
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._write(header, payload)
        if not self._writable.is_set():
            try:
                await self._writable.wait()
            except BaseException:
                future.cancel()
                raise
        return future

    async def disconnect(self, timeout: float = 30.0) -> None:
        """Wait (up to ``timeout``) for pending requests, send NBD_CMD_DISC and close.

        Idempotent. Requests still pending after the timeout fail with
        NbdConnectionError.
        """
        if self._error is None:
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                pass
        if self._error is None:
            self._error = NbdConnectionError("NBD connection closed by the client")
            self._write(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Command.DISC, 0, 0, 0), None)
            try:
                async with asyncio.timeout(5.0):
                    await self._drained.wait()
            except TimeoutError:
                pass
        self._connection_lost(None)

    def abort(self) -> None:
        """Drop the connection at once; pending requests fail with NbdConnectionError."""
        if self._error is None:
            self._error = NbdConnectionError("NBD connection aborted by the client")
        self._connection_lost(None)

    def _check_open(self) -> None:
        if self._error is not None:
            raise NbdConnectionError(str(self._error))

    # --- reply parser --------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while True:
            avail = self._wpos - self._rpos
            state = self._state
            if state == _DATA:
                if not avail:
                    break
                n = min(avail, self._remaining)
                sink = self._sink
                if sink is not None:
                    cur = self._cur
                    if cur is None or cur.future.done():
                        self._sink = None
                    else:
                        pos = self._sink_pos
                        sink[pos : pos + n] = self._view[self._rpos : self._rpos + n]
                        self._sink_pos = pos + n
                self._rpos += n
                self._remaining -= n
                if self._remaining:
                    break
                self._data_done()
            elif state == _HEADER:
                if avail < p.SIMPLE_REPLY.size:
                    break
                rpos = self._rpos
                (magic,) = p.U32.unpack_from(buf, rpos)
                if magic == p.STRUCTURED_REPLY_MAGIC:
                    if avail < p.STRUCTURED_REPLY.size:
                        break
                    _, flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack_from(buf, rpos)
                    self._rpos = rpos + p.STRUCTURED_REPLY.size
                    self._on_chunk_header(flags, rtype, cookie, length)
                elif magic == p.SIMPLE_REPLY_MAGIC:
                    _, error, cookie = p.SIMPLE_REPLY.unpack_from(buf, rpos)
                    self._rpos = rpos + p.SIMPLE_REPLY.size
                    self._on_simple_reply(error, cookie)
                else:
                    raise NbdProtocolError(f"bad reply magic {magic:#x}")
            else:  # _PAYLOAD
                need = self._need
                if avail < need:
                    self._reserve(need)
                    break
                start = self._rpos
                self._rpos = start + need
                self._on_payload(self._view[start : start + need])
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0

    def _compact(self) -> None:
        """Move unparsed bytes to the front of the staging buffer."""
        data = bytes(self._view[self._rpos : self._wpos])
        self._view[: len(data)] = data
        self._rpos = 0
        self._wpos = len(data)

    def _reserve(self, need: int) -> None:
        """Make room for ``need`` contiguous bytes from the read position."""
        if len(self._buf) - self._rpos >= need:
            return
        if need <= len(self._buf):
            self._compact()
            return
        # Grow: a new buffer (the old one may still be exported to the transport).
        data = self._view[self._rpos : self._wpos]
        self._buf = bytearray(max(need, 2 * len(self._buf)))
        self._view = memoryview(self._buf)
        self._view[: len(data)] = data
        self._rpos = 0
        self._wpos = len(data)

    def _request(self, cookie: int) -> _Request:
        req = self._pending.get(cookie)
        if req is None:
            raise NbdProtocolError(f"reply for unknown cookie {cookie}")
        return req

    def _on_simple_reply(self, error: int, cookie: int) -> None:
        req = self._request(cookie)
        if error:
            req.error = NbdCommandError(req.command, req.offset, req.length, error)
            self._complete(req)
        elif req.command == p.Command.READ:
            req.received = req.length
            self._begin_data(req, 0, req.length, done=True)
        else:
            self._complete(req)

    def _on_chunk_header(self, flags: int, rtype: int, cookie: int, length: int) -> None:
        req = self._request(cookie)
        self._cur = req
        self._chunk_flags = flags
        self._chunk_type = rtype
        if rtype == p.ReplyType.OFFSET_DATA:
            if req.command != p.Command.READ or length <= p.U64.size:
                raise NbdProtocolError(f"bad OFFSET_DATA chunk (length {length})")
            self._need = p.U64.size
            self._data_len = length - p.U64.size
            self._state = _PAYLOAD
        elif rtype == p.ReplyType.NONE:
            if length or not flags & p.REPLY_FLAG_DONE:
                raise NbdProtocolError("NONE chunk with a payload or without DONE")
            self._complete(req)
        else:
            if length > _MAX_CHUNK:
                raise NbdProtocolError(f"reply chunk of {length} bytes is too long")
            self._need = length
            self._state = _PAYLOAD

    def _on_payload(self, payload: memoryview) -> None:
        req = self._cur
        assert req is not None
        rtype = self._chunk_type
        if rtype == p.ReplyType.OFFSET_DATA:
            (offset,) = p.U64.unpack_from(payload)
            rel = offset - req.offset
            n = self._data_len
            if rel < 0 or rel + n > req.length:
                raise NbdProtocolError(f"OFFSET_DATA at {offset}+{n} outside the request")
            req.received += n
            self._begin_data(req, rel, n, done=bool(self._chunk_flags & p.REPLY_FLAG_DONE))
            return
        self._state = _HEADER
        if rtype == p.ReplyType.OFFSET_HOLE:
            if req.command != p.Command.READ or len(payload) != p.OFFSET_HOLE.size:
                raise NbdProtocolError("bad OFFSET_HOLE chunk")
            offset, size = p.OFFSET_HOLE.unpack(payload)
            rel = offset - req.offset
            if rel < 0 or size == 0 or rel + size > req.length:
                raise NbdProtocolError(f"OFFSET_HOLE at {offset}+{size} outside the request")
            if req.buf is not None and not req.future.done():
                _fill_zero(req.buf, rel, size)
            req.received += size
        elif rtype == p.ReplyType.BLOCK_STATUS:
            self._on_block_status(req, payload)
        elif rtype & p.REPLY_ERROR_BIT:
            self._on_error_chunk(req, rtype, payload)
        else:
            raise NbdProtocolError(f"unknown reply chunk type {rtype}")
        if self._chunk_flags & p.REPLY_FLAG_DONE:
            self._complete(req)

    def _on_block_status(self, req: _Request, payload: memoryview) -> None:
        size = len(payload)
        if req.extents is None or size < 12 or (size - 4) % p.BLOCK_DESCRIPTOR.size:
            raise NbdProtocolError("bad BLOCK_STATUS chunk")
        (context,) = p.U32.unpack_from(payload)
        extents = req.extents.setdefault(context, [])
        pos = req.offset
        if extents:
            pos = extents[-1].offset + extents[-1].length
        for length, flags in p.BLOCK_DESCRIPTOR.iter_unpack(payload[4:]):
            if length == 0:
                raise NbdProtocolError("BLOCK_STATUS extent of length 0")
            extents.append(Extent(pos, length, flags))
            pos += length

    def _on_error_chunk(self, req: _Request, rtype: int, payload: memoryview) -> None:
        size = len(payload)
        if size < p.ERROR_HEAD.size:
            raise NbdProtocolError("short error chunk")
        errno, msg_len = p.ERROR_HEAD.unpack_from(payload)
        end = p.ERROR_HEAD.size + msg_len
        if end > size:
            raise NbdProtocolError("error chunk message longer than the chunk")
        message = bytes(payload[p.ERROR_HEAD.size : end]).decode("utf-8", "replace")
        error_offset: int | None = None
        if rtype == p.ReplyType.ERROR_OFFSET:
            if size != end + p.U64.size:
                raise NbdProtocolError("bad ERROR_OFFSET chunk")
            (error_offset,) = p.U64.unpack_from(payload, end)
        if errno == 0:
            raise NbdProtocolError("error chunk with error value 0")
        if req.error is None:
            req.error = NbdCommandError(
                req.command, req.offset, req.length, errno, message, error_offset
            )

    def _begin_data(self, req: _Request, rel: int, length: int, *, done: bool) -> None:
        self._cur = req
        self._sink = req.buf if req.buf is not None and not req.future.done() else None
        self._sink_pos = rel
        self._remaining = length
        self._done_after_data = done
        self._state = _DATA

    def _data_done(self) -> None:
        self._state = _HEADER
        self._sink = None
        req = self._cur
        if self._done_after_data and req is not None:
            self._complete(req)

    def _complete(self, req: _Request) -> None:
        del self._pending[req.cookie]
        self._slots.release()
        if not self._pending:
            self._idle.set()
        self._cur = None
        future = req.future
        if future.done():
            return
        if req.error is not None:
            future.set_exception(req.error)
        elif req.command == p.Command.READ and req.received != req.length:
            future.set_exception(
                NbdProtocolError(
                    f"read reply covered {req.received} of {req.length} bytes"
                    f" at offset {req.offset}"
                )
            )
        else:
            future.set_result(req.extents)

    def _fail_pending(self, error: NbdConnectionError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        self._idle.set()
        for req in pending:
            self._slots.release()
            if not req.future.done():
                req.future.set_exception(NbdConnectionError(str(error)))

    def _fail(self, error: NbdConnectionError) -> None:
        if self._error is None:
            self._error = error
        self._connection_lost(None)


class TlsNbdConnection(NbdConnection):
    """The transmission phase over a TLS transport (see :func:`.handshake.negotiate_tls`).

    Same contract as :class:`NbdConnection`; only the bytes travel differently: the
    transport decrypts replies straight into the parser's buffers (read data into the
    caller's buffer, as on a plain socket) and encrypts each request as it is written,
    so a write payload is not referenced after :meth:`submit` returns. The plain
    connection keeps its own socket path (``sendmsg``, ``recv_into``): TLS costs nothing
    where it is not used.
    """

    def __init__(
        self, writer: asyncio.StreamWriter, info: ExportInfo, *, max_in_flight: int = 64
    ) -> None:
        """Take over the TLS transport of ``writer`` (the handshake's stream). The writer
        is kept: one that is garbage-collected closes its transport."""
        self._setup(info, max_in_flight)
        self._writer = writer
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        self._transport: asyncio.Transport | None = transport
        self._aborting = False
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        raw = transport.get_extra_info("socket")
        self._quickack = (
            _TCP_QUICKACK != 0
            and raw is not None
            and raw.family in (socket.AF_INET, socket.AF_INET6)
        )
        self._raw = raw
        transport.set_protocol(_TlsProtocol(self))
        if transport.is_closing():
            self._connection_lost(None)

    def _write(self, header: bytes, payload: memoryview | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(header)
        if payload is not None:
            transport.write(payload)

    def _close_socket(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        self._drained.set()
        if self._aborting:
            transport.abort()
        else:
            transport.close()  # sends what is queued (a DISC) and TLS's close_notify

    def abort(self) -> None:
        self._aborting = True
        super().abort()


class _TlsProtocol(asyncio.BufferedProtocol):
    """Hands the TLS transport's events to its :class:`TlsNbdConnection`."""

    def __init__(self, conn: TlsNbdConnection) -> None:
        self._conn = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self._conn
        if conn._quickack and conn._raw is not None:
            # As on a plain socket (see NbdConnection._on_readable): QEMU leaves Nagle
            # on, so acknowledge at once rather than let Linux delay the ACK.
            with contextlib.suppress(OSError):
                conn._raw.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return conn._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._conn._buffer_updated(nbytes)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn._writable.clear()

    def resume_writing(self) -> None:
        self._conn._writable.set()
