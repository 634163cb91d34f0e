"""The filesystem driver: objects are files under a root directory.

- ``put`` writes ``<dir>/.vbtmp-<random>-<name>``, fsyncs it, renames it over the key's
  path and fsyncs the directory (and every directory it had to create, and their
  parents), so that an object is durable once ``put`` returns and a reader never sees a
  partial file.
- The root's parent must exist; the root itself is created on the first write. This
  keeps a backup from silently filling the wrong disk when a mount point is missing.
  Reads refuse the same way: a missing object or directory whose root's parent is
  missing too is a ``PermanentError`` naming that directory (an unmounted disk), not an
  empty repository.
- Objects of 64 KiB and more (chunks) are written with ``O_DIRECT`` from an aligned
  per-thread buffer, padded to 4 KiB and truncated back. Backup data then does not go
  through the page cache: it does not evict the VMs' cached data, and it costs far less
  CPU (on the benchmark machine, buffered writes cost 0.5-2 s of kernel time per GB,
  direct ones 0.3-0.5 s). Whole-object reads of that size use ``O_DIRECT`` too. A
  filesystem that refuses ``O_DIRECT`` gets buffered I/O.
- Blocking file I/O runs in the driver's own thread pool.
- Symlinks inside the root are not followed when listing.
- Directories are only a means: deleting the last object of a directory removes it, and
  every parent left empty, up to (not including) the root. ``rmdir`` removes only an
  empty directory, and a ``put`` creates its temporary file in the key's directory, so a
  writer's directory is never removed under a file it writes; a directory removed between
  a writer's ``mkdir`` and its ``open`` is made again (``PUT_DIR_ATTEMPTS``).
- Only the owner can read the repository: directories are created 0700 and files 0600
  (``DIR_MODE``, ``FILE_MODE``; a umask can only narrow them), and a root left wider by
  an older version is narrowed to 0700 on the first write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import secrets
import stat as stat_module
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from virtbackup.storage.base import DriverBase, check_range
from virtbackup.storage.errors import (
    InvalidKeyError,
    NotFoundError,
    PermanentError,
    StorageError,
    TransientError,
)
from virtbackup.storage.keys import TEMP_PREFIX, is_temp_name, validate_key, validate_prefix
from virtbackup.storage.protocol import ObjectInfo

T = TypeVar("T")

#: Mode of the directories the driver creates (the root and below it): owner only.
DIR_MODE: Final = 0o700
#: Mode of the files the driver writes: owner only (chunks hold VM data).
FILE_MODE: Final = 0o600

#: One directory: (files as (name, size, mtime), subdirectories).
_Listing = tuple[list[tuple[str, int, float]], list[str]]

#: errno values a retry cannot fix: the configuration or the disk has to change.
PERMANENT_ERRNOS: Final = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EINVAL,
        errno.EEXIST,
    }
)


#: Objects at least this large are written with ``O_DIRECT`` (where the platform has it).
DIRECT_MIN: Final = 64 * 1024
#: How often a ``put`` makes its directory again when a delete removed it meanwhile.
PUT_DIR_ATTEMPTS: Final = 8
#: Offset, length and address alignment used for ``O_DIRECT`` (enough for 4Kn disks).
DIRECT_ALIGN: Final = 4096
_O_DIRECT: Final[int] = getattr(os, "O_DIRECT", 0)


class _AlignedBuffers:
    """Page-aligned buffers (anonymous mmaps) for ``O_DIRECT`` reads and writes, shared
    by the driver's threads and reused: a buffer is taken only for the read or write
    itself (not for the fsync, the rename or the copy's life), so a few serve all 16
    threads. One buffer per thread, kept for good, made a worker hold 9-16 of them
    touched up to a chunk's size: 36-64 MiB of its peak memory on the benchmark."""

    #: Free buffers kept; one given back beyond these is unmapped.
    KEEP = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, max(size, 8 << 20))

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.KEEP:
                self._free.append(buf)
                return
        buf.close()


def map_os_error(exc: OSError, what: str) -> StorageError:
    """Translate an ``OSError`` raised while doing ``what`` into the storage hierarchy."""
    message = f"{what}: {exc.strerror or exc}"
    if exc.errno == errno.ENOENT:
        return NotFoundError(what, message)
    if exc.errno in PERMANENT_ERRNOS:
        return PermanentError(message)
    return TransientError(message)


class _DirectRefused(Exception):
    """The filesystem does not take ``O_DIRECT`` writes."""


