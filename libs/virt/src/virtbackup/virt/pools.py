"""libvirt storage pools: which there are, where their volumes live, and a refresh.

Restores write into a pool whose volumes are files in a directory (``dir``, ``fs``,
``netfs``): the image is written beside its final name and moved there like any other,
and a refresh of the pool makes libvirt list the new volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import libvirt

from virtbackup.virt import _xml
from virtbackup.virt.connection import Connection
from virtbackup.virt.errors import NotFound, VirtError

#: Pool types whose volumes are files in the pool's target directory.
DIRECTORY_POOL_TYPES: Final = frozenset({"dir", "fs", "netfs"})


@dataclass(frozen=True, slots=True)
class StoragePool:
    """A pool: ``type`` as libvirt names it (``dir``, ``logical``...), ``path`` its
    target path (a directory for the directory types; empty if it has none)."""

    name: str
    type: str
    path: str
    active: bool

    @property
    def holds_files(self) -> bool:
        """Whether its volumes are files in ``path`` (see :data:`DIRECTORY_POOL_TYPES`)."""
        return self.type in DIRECTORY_POOL_TYPES and bool(self.path)


async def _describe(conn: Connection, pool: Any) -> StoragePool:
    root = _xml.parse(str(await conn.call(pool.XMLDesc, 0)))
    return StoragePool(
        name=(root.findtext("name") or "").strip(),
        type=root.get("type", ""),
        path=(root.findtext("./target/path") or "").strip(),
        active=bool(await conn.call(pool.isActive)),
    )


async def list_pools(conn: Connection) -> list[StoragePool]:
    """Every pool (active or not), sorted by name."""
    pools = await conn.call(conn.raw.listAllStoragePools, 0)
    return sorted([await _describe(conn, p) for p in pools], key=lambda p: p.name)


async def get_pool(conn: Connection, name: str) -> StoragePool:
    """Pool ``name``; :class:`NotFound` if there is none."""
    try:
        pool = await conn.call(conn.raw.storagePoolLookupByName, name)
    except VirtError as exc:
        if exc.code == libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise NotFound(f"no storage pool {name!r}", code=exc.code) from None
        raise
    return await _describe(conn, pool)


async def refresh_pools_holding(conn: Connection, directories: set[str]) -> list[str]:
    """Refresh every active pool whose target path is one of ``directories`` (so that
    libvirt lists files just moved there as volumes); returns their names."""
    refreshed = []
    for pool in await conn.call(conn.raw.listAllStoragePools, 0):
        info = await _describe(conn, pool)
        if info.active and info.path.rstrip("/") in directories:
            await conn.call(pool.refresh, 0)
            refreshed.append(info.name)
    return refreshed
