"""Checkpoints: libvirt's named points in time, each backed by one dirty bitmap per disk.

A backup begins with a new checkpoint; the next incremental backup reads only what the
checkpoint's bitmaps marked dirty since then. libvirt keeps every checkpoint's bitmap
recording, so an incremental from checkpoint ``C`` needs ``C``'s bitmaps only (the
``parent`` link is bookkeeping). The chain is *intact* for ``C`` when:

1. libvirt still knows ``C``;
2. every current qcow2 disk is part of ``C`` with a bitmap (a disk added later is not);
3. each of those bitmaps exists and is consistent: for a running domain libvirt's own
   check (``virDomainCheckpointGetXMLDesc`` with ``VIR_DOMAIN_CHECKPOINT_XML_SIZE``
   reports no size for a missing or broken bitmap); for a stopped one ``qemu-img info -U``
   over the disk's backing chain (the bitmap must exist without the ``in-use`` flag).

A chain-wide problem (1) means the next backup must be a full read of every disk;
a problem of one disk (2, 3) means a full read of that disk only, the others staying
incremental (libvirt's per-disk ``backupmode='full'``). A full read, with
content-addressed chunks, still uploads only new data. A stale checkpoint should be
deleted with ``metadata_only=True`` because libvirt cannot delete a bitmap that is gone;
a checkpoint of a stopped domain is deleted by :func:`discard_checkpoint`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import libvirt

from virtbackup.virt import _xml
from virtbackup.virt.connection import Connection
from virtbackup.virt.disks import Disk, list_disks, parse_disks
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host
from virtbackup.virt.images import image_chain


@dataclass(frozen=True, slots=True)
class CheckpointDisk:
    """One disk's part of a checkpoint.

    ``bitmap`` is ``None`` for a disk excluded from the checkpoint (``checkpoint='no'``).
    ``size`` is the number of bytes dirtied since the checkpoint, present only when the
    checkpoint was read with ``with_size=True`` from a running domain *and* the bitmap is
    present and consistent.
    """

    target: str
    bitmap: str | None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A libvirt checkpoint (``creation_time`` in Unix seconds)."""

    name: str
    parent: str | None
    creation_time: int
    disks: tuple[CheckpointDisk, ...]

    def bitmap_for(self, target: str) -> str | None:
        """The bitmap name for disk ``target``, or ``None`` if the disk is not covered."""
        for disk in self.disks:
            if disk.target == target:
                return disk.bitmap
        return None


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """Whether an incremental backup may start from ``checkpoint``.

    ``chain_problems`` concern the whole chain (no checkpoint, unknown to libvirt): the
    next backup is a full read of every disk. ``disk_problems`` concern one disk each
    (target -> why): that disk alone is read in full (libvirt's per-disk
    ``backupmode='full'``) while the others stay incremental. ``new_disks`` are the
    targets of ``disk_problems`` that the checkpoint does not cover at all (disks added
    since)."""

    checkpoint: str | None
    chain_problems: tuple[str, ...] = ()
    disk_problems: Mapping[str, str] = field(default_factory=dict)
    new_disks: tuple[str, ...] = ()

    @property
    def problems(self) -> tuple[str, ...]:
        """Every problem, the chain's first (empty when intact)."""
        return self.chain_problems + tuple(self.disk_problems.values())

    @property
    def intact(self) -> bool:
        """True when the next backup may be incremental from :attr:`checkpoint` for every
        disk."""
        return not self.problems

    @property
    def usable(self) -> bool:
        """True when the next backup may be incremental from :attr:`checkpoint` for the
        disks outside :attr:`disk_problems` (which are read in full)."""
        return self.checkpoint is not None and not self.chain_problems


def parse_checkpoint(xml: str) -> Checkpoint:
    """A :class:`Checkpoint` from ``<domaincheckpoint>`` XML."""
    root = _xml.parse(xml)
    parent = root.find("./parent/name")
    disks = tuple(
        CheckpointDisk(
            target=d.get("name", ""),
            bitmap=(d.get("bitmap") or root.findtext("name") or None)
            if d.get("checkpoint", "bitmap") == "bitmap"
            else None,
            size=_xml.int_or_none(d.get("size")),
        )
        for d in root.findall("./disks/disk")
    )
    return Checkpoint(
        name=root.findtext("name") or "",
        parent=parent.text if parent is not None and parent.text else None,
        creation_time=_xml.int_or_none(root.findtext("creationTime")) or 0,
        disks=disks,
    )


