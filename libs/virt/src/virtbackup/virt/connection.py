"""Connections to libvirtd: local, ``qemu+ssh://``, or through a socket forwarded by asyncssh.

libvirt-python's calls block. A :class:`Connection` runs every call in its own small
thread pool and bounds it with ``asyncio.wait_for``; a call that overruns raises
:class:`~virtbackup.virt.errors.VirtTimeout` (its thread may linger until libvirt's
keepalive notices a dead peer and fails it). Every connection has keepalive on and a close
callback, so a lost hypervisor is noticed within ``interval * (count + 1)`` seconds and
reported to :meth:`Connection.add_close_listener` listeners (the lifecycle event watcher
uses that to reconnect).

Three ways in:

* :func:`open_connection` with ``qemu:///system`` (this host) or any libvirt URI.
* :func:`ssh_uri` builds ``qemu+ssh://user@host:port/system?keyfile=...`` for libvirt's
  own ssh transport (runs the ``ssh`` binary: key or agent auth only, never a password).
* :func:`open_ssh_connection` forwards a local Unix socket to the remote
  ``/var/run/libvirt/libvirt-sock`` through an already authenticated asyncssh connection
  (password, key, whatever asyncssh accepted) and opens ``qemu+unix:///system?socket=...``
  on it; with ``session=True``, to the login user's own ``qemu:///session`` daemon
  instead (started if needed, see :mod:`virtbackup.virt.session`), opened as
  ``qemu+unix:///session?socket=...``. The asyncio loop pumps that tunnel, so it must
  keep running while libvirt calls are in flight; they are, since every call runs in the
  thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import asyncssh
import libvirt

from virtbackup.virt.errors import Unreachable, VirtError, VirtTimeout, translate
from virtbackup.virt.eventloop import ensure_event_loop
from virtbackup.virt.host import Host, LocalHost, SshHost
from virtbackup.virt.session import SessionDaemon, ensure_session_daemon
from virtbackup.virt.threads import ReapingExecutor

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_OPEN_TIMEOUT = 20.0
LOCAL_SYSTEM_URI = "qemu:///system"
REMOTE_LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}

CloseListener = Callable[[str], None]


class Connection:
    """An open libvirt connection with bounded, non-blocking calls.

    Use :meth:`call` for every libvirt call (on the raw connection or on objects obtained
    from it); only the identity a ``virDomain`` caches (``name()``, ``UUIDString()``,
    ``ID()``) is read directly, since it never blocks. Not reusable after :meth:`close`;
    after the peer went away
    (:attr:`closed_reason` set) every call raises :class:`Unreachable`: open a new one.
    """

    def __init__(
        self,
        raw: Any,
        uri: str,
        *,
        executor: Executor,
        host: Host | None,
        call_timeout: float,
    ) -> None:
        self._raw = raw
        self.uri = uri
        self.host = host
        self.call_timeout = call_timeout
        self._executor = executor
        self._lock = threading.Lock()
        self._listeners: list[CloseListener] = []
        self._closed_reason: str | None = None
        self._closing = False
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        #: Where the session daemon is, for a connection to a user's ``qemu:///session``
        #: over SSH (:func:`open_ssh_connection` with ``session=True``); else ``None``.
        self.session: SessionDaemon | None = None

    @property
    def raw(self) -> Any:
        """The ``libvirt.virConnect``; call its methods only through :meth:`call`."""
        return self._raw

    @property
    def closed_reason(self) -> str | None:
        """``None`` while open; else why libvirt closed it: error, eof, keepalive, client."""
        return self._closed_reason

    def add_close_listener(self, listener: CloseListener) -> Callable[[], None]:
        """Call ``listener(reason)`` once when libvirt reports the connection closed.

        The listener runs on libvirt's event-loop thread (or right away, on the caller's
        thread, if the connection is already closed): it must be quick and thread-safe.
        Returns a function that removes the listener.
        """
        with self._lock:
            reason = self._closed_reason
            if reason is None:
                self._listeners.append(listener)
        if reason is not None:
            listener(reason)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def add_cleanup(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run ``cleanup`` after the libvirt connection is closed by :meth:`close`."""
        self._cleanups.append(cleanup)

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._mark_closed(CLOSE_REASONS.get(reason, f"unknown({reason})"))

    def _mark_closed(self, reason: str) -> None:
        with self._lock:
            if self._closed_reason is not None:
                return
            self._closed_reason = reason
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            with contextlib.suppress(Exception):
                listener(reason)

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run the blocking ``fn(*args)`` in the pool, bounded by ``timeout`` seconds.

        Translates ``libvirtError`` into :class:`VirtError` subclasses; raises
        :class:`VirtTimeout` past the bound and :class:`Unreachable` on a closed connection.
        """
        if self._closed_reason is not None:
            raise Unreachable(f"connection to {self.uri} is closed ({self._closed_reason})")
        if self._closing:
            raise VirtError(f"connection to {self.uri} was closed by this process")
        loop = asyncio.get_running_loop()
        bound = self.call_timeout if timeout is None else timeout
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(future, bound)
        except libvirt.libvirtError as exc:
            raise translate(exc) from exc
        except TimeoutError:
            name = getattr(fn, "__name__", repr(fn))
            raise VirtTimeout(f"libvirt call {name} on {self.uri} exceeded {bound} s") from None

    async def lookup(self, name: str) -> Any:
        """The ``libvirt.virDomain`` named ``name``; :class:`NotFound` if there is none."""
        return await self.call(self._raw.lookupByName, name)

    async def is_alive(self) -> bool:
        """True while the connection is usable (no close reported, libvirt says alive)."""
        if self._closed_reason is not None or self._closing:
            return False
        try:
            return bool(await self.call(self._raw.isAlive, timeout=5))
        except VirtError:
            return False

    async def close(self) -> None:
        """Close the libvirt connection, then run the registered cleanups; idempotent."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()

        def _close() -> None:
            with contextlib.suppress(libvirt.libvirtError):
                self._raw.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                self._raw.close()

        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, _close), 10)
        except TimeoutError:
            pass
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            for cleanup in reversed(self._cleanups):
                with contextlib.suppress(Exception):
                    await cleanup()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _is_local_uri(uri: str) -> bool:
    parts = urlsplit(uri)
    return "+" not in parts.scheme and not parts.hostname


