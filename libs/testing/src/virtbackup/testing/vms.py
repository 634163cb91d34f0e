"""Small VMs on the real libvirtd for tests: create, write as the guest, reach into QEMU.

Importable from any package's tests (no pytest import here). Needs root for QEMU to open
the images, and a running libvirtd (:func:`virtbackup.testing.libvirtd.ensure_libvirtd`).
Typical use::

    ensure_libvirtd()
    directory = vm_directory()
    async with await open_connection() as conn:
        vm = await create_vm(conn, "t-backup", directory, [64 * MiB, 32 * MiB])
        await guest_write(conn, vm.name, "vda", 0, 4 * MiB, pattern=0xAB)
        ...
        await remove_vm(conn, vm.name)

VMs have no operating system: SeaBIOS finds nothing to boot and idles, which is enough
for pull-mode backups, checkpoints and monitor writes. Such a guest ignores ACPI
(``shutdown``/``reboot`` requests do nothing). The domain type is ``kvm`` when QEMU can
open ``/dev/kvm``, else ``qemu`` (TCG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from virtbackup.testing.images import create_image
from virtbackup.testing.libvirtd import domain_type
from virtbackup.virt import Conflict, Connection, NotFound, VirtError, WatchEvent, domain_xml

__all__ = [
    "MiB",
    "SmallVm",
    "build_uefi_vm_xml",
    "build_vm_xml",
    "create_uefi_vm",
    "create_vm",
    "disk_target",
    "drop_bitmap",
    "guest_write",
    "monitor_hmp",
    "monitor_qmp",
    "remove_vm",
    "vm_directory",
    "wait_for_event",
]

MiB: Final = 1024 * 1024


def _live_xml(text: str) -> ET.Element:
    """Parse a domain XML from libvirtd (a trusted peer, root on this machine)."""
    return ET.fromstring(text)  # noqa: S314 - trusted input


def vm_directory(
    base: str | Path = "/var/tmp",  # noqa: S108 - mkdtemp below makes a private name
    prefix: str = "vbtest-",
) -> Path:
    """A new directory for images and scratch files that QEMU (not root) can traverse.

    pytest's ``tmp_path`` is under a 0700 directory, which QEMU cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


@dataclass(frozen=True, slots=True)
class SmallVm:
    """A VM made by :func:`create_vm`: ``disks[i]`` is the image of target ``vd<a+i>``."""

    name: str
    directory: Path
    disks: tuple[Path, ...]
    cdrom: Path | None = None
    targets: tuple[str, ...] = field(default=())
    #: The UEFI variable store of a VM from :func:`create_uefi_vm`.
    nvram: Path | None = None


def disk_target(index: int) -> str:
    """``vda``, ``vdb``, ... for disk ``index``."""
    return "vd" + chr(ord("a") + index)


def build_vm_xml(
    name: str,
    disks: Sequence[Path],
    *,
    memory_mib: int = 64,
    virt_type: str | None = None,
    cdrom: Path | None = None,
    formats: Sequence[str] | None = None,
    user_aliases: bool = False,
) -> str:
    """Domain XML for a small OS-less VM: virtio disks ``vda``... on ``disks``, an optional
    SATA CD-ROM ``sda`` with ``cdrom`` inserted, no network, graphics, USB or balloon.
    ``user_aliases`` names the disk devices ``ua-disk-vda``... instead of libvirt's
    ``virtio-disk0``..."""
    root = ET.Element("domain", type=virt_type or domain_type())
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(root, "vcpu").text = "1"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    for index, path in enumerate(disks):
        fmt = formats[index] if formats is not None else "qcow2"
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=disk_target(index), bus="virtio")
        if user_aliases:
            ET.SubElement(disk, "alias", name=f"ua-disk-{disk_target(index)}")
    if cdrom is not None:
        drive = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(drive, "driver", name="qemu", type="raw")
        ET.SubElement(drive, "source", file=str(cdrom))
        ET.SubElement(drive, "target", dev="sda", bus="sata")
        ET.SubElement(drive, "readonly")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


