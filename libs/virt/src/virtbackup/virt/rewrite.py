"""Rewriting a saved domain XML for a restore: another name, other disk locations.

A restore defines the domain from the XML saved with the restore point. Written back
in place it needs no change; restored somewhere else it does, and this module makes
exactly the changes libvirt needs and no others:

* a new name (:func:`rewrite_domain` with ``name`` other than the saved one): ``<name>``
  set, ``<uuid>`` replaced by the one given (or dropped: libvirt makes one; an SMBIOS
  ``uuid`` entry of ``<sysinfo>`` that would contradict it goes too; a restore keeps
  the UUID of a domain it replaces, see :func:`restored_domain`), every interface's ``<mac>``
  replaced by a new random locally administered address (QEMU's ``52:54:00`` prefix),
  and the ``<nvram>`` file renamed after the new name, so that the copy and the
  original never share a file;
* a disk restored elsewhere, or as another kind (:class:`DiskPlacement`): its ``type``
  (``file`` or ``block``), its ``<source file|dev>`` and its driver ``type`` (the image
  format) set, and any ``<backingStore>`` dropped (a restored image is flat).

Disks without a placement (CD-ROMs, read-only disks) are left as they are. Pure
functions: no libvirt call, no I/O.
"""

from __future__ import annotations

import posixpath
import random
import re
import secrets
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from virtbackup.virt import _xml

DiskKind = Literal["file", "block"]

#: QEMU's prefix for generated MAC addresses (locally administered, unicast).
MAC_PREFIX = "52:54:00"
#: File name extensions of restored images by format (a block device restored into a
#: directory is named ``<vm>-<target><ext>``).
EXTENSIONS = {"qcow2": ".qcow2", "raw": ".img"}


@dataclass(frozen=True, slots=True)
class DiskPlacement:
    """Where disk ``target`` (``vda``) is restored: ``path`` is a file (``kind='file'``)
    or a block device written in place (``kind='block'``), holding an image of
    ``format`` (``raw``, ``qcow2``)."""

    target: str
    path: str
    kind: DiskKind
    format: str


def domain_name(xml: str) -> str:
    """The ``<name>`` of a domain XML (empty if it has none)."""
    return (_xml.parse(xml).findtext("name") or "").strip()


def renamed_file(basename: str, old_name: str, new_name: str) -> str:
    """A disk's file name for the VM's copy ``new_name``: the old name replaced where the
    file name contains it as a word (``web1-vda.qcow2`` -> ``web2-vda.qcow2``, once),
    else the new name put in front (``disk0.img`` -> ``web2-disk0.img``). Never
    ``basename`` itself when the names differ, so a copy's disk never lands on the
    original's file."""
    if old_name == new_name:
        return basename
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(old_name)}(?![A-Za-z0-9])")
    if old_name and word.search(basename):
        return word.sub(lambda _: new_name, basename, count=1)
    return f"{new_name}-{basename}"


def device_file(vm_name: str, target: str, fmt: str) -> str:
    """The file name of a block device's disk restored into a directory."""
    return f"{vm_name}-{target}{EXTENSIONS.get(fmt, '.' + fmt)}"


def random_mac(rng: random.Random | None = None) -> str:
    """A new MAC address with QEMU's prefix (``52:54:00:xx:xx:xx``)."""
    tail = rng.randbytes(3) if rng is not None else secrets.token_bytes(3)
    return MAC_PREFIX + "".join(f":{b:02x}" for b in tail)


def rewrite_domain(
    xml: str,
    *,
    name: str,
    disks: Iterable[DiskPlacement] = (),
    rng: random.Random | None = None,
    uuid: str | None = None,
) -> str:
    """``xml`` defining domain ``name`` with its disks at ``disks`` (see the module
    docstring). With the saved name and the saved disk locations the domain is
    unchanged. ``rng`` makes the new MAC addresses reproducible; by default they come
    from :mod:`secrets`. ``uuid`` is a renamed domain's new UUID (``None``: libvirt
    makes one). Raises ``ValueError`` for an XML without a name."""
    root = _xml.parse(xml)
    name_el = root.find("name")
    if name_el is None or not (name_el.text or "").strip():
        raise ValueError("the domain XML has no <name>")
    old_name = (name_el.text or "").strip()
    if name != old_name:
        _rename(root, old_name, name, rng, uuid)
    by_target = {d.target: d for d in disks}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        placement = by_target.get(target.get("dev", "") if target is not None else "")
        if placement is not None:
            _place(disk, placement)
    return _xml.dump(root)


def _rename(
    root: ET.Element,
    old_name: str,
    new_name: str,
    rng: random.Random | None,
    new_uuid: str | None,
) -> None:
    name_el = root.find("name")
    assert name_el is not None
    name_el.text = new_name
    _set_uuid(root, new_uuid)
    used = {m.get("address", "").lower() for m in root.findall("./devices/interface/mac")}
    for interface in root.findall("./devices/interface"):
        mac = interface.find("mac")
        if mac is None:
            continue  # libvirt makes one
        address = random_mac(rng)
        while address in used:
            address = random_mac(rng)
        used.add(address)
        mac.set("address", address)
    nvram = root.find("./os/nvram")
    if nvram is not None:
        _rename_nvram(nvram, old_name, new_name)