async def open_connection(
    uri: str = LOCAL_SYSTEM_URI,
    *,
    host: Host | None = None,
    readonly: bool = False,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
    keepalive_interval: int = 5,
    keepalive_count: int = 3,
    max_threads: int = 4,
    idle_thread_seconds: float = 30,
) -> Connection:
    """Open ``uri`` with keepalive and a close callback.

    ``host`` runs helper commands (``qemu-img``) where libvirtd runs; it defaults to
    :class:`LocalHost` for a local URI (``qemu:///system``) and to ``None`` otherwise.
    Raises :class:`Unreachable` when the connection cannot be opened within
    ``open_timeout`` seconds (a connection that completes later is closed at once).
    Calls run in up to ``max_threads`` threads of the connection's own, each ending after
    ``idle_thread_seconds`` without a call.
    """
    ensure_event_loop()
    # A pool per connection (a hung host holds only its own threads), whose idle threads
    # end: a fleet's connections are idle nearly all the time (virt.threads).
    executor = ReapingExecutor(
        max_threads, idle_seconds=idle_thread_seconds, thread_name_prefix="libvirt-call"
    )
    loop = asyncio.get_running_loop()
    opener = libvirt.openReadOnly if readonly else libvirt.open
    future = loop.run_in_executor(executor, opener, uri)
    try:
        raw = await asyncio.wait_for(asyncio.shield(future), open_timeout)
    except libvirt.libvirtError as exc:
        executor.shutdown(wait=False)
        raise translate(exc, opening=True) from exc
    except TimeoutError:

        def _close_late(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                with contextlib.suppress(Exception):
                    done.result().close()

        future.add_done_callback(_close_late)
        executor.shutdown(wait=False)
        raise Unreachable(f"opening {uri} took longer than {open_timeout} s") from None
    if host is None and _is_local_uri(uri):
        host = LocalHost()
    conn = Connection(raw, uri, executor=executor, host=host, call_timeout=call_timeout)
    try:
        await conn.call(raw.registerCloseCallback, conn._on_close, None)
        # libvirt's test driver (test:///, in this process: there is no peer) refuses
        # keepalive with "not supported" rather than answering 1.
        if urlsplit(uri).scheme != "test":
            await conn.call(raw.setKeepAlive, keepalive_interval, keepalive_count)
    except VirtError:
        await conn.close()
        raise
    return conn


def ssh_uri(
    host: str,
    *,
    user: str = "root",
    port: int = 22,
    keyfile: str | None = None,
    known_hosts: str | None = None,
    no_verify: bool = False,
    transport: Literal["ssh", "libssh"] = "ssh",
    path: str = "/system",
) -> str:
    """A ``qemu+ssh://`` (or ``qemu+libssh://``) URI for libvirt's own ssh transports.

    * ``ssh`` runs the ``ssh`` binary in batch mode (``no_tty=1``): key or agent auth; the
      host key is checked against the user's ``~/.ssh/known_hosts`` unless ``no_verify``.
      libvirt 9.0 does not pass ``known_hosts=`` to the ``ssh`` binary, so asking for it
      raises ``ValueError``: use ``transport="libssh"`` or :func:`open_ssh_connection`.
    * ``libssh`` runs in-process: ``keyfile`` and ``known_hosts`` are honoured
      (``no_verify`` maps to ``known_hosts_verify=ignore``).

    A password cannot be given to either without an interactive prompt or an agent; for
    password auth use :func:`open_ssh_connection` over asyncssh.
    """
    if transport == "ssh" and known_hosts is not None:
        raise ValueError("libvirt's ssh transport ignores known_hosts=; use libssh or asyncssh")
    params: dict[str, str] = {}
    if keyfile:
        params["keyfile"] = keyfile
    if transport == "ssh":
        params["no_tty"] = "1"
        if no_verify:
            params["no_verify"] = "1"
    else:
        params["sshauth"] = "privkey,agent" if keyfile else "agent,privkey"
        if known_hosts:
            params["known_hosts"] = known_hosts
        params["known_hosts_verify"] = "ignore" if no_verify else "normal"
    netloc = f"{quote(user, safe='')}@{_bracket(host)}:{port}"
    query = urlencode(params, safe="/,")
    return f"qemu+{transport}://{netloc}{path}" + (f"?{query}" if query else "")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(slots=True)
class ForwardedSocket:
    """A local Unix socket that asyncssh forwards to the remote libvirtd socket."""

    path: str
    uri: str
    listener: asyncssh.SSHListener
    directory: str

    async def close(self) -> None:
        """Stop listening and remove the socket's private directory; idempotent."""
        self.listener.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.listener.wait_closed(), 5)
        shutil.rmtree(self.directory, ignore_errors=True)


