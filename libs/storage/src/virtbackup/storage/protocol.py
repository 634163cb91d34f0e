"""The one protocol every destination driver implements (modelled on restic's backends).

Contract, for every driver:

Keys
    Relative, slash-separated paths (``chunks/ab/ab12...``) under the driver's root,
    checked by ``virtbackup.storage.keys.validate_key`` before any I/O: an invalid key
    raises ``InvalidKeyError`` (a ``PermanentError``) and never touches the destination.
    A driver never reads or writes outside its root.

Writes
    ``put`` is idempotent (putting the same key twice with the same data is the same as
    once; with different data, the last completed put wins) and atomic in visibility:
    a reader sees either no object or the whole object, never a partial one (temp file +
    rename, or one object PUT). When ``put`` returns, the object is durable as far as the
    destination can promise (fsync of file and directory on a filesystem). A ``put`` that
    fails or is cancelled leaves no visible object under its key; a leftover temporary file
    is never listed as a key.

Reads
    ``get`` returns the whole object; ``get_range`` a slice of it. Both raise
    ``NotFoundError`` for a missing key. Where the destination has no native range read,
    ``get_range`` reads the whole object and slices it, and the driver's registry entry
    says ``supportsRangeRead: false``.

Listing
    ``list(prefix)`` yields every key that starts with ``prefix`` (a plain string
    prefix, so ``"chunks/a"`` matches ``chunks/ab/...``), recursively, relative to the
    root, in no promised order. Temporary files and directories are not keys.
    ``list_info(prefix)`` yields the same keys as ``ObjectInfo`` (key, size in bytes,
    last-modified time) in one listing pass, without a request per key.

Object ages
    ``ObjectInfo.modified`` is the time the object's current content was stored, in
    seconds since the epoch, *as the destination's clock has it* (never the caller's):
    the file's mtime on a filesystem and over SFTP (whole seconds there), ``Last-Modified``
    on S3 (whole seconds), the ``createdTime`` of the newest file of the key on Google
    Drive (every ``put`` uploads a new file, so it is when that content was stored; the
    dummy driver keeps the local time of the ``put``). A ``put`` of the same key again
    (an idempotent rewrite) makes the object younger. Nothing reads access times: S3 and
    Drive have none. Compare ages only with other ages read from the same destination
    (garbage collection measures its cutoff against a marker object it writes itself).

Deletes
    ``delete`` and ``delete_many`` are idempotent: a missing key is not an error.

Errors and retries
    Drivers raise only ``StorageError`` subclasses (``virtbackup.storage.errors``):
    ``NotFoundError``, ``PermanentError`` or ``TransientError``. Drivers do not retry
    requests themselves (the SFTP driver reopens a dropped connection once); callers
    retry ``TransientError`` with ``virtbackup.storage.retry``. Every operation is
    idempotent, so a retry is always safe.

Concurrency
    Every method may be called concurrently from one event loop. Blocking clients run
    in a thread pool owned by the driver. ``close`` releases connections and threads;
    the driver must not be used after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import NamedTuple, Protocol, Self, runtime_checkable


class ObjectInfo(NamedTuple):
    """One listed object: its key, its size in bytes and when its content was stored
    (seconds since the epoch on the destination's clock; see "Object ages" above)."""

    key: str
    size: int
    modified: float


@runtime_checkable
class Driver(Protocol):
    """An open destination. See the module docstring for the full contract."""

    @property
    def driver_id(self) -> str:
        """The registry id of this driver (``filesystem``, ``sftp``, ``s3``, ``gdrive``,
        ``dummy``)."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``: idempotent, atomic in visibility, durable on return."""
        ...

    async def get(self, key: str) -> bytes:
        """The whole object. ``NotFoundError`` if there is none."""
        ...

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; fewer if the object ends first, ``b""`` past its end.

        ``offset >= 0`` and ``length >= 1``, else ``ValueError``. ``NotFoundError`` if
        the object does not exist.
        """
        ...

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    async def stat(self, key: str) -> int:
        """The size of the object in bytes. ``NotFoundError`` if there is none."""
        ...

    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key starting with ``prefix``, recursively, relative to the root."""
        ...

    def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every key ``list(prefix)`` yields, with its size and last-modified time."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every object named (all keys are validated first); missing keys are fine."""
        ...

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""
        ...

    async def __aenter__(self) -> Self:
        """``async with driver:`` closes the driver on exit."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class FolderRemover(Protocol):
    """A driver whose folders are objects of their own, which deleting a folder's last
    object leaves behind (Google Drive). The filesystem and SFTP drivers remove emptied
    folders in ``delete`` itself (``rmdir`` refuses a folder that holds anything, so no
    writer loses a file); S3 has no folders."""

    async def remove_empty_folder(self, prefix: str) -> bool:
        """Remove the folder of ``prefix`` (a key prefix ending in ``/``) if it holds no
        object and no folder; ``True`` when it is gone (or was never there), ``False``
        when it holds something. Only the folder itself, never its parents.

        Removing a folder is not atomic with the check that it is empty (Drive deletes a
        folder with whatever it holds): the caller must know that nothing writes below
        ``prefix`` meanwhile (a deleted restore point's folder, under the point's
        locks). Storage errors as every operation's."""
        ...
