"""Anomalies and domain definitions (``VB_ANOMALIES``), as backupagent-api.md's
``anomaly`` and ``schema-snapshot`` routes and VirtBackup's own checks after a backup
record them.

An anomaly is stored as ``anomaly.<id>`` and announced as an ``anomaly.raised`` event
(payload: the record); a definition drift is an anomaly of type ``schema_drift`` and is
also announced as ``vm.definition_drift`` (payload: the record, its ``changes`` listing
what changed). A VM's definition is kept in a small summary (:class:`DomainDefinition`)
read from its domain XML: what a drift is judged on.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from virtbackup.contracts.v1.common import Message

AnomalyType = Literal["size_anomaly", "schema_drift", "restore_failure"]
Severity = Literal["info", "warning", "critical"]


class DefinitionDisk(Message, frozen=True, kw_only=True):
    """A disk of a domain: its target (``vda``), capacity in bytes when known (0: not
    known), image format (``qcow2``, ``raw``; ``""``: not known) and device
    (``disk``, ``cdrom``...)."""

    target: str
    size: int = 0
    format: str = ""
    device: str = "disk"


class DomainDefinition(Message, frozen=True, kw_only=True):
    """What a drift compares: disks, memory in KiB, vCPUs, firmware (``bios``,
    ``efi``), NICs (their MAC addresses, or models when no MAC is given)."""

    disks: list[DefinitionDisk] = msgspec.field(default_factory=list)
    memory_kib: int = 0
    vcpus: int = 0
    firmware: str = ""
    nics: list[str] = msgspec.field(default_factory=list)


class DefinitionRecord(Message, frozen=True, kw_only=True):
    """``def.<server>.<vm>``: the definition of the VM's last backup (its restore point
    ``timestamp`` in ``destination_id``, by ``job_id``)."""

    server_id: str
    vm_name: str
    definition: DomainDefinition
    destination_id: str = ""
    timestamp: str = ""
    job_id: str = ""
    recorded_at: str = ""


class Anomaly(Message, frozen=True, kw_only=True):
    """``anomaly.<id>``: who raised it (``source``: ``agent`` with ``agent_id``, or
    ``virtbackup``), about what (VM, job, destination when known), and for a drift the
    list of ``changes`` (one sentence each); ``details``: numbers behind it (sizes in
    bytes, the median, the rule)."""

    id: str
    type: AnomalyType
    severity: Severity
    title: str
    description: str = ""
    source: Literal["agent", "virtbackup"] = "virtbackup"
    agent_id: str | None = None
    server_id: str | None = None
    vm_name: str | None = None
    job_id: str | None = None
    destination_id: str | None = None
    changes: list[str] = msgspec.field(default_factory=list)
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: str = ""