async def forward_libvirt_socket(
    ssh: asyncssh.SSHClientConnection,
    *,
    remote_socket: str = REMOTE_LIBVIRT_SOCKET,
    local_dir: str | None = None,
    path: Literal["/system", "/session"] = "/system",
) -> ForwardedSocket:
    """Forward a new local Unix socket to ``remote_socket`` on the ssh server.

    The socket lives in a fresh private (0700) directory under ``local_dir`` (default: the
    system temp dir). Returns it with the URI to open:
    ``qemu+unix://<path>?socket=<local path>`` (``/system``, or ``/session`` for a user's
    session daemon). The remote user must be allowed to connect to libvirtd's socket
    (root, or the ``libvirt`` group; a session daemon's own user).
    """
    directory = tempfile.mkdtemp(prefix="virtbackup-libvirt-", dir=local_dir)
    os.chmod(directory, 0o700)
    local = os.path.join(directory, "libvirt-sock")
    try:
        listener = await ssh.forward_local_path(local, remote_socket)
    except (OSError, asyncssh.Error) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise Unreachable(f"cannot forward {remote_socket} over ssh: {exc}") from exc
    uri = f"qemu+unix://{path}?" + urlencode({"socket": local}, safe="/")
    return ForwardedSocket(path=local, uri=uri, listener=listener, directory=directory)


async def open_ssh_connection(
    ssh: asyncssh.SSHClientConnection,
    *,
    remote_socket: str = REMOTE_LIBVIRT_SOCKET,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
    keepalive_interval: int = 5,
    keepalive_count: int = 3,
    session: bool = False,
    start_timeout: float | None = None,
) -> Connection:
    """Open libvirt on the ssh server's host through a forwarded Unix socket.

    With ``session``, libvirt is the login user's own ``qemu:///session`` daemon: its
    socket is asked of the host and the daemon started when it is not running
    (:func:`~virtbackup.virt.session.ensure_session_daemon`, within ``start_timeout``,
    default ``open_timeout``, seconds), and :attr:`Connection.session` says where it is;
    ``remote_socket`` is ignored then.

    The returned connection's :attr:`Connection.host` runs commands over ``ssh``; closing
    the connection stops the forwarding but leaves ``ssh`` open (the caller owns it).
    Closing ``ssh`` ends the libvirt connection (close reason ``eof``). Raises
    :class:`Unreachable` when libvirt cannot be reached in ``open_timeout`` seconds.
    """
    host = SshHost(ssh)
    daemon: SessionDaemon | None = None
    if session:
        start = open_timeout if start_timeout is None else start_timeout
        daemon = await ensure_session_daemon(host, timeout=start)
        remote_socket = daemon.socket
    forwarded = await forward_libvirt_socket(
        ssh, remote_socket=remote_socket, path="/session" if session else "/system"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + open_timeout
    if daemon is not None and daemon.started:
        deadline += start
    try:
        while True:
            try:
                conn = await open_connection(
                    forwarded.uri,
                    host=host,
                    open_timeout=max(1.0, deadline - loop.time()),
                    call_timeout=call_timeout,
                    keepalive_interval=keepalive_interval,
                    keepalive_count=keepalive_count,
                )
                break
            except Unreachable:
                # A daemon started just now may have made its socket before it listens.
                if daemon is None or not daemon.started or loop.time() > deadline - 0.5:
                    raise
                await asyncio.sleep(0.2)
    except BaseException:
        await forwarded.close()
        raise
    conn.session = daemon
    conn.add_cleanup(forwarded.close)
    return conn
