"""One configured hypervisor server: its SSH and libvirt connections, kept and re-opened.

A server with an empty ``host`` is this machine's libvirt (``uri`` or ``qemu:///system``).
Any other is reached over SSH with asyncssh (password or private key); libvirt then goes
through a Unix socket forwarded over that SSH connection, unless ``uri`` is a
``qemu+tls://`` URI: the system daemon's socket (``uri`` empty or ``qemu:///system``), or,
with ``uri`` ``qemu:///session``, the login user's own session daemon (started when it
is not running, see :mod:`virtbackup.virt.session`; its backup scratch files then go
to a 0700 folder of that user's, :meth:`HostServer.scratch_dir`). A ``uri`` that
``check_libvirt_uri`` refuses (a transport or parameter that runs a program or names a
socket) is never opened, even if it reached the stored configuration some other way
than ``POST /config``. A *simulated* server (``uri`` ``test:///...``: libvirt's test
driver, in this process; fleet simulations) lists, starts and stops its VMs, but has no
QEMU and no disks: :meth:`HostServer.host`, which everything that reads or writes a disk
goes through, refuses it with a ``BadRequest`` saying so. Every connection attempt is bounded
by the server timeout; a failure marks the server unreachable with the reason, and the
next use tries again. Servers never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncssh

from virtbackup.contracts.v1.config import (
    Server,
    check_libvirt_uri,
    host_key_fingerprint,
    is_simulated_uri,
)
from virtbackup.runtime.errors import BadRequest, Unavailable
from virtbackup.virt import Connection, open_connection, open_ssh_connection
from virtbackup.virt.connection import LOCAL_SYSTEM_URI
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host, LocalHost, SshHost
from virtbackup.virt.session import SessionDaemon, ensure_session_daemon

#: The ``uri`` of a server reached over SSH whose libvirt is the login user's own daemon.
SESSION_URI = "qemu:///session"
#: Seconds a session daemon that is not running may take to start (its first start
#: probes QEMU's capabilities): longer than the server timeout, once.
SESSION_START_TIMEOUT = 20.0

log = logging.getLogger(__name__)


class _PinnedHostKey(asyncssh.SSHClient):
    """Accepts only the server's pinned host key, and remembers the one presented."""

    def __init__(self, pinned: str) -> None:
        self.pinned = pinned
        self.presented = ""

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = str(key.get_fingerprint("sha256"))
        try:
            return host_key_fingerprint(self.pinned) == self.presented
        except ValueError:
            return False


def _host_key_algorithms(pinned: str) -> list[str] | None:
    """The signature algorithms of a pinned key line (None for a bare fingerprint)."""
    words = pinned.split()
    for start in range(min(2, len(words))):
        try:
            key = asyncssh.import_public_key(" ".join(words[start:]))
        except (asyncssh.KeyImportError, ValueError):
            continue
        return [alg.decode() for alg in key.sig_algorithms]
    return None


def ssh_options(server: Server, timeout: float) -> dict[str, object]:
    """asyncssh options for ``server``: password and/or key, bounded connect time, and
    only its pinned host key trusted (the host key check itself is ``_PinnedHostKey``)."""
    options: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "username": server.username or "root",
        "known_hosts": ([], [], []),
        "server_host_key_algs": _host_key_algorithms(server.host_key) or (),
        "config": None,
        "connect_timeout": timeout,
        "login_timeout": timeout,
        "agent_path": None,
        "keepalive_interval": 10,
        "keepalive_count_max": 3,
    }
    if server.private_key:
        options["client_keys"] = [asyncssh.import_private_key(server.private_key)]
    else:
        options["client_keys"] = None
    if server.password:
        options["password"] = server.password
    return options