class FilesystemDriver(DriverBase):
    """Objects as files under ``root`` (see the module docstring)."""

    driver_id = "filesystem"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, threads: int = 16):
        super().__init__()
        self.root = Path(os.path.abspath(root))
        self.fsync = fsync
        #: Cleared for good when the filesystem refuses ``O_DIRECT``.
        self.direct = _O_DIRECT != 0
        self._aligned = _AlignedBuffers()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vb-fs")
        self._root_narrowed = False

    def __repr__(self) -> str:
        return f"FilesystemDriver({str(self.root)!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    async def _run(self, func: Callable[[], T]) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func)

    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _base_missing(self) -> PermanentError | None:
        """The error to raise instead of "not found" when the root's parent is missing."""
        if self.root.parent.is_dir():
            return None
        return PermanentError(
            f"destination directory {str(self.root.parent)!r} does not exist (is its disk mounted?)"
        )

    def _not_found(self, key: str) -> StorageError:
        return self._base_missing() or NotFoundError(key)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` (inside the root, or the root itself) durably."""
        missing: list[Path] = []
        probe = directory
        while not probe.is_dir():
            if probe == self.root:
                if not self.root.parent.is_dir():
                    raise PermanentError(
                        f"destination directory {str(self.root.parent)!r} does not exist"
                    )
                missing.append(probe)
                break
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=DIR_MODE)
            except FileExistsError:
                if not path.is_dir():
                    raise
            self._fsync_dir(path.parent)

    # -- writes --------------------------------------------------------------------------

    def _narrow_root(self) -> None:
        """Make an existing root owner-only (once per driver; best effort)."""
        self._root_narrowed = True
        with contextlib.suppress(OSError):
            st = os.stat(self.root, follow_symlinks=False)
            if stat_module.S_ISDIR(st.st_mode) and st.st_mode & 0o077:
                os.chmod(self.root, stat_module.S_IMODE(st.st_mode) & ~0o077)

    def _put_sync(self, key: str, path: Path, data: bytes) -> None:
        if not self._root_narrowed:
            self._narrow_root()
        if self.direct and len(data) >= DIRECT_MIN:
            try:
                self._put_file(key, path, data, direct=True)
                return
            except _DirectRefused:
                self.direct = False
        self._put_file(key, path, data, direct=False)

    def _write_all(self, fd: int, data: bytes, *, direct: bool) -> None:
        if not direct:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                view.release()
            return
        size = len(data)
        padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = self._aligned.take(padded)
        try:
            buf[:size] = data
            if padded != size:
                buf[size:padded] = bytes(padded - size)
            view = memoryview(buf)[:padded]
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                view.release()
        finally:
            self._aligned.give(buf)
        if padded != size:
            os.ftruncate(fd, size)

    def _open_new(self, tmp: Path, flags: int) -> int:
        """Create ``tmp``, making its directory when missing. A delete removing that
        directory (left empty) between our ``mkdir`` and ``open`` is outwaited by trying
        again: once the file exists the directory is not empty and stays."""
        for attempt in range(PUT_DIR_ATTEMPTS):
            try:
                return os.open(tmp, flags, FILE_MODE)
            except FileNotFoundError:
                if attempt == PUT_DIR_ATTEMPTS - 1:
                    raise
            try:
                self._make_dirs(tmp.parent)
            except FileNotFoundError:  # a parent went meanwhile: start from the root again
                continue
        raise AssertionError("unreachable")

    def _put_file(self, key: str, path: Path, data: bytes, *, direct: bool) -> None:
        tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if direct:
            flags |= _O_DIRECT
        try:
            fd = self._open_new(tmp, flags)
            try:
                self._write_all(fd, data, direct=direct)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                if direct and exc.errno == errno.EINVAL:
                    raise _DirectRefused from exc
                if exc.errno == errno.ENOENT:  # a directory vanished under us: try again
                    raise TransientError(f"cannot write {key!r}: {exc}") from exc
                raise map_os_error(exc, f"cannot write {key!r}") from exc
            raise

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        await self._run(lambda: self._put_sync(key, path, data))

    # -- reads ---------------------------------------------------------------------------

    def _read_direct(self, fd: int, size: int) -> bytes | None:
        """The whole file read with ``O_DIRECT`` into the aligned buffer, or ``None``
        when the filesystem refuses it (the caller then reads normally)."""
        padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
        except OSError:
            return None
        buf = self._aligned.take(padded)
        view = memoryview(buf)
        try:
            position = 0
            while position < size:
                n = os.preadv(fd, [view[position:padded]], position)
                if n == 0:
                    break
                position += n
            return bytes(view[: min(position, size)])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return None
        finally:
            view.release()
            self._aligned.give(buf)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)

    def _read_sync(self, key: str, path: Path, offset: int, length: int | None) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise map_os_error(exc, f"cannot read {key!r}") from exc
        try:
            info = os.fstat(fd)
            if not stat_module.S_ISREG(info.st_mode):
                raise NotFoundError(key)
            if self.direct and length is None and offset == 0 and info.st_size >= DIRECT_MIN:
                data = self._read_direct(fd, info.st_size)
                if data is not None:
                    return data
            end = info.st_size if length is None else min(info.st_size, offset + length)
            chunks: list[bytes] = []
            position = offset
            while position < end:
                chunk = os.pread(fd, end - position, position)
                if not chunk:
                    break
                chunks.append(chunk)
                position += len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise map_os_error(exc, f"cannot read {key!r}") from exc
        finally:
            os.close(fd)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        return await self._run(lambda: self._read_sync(key, path, 0, None))

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        path = self._path(key)
        return await self._run(lambda: self._read_sync(key, path, offset, length))

    def _stat_sync(self, key: str, path: Path) -> int:
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise map_os_error(exc, f"cannot stat {key!r}") from exc
        if not stat_module.S_ISREG(info.st_mode):
            raise NotFoundError(key)
        return info.st_size

    async def stat(self, key: str) -> int:
        path = self._path(key)
        return await self._run(lambda: self._stat_sync(key, path))

    # -- listing -------------------------------------------------------------------------

    def _scan_sync(self, relative: str, with_info: bool) -> _Listing:
        """Files (that may be keys) and subdirectories of one directory under the root;
        each file's size and mtime when ``with_info`` (else 0)."""
        directory = self.root.joinpath(*relative.split("/")) if relative else self.root
        files: list[tuple[str, int, float]] = []
        dirs: list[str] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_symlink() or is_temp_name(entry.name):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        if not with_info:
                            files.append((entry.name, 0, 0.0))
                            continue
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted meanwhile
                        files.append((entry.name, info.st_size, info.st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            missing = self._base_missing()
            if missing is not None:
                raise missing from None
            return [], []
        except OSError as exc:
            raise map_os_error(exc, f"cannot list {relative or '/'!r}") from exc
        return sorted(files), sorted(dirs)

    async def _walk(self, prefix: str, with_info: bool) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        start = prefix.rpartition("/")[0]
        pending = [start]
        while pending:
            relative = pending.pop()
            files, dirs = await self._run(functools.partial(self._scan_sync, relative, with_info))
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
        async for info in self._walk(prefix, False):
            yield info.key

    async def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Keys with size and mtime (one ``stat`` per file, in the driver's threads)."""
        async for info in self._walk(prefix, True):
            yield info

    # -- deletes -------------------------------------------------------------------------

    def _delete_sync(self, keys: Sequence[str]) -> None:
        emptied: set[Path] = set()
        for key in keys:
            path = self.root.joinpath(*key.split("/"))
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except IsADirectoryError:
                continue
            except OSError as exc:
                if exc.errno == errno.EPERM and path.is_dir():
                    continue
                raise map_os_error(exc, f"cannot delete {key!r}") from exc
            emptied.add(path.parent)
        # Deepest first, so that a folder emptied by removing its last subfolder goes too.
        for directory in sorted(emptied, key=lambda d: len(d.parts), reverse=True):
            self._remove_empty_dirs(directory)

    def _remove_empty_dirs(self, directory: Path) -> None:
        """Remove ``directory`` and its parents while they are empty, never the root.
        ``rmdir`` refuses a directory that holds anything (a writer's temporary file
        included), so this cannot remove what another writer puts there."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or gone, or not ours to remove): stop here
                return
            with contextlib.suppress(OSError):
                self._fsync_dir(directory.parent)
            directory = directory.parent

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._run(lambda: self._delete_sync([key]))

    async def delete_many(self, keys: Iterable[str]) -> None:
        """One thread hop for the whole batch: local unlinks are a native batch delete."""
        todo = [validate_key(k) for k in keys]
        if todo:
            await self._run(lambda: self._delete_sync(todo))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True
