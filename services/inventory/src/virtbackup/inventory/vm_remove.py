"""``vb.cmd.inventory.vm-remove``: a migrated VM's source removed (``remove_source``).

Asked by the migration that moved the VM, once it runs on (or is defined on) the target:
the shut-off source domain is undefined with its checkpoint, snapshot and managed-save
metadata, its NVRAM file and its TPM state; with ``remove_disks``, its disk images are
deleted after that. Only what is the VM's alone is deleted: a disk of ``type='block'``
(an LVM volume, a partition), a network disk, a read-only or shareable one, or an image
another domain of the server names (as a disk or in its backing chain, read from its
images with ``qemu-img info --backing-chain``: a shut-off domain's XML shows none), also
through a symbolic link (paths are compared resolved on the host), is kept and said so;
backing files below an image are never touched, and each one below the VM's own images
(read from them the same way) is listed as kept, with why. An image that is a volume of
a libvirt storage pool is deleted through the pool (the pool then knows), any other with
``rm`` on the server's host.
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET

import msgspec
from nats.js.errors import KeyNotFoundError

from virtbackup.contracts import buckets
from virtbackup.contracts.buckets import vm_lock_key
from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import VmRemoved, VmRemoveRequest
from virtbackup.inventory.handlers import libvirt_errors
from virtbackup.inventory.inventory import Inventory
from virtbackup.runtime.errors import Conflict, Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.virt import Connection, list_domains
from virtbackup.virt.domains import PowerState, domain_xml, get_domain, undefine_domain
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host
from virtbackup.virt.placement import resolve

log = logging.getLogger(__name__)


class _Lock(msgspec.Struct, rename="camel"):
    job_id: str


def _parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - libvirt's own XML of a domain


def _sources(xml: str) -> set[str]:
    """Every file or device a domain's disks name, their backing chains included."""
    found: set[str] = set()
    for source in _parse(xml).iter("source"):
        for attr in ("file", "dev"):
            if value := source.get(attr):
                found.add(value)
    return found


async def _used_elsewhere(conn: Connection, vm_name: str) -> dict[str, str]:
    """Path -> the name of another domain of the server that names it."""
    used: dict[str, str] = {}
    for dom in await list_domains(conn):
        if dom.name == vm_name:
            continue
        with contextlib.suppress(VirtNotFound):
            for inactive in (True, False):
                for path in _sources(await domain_xml(conn, dom.name, inactive=inactive)):
                    used.setdefault(path, dom.name)
    return used


#: Prints the backing chain of image ``$1`` as JSON (nothing when it does not exist: a
#: domain's image removed meanwhile backs nothing).
_CHAIN_SCRIPT = (
    'test -e "$1" || exit 0; exec qemu-img info -U --backing-chain --output=json -- "$1"'
)


async def _backing_files(host: Host, image: str) -> list[str] | None:
    """The backing files below ``image`` (absolute paths, nearest first), read from the
    image; ``None`` when its chain cannot be read."""
    done = await host.run(["sh", "-c", _CHAIN_SCRIPT, "sh", image], timeout=60)
    if done.returncode != 0:
        return None
    try:
        chain = msgspec.json.decode(done.stdout or "[]", type=list[dict[str, object]])
    except msgspec.DecodeError:
        return None
    found: list[str] = []
    for layer in chain:
        for key in ("full-backing-filename", "backing-filename"):
            backing = layer.get(key)
            if isinstance(backing, str) and backing.startswith("/") and backing not in found:
                found.append(backing)
    return found