async def create_vm(
    conn: Connection,
    name: str,
    directory: Path,
    disk_sizes: Sequence[int],
    *,
    memory_mib: int = 64,
    start: bool = True,
    with_cdrom: bool = False,
    user_aliases: bool = False,
) -> SmallVm:
    """Create qcow2 images ``<name>-vda.qcow2``... of ``disk_sizes`` bytes in
    ``directory``, define the VM (replacing a leftover of the same name) and start it.

    ``with_cdrom`` also inserts a 1 MiB file as a CD-ROM medium (target ``sda``);
    ``user_aliases`` gives the disks ``ua-`` aliases (see :func:`build_vm_xml`).
    """
    await remove_vm(conn, name)
    paths = tuple(
        create_image(directory / f"{name}-{disk_target(i)}.qcow2", size)
        for i, size in enumerate(disk_sizes)
    )
    cdrom: Path | None = None
    if with_cdrom:
        cdrom = directory / f"{name}-cdrom.iso"
        with cdrom.open("wb") as fh:
            fh.truncate(MiB)
        cdrom.chmod(0o644)
    xml = build_vm_xml(name, paths, memory_mib=memory_mib, cdrom=cdrom, user_aliases=user_aliases)
    dom = await conn.call(conn.raw.defineXML, xml)
    if start:
        await conn.call(dom.create, timeout=60)
    return SmallVm(
        name=name,
        directory=directory,
        disks=paths,
        cdrom=cdrom,
        targets=tuple(disk_target(i) for i in range(len(paths))),
    )


@contextlib.asynccontextmanager
async def made_vm(
    conn: Connection,
    name: str,
    disk_sizes: Sequence[int],
    *,
    memory_mib: int = 64,
    with_cdrom: bool = False,
) -> AsyncIterator[SmallVm]:
    """A running VM made by :func:`create_vm` in a new :func:`vm_directory`, removed
    with that directory on exit (a module's VM fixture: ``async with made_vm(...) as vm:
    yield vm``)."""
    directory = vm_directory()
    vm = await create_vm(
        conn, name, directory, disk_sizes, memory_mib=memory_mib, with_cdrom=with_cdrom
    )
    try:
        yield vm
    finally:
        await remove_vm(conn, name, delete_directory=directory)


async def remove_vm(conn: Connection, name: str, *, delete_directory: Path | None = None) -> None:
    """Destroy (if running) and undefine ``name`` with its checkpoint and snapshot
    metadata, NVRAM file and TPM state; quiet when it does not exist.
    ``delete_directory`` is removed afterwards."""
    try:
        dom = await conn.lookup(name)
    except NotFound:
        dom = None
    if dom is not None:
        with contextlib.suppress(Conflict, NotFound):
            await conn.call(dom.abortJob)
        with contextlib.suppress(Conflict, NotFound):
            await conn.call(dom.destroy, timeout=60)
        with contextlib.suppress(NotFound):
            await conn.call(
                dom.undefineFlags,
                libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                | libvirt.VIR_DOMAIN_UNDEFINE_TPM,
            )
    if delete_directory is not None:
        shutil.rmtree(delete_directory, ignore_errors=True)


#: Debian's OVMF (package ``ovmf``): firmware code (read-only, shared) and the template
#: each VM's variable store starts from.
OVMF_CODE: Final = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS: Final = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
NVRAM_DIR: Final = Path("/var/lib/libvirt/qemu/nvram")


def build_uefi_vm_xml(
    name: str,
    disks: Sequence[Path],
    *,
    nvram: Path,
    memory_mib: int = 256,
    virt_type: str = "qemu",
    tpm: bool = True,
) -> str:
    """Domain XML for an OS-less UEFI VM: q35, OVMF as a read-only pflash loader with
    its variable store at ``nvram`` (made from :data:`OVMF_VARS` on the first start),
    an emulated TPM 2.0 (``tpm-crb``, state kept by swtpm) unless ``tpm`` is false, and
    virtio disks ``vda``... on ``disks`` (qcow2). ``virt_type`` is ``qemu`` (TCG) by
    default: nested KVM may stop OVMF with an internal error."""
    root = _live_xml(build_vm_xml(name, disks, memory_mib=memory_mib, virt_type=virt_type))
    os_el = root.find("os")
    assert os_el is not None
    os_type = os_el.find("type")
    assert os_type is not None
    os_type.set("machine", "q35")
    loader = ET.Element("loader", readonly="yes", type="pflash")
    loader.text = str(OVMF_CODE)
    nvram_el = ET.Element("nvram", template=str(OVMF_VARS))
    nvram_el.text = str(nvram)
    os_el.insert(1, loader)
    os_el.insert(2, nvram_el)
    devices = root.find("devices")
    assert devices is not None
    if tpm:
        tpm_el = ET.SubElement(devices, "tpm", model="tpm-crb")
        ET.SubElement(tpm_el, "backend", type="emulator", version="2.0")
    return ET.tostring(root, encoding="unicode")


