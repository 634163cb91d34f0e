"""The SFTP driver (asyncssh): objects are files under a root directory on an SSH server.

Connection
    One SSH connection per driver, opened on first use, with ``channels`` SFTP sessions
    on it used in turn; each session pipelines many requests (large reads and writes
    are split into parallel requests by asyncssh). A dropped connection is noticed
    (keepalives, or the failing request) and reopened by the next request; a request
    that failed on a connection that was already open is reopened and sent once more,
    because every operation is idempotent. Everything else is left to the caller's
    retry (``virtbackup.storage.retry``).

Authentication and host key
    Password and/or private key (PEM or OpenSSH text). No SSH agent, no ``~/.ssh``
    files are used. ``host_key`` pins the server's key (an OpenSSH public key line,
    optionally preceded by host names as in known_hosts, or a ``SHA256:`` fingerprint);
    empty accepts any key here, but ``open_driver`` refuses an SFTP destination without
    one, so a configured destination always checks it. A refused login or a wrong host
    key is a ``PermanentError`` (naming the pinned and the presented fingerprints).

Timeouts
    ``connect_timeout`` bounds TCP connect, handshake and login together;
    ``op_timeout`` bounds each request (plus one second per MiB transferred). A timeout
    is a ``TransientError``; it also drops the connection when no other request
    completed on it while this one waited (a stuck server, not a busy link).

Writes
    ``put`` writes ``<dir>/.vbtmp-<random>-<name>``, fsyncs it where the server has the
    ``fsync@openssh.com`` extension, then renames it over the key's path with
    ``posix-rename@openssh.com`` (atomic replace). Without that extension it falls back
    to rename, removing an existing target first (a short window where the key is
    missing, never partial). Missing directories below the root are created; the root's
    parent (the configured ``basePath``) must exist. Directories are created 0700 and
    files 0600 (``DIR_MODE``, ``FILE_MODE``; the server's umask can only narrow them):
    only the SSH user reads the repository. Deleting the last object of a directory
    removes it and every parent left empty (never the root); a ``put`` whose directory
    a delete removed between its ``mkdir`` and its ``open`` makes it again.

Missing base path
    Reads of a destination whose ``basePath`` does not exist (an unmounted disk on the
    server) raise a ``PermanentError`` saying so, as the filesystem driver does, rather
    than "not found" or an empty listing: an unmounted disk is no empty repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import posixpath
import secrets
import socket
import stat as stat_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import asyncssh

from virtbackup.contracts.v1.config import host_key_fingerprint
from virtbackup.storage.base import DriverBase, check_range
from virtbackup.storage.errors import (
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    StorageError,
    TransientError,
)
from virtbackup.storage.keys import TEMP_PREFIX, is_temp_name, validate_key, validate_prefix
from virtbackup.storage.protocol import ObjectInfo

T = TypeVar("T")

#: Names in one directory: (files, subdirectories).
_Listing = tuple[list[tuple[str, int, float]], list[str]]

MIB: Final = 1024 * 1024
#: How often a ``put`` makes its directory again when a delete removed it meanwhile.
PUT_DIR_ATTEMPTS: Final = 8
#: Mode of the directories the driver creates on the server: owner only.
DIR_MODE: Final = 0o700
#: Mode of the files the driver writes on the server: owner only (chunks hold VM data).
FILE_MODE: Final = 0o600

_NOT_FOUND: Final = (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath)
_PERMANENT: Final = (
    asyncssh.SFTPPermissionDenied,
    asyncssh.SFTPWriteProtect,
    asyncssh.SFTPNoSpaceOnFilesystem,
    asyncssh.SFTPQuotaExceeded,
    asyncssh.SFTPOpUnsupported,
    asyncssh.SFTPInvalidFilename,
    asyncssh.SFTPNotADirectory,
    asyncssh.SFTPFileIsADirectory,
    asyncssh.SFTPLinkLoop,
    asyncssh.SFTPOwnerInvalid,
    asyncssh.SFTPGroupInvalid,
)
#: Failures of the transport rather than of the request: the connection is dropped.
_CONNECTION_ERRORS: Final = (
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    asyncssh.ConnectionLost,
    asyncssh.DisconnectError,
    ConnectionError,
    EOFError,
    TimeoutError,
    OSError,
)


class _ClientHooks(asyncssh.SSHClient):
    """Host key pinning and connection-loss notification."""

    def __init__(self, session: _Session | None, host_key: str) -> None:
        self.session = session
        self.host_key = host_key
        #: The fingerprint of the key the server presented, once it has.
        self.presented = ""

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = str(key.get_fingerprint("sha256"))
        return host_key_matches(key, self.host_key)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.lost = True


def host_key_matches(key: asyncssh.SSHKey, expected: str) -> bool:
    """Whether ``key`` is the one ``expected`` names (public key line or SHA256: fingerprint)."""
    try:
        return bool(host_key_fingerprint(expected) == key.get_fingerprint("sha256"))
    except ValueError:
        return False


def host_key_algorithms(expected: str) -> list[str] | None:
    """The signature algorithms of a pinned public key line (so that the server presents
    that key), or None for a fingerprint (any algorithm)."""
    words = expected.split()
    for start in range(min(2, len(words))):
        try:
            key = asyncssh.import_public_key(" ".join(words[start:]))
        except (asyncssh.KeyImportError, ValueError):
            continue
        return [alg.decode() for alg in key.sig_algorithms]
    return None


@dataclass(eq=False)
class _Session:
    """One open connection and its SFTP sessions."""

    conn: asyncssh.SSHClientConnection
    clients: list[asyncssh.SFTPClient] = field(default_factory=list)
    lost: bool = False
    turn: itertools.count[int] = field(default_factory=itertools.count)
    #: When a request on this connection last completed (monotonic clock).
    last_progress: float = field(default_factory=time.monotonic)

    def client(self) -> asyncssh.SFTPClient:
        return self.clients[next(self.turn) % len(self.clients)]


class SftpDriver(DriverBase):
    """Objects as files under ``root`` on an SFTP server (see the module docstring)."""

    driver_id = "sftp"
    delete_concurrency = 32

    def __init__(
        self,
        *,
        host: str,
        username: str,
        root: str,
        port: int = 22,
        password: str = "",
        private_key: str = "",
        host_key: str = "",
        channels: int = 4,
        connect_timeout: float = 15.0,
        op_timeout: float = 60.0,
        keepalive_interval: float = 15.0,
        fsync: bool = True,
    ) -> None:
        super().__init__()
        if not password and not private_key:
            raise InvalidParamsError("sftp: give a password or a privateKey")
        self.host = host
        self.port = port
        self.username = username
        self.root = posixpath.normpath(root)
        if self.root in ("/", "."):
            raise InvalidParamsError(f"sftp: root {root!r} must be a directory below the base")
        self.channels = max(1, channels)
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self.keepalive_interval = keepalive_interval
        self.fsync = fsync
        self._password = password
        self._host_key = host_key
        self._client_keys: list[asyncssh.SSHKey] | None = None
        if private_key:
            try:
                self._client_keys = [asyncssh.import_private_key(private_key)]
            except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
                raise InvalidParamsError(f"sftp: privateKey cannot be read: {exc}") from None
        self._session: _Session | None = None
        self._connect_lock = asyncio.Lock()
        self._posix_rename = True
        self._fsync_supported = True
        self._cleanups: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"SftpDriver({self.username}@{self.host}:{self.port}{self.root})"

    @property
    def where(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    # -- connection ----------------------------------------------------------------------

    async def _open_session(self) -> _Session:
        hooks = _ClientHooks(None, self._host_key)
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn, _ = await asyncssh.create_connection(
                    lambda: hooks,
                    self.host,
                    self.port,
                    username=self.username,
                    password=self._password or None,
                    client_keys=self._client_keys,
                    known_hosts=([], [], []) if self._host_key else None,
                    server_host_key_algs=host_key_algorithms(self._host_key) or (),
                    agent_path=None,
                    config=None,
                    preferred_auth=("publickey", "password", "keyboard-interactive"),
                    connect_timeout=self.connect_timeout,
                    keepalive_interval=self.keepalive_interval,
                    keepalive_count_max=3,
                )
                session = _Session(conn)
                hooks.session = session
                try:
                    for _ in range(self.channels):
                        session.clients.append(await conn.start_sftp_client())
                except BaseException:
                    conn.abort()
                    raise
        except asyncssh.PermissionDenied as exc:
            raise PermanentError(
                f"SFTP authentication failed for {self.where}: {exc.reason or 'permission denied'}"
            ) from exc
        except asyncssh.HostKeyNotVerifiable as exc:
            raise PermanentError(
                f"SFTP host key of {self.host}:{self.port} does not match the pinned hostKey: "
                f"pinned {_fingerprint(self._host_key)}, presented {hooks.presented or '?'} "
                "(if the server's key really changed, set hostKey to the new key or clear it "
                "and save the configuration again)"
            ) from exc
        except socket.gaierror as exc:
            raise PermanentError(f"SFTP host {self.host!r} cannot be resolved: {exc}") from exc
        except TimeoutError as exc:
            raise TransientError(
                f"SFTP connection to {self.host}:{self.port} timed out "
                f"after {self.connect_timeout:g} s"
            ) from exc
        except asyncssh.ChannelOpenError as exc:
            raise TransientError(f"SFTP session on {self.where} refused: {exc.reason}") from exc
        except OSError as exc:
            raise TransientError(
                f"SFTP connection to {self.host}:{self.port} failed: {exc.strerror or exc}"
            ) from exc
        except asyncssh.Error as exc:
            raise TransientError(
                f"SFTP connection to {self.host}:{self.port} failed: {exc.reason}"
            ) from exc
        except ValueError as exc:  # a host or username SSH cannot carry (SASLprep, IDNA)
            raise InvalidParamsError(
                f"SFTP parameters for {self.where} are unusable: {exc}"
            ) from exc
        return session

    async def _current(self) -> tuple[_Session, bool]:
        """The open session (opening one if needed) and whether this call opened it."""
        self._check_open()
        session = self._session
        if session is not None and not session.lost:
            return session, False
        async with self._connect_lock:
            self._check_open()
            session = self._session
            if session is not None and not session.lost:
                return session, False
            if session is not None:
                self._drop(session)
            session = await self._open_session()
            self._session = session
            return session, True

    def _drop(self, session: _Session) -> None:
        session.lost = True
        if self._session is session:
            self._session = None
        session.conn.abort()

    async def _call(
        self,
        what: str,
        key: str,
        operation: Callable[[asyncssh.SFTPClient], Awaitable[T]],
        *,
        size: int = 0,
    ) -> T:
        """Run one SFTP operation with a timeout, error mapping and one reconnect."""
        timeout = self.op_timeout + size / MIB
        for attempt in range(2):
            session, fresh = await self._current()
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    result = await operation(session.client())
                session.last_progress = time.monotonic()
                return result
            except StorageError:
                session.last_progress = time.monotonic()
                raise
            except _NOT_FOUND as exc:
                session.last_progress = time.monotonic()
                raise await self._not_found(session.client(), key) from exc
            except _PERMANENT as exc:
                session.last_progress = time.monotonic()
                raise PermanentError(f"SFTP {what} {key!r} on {self.where}: {exc.reason}") from exc
            except TimeoutError as exc:
                if session.last_progress <= started:
                    self._drop(session)  # nothing completed meanwhile: the server is stuck
                raise TransientError(
                    f"SFTP {what} {key!r} on {self.where} timed out after {timeout:g} s"
                ) from exc
            except _CONNECTION_ERRORS as exc:
                self._drop(session)
                if attempt == 0 and not fresh:
                    continue  # the connection had died while idle: reopen it once
                raise TransientError(
                    f"SFTP connection to {self.where} lost during {what} {key!r}: {exc}"
                ) from exc
            except asyncssh.SFTPError as exc:
                raise TransientError(f"SFTP {what} {key!r} on {self.where}: {exc.reason}") from exc
        raise AssertionError("unreachable")

    def _path(self, key: str) -> str:
        return f"{self.root}/{validate_key(key)}"

    def _base_missing_error(self) -> PermanentError:
        return PermanentError(
            f"SFTP base path {posixpath.dirname(self.root)!r} does not exist on "
            f"{self.where} (is its disk mounted?)"
        )

    async def _base_exists(self, sftp: asyncssh.SFTPClient) -> bool:
        """Whether the root's parent (the configured ``basePath``) is a directory; true
        when that cannot be told (the caller's own error then stands)."""
        try:
            async with asyncio.timeout(self.op_timeout):
                return bool(await sftp.isdir(posixpath.dirname(self.root)))
        except (asyncssh.Error, OSError, TimeoutError):
            return True

    async def _not_found(self, sftp: asyncssh.SFTPClient, key: str) -> StorageError:
        """``NotFoundError(key)``, or the missing base path's ``PermanentError``."""
        if await self._base_exists(sftp):
            return NotFoundError(key)
        return self._base_missing_error()

    # -- writes --------------------------------------------------------------------------

    async def _ensure_dir(self, sftp: asyncssh.SFTPClient, directory: str) -> None:
        """Create ``directory`` (the root or below it); the root's parent must exist."""
        relative = posixpath.relpath(directory, self.root)
        parts = [] if relative == "." else relative.split("/")
        path = self.root
        for part in [None, *parts]:
            if part is not None:
                path = f"{path}/{part}"
            try:
                await sftp.mkdir(path, asyncssh.SFTPAttrs(permissions=DIR_MODE))
            except _NOT_FOUND as exc:
                if path == self.root:
                    raise PermanentError(
                        f"SFTP base path {posixpath.dirname(self.root)!r} does not exist "
                        f"on {self.where}"
                    ) from exc
                raise
            except asyncssh.SFTPError:
                if not await sftp.isdir(path):
                    raise

    async def _put(self, sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
        directory, name = posixpath.split(path)
        tmp = f"{directory}/{TEMP_PREFIX}{secrets.token_hex(8)}-{name}"
        try:
            file = await self._open_new(sftp, directory, tmp)
            try:
                await file.write(data, 0)
                if self.fsync and self._fsync_supported:
                    try:
                        await file.fsync()
                    except asyncssh.SFTPOpUnsupported:
                        self._fsync_supported = False
            finally:
                await file.close()
            await self._rename(sftp, tmp, path)
        except BaseException:
            self._cleanup_later(sftp, tmp)
            raise

    async def _open_new(
        self, sftp: asyncssh.SFTPClient, directory: str, tmp: str
    ) -> asyncssh.SFTPClientFile:
        """Create ``tmp`` in ``directory``, making the directory when missing; again when
        a delete removed it (left empty) between our ``mkdir`` and ``open``."""
        attrs = asyncssh.SFTPAttrs(permissions=FILE_MODE)
        for attempt in range(PUT_DIR_ATTEMPTS):
            try:
                return await sftp.open(tmp, "wb", attrs)
            except _NOT_FOUND:
                if attempt == PUT_DIR_ATTEMPTS - 1:
                    raise
            try:
                await self._ensure_dir(sftp, directory)
            except _NOT_FOUND:  # a parent went meanwhile: start from the root again
                continue
        raise AssertionError("unreachable")

    async def _rename(self, sftp: asyncssh.SFTPClient, source: str, target: str) -> None:
        if self._posix_rename:
            try:
                await sftp.posix_rename(source, target)
            except asyncssh.SFTPOpUnsupported:
                self._posix_rename = False
            else:
                return
        try:
            await sftp.rename(source, target)
        except asyncssh.SFTPError:
            if not await sftp.exists(target):
                raise
            await sftp.remove(target)
            await sftp.rename(source, target)

    def _cleanup_later(self, sftp: asyncssh.SFTPClient, tmp: str) -> None:
        """Remove a temporary file in the background (best effort: it is never listed)."""
        session = self._session
        if session is None or session.lost:
            return

        async def remove() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.op_timeout):
                    await sftp.remove(tmp)

        task = asyncio.get_running_loop().create_task(remove())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        await self._call("write", key, lambda sftp: self._put(sftp, path, data), size=len(data))

    # -- reads ---------------------------------------------------------------------------

    async def _read(self, sftp: asyncssh.SFTPClient, path: str, offset: int, size: int) -> bytes:
        async with await sftp.open(path, "rb") as file:
            data = await file.read(size, offset)
        assert isinstance(data, bytes)
        return data

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        return await self._call("read", key, lambda sftp: self._read(sftp, path, 0, -1))

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        path = self._path(key)
        return await self._call(
            "read", key, lambda sftp: self._read(sftp, path, offset, length), size=length
        )

    async def _stat(self, sftp: asyncssh.SFTPClient, key: str, path: str) -> int:
        attrs = await sftp.stat(path)
        if attrs.permissions is not None and not stat_module.S_ISREG(attrs.permissions):
            raise NotFoundError(key)
        return int(attrs.size or 0)

    async def stat(self, key: str) -> int:
        path = self._path(key)
        return await self._call("stat", key, lambda sftp: self._stat(sftp, key, path))

    # -- listing -------------------------------------------------------------------------

    async def _scan(self, sftp: asyncssh.SFTPClient, relative: str) -> _Listing:
        directory = f"{self.root}/{relative}" if relative else self.root
        files: list[tuple[str, int, float]] = []
        dirs: list[str] = []
        try:
            async for entry in sftp.scandir(directory):
                name = str(entry.filename)
                if name in (".", "..") or is_temp_name(name):
                    continue
                mode = entry.attrs.permissions or 0
                if stat_module.S_ISDIR(mode):
                    dirs.append(name)
                elif stat_module.S_ISREG(mode):
                    files.append((name, int(entry.attrs.size or 0), float(entry.attrs.mtime or 0)))
        except (*_NOT_FOUND, asyncssh.SFTPNotADirectory):
            if not await self._base_exists(sftp):
                raise self._base_missing_error() from None
            return [], []
        except asyncssh.SFTPFailure:
            if await sftp.exists(directory):
                raise
            if not await self._base_exists(sftp):
                raise self._base_missing_error() from None
            return [], []
        return sorted(files), sorted(dirs)

    async def _walk(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        pending = [prefix.rpartition("/")[0]]
        while pending:
            relative = pending.pop()
            files, dirs = await self._call(
                "list", relative or "/", functools.partial(self._scan, relative=relative)
            )
            base = f"{relative}/" if relative else ""
            for name, size, mtime in files:
                key = base + name
                if key.startswith(prefix) and _is_key(key):
                    yield ObjectInfo(key, size, mtime)
            for name in reversed(dirs):
                sub = base + name
                if sub.startswith(prefix) or prefix.startswith(sub + "/"):
                    pending.append(sub)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for info in self._walk(prefix):
            yield info.key

    async def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Sizes and mtimes (whole seconds, the server's clock) from the directory
        listings themselves (``READDIR`` answers carry the attributes)."""
        async for info in self._walk(prefix):
            yield info

    # -- deletes -------------------------------------------------------------------------

    async def _remove(self, sftp: asyncssh.SFTPClient, path: str) -> None:
        try:
            await sftp.remove(path)
        except _NOT_FOUND:
            return
        # Remove the folders left empty, deepest first, never the root: the server's
        # rmdir refuses a folder that holds anything (a writer's temporary file too).
        directory = posixpath.dirname(path)
        while directory != self.root and directory.startswith(self.root + "/"):
            try:
                await sftp.rmdir(directory)
            except asyncssh.SFTPError:
                return
            directory = posixpath.dirname(directory)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self._call("delete", key, lambda sftp: self._remove(sftp, path))

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._cleanups):
            task.cancel()
        session, self._session = self._session, None
        if session is not None:
            for client in session.clients:
                client.exit()
            session.conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await session.conn.wait_closed()


def _fingerprint(host_key: str) -> str:
    try:
        return host_key_fingerprint(host_key)
    except ValueError:
        return repr(host_key)


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except StorageError:
        return False
    return True