def restored_domain(
    xml: str,
    *,
    name: str,
    job_id: str,
    disks: Iterable[DiskPlacement] = (),
    uuid: str | None = None,
    nvram_dir: str | None = None,
) -> str:
    """:func:`rewrite_domain` for restore job ``job_id``: the same XML every time it is
    asked for the same job and ``uuid``, so that the state files staged early in the job
    (the TPM state lives under the UUID, the NVRAM under the name) land where the domain
    defined at its commit, or at a commit repeated by another orchestrator replica, looks
    for them.

    The UUID: ``uuid`` when given (the domain the restore replaces keeps its own, so that
    its TPM state is the one replaced), else the saved one under the saved name, else
    one derived from the job id (a new domain). MAC addresses of a renamed domain are
    derived from the job id. Raises ``ValueError`` for an XML without a name or a
    malformed ``uuid``.

    ``nvram_dir``: libvirt's NVRAM directory on the target (``/var/lib/libvirt/qemu/nvram``
    for the system daemon, ``<home>/.config/libvirt/qemu/nvram`` for a user's session
    daemon). A variable store saved in libvirt's NVRAM directory of another kind of
    daemon (a system VM restored or migrated to a session host, or back) is placed in
    ``nvram_dir`` under its name: the target's daemon cannot, or should not, write there.
    A store anywhere else stays where it was."""
    identity = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"virtbackup:restore:{job_id}")
    rng = random.Random(identity.int)  # noqa: S311 - MAC addresses are no secret
    new_uuid = str(uuidlib.UUID(uuid)) if uuid else str(identity)
    out = rewrite_domain(xml, name=name, disks=disks, rng=rng, uuid=new_uuid)
    moved = nvram_dir is not None and _nvram_moved(_xml.parse(out), nvram_dir)
    if (uuid and domain_uuid(out) != new_uuid) or moved:
        root = _xml.parse(out)
        if uuid and domain_uuid(out) != new_uuid:
            # The saved name, but the domain of that name on the host has another UUID.
            _set_uuid(root, new_uuid)
        if nvram_dir is not None:
            _nvram_moved(root, nvram_dir)
        out = _xml.dump(root)
    return out


#: libvirt's NVRAM directories: the system daemon's, and a session daemon's below a home.
_SYSTEM_NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
_SESSION_NVRAM_SUFFIX = "/.config/libvirt/qemu/nvram"


def _nvram_moved(root: ET.Element, nvram_dir: str) -> bool:
    """Place the domain's variable store in ``nvram_dir`` when it is in libvirt's NVRAM
    directory of another daemon (see :func:`restored_domain`); whether it was moved."""
    nvram = root.find("./os/nvram")
    if nvram is None:
        return False
    source = nvram.find("source")
    path = source.get("file", "") if source is not None else (nvram.text or "").strip()
    directory, base = posixpath.split(path)
    target = posixpath.normpath(nvram_dir)
    libvirts = directory == _SYSTEM_NVRAM_DIR or directory.endswith(_SESSION_NVRAM_SUFFIX)
    if not path or not libvirts or directory == target:
        return False
    if source is not None:
        source.set("file", posixpath.join(target, base))
    else:
        nvram.text = posixpath.join(target, base)
    return True


def domain_uuid(xml: str) -> str:
    """The ``<uuid>`` of a domain XML, normalised (empty if it has none)."""
    text = (_xml.parse(xml).findtext("uuid") or "").strip()
    try:
        return str(uuidlib.UUID(text)) if text else ""
    except ValueError:
        return text


def _set_uuid(root: ET.Element, new_uuid: str | None) -> None:
    """Replace the domain's ``<uuid>`` (``None``: drop it, libvirt makes one) and drop an
    SMBIOS ``uuid`` entry of ``<sysinfo>`` that would contradict it."""
    name_el = root.find("name")
    assert name_el is not None
    for old in root.findall("uuid"):
        root.remove(old)
    if new_uuid is not None:
        # Right after <name>, where libvirt writes it.
        uuid_el = ET.Element("uuid")
        uuid_el.text = new_uuid
        uuid_el.tail = name_el.tail
        root.insert(list(root).index(name_el) + 1, uuid_el)
    for system in root.findall("./sysinfo/system"):
        for entry in system.findall("entry"):
            if entry.get("name") == "uuid":
                system.remove(entry)


def _rename_nvram(nvram: ET.Element, old_name: str, new_name: str) -> None:
    """Rename the variable store, written either as the element's text (the usual form)
    or as ``<nvram type='file'><source file=.../></nvram>``."""
    source = nvram.find("source")
    if source is not None and source.get("file"):
        source.set("file", _renamed_path(source.get("file", ""), old_name, new_name))
    elif (nvram.text or "").strip():
        nvram.text = _renamed_path((nvram.text or "").strip(), old_name, new_name)


def _renamed_path(path: str, old_name: str, new_name: str) -> str:
    directory, base = posixpath.split(path)
    return posixpath.join(directory, renamed_file(base, old_name, new_name))


def _place(disk: ET.Element, placement: DiskPlacement) -> None:
    driver = disk.find("driver")
    source = disk.find("source")
    current_path = None
    if source is not None:
        current_path = source.get("dev") if disk.get("type") == "block" else source.get("file")
    current_format = driver.get("type") if driver is not None else None
    if (
        disk.get("type", "file") == placement.kind
        and current_path == placement.path
        and current_format == placement.format
    ):
        return  # written back where and as it was
    disk.set("type", placement.kind)
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", placement.format)
    if source is None:
        source = ET.SubElement(disk, "source")
    for attr in ("file", "dev", "pool", "volume", "name", "protocol", "index", "mode"):
        source.attrib.pop(attr, None)
    source.set("file" if placement.kind == "file" else "dev", placement.path)
    for child in list(source):
        if child.tag in ("host", "auth"):
            source.remove(child)
    for backing in disk.findall("backingStore"):
        disk.remove(backing)