async def ssh_connect(server: Server, timeout: float) -> asyncssh.SSHClientConnection:
    """An authenticated SSH connection, or ``Unavailable`` with the reason.

    The server must present its pinned ``hostKey``: without one nothing is sent (the
    gateway pins it when the configuration is saved); a different key is refused with
    both fingerprints, before any secret is sent.
    """
    where = f"{server.host}:{server.port}"
    if not server.host_key:
        raise Unavailable(
            f"server {server.id}: the SSH host key of {where} is not pinned (hostKey), so "
            "no secret is sent to it; save the configuration again while the host answers "
            "(it pins the key), or give hostKey"
        )
    client = _PinnedHostKey(server.host_key)
    try:
        return await asyncio.wait_for(
            asyncssh.connect(client_factory=lambda: client, **ssh_options(server, timeout)),
            timeout,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise Unavailable(
            f"server {server.id}: the SSH host key of {where} does not match the pinned "
            f"hostKey: pinned {_fingerprint(server.host_key)}, presented "
            f"{client.presented or '?'} (if the host's key really changed, set hostKey to "
            "the new key or clear it and save the configuration again)"
        ) from None
    except asyncssh.PermissionDenied:
        raise Unavailable(
            f"server {server.id}: SSH authentication failed for {server.username or 'root'}"
        ) from None
    except TimeoutError:
        raise Unavailable(
            f"server {server.id}: no SSH answer from {where} in {timeout:g}s"
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise Unavailable(f"server {server.id}: SSH to {where}: {exc}") from None


def _fingerprint(host_key: str) -> str:
    try:
        return host_key_fingerprint(host_key)
    except ValueError:
        return repr(host_key)


@dataclass
class HostServer:
    """A configured server and its open connections (opened on first use)."""

    config: Server
    timeout: float
    conn: Connection | None = None
    ssh: asyncssh.SSHClientConnection | None = None
    reachable: bool = False
    error: str = ""
    failed_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Fills in the login of a server whose credentials are in the vault
    #: (``runtime.vault.resolve_server``), at each login; None: the config holds them.
    resolve: Callable[[Server], Awaitable[Server]] | None = None
    #: Where the login user's session daemon is (``is_session``), learnt at each open.
    session: SessionDaemon | None = None

    #: After a failed attempt, calls fail at once with its reason for this many seconds.
    RETRY_AFTER = 5.0

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def is_local(self) -> bool:
        return not self.config.host

    @property
    def is_simulated(self) -> bool:
        """Whether this is a simulated server (libvirt's ``test:///`` driver, no QEMU)."""
        return is_simulated_uri(self.config.uri)

    @property
    def is_session(self) -> bool:
        """Whether libvirt is the SSH login user's own ``qemu:///session`` daemon."""
        return bool(self.config.host) and self.config.uri == SESSION_URI

    @property
    def over_ssh(self) -> bool:
        """Whether libvirt is reached through a socket forwarded over SSH."""
        return bool(self.config.host) and not self.config.uri.startswith("qemu+tls")

    async def scratch_dir(self, default: str) -> str:
        """Where backups of this server keep scratch files and state copies: ``default``
        (the inventory's ``scratch_dir`` setting), or for a session server a 0700 folder
        of its user's (``~/.cache/virtbackup/scratch``). Raises ``Unavailable`` when a
        session server cannot be reached to ask."""
        if not self.is_session:
            return default
        return (await self.session_daemon()).scratch_dir

    async def session_daemon(self) -> SessionDaemon:
        """The session daemon's places (``is_session`` only; ValueError otherwise); asks
        the host (starting the daemon if needed) when no connection learnt them yet."""
        if not self.is_session:
            raise ValueError(f"server {self.id} is not a session server")
        if self.session is None:
            host = await self.host()
            try:
                self.session = await ensure_session_daemon(
                    host, timeout=max(self.timeout, SESSION_START_TIMEOUT)
                )
            except VirtError as exc:
                raise Unavailable(f"server {self.id}: {exc}") from None
        return self.session

    @property
    def uri(self) -> str:
        if self.config.uri:
            return self.config.uri
        return LOCAL_SYSTEM_URI if self.is_local else f"ssh://{self.config.host}/system"

    @property
    def nbd_host(self) -> str:
        """The address workers reach this server's NBD exports at."""
        return "127.0.0.1" if self.is_local else self.config.host

    async def connection(self) -> Connection:
        """The libvirt connection, opened (or re-opened) if needed."""
        if self.conn is not None and self.conn.closed_reason is None:
            return self.conn
        if self.failed_at and time.monotonic() - self.failed_at < self.RETRY_AFTER:
            raise Unavailable(self.error)
        async with self.lock:
            if self.conn is not None and self.conn.closed_reason is None:
                return self.conn
            await self._close_locked()
            try:
                self.conn = await self._open()
            except Unavailable as exc:
                self._failed(exc.message)
                raise
            except VirtError as exc:
                self._failed(f"server {self.id}: {exc}")
                await self._close_locked()
                raise Unavailable(self.error) from None
            self.reachable, self.error, self.failed_at = True, "", 0.0
            return self.conn

    def _failed(self, reason: str) -> None:
        self.reachable, self.error, self.failed_at = False, reason, time.monotonic()

    async def open_new(self) -> Connection:
        """A new, separate libvirt connection (for the lifecycle event watcher)."""
        try:
            conn = await self._open()
        except VirtError as exc:
            raise Unavailable(f"server {self.id}: {exc}") from None
        self.reachable, self.error = True, ""
        return conn

    async def _open(self) -> Connection:
        """Open libvirt; a tunnelling SSH connection is closed together with it."""
        problem = check_libvirt_uri(self.config.uri)
        if problem is not None:
            raise Unavailable(f"server {self.id}: {problem}")
        if not self.over_ssh:
            host: Host | None = LocalHost() if self.is_local and not self.is_simulated else None
            return await open_connection(
                self.uri, host=host, open_timeout=self.timeout, call_timeout=max(30, self.timeout)
            )
        ssh = await ssh_connect(await self.login(), self.timeout)
        try:
            conn = await open_ssh_connection(
                ssh,
                open_timeout=self.timeout,
                call_timeout=max(30, self.timeout),
                session=self.is_session,
                start_timeout=max(self.timeout, SESSION_START_TIMEOUT),
            )
        except BaseException:
            ssh.close()
            raise
        if conn.session is not None:
            self.session = conn.session

        async def close_ssh() -> None:
            ssh.close()

        conn.add_cleanup(close_ssh)
        return conn

    async def host(self) -> Host:
        """Where ``qemu-img`` and friends run for this server. Raises ``BadRequest`` for a
        simulated server: it has no QEMU and no disks to back up, restore or clean."""
        if self.is_simulated:
            raise BadRequest(
                f"server {self.id} is simulated (libvirt's test driver, {self.config.uri}): "
                "it has no QEMU and no disks, so backups, restores, migrations and cleanups "
                "cannot run on it"
            )
        if self.is_local:
            return LocalHost()
        async with self.lock:
            if self.ssh is None or self.ssh.is_closed():
                self.ssh = await ssh_connect(await self.login(), self.timeout)
            return SshHost(self.ssh)

    async def test_ssh(self) -> str:
        """Log in over SSH (``Unavailable`` with the reason if that fails), then check that
        commands run, which backups need (``qemu-img`` on the host)."""
        if self.is_local:
            return "local server: no SSH needed"
        ssh = await ssh_connect(await self.login(), self.timeout)
        try:
            result = await asyncio.wait_for(ssh.run("true", check=False), self.timeout)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            return f"SSH login OK, but running a command failed: {exc}"
        finally:
            ssh.close()
        if result.exit_status != 0:
            return f"SSH login OK, but commands cannot run (exit {result.exit_status})"
        return "SSH connection successful"

    async def login(self) -> Server:
        """The configuration with its login filled in from the vault (when it names a
        vault connection): asked at each login, kept only by the connection made."""
        if self.resolve is None or self.config.vault_connection_id is None:
            return self.config
        return await self.resolve(self.config)

    async def _close_locked(self) -> None:
        conn, ssh, self.conn, self.ssh = self.conn, self.ssh, None, None
        if conn is not None:
            with contextlib.suppress(VirtError, OSError):
                await conn.close()
        if ssh is not None:
            ssh.close()

    async def close(self) -> None:
        async with self.lock:
            await self._close_locked()