def build_checkpoint_xml(
    name: str, disks: Sequence[Disk], *, description: str | None = None
) -> str:
    """``<domaincheckpoint>`` XML for a new checkpoint ``name`` over ``disks``.

    qcow2 disks get a bitmap named after the checkpoint; other formats cannot hold one and
    are listed with ``checkpoint='no'`` (their backups are always full reads).
    """
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    elements = ET.SubElement(root, "disks")
    for disk in disks:
        if disk.supports_bitmaps:
            ET.SubElement(elements, "disk", name=disk.target, checkpoint="bitmap", bitmap=name)
        else:
            ET.SubElement(elements, "disk", name=disk.target, checkpoint="no")
    return _xml.dump(root)


async def _checkpoint_xml(conn: Connection, cp: Any, *, with_size: bool) -> str:
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
    if with_size:
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE
    return str(await conn.call(cp.getXMLDesc, flags))


async def list_checkpoints(conn: Connection, name: str) -> list[Checkpoint]:
    """The domain's checkpoints, every parent before its children (oldest first)."""
    dom = await conn.lookup(name)
    raw = await conn.call(dom.listAllCheckpoints, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    return [parse_checkpoint(await _checkpoint_xml(conn, cp, with_size=False)) for cp in raw]


async def get_checkpoint(
    conn: Connection, name: str, checkpoint: str, *, with_size: bool = False
) -> Checkpoint:
    """One checkpoint; NotFound if libvirt does not know it.

    ``with_size`` asks libvirt for each bitmap's dirty size (running domains only; a
    Conflict otherwise); a disk whose bitmap is missing or broken then has no size.
    """
    dom = await conn.lookup(name)
    cp = await conn.call(dom.checkpointLookupByName, checkpoint, 0)
    return parse_checkpoint(await _checkpoint_xml(conn, cp, with_size=with_size))


async def create_checkpoint(
    conn: Connection,
    name: str,
    checkpoint: str,
    *,
    disks: Sequence[Disk] | None = None,
    description: str | None = None,
) -> Checkpoint:
    """Create checkpoint ``checkpoint`` (bitmaps on the qcow2 disks among ``disks``,
    default all backed-up disks). Conflict if the name exists.

    Backups create their checkpoint atomically with ``virDomainBackupBegin``; this is for
    starting change tracking without a backup.
    """
    dom = await conn.lookup(name)
    chosen = list(disks) if disks is not None else await list_disks(conn, name)
    xml = build_checkpoint_xml(checkpoint, chosen, description=description)
    cp = await conn.call(dom.checkpointCreateXML, xml, 0)
    return parse_checkpoint(await _checkpoint_xml(conn, cp, with_size=False))


async def delete_checkpoint(
    conn: Connection, name: str, checkpoint: str, *, metadata_only: bool = False
) -> None:
    """Delete a checkpoint and its bitmaps; NotFound if it does not exist.

    ``metadata_only`` forgets the checkpoint without touching bitmaps: the only way to drop
    a checkpoint whose bitmap is already gone (libvirt refuses the normal delete with
    "bitmap ... not found in backing chain").
    """
    dom = await conn.lookup(name)
    cp = await conn.call(dom.checkpointLookupByName, checkpoint, 0)
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    await conn.call(cp.delete, flags)


async def bitmap_problems(
    conn: Connection,
    name: str,
    checkpoint: Checkpoint,
    disks: Sequence[Disk],
    *,
    host: Host | None = None,
) -> list[str]:
    """Why the bitmaps of ``checkpoint`` on ``disks`` cannot be trusted (empty: they can).

    Only disks that the checkpoint covers with a bitmap are checked.
    """
    return list((await disk_bitmap_problems(conn, name, checkpoint, disks, host=host)).values())


async def disk_bitmap_problems(
    conn: Connection,
    name: str,
    checkpoint: Checkpoint,
    disks: Sequence[Disk],
    *,
    host: Host | None = None,
) -> dict[str, str]:
    """As :func:`bitmap_problems`, by disk target (only the disks with a problem)."""
    covered = [d for d in disks if checkpoint.bitmap_for(d.target)]
    if not covered:
        return {}
    dom = await conn.lookup(name)
    if bool(await conn.call(dom.isActive)):
        try:
            sized = await get_checkpoint(conn, name, checkpoint.name, with_size=True)
        except VirtError as exc:
            why = f"libvirt cannot size checkpoint {checkpoint.name}: {exc}"
            return {d.target: why for d in covered}
        sizes = {d.target: d.size for d in sized.disks}
        return {
            d.target: (
                f"bitmap {checkpoint.bitmap_for(d.target)} of disk {d.target} is missing or broken"
            )
            for d in covered
            if sizes.get(d.target) is None
        }
    runner = host if host is not None else conn.host
    if runner is None:
        why = f"cannot inspect bitmaps of stopped domain {name} without host access"
        return {d.target: why for d in covered}
    problems: dict[str, str] = {}
    for disk in covered:
        bitmap = checkpoint.bitmap_for(disk.target)
        if disk.type != "file" or not disk.source:
            problems[disk.target] = f"cannot inspect bitmaps of {disk.type} disk {disk.target}"
            continue
        try:
            chain = await image_chain(runner, disk.source)
        except VirtError as exc:
            problems[disk.target] = f"cannot read image of disk {disk.target}: {exc}"
            continue
        found = [b for image in chain for b in image.bitmaps if b.name == bitmap]
        if not found:
            problems[disk.target] = f"bitmap {bitmap} of disk {disk.target} is missing"
        elif any(b.in_use for b in found):
            problems[disk.target] = (
                f"bitmap {bitmap} of disk {disk.target} is inconsistent (in-use)"
            )
    return problems


async def discard_checkpoint(
    conn: Connection, name: str, checkpoint: str, *, host: Host | None = None
) -> None:
    """Delete checkpoint ``checkpoint`` and its bitmaps, whether the domain runs or not.

    A running domain: libvirt's delete. A stopped one (libvirt refuses: "cannot remove
    checkpoint from inactive domain"): each bitmap is removed from the image of the
    disk's backing chain that holds it (``qemu-img bitmap --remove`` on ``host``, default
    the connection's host), then libvirt forgets the checkpoint (metadata only). This is
    what libvirt's own delete does: every checkpoint's bitmap records every write since
    its checkpoint, so the parent's bitmap already covers what the dropped one recorded
    and nothing needs merging. Raises NotFound when libvirt does not know the checkpoint,
    CommandFailed when an image cannot be changed (e.g. the domain was started meanwhile;
    the checkpoint then stays, whole)."""
    dom = await conn.lookup(name)
    if bool(await conn.call(dom.isActive)):
        await delete_checkpoint(conn, name, checkpoint)
        return
    cp = await get_checkpoint(conn, name, checkpoint)
    runner = host if host is not None else conn.host
    if runner is None:
        raise VirtError(f"removing the bitmaps of stopped domain {name} needs host access")
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE
    for disk in parse_disks(str(await conn.call(dom.XMLDesc, flags))):
        bitmap = cp.bitmap_for(disk.target)
        if not bitmap or disk.type != "file" or not disk.source:
            continue
        for image in await image_chain(runner, disk.source):
            if any(b.name == bitmap for b in image.bitmaps):
                removal = ["qemu-img", "bitmap", "--remove", image.filename, bitmap]
                (await runner.run(removal, timeout=60)).check()
    await delete_checkpoint(conn, name, checkpoint, metadata_only=True)


async def check_chain(
    conn: Connection,
    name: str,
    checkpoint: str | None,
    *,
    host: Host | None = None,
) -> ChainCheck:
    """Whether the next backup of ``name`` may be incremental from ``checkpoint``, and for
    which disks (see :class:`ChainCheck`).

    ``checkpoint`` is the one the last successful backup created (``None``: there is none).
    See the module docstring for the rules. Never raises for a broken chain; raises
    NotFound for an unknown domain and Unreachable/VirtTimeout as every call.
    """
    if checkpoint is None:
        return ChainCheck(None, ("no previous checkpoint",))
    known = {cp.name: cp for cp in await list_checkpoints(conn, name)}
    cp = known.get(checkpoint)
    if cp is None:
        return ChainCheck(checkpoint, (f"checkpoint {checkpoint} does not exist in libvirt",))
    disks = [d for d in await list_disks(conn, name, host=host) if d.supports_bitmaps]
    new = tuple(d.target for d in disks if not cp.bitmap_for(d.target))
    problems = {t: f"disk {t} is not part of checkpoint {checkpoint}" for t in new}
    problems.update(await disk_bitmap_problems(conn, name, cp, disks, host=host))
    return ChainCheck(checkpoint, disk_problems=problems, new_disks=new)
