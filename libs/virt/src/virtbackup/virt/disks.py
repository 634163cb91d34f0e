"""The disks a backup reads, taken from the domain XML.

Only writable disks with a medium are backed up: CD-ROMs, floppies, ``<readonly/>`` disks
and drives without a ``<source>`` are skipped.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from virtbackup.virt import _xml
from virtbackup.virt.connection import Connection
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host
from virtbackup.virt.images import image_info

_SKIPPED_DEVICES = frozenset({"cdrom", "floppy"})


@dataclass(frozen=True, slots=True)
class Disk:
    """One disk of a domain.

    ``target`` is the guest-visible name (``vda``), which libvirt also uses to name the
    disk's NBD export and checkpoint bitmap. ``source`` is the top image: a path for
    ``type='file'``/``'block'``, the volume or network name otherwise. ``format`` is the
    driver type (``qcow2``, ``raw``). ``backing`` lists the backing chain below ``source``
    (from the live XML; empty for an inactive domain or a flat image). ``alias`` is QEMU's
    device id (``virtio-disk0``, or a user alias ``ua-...``), known while the domain runs.
    ``capacity`` is the virtual size in bytes, ``None`` where it was not looked up.
    """

    target: str
    source: str | None
    format: str
    device: str
    type: str
    bus: str | None
    alias: str | None
    backing: tuple[str, ...] = ()
    capacity: int | None = None

    @property
    def supports_bitmaps(self) -> bool:
        """Whether the disk can carry persistent dirty bitmaps (only qcow2 can)."""
        return self.format == "qcow2"


def _source_of(element: ET.Element | None) -> str | None:
    if element is None:
        return None
    src = element.find("source")
    if src is None:
        return None
    for attr in ("file", "dev", "name", "volume"):
        value = src.get(attr)
        if value:
            return value
    return None


def _backing_chain(disk: ET.Element) -> tuple[str, ...]:
    chain: list[str] = []
    node = disk.find("backingStore")
    while node is not None and node.find("source") is not None:
        path = _source_of(node)
        if path:
            chain.append(path)
        node = node.find("backingStore")
    return tuple(chain)


def parse_disks(xml: str) -> list[Disk]:
    """The backed-up disks of a domain XML, in document order, without capacity."""
    root = _xml.parse(xml)
    disks: list[Disk] = []
    for element in root.findall("./devices/disk"):
        device = element.get("device", "disk")
        if device in _SKIPPED_DEVICES or element.find("readonly") is not None:
            continue
        source = _source_of(element)
        target = element.find("target")
        if source is None or target is None or not target.get("dev"):
            continue
        driver = element.find("driver")
        alias = element.find("alias")
        disks.append(
            Disk(
                target=target.get("dev", ""),
                source=source,
                format=(driver.get("type") if driver is not None else None) or "raw",
                device=device,
                type=element.get("type", "file"),
                bus=target.get("bus"),
                alias=alias.get("name") if alias is not None else None,
                backing=_backing_chain(element),
            )
        )
    return disks


async def list_disks(conn: Connection, name: str, *, host: Host | None = None) -> list[Disk]:
    """The domain's backed-up disks with their capacity.

    Capacity comes from ``virDomainGetBlockInfo``; if libvirt cannot tell (storage it
    cannot open) it falls back to ``qemu-img info -U`` on ``host`` (default: the
    connection's host), else stays ``None``.
    """
    dom = await conn.lookup(name)
    xml = str(await conn.call(dom.XMLDesc, 0))
    runner = host if host is not None else conn.host
    result: list[Disk] = []
    for disk in parse_disks(xml):
        capacity: int | None
        try:
            info = await conn.call(dom.blockInfo, disk.target, 0)
            capacity = int(info[0])
        except VirtError:
            capacity = None
            if runner is not None and disk.source and disk.type == "file":
                try:
                    capacity = (await image_info(runner, disk.source)).virtual_size
                except VirtError:
                    capacity = None
        result.append(dataclasses.replace(disk, capacity=capacity))
    return result
