"""Opening the repository of a configured destination."""

from __future__ import annotations

from virtbackup.contracts.v1.config import Destination
from virtbackup.repository.repository import Repository
from virtbackup.storage.factory import open_destination


async def open_repository(
    destination: Destination, *, tmp_writes: bool = False, create: bool = True
) -> Repository:
    """The repository at ``destination``, created on first use when ``create``.

    The caller owns the driver: ``await repo.driver.close()`` when done.
    """
    driver = open_destination(destination, tmp_writes=tmp_writes)
    try:
        if create:
            return await Repository.open_or_create(driver)
        return await Repository.open(driver)
    except BaseException:
        await driver.close()
        raise
