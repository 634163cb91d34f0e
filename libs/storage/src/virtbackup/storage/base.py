"""Shared behaviour of the drivers: async context manager, defaults built on the primitives.

``DriverBase`` is an implementation aid, not part of the contract: code that uses
drivers depends on ``virtbackup.storage.protocol.Driver`` only.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Self

from virtbackup.storage.errors import NotFoundError, PermanentError
from virtbackup.storage.keys import validate_key
from virtbackup.storage.protocol import ObjectInfo


def check_range(offset: int, length: int) -> None:
    """Validate the arguments of ``get_range`` (``ValueError`` if they are out of bounds)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    if length < 1:
        raise ValueError(f"length must be >= 1, not {length}")


class DriverBase(abc.ABC):
    """Base class of the bundled drivers (see ``protocol.Driver`` for the contract)."""

    driver_id: str
    #: How many requests ``delete_many`` keeps in flight when it falls back to ``delete``.
    delete_concurrency: int = 16

    def __init__(self) -> None:
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise PermanentError(f"{self.driver_id} driver is closed")

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    async def stat(self, key: str) -> int: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[str]: ...

    @abc.abstractmethod
    def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Emulated range read: reads the whole object. Drivers with a native one override."""
        check_range(offset, length)
        data = await self.get(key)
        return data[offset : offset + length]

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFoundError:
            return False
        return True

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete with at most ``delete_concurrency`` requests in flight."""
        todo = [validate_key(k) for k in keys]
        if not todo:
            return
        self._check_open()
        semaphore = asyncio.Semaphore(self.delete_concurrency)

        async def one(key: str) -> None:
            async with semaphore:
                await self.delete(key)

        async with asyncio.TaskGroup() as group:
            for key in todo:
                group.create_task(one(key))
