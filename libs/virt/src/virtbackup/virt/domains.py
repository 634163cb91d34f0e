"""Domains: listing with power state, XML, define/undefine, power actions, CD-ROM eject,
and starting a shut-off domain paused to read its disks (offline backups).

Domains are addressed by name, as the agent API does (``vmName``). Power states and
actions are strings on the wire: :class:`PowerState` uses libvirt's state names
(``running``, ``shutoff``, ``paused``...), :class:`DomainAction` the agent API's verbs
(``start``, ``reboot``, ``shutdown``, ``forceReset``, ``forceOff``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import libvirt

from virtbackup.virt import _xml
from virtbackup.virt.connection import Connection
from virtbackup.virt.errors import Conflict, NotFound


class PowerState(StrEnum):
    """libvirt's ``virDomainState`` as a lowercase word."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    """Being shut down (the guest acknowledged a shutdown request)."""
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @classmethod
    def from_libvirt(cls, state: int) -> PowerState:
        """Map a ``VIR_DOMAIN_*`` state number (unknown numbers become ``nostate``)."""
        return _STATES.get(state, cls.NOSTATE)


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PMSUSPENDED,
}


class DomainAction(StrEnum):
    """The agent API's VM actions and the libvirt call each one makes.

    * ``start``: ``virDomainCreate``; Conflict if running.
    * ``reboot``: ``virDomainReboot`` (guest agent or ACPI): a *request* the guest OS
      carries out; a guest without an OS ignores it and keeps running.
    * ``shutdown``: ``virDomainShutdown`` (ACPI power button): a request, as for reboot.
    * ``forceReset``: ``virDomainReset``: hardware reset, stays ``running``.
    * ``forceOff``: ``virDomainDestroy``: immediate power-off, ends in ``shutoff``.
    """

    START = "start"
    REBOOT = "reboot"
    SHUTDOWN = "shutdown"
    FORCE_RESET = "forceReset"
    FORCE_OFF = "forceOff"


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """A domain as the inventory lists it; ``id`` is the running domain's id, else None."""

    name: str
    uuid: str
    id: int | None
    power_state: PowerState


def _info(dom: Any, state: int) -> DomainInfo:
    dom_id = int(dom.ID())
    return DomainInfo(
        name=str(dom.name()),
        uuid=str(dom.UUIDString()),
        id=dom_id if dom_id >= 0 else None,
        power_state=PowerState.from_libvirt(state),
    )


async def list_domains(conn: Connection) -> list[DomainInfo]:
    """Every domain (running and defined), sorted by name; one round trip to libvirtd."""
    stats = await conn.call(conn.raw.getAllDomainStats, libvirt.VIR_DOMAIN_STATS_STATE, 0)
    infos = [_info(dom, int(values.get("state.state", 0))) for dom, values in stats]
    return sorted(infos, key=lambda i: i.name)


async def get_domain(conn: Connection, name: str) -> DomainInfo:
    """One domain's info; :class:`~virtbackup.virt.errors.NotFound` if unknown."""
    dom = await conn.lookup(name)
    state, _reason = await conn.call(dom.state, 0)
    return _info(dom, int(state))


async def domain_xml(
    conn: Connection, name: str, *, inactive: bool = False, secure: bool = False
) -> str:
    """The domain XML: live definition if running (``inactive`` for the persistent one).

    ``secure`` includes secrets such as VNC passwords (needs a read-write connection);
    use it when the XML will be redefined or saved with a backup.
    """
    dom = await conn.lookup(name)
    flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
        libvirt.VIR_DOMAIN_XML_SECURE if secure else 0
    )
    return str(await conn.call(dom.XMLDesc, flags))


async def define_domain(conn: Connection, xml: str) -> DomainInfo:
    """Define (or redefine, same name and uuid) a persistent domain from ``xml``.

    Conflict when another domain already has the name or the uuid.
    """
    dom = await conn.call(conn.raw.defineXML, xml)
    state, _reason = await conn.call(dom.state, 0)
    return _info(dom, int(state))


async def undefine_domain(
    conn: Connection,
    name: str,
    *,
    keep_nvram: bool = False,
    keep_tpm: bool = False,
    remove_tpm: bool = False,
) -> None:
    """Remove the persistent definition with its checkpoint, snapshot and managed-save
    metadata (the disk images stay). A running domain keeps running, as a transient one.
    Its NVRAM file and emulated TPM's state are removed unless ``keep_nvram`` and
    ``keep_tpm`` (libvirt's own default for the TPM state applies otherwise: kept when
    the TPM says ``persistent_state='yes'``); ``remove_tpm`` removes the TPM state
    whatever the TPM says.
    """
    dom = await conn.lookup(name)
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | (
            libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
            if keep_nvram
            else libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        | (libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM if keep_tpm else 0)
        | (libvirt.VIR_DOMAIN_UNDEFINE_TPM if remove_tpm and not keep_tpm else 0)
    )
    await conn.call(dom.undefineFlags, flags)