async def _backing_chains(host: Host, used: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``(path -> domain, unreadable)``: the backing files below the images of ``used``
    (path -> the domain naming it), read from the images: the XML of a shut-off domain
    does not show its images' backing chains. ``unreadable``: images whose chain could
    not be read (their backing files are unknown)."""
    below: dict[str, str] = {}
    unreadable: list[str] = []
    for path, owner in sorted(used.items()):
        if not path.startswith("/"):
            continue
        chain = await _backing_files(host, path)
        if chain is None:
            unreadable.append(f"{path} (vm {owner})")
            continue
        for backing in chain:
            below.setdefault(backing, owner)
    return below, unreadable


async def _volume(conn: Connection, disk: ET.Element, path: str | None) -> object | None:
    """The storage volume of a disk (``type='volume'``, or an image a pool holds)."""
    source = disk.find("source")
    try:
        if disk.get("type") == "volume" and source is not None:
            pool = await conn.call(conn.raw.storagePoolLookupByName, source.get("pool", ""))
            return await conn.call(pool.storageVolLookupByName, source.get("volume", ""))
        if path:
            return await conn.call(conn.raw.storageVolLookupByPath, path)
    except VirtError:
        return None
    return None


async def _plan(
    conn: Connection, host: Host, vm_name: str, xml: str
) -> tuple[list[tuple[str, object | None]], list[str]]:
    """``(images to delete with their volume if any, disks kept with why)``."""
    used = await _used_elsewhere(conn, vm_name)
    below, unreadable = await _backing_chains(host, used)
    for backing, owner in below.items():
        used.setdefault(backing, owner)
    # Compared as the files they are: another domain may name this VM's image through a
    # symbolic link (as its disk, or as the backing file of its image).
    real = await resolve(host, [p for p in used if p.startswith("/")])
    for named, named_real in real.items():
        used.setdefault(named_real, used[named])
    delete: list[tuple[str, object | None]] = []
    kept: list[str] = []
    backing_kept: dict[str, str] = {}  # a backing file of the VM's images -> the image
    for disk in _parse(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue  # CD-ROMs, floppies, LUNs: media and devices, not the VM's images
        kind = disk.get("type", "file")
        source = disk.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        name = path or (source.get("volume") if source is not None else None) or "?"
        if kind == "block":
            kept.append(f"{name}: a block device (LVM volume, partition): never deleted")
            continue
        if kind not in ("file", "volume") or source is None:
            kept.append(f"{name}: a {kind} disk: not an image of this server")
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            kept.append(f"{name}: read-only or shareable: other VMs may use it")
            continue
        volume = await _volume(conn, disk, path)
        if volume is not None and path is None:
            path = str(await conn.call(volume.path))  # type: ignore[attr-defined]
        if not path:
            kept.append(f"{name}: its path cannot be found")
            continue
        for backing in await _backing_files(host, path) or []:
            backing_kept.setdefault(backing, path)
        real_path = (await resolve(host, [path]))[path]
        if path in used or real_path in used:
            kept.append(f"{path}: vm {used.get(path) or used[real_path]} uses it too")
            continue
        if unreadable:
            kept.append(
                f"{path}: the backing chain of {', '.join(unreadable)} could not be read: "
                "it may be built on this image"
            )
            continue
        delete.append((path, volume))
    # Below the VM's images: never deleted, even when it is another disk of the VM.
    delete = [(path, volume) for path, volume in delete if path not in backing_kept]
    listed = {entry.split(": ", 1)[0] for entry in kept}
    for backing, image in backing_kept.items():
        if backing not in listed:
            kept.append(f"{backing}: the backing file of {image}: backing files are never deleted")
    return delete, kept


def register_vm_remove(ctx: ServiceContext, inv: Inventory) -> None:
    @ctx.bus.handle(InventoryCmd.VM_REMOVE, VmRemoveRequest)
    async def vm_remove(req: VmRemoveRequest) -> VmRemoved:
        """See ``VmRemoveRequest``: 404 for an unknown VM, 409 when it is not shut off,
        not held by the job or not the domain of ``uuid``, 503 when the server cannot be
        reached. Nothing is deleted unless the undefine succeeded."""
        entry = await inv.entry_fresh(req.server_id)
        conn = await entry.host.connection()
        async with (
            inv.vm_lock(req.server_id, req.vm_name),
            libvirt_errors(req.server_id, req.vm_name),
        ):
            dom = await get_domain(conn, req.vm_name)
            if req.uuid and dom.uuid != req.uuid:
                raise Conflict(f"vm {req.vm_name} is not the migrated domain (uuid {dom.uuid})")
            if dom.power_state != PowerState.SHUTOFF:
                raise Conflict(f"vm {req.vm_name} is {dom.power_state}: only a shut-off VM")
            await _check_held(ctx, req)
            xml = await domain_xml(conn, req.vm_name, inactive=True)
            host = await entry.host.host() if req.remove_disks else None
            delete: list[tuple[str, object | None]] = []
            kept: list[str] = []
            if host is not None:
                delete, kept = await _plan(conn, host, req.vm_name, xml)
            await undefine_domain(conn, req.vm_name, remove_tpm=True)
        log.info("undefined vm %s on server %s (job %s)", req.vm_name, req.server_id, req.job_id)
        removed: list[str] = []
        for path, volume in delete:
            try:
                if volume is not None:
                    await conn.call(volume.delete, 0)  # type: ignore[attr-defined]
                else:
                    assert host is not None
                    done = await host.run(["rm", "-f", "--", path], timeout=60)
                    if done.returncode != 0:
                        raise VirtError(done.stderr.strip() or f"rm exited {done.returncode}")
            except (VirtError, Unavailable, OSError) as exc:
                kept.append(f"{path}: could not be deleted: {exc}")
                continue
            removed.append(path)
        with contextlib.suppress(Unavailable, VirtError):
            await inv.refresh_vm(req.server_id, req.vm_name)
        return VmRemoved(removed=removed, kept=kept)


async def _check_held(ctx: ServiceContext, req: VmRemoveRequest) -> None:
    """``Conflict`` unless the VM's lock in ``VB_LOCKS`` names ``req.job_id``."""
    try:
        entry = await ctx.bucket(buckets.LOCKS).get(vm_lock_key(req.server_id, req.vm_name))
    except KeyNotFoundError:
        entry = None
    holder = ""
    if entry is not None and entry.value:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            holder = msgspec.json.decode(entry.value, type=_Lock).job_id
    if holder != req.job_id:
        raise Conflict(
            f"vm {req.vm_name} is not held by job {req.job_id}: only the migration that "
            "moved it removes it"
        )
