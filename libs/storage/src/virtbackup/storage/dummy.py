"""The dummy driver, for benchmarks: it discards data but remembers keys and sizes.

``exists``, ``stat`` and ``list`` answer from memory, so deduplication behaves as with a
real destination. Reading data back is impossible: ``get`` of a stored key raises
``PermanentError`` (``NotFoundError`` for a key never put).

With ``tmp_writes=True`` (the agent config's ``dummyDriverTmpWrites``) every object is
also written to a fresh temporary directory, without fsync, so that a benchmark pays the
cost of local writes and ``get`` returns the data. The directory is removed by ``close``.
Range reads are emulated either way (``supportsRangeRead: false``).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from virtbackup.storage.base import DriverBase
from virtbackup.storage.errors import NotFoundError, PermanentError
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.storage.keys import validate_key, validate_prefix
from virtbackup.storage.protocol import ObjectInfo


class DummyDriver(DriverBase):
    """Keys and sizes in memory; data discarded or, with ``tmp_writes``, in a temp dir."""

    driver_id = "dummy"

    def __init__(self, *, tmp_writes: bool = False) -> None:
        super().__init__()
        self._sizes: dict[str, int] = {}
        self._times: dict[str, float] = {}
        self.tmp_dir: Path | None = None
        self._files: FilesystemDriver | None = None
        if tmp_writes:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="virtbackup-dummy-"))
            self._files = FilesystemDriver(self.tmp_dir / "VirtBackup", fsync=False)

    @property
    def tmp_writes(self) -> bool:
        return self._files is not None

    def __repr__(self) -> str:
        return f"DummyDriver(tmp_writes={self.tmp_writes})"

    async def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        self._check_open()
        if self._files is not None:
            await self._files.put(key, data)
        self._sizes[key] = len(data)
        self._times[key] = time.time()

    async def get(self, key: str) -> bytes:
        validate_key(key)
        self._check_open()
        if key not in self._sizes:
            raise NotFoundError(key)
        if self._files is None:
            raise PermanentError(
                f"the dummy driver discards data: {key!r} cannot be read back "
                "(enable dummyDriverTmpWrites to keep it in a temporary directory)"
            )
        return await self._files.get(key)

    async def stat(self, key: str) -> int:
        validate_key(key)
        self._check_open()
        try:
            return self._sizes[key]
        except KeyError:
            raise NotFoundError(key) from None

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
        self._check_open()
        for key in sorted(k for k in self._sizes if k.startswith(prefix)):
            await asyncio.sleep(0)
            if key in self._sizes:
                yield key

    async def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Sizes and the local time of each ``put`` (the dummy's "destination clock")."""
        async for key in self.list(prefix):
            size, modified = self._sizes.get(key), self._times.get(key)
            if size is not None and modified is not None:
                yield ObjectInfo(key, size, modified)

    async def delete(self, key: str) -> None:
        validate_key(key)
        self._check_open()
        self._sizes.pop(key, None)
        self._times.pop(key, None)
        if self._files is not None:
            await self._files.delete(key)

    async def delete_many(self, keys: Iterable[str]) -> None:
        todo = [validate_key(k) for k in keys]
        self._check_open()
        for key in todo:
            self._sizes.pop(key, None)
            self._times.pop(key, None)
        if self._files is not None:
            await self._files.delete_many(todo)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sizes.clear()
        self._times.clear()
        if self._files is not None:
            await self._files.close()
        if self.tmp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.tmp_dir, True)