async def perform_action(conn: Connection, name: str, action: DomainAction | str) -> DomainInfo:
    """Run one :class:`DomainAction` and return the domain's state right after the call.

    Raises ``ValueError`` for an unknown action, NotFound for an unknown domain and
    Conflict (with libvirt's reason, e.g. "domain is already running") when the state
    forbids it. ``reboot`` and ``shutdown`` return once the request is delivered, not when
    the guest has acted on it.
    """
    act = DomainAction(action)
    dom = await conn.lookup(name)
    if act is DomainAction.START:
        await conn.call(dom.create)
    elif act is DomainAction.REBOOT:
        await conn.call(dom.reboot, 0)
    elif act is DomainAction.SHUTDOWN:
        await conn.call(dom.shutdown)
    elif act is DomainAction.FORCE_RESET:
        await conn.call(dom.reset, 0)
    else:
        await conn.call(dom.destroy)
    state, _reason = await conn.call(dom.state, 0)
    return _info(dom, int(state))


async def start_paused(conn: Connection, name: str) -> DomainInfo:
    """Start the shut-off domain ``name`` with its vCPUs paused (``virDomainCreateWithFlags``
    with ``VIR_DOMAIN_START_PAUSED``): QEMU opens the disks, the guest runs no instruction.

    Used to read a shut-off VM's disks through the same pull-mode backup as a running one.
    Raises Conflict when the domain is already running, or has a managed save image
    (starting would restore, then consume, the saved memory state: a later destroy would
    lose it), VirtError with libvirt's reason when QEMU cannot start (e.g. a missing
    network or host device), NotFound for an unknown domain.
    """
    dom = await conn.lookup(name)
    if bool(await conn.call(dom.isActive)):
        raise Conflict(f"domain {name} is already running")
    if bool(await conn.call(dom.hasManagedSaveImage, 0)):
        raise Conflict(
            f"domain {name} has a managed save image: starting it would consume its saved state"
        )
    await conn.call(dom.createWithFlags, libvirt.VIR_DOMAIN_START_PAUSED, timeout=120)
    state, _reason = await conn.call(dom.state, 0)
    return _info(dom, int(state))


async def destroy_if_paused(conn: Connection, name: str) -> bool:
    """Power off the domain (``virDomainDestroy``) only if it is paused; returns whether it
    was. A domain that someone resumed (or that stopped) is left as it is. Quiet for an
    unknown domain (returns False)."""
    try:
        dom = await conn.lookup(name)
        state, _reason = await conn.call(dom.state, 0)
        if int(state) != libvirt.VIR_DOMAIN_PAUSED:
            return False
        await conn.call(dom.destroy, timeout=60)
    except NotFound:
        return False
    except Conflict:  # stopped between the look and the destroy
        return False
    return True


async def eject_cdrom(conn: Connection, name: str, target: str | None = None) -> list[str]:
    """Remove the medium from the domain's CD-ROM drives (or only ``target``, e.g. ``sda``).

    Changes the running domain and its persistent definition alike (forced eject, even if
    the guest locked the tray). Returns the targets that had a medium; idempotent (an empty
    drive is skipped). NotFound when ``target`` is given and is not a CD-ROM drive.
    """
    dom = await conn.lookup(name)
    active = bool(await conn.call(dom.isActive))
    persistent = bool(await conn.call(dom.isPersistent))
    xml = str(await conn.call(dom.XMLDesc, 0))
    root = _xml.parse(xml)
    drives = [
        d
        for d in root.findall("./devices/disk[@device='cdrom']")
        if target is None or _target_dev(d) == target
    ]
    if target is not None and not drives:
        raise NotFound(f"domain {name} has no CD-ROM drive {target}")
    flags = libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE
    if active:
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if persistent:
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    ejected: list[str] = []
    for drive in drives:
        source = drive.find("source")
        if source is None or not any(source.get(a) for a in ("file", "dev", "name", "volume")):
            continue  # empty drive (a live XML may keep a bare <source index=.../>)
        drive.remove(source)
        for chain in drive.findall("backingStore"):
            drive.remove(chain)
        await conn.call(dom.updateDeviceFlags, _xml.dump(drive), flags)
        ejected.append(_target_dev(drive))
    return ejected


def _target_dev(disk: ET.Element) -> str:
    target = disk.find("target")
    return target.get("dev", "") if target is not None else ""
