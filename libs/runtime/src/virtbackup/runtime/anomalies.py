"""Anomalies and definition drift, shared by the gateway (what remote agents post) and
the job-orchestrator (its checks after each backup): ``VB_ANOMALIES``.

* :func:`summarize` reads a domain XML into a :class:`DomainDefinition`; :func:`drift`
  lists what changed between two (one sentence per change: a disk added, removed,
  resized or of another format; memory, vCPUs, firmware or NICs changed).
* :func:`size_verdict` is the size rule: a full backup whose read size is below
  :data:`SIZE_LOW` (50%) or above :data:`SIZE_HIGH` (200%) of the median of the last
  :data:`SIZE_HISTORY` (5) full backups of that VM into that destination, when at least
  :data:`SIZE_MIN_HISTORY` (3) exist.
* :func:`record` stores an anomaly (``anomaly.<id>``) and announces it
  (``anomaly.raised``; a ``schema_drift`` also as ``vm.definition_drift``).
"""

from __future__ import annotations

import base64
import statistics
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Final

import msgspec
from nats.js.kv import KeyValue

from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.anomalies import Anomaly, DefinitionDisk, DomainDefinition
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.clock import utcnow_iso

#: The size rule (see the module): fractions of the median, and how many fulls count.
SIZE_LOW: Final = 0.5
SIZE_HIGH: Final = 2.0
SIZE_HISTORY: Final = 5
SIZE_MIN_HISTORY: Final = 3
#: Largest domain XML read (bytes): a domain's definition is a few KiB.
XML_MAX: Final = 1 << 20

_UNITS: Final = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


def _kib(elem: ET.Element | None) -> int:
    if elem is None or not (elem.text or "").strip():
        return 0
    unit = _UNITS.get((elem.get("unit") or "KiB").lower(), 1024)
    try:
        return int(elem.text or "0") * unit // 1024
    except ValueError:
        return 0


def summarize(xml: str) -> DomainDefinition:
    """The definition of a domain XML (sizes of disks are not in it: 0). ``ValueError``
    for text that is not a domain's XML (or longer than :data:`XML_MAX`)."""
    if len(xml) > XML_MAX:
        raise ValueError(f"the domain XML is longer than {XML_MAX} bytes")
    try:
        root = ET.fromstring(xml)  # noqa: S314 (expat refuses entity expansion bombs)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from None
    if root.tag != "domain":
        raise ValueError(f"not a domain's XML (root element <{root.tag}>)")
    disks = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = disk.find("driver")
        disks.append(
            DefinitionDisk(
                target=str(target.get("dev")),
                format=(driver.get("type") or "") if driver is not None else "",
                device=disk.get("device") or "disk",
            )
        )
    vcpu = root.find("vcpu")
    try:
        vcpus = int((vcpu.text or "0").strip()) if vcpu is not None else 0
    except ValueError:
        vcpus = 0
    os_elem = root.find("os")
    firmware = (os_elem.get("firmware") or "") if os_elem is not None else ""
    if not firmware and root.find("./os/loader") is not None:
        firmware = "efi"
    nics = []
    for nic in root.findall("./devices/interface"):
        mac = nic.find("mac")
        model = nic.find("model")
        nics.append(
            (mac.get("address") or "")
            if mac is not None
            else ((model.get("type") or "") if model is not None else nic.get("type") or "")
        )
    return DomainDefinition(
        disks=sorted(disks, key=lambda d: d.target),
        memory_kib=_kib(root.find("memory")),
        vcpus=vcpus,
        firmware=firmware or "bios",
        nics=sorted(nics),
    )


def with_sizes(definition: DomainDefinition, sizes: dict[str, int]) -> DomainDefinition:
    """``definition`` with the disks' sizes (bytes by target) filled in where known."""
    disks = [msgspec.structs.replace(d, size=sizes.get(d.target, d.size)) for d in definition.disks]
    return msgspec.structs.replace(definition, disks=disks)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


def drift(old: DomainDefinition, new: DomainDefinition) -> list[str]:
    """What changed from ``old`` to ``new``, one sentence each (``[]``: nothing that
    counts). Sizes and formats are compared only where both sides know them; CD-ROMs
    and floppies count as disks for added and removed only."""
    changes = []
    before = {d.target: d for d in old.disks}
    after = {d.target: d for d in new.disks}
    for target in sorted(after.keys() - before.keys()):
        disk = after[target]
        size = f" ({_size(disk.size)})" if disk.size else ""
        changes.append(f"disk {target} added{size}")
    for target in sorted(before.keys() - after.keys()):
        changes.append(f"disk {target} removed")
    for target in sorted(before.keys() & after.keys()):
        was, now = before[target], after[target]
        if was.size and now.size and was.size != now.size:
            changes.append(f"disk {target} resized from {_size(was.size)} to {_size(now.size)}")
        if was.format and now.format and was.format != now.format:
            changes.append(f"disk {target} format changed from {was.format} to {now.format}")
    if old.memory_kib and new.memory_kib and old.memory_kib != new.memory_kib:
        changes.append(
            f"memory changed from {old.memory_kib // 1024} MiB to {new.memory_kib // 1024} MiB"
        )
    if old.vcpus and new.vcpus and old.vcpus != new.vcpus:
        changes.append(f"vCPUs changed from {old.vcpus} to {new.vcpus}")
    if old.firmware and new.firmware and old.firmware != new.firmware:
        changes.append(f"firmware changed from {old.firmware} to {new.firmware}")
    if old.nics != new.nics:
        changes.append(f"network interfaces changed from {len(old.nics)} to {len(new.nics)}")
    return changes


def size_verdict(size: int, history: Sequence[int]) -> tuple[str, float] | None:
    """``("smaller" | "larger", median)`` when ``size`` (a full backup's read bytes)
    breaks the size rule against ``history`` (earlier fulls' read bytes, oldest first;
    the last :data:`SIZE_HISTORY` count), else ``None`` (also with too little history)."""
    recent = [h for h in history if h > 0][-SIZE_HISTORY:]
    if len(recent) < SIZE_MIN_HISTORY:
        return None
    median = float(statistics.median(recent))
    if size < SIZE_LOW * median:
        return "smaller", median
    if size > SIZE_HIGH * median:
        return "larger", median
    return None


def definition_key(server_id: str, vm_name: str) -> str:
    """``def.<server>.<vm>``: each part base64url without padding (any name is a key)."""

    def enc(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") or "_"

    return f"def.{enc(server_id)}.{enc(vm_name)}"


def new_id() -> str:
    return str(uuid.uuid4())


async def record(bus: Bus, kv: KeyValue, anomaly: Anomaly) -> Anomaly:
    """Store ``anomaly`` (its ``id`` and ``created_at`` filled in when empty) and publish
    ``anomaly.raised`` (and ``vm.definition_drift`` for a ``schema_drift``); returns it."""
    anomaly = msgspec.structs.replace(
        anomaly, id=anomaly.id or new_id(), created_at=anomaly.created_at or utcnow_iso()
    )
    await kv.put(f"anomaly.{anomaly.id}", msgspec.json.encode(anomaly))
    await bus.publish_event(EventType.ANOMALY_RAISED, anomaly, key=anomaly.id)
    if anomaly.type == "schema_drift":
        await bus.publish_event(EventType.VM_DEFINITION_DRIFT, anomaly, key=anomaly.id)
    return anomaly