async def create_uefi_vm(
    conn: Connection,
    name: str,
    directory: Path,
    disk_sizes: Sequence[int],
    *,
    start: bool = True,
    tpm: bool = True,
) -> SmallVm:
    """Like :func:`create_vm`, for a UEFI VM (:func:`build_uefi_vm_xml`) whose variable
    store is ``/var/lib/libvirt/qemu/nvram/<name>_VARS.fd`` (``SmallVm.nvram``); its TPM
    state is libvirt's, ``/var/lib/libvirt/swtpm/<uuid>``. Needs Debian's ``ovmf`` and
    ``swtpm-tools``."""
    await remove_vm(conn, name)
    paths = tuple(
        create_image(directory / f"{name}-{disk_target(i)}.qcow2", size)
        for i, size in enumerate(disk_sizes)
    )
    nvram = NVRAM_DIR / f"{name}_VARS.fd"
    xml = build_uefi_vm_xml(name, paths, nvram=nvram, tpm=tpm)
    dom = await conn.call(conn.raw.defineXML, xml)
    if start:
        await conn.call(dom.create, timeout=60)
    return SmallVm(
        name=name,
        directory=directory,
        disks=paths,
        targets=tuple(disk_target(i) for i in range(len(paths))),
        nvram=nvram,
    )


async def monitor_hmp(conn: Connection, name: str, command: str) -> str:
    """Run a human monitor (HMP) command in the domain's QEMU and return its output.

    Uses libvirt-qemu's unsupported passthrough: libvirt marks the domain ``tainted``.
    For tests only.
    """
    dom = await conn.lookup(name)
    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    return str(await conn.call(libvirt_qemu.qemuMonitorCommand, dom, command, flags))


async def guest_write(
    conn: Connection,
    name: str,
    target: str,
    offset: int,
    length: int,
    *,
    pattern: int = 0xAB,
    flush: bool = True,
) -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` of disk ``target`` as if the
    guest did (through the device, so dirty bitmaps record it).

    Runs ``qemu-io -d /machine/peripheral/<alias>/virtio-backend "write -P ..."`` in the
    monitor; the alias comes from the live XML (``virtio-disk0`` or a ``ua-`` alias).
    ``flush`` then flushes the device, so that ``qemu-img -U`` on the image file sees the
    data and the qcow2 metadata.
    """
    root = _live_xml(await domain_xml(conn, name))
    alias: str | None = None
    bus: str | None = None
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            al = disk.find("alias")
            alias = al.get("name") if al is not None else None
            bus = tgt.get("bus")
    if alias is None:
        raise NotFound(f"domain {name} has no running disk {target}")
    device = f"/machine/peripheral/{alias}" + ("/virtio-backend" if bus == "virtio" else "")
    command = f'qemu-io -d {device} "write -P 0x{pattern:02x} {offset} {length}"'
    output = await monitor_hmp(conn, name, command)
    if flush:
        output += await monitor_hmp(conn, name, f'qemu-io -d {device} "flush"')
    if "error" in output.lower() or "not found" in output.lower():
        raise VirtError(f"guest write failed: {output.strip()}")


async def monitor_qmp(conn: Connection, name: str, command: dict[str, object]) -> object:
    """Run a QMP command in the domain's QEMU and return its ``return`` value (tests only,
    taints the domain like :func:`monitor_hmp`). Raises VirtError on a QMP error."""
    dom = await conn.lookup(name)
    reply = str(await conn.call(libvirt_qemu.qemuMonitorCommand, dom, json.dumps(command), 0))
    data = json.loads(reply)
    if "error" in data:
        raise VirtError(f"QMP {command.get('execute')}: {data['error']}")
    return data.get("return")


async def drop_bitmap(conn: Connection, name: str, target: str, bitmap: str) -> None:
    """Delete dirty bitmap ``bitmap`` of disk ``target`` behind libvirt's back, as a crash
    or a foreign tool would (``block-dirty-bitmap-remove`` on the disk's format node)."""
    root = _live_xml(await domain_xml(conn, name))
    alias = None
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        al = disk.find("alias")
        if tgt is not None and tgt.get("dev") == target and al is not None:
            alias = al.get("name")
    if alias is None:
        raise NotFound(f"domain {name} has no running disk {target}")
    blocks = await monitor_qmp(conn, name, {"execute": "query-block"})
    assert isinstance(blocks, list)
    for block in blocks:
        if alias in str(block.get("qdev", "")) and block.get("inserted"):
            node = block["inserted"]["node-name"]
            await monitor_qmp(
                conn,
                name,
                {
                    "execute": "block-dirty-bitmap-remove",
                    "arguments": {"node": node, "name": bitmap},
                },
            )
            return
    raise NotFound(f"no block node for {target} ({alias})")


async def wait_for_event(
    queue: asyncio.Queue[WatchEvent],
    predicate: Callable[[WatchEvent], bool],
    timeout: float,
) -> WatchEvent:
    """The first event from ``queue`` matching ``predicate`` within ``timeout`` seconds
    (others are discarded); TimeoutError otherwise."""

    async def scan() -> WatchEvent:
        while True:
            item = await queue.get()
            if predicate(item):
                return item

    return await asyncio.wait_for(scan(), timeout)
