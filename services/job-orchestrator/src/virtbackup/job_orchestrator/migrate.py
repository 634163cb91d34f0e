"""Warm migration of a running VM to another libvirt server (job type ``migration``).

Built on the data path of backups and restores; no repository is involved:

1. ``copying``: a pull-mode backup of the running source VM begins with a new
   checkpoint (``BACKUP_BEGIN``, as a full backup); the target server prepares thin
   images of the same sizes and formats (``RESTORE_PRECHECK``/``RESTORE_PREPARE``: the
   placement checks of restores, in ``targetDirectory`` or ``storagePool``) and exports
   them over NBD; ``migrate`` units read the allocated extents of the source export and
   write them to the target export (transfer worker ``migrate_unit``), one disk split
   across workers.
2. ``syncing``: the libvirt job ends keeping its checkpoint, an incremental one begins
   from it, and only the dirty bitmap's extents are copied; again until the last pass's
   dirty bytes divided by its rate is below ``maxDowntimeSeconds`` or ``maxPasses``
   passes were made. ``result.pass`` and ``result.dirtyBytes`` say where it is.
3. ``cutover`` (phase ``committing``: a cancel is refused from here): the source is shut
   down (gracefully for ``shutdownTimeoutSeconds``, then forced if ``forceShutdown``),
   the last delta is copied offline (read from the images' persistent bitmaps of the
   last checkpoint by ``qemu-nbd``, without starting QEMU; where that cannot be, a raw
   disk, the inventory starts the VM paused to read it),
   its state files (NVRAM, TPM state) are staged on the target (``migrate_state``),
   the target images are moved into place and the domain is defined there
   (``RESTORE_FINISH``: new disk paths; ``networkMapping`` applied to its interfaces),
   and started (``starting``) if ``startOnTarget``. The source stays defined, shut off,
   and the migration's checkpoints are dropped; with ``removeSource`` it is undefined
   once the target is confirmed, and with ``removeSourceDisks`` its images are deleted
   (``migrate_source``: a failure there is said, not a failed migration).

The target is ``destination.server_id`` or the configured server that
``destination.libvirt_uri`` names (``migrate_target``).

``result``: ``stage`` (``copying``, ``syncing``, ``cutover``, ``starting``,
``completed``), ``pass``, ``dirtyBytes``, ``passes`` (bytes and seconds of each; the
last one ``offline``, and ``fromBitmaps`` when its delta was read from the bitmaps),
``bytesCopied``, ``downtimeSeconds`` (source shut off -> target running, or defined
when not started), ``cutoverSeconds`` (seconds from the source's stop to: the last
delta's exports begun (``begun``), the last delta copied (``copied``), the state files staged
(``delta``), the domain ``defined``, the target ``running`` (or ``done``), and the
source's offline backup job or bitmap exports ended (``sourceEnded``: in parallel with
the define and start, so not in the downtime)), ``exportDir`` (the bitmap exports'
directory on the source, stopped by whoever ends the job),
``shutdownSeconds`` (from the shutdown request to the source off: not in the downtime)
and ``copySeconds`` (the first pass); with ``removeSource``, ``sourceRemoval``
(``migrate_source.remove_source``).

A cancel or failure before the cut-over ends the libvirt job, drops the migration's
checkpoints and removes the target images; the source keeps running. A failure after
the source stopped starts the source again, and the job's message says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.common import ServerId, VmName, shown
from virtbackup.contracts.v1.inventory import (
    STATE_DIRTY,
    STATE_ZERO,
    BackupBeginRequest,
    BackupBegun,
    BackupEndRequest,
    CheckpointForgetRequest,
    DiskExport,
    DiskList,
    DomainXml,
    Extent,
    NetworkList,
    Ok,
    RestoreDisk,
    RestoreFinishRequest,
    RestorePrecheckRequest,
    RestorePrecheckResult,
    RestorePrepared,
    RestorePrepareRequest,
    RestoreTarget,
    ServerRef,
    VmAction,
    VmActionRequest,
    VmInfo,
    VmRef,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.schedules import JobDefinition, JobSubmitResult, JobTarget
from virtbackup.contracts.v1.state import StagedState
from virtbackup.contracts.v1.work import TransferUnit
from virtbackup.job_orchestrator.backup import end_libvirt_job
from virtbackup.job_orchestrator.errors import JobCanceled, JobFailed, JobLost
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.migrate_source import power_state, remove_source
from virtbackup.job_orchestrator.migrate_state import move_state
from virtbackup.job_orchestrator.migrate_target import resolve_libvirt_uri
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.state_files import state_summary
from virtbackup.runtime import joblog, timeouts
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, ServiceError

log = logging.getLogger(__name__)

#: Bytes of ranges one unit copies at most (a disk is split across workers).
UNIT_BYTES = 16 << 20
DEFAULTS: dict[str, Any] = {
    "maxDowntimeSeconds": 30.0,
    "maxPasses": 5,
    "shutdownTimeoutSeconds": 120.0,
    "forceShutdown": True,
    "startOnTarget": True,
    "removeSource": False,
    "removeSourceDisks": False,
    "replace": False,
}
#: HyperSDK option (snake_case) -> the job's parameter (camelCase), and its type.
OPTIONS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "target_directory": ("targetDirectory", str),
    "storage_pool": ("storagePool", str),
    "vm_name": ("targetVmName", str),
    "max_downtime_seconds": ("maxDowntimeSeconds", (int, float)),
    "max_passes": ("maxPasses", int),
    "shutdown_timeout_seconds": ("shutdownTimeoutSeconds", (int, float)),
    "force_shutdown": ("forceShutdown", bool),
    "start_on_target": ("startOnTarget", bool),
    "remove_source": ("removeSource", bool),
    "remove_source_disks": ("removeSourceDisks", bool),
    "replace": ("replace", bool),
    "network_mapping": ("networkMapping", dict),
    "debug_fault": ("debugFault", str),
}
DESTINATION_FIELDS = frozenset({"type", "server_id", "libvirt_uri"})
#: ``options.debug_fault`` (debug mode only): ``cutover`` fails the job once the source
#: is stopped and the last delta copied; ``remove_source`` asks the source's removal
#: with another UUID (the inventory refuses it: the migration completes, saying so);
#: ``cutover_stall`` waits :data:`STALL_SECONDS` once the last delta is copied (its
#: exports still up), so that a test can stop the orchestrator there; ``start`` fails the
#: start on the target once the VM is defined there.
DEBUG_FAULTS = ("cutover", "remove_source", "cutover_stall", "start")
STALL_SECONDS = 60.0
#: A UUID no domain has (``debug_fault: remove_source``).
NO_UUID = "00000000-0000-0000-0000-000000000000"
#: The longest ``shutdown_timeout_seconds`` accepted: the graceful shutdown is waited for
#: in the cut-over, where a cancel is refused.
MAX_SHUTDOWN_SECONDS = 3600.0
#: Seconds between two looks at the source's power state while it shuts down.
POLL_SECONDS = 0.5


def is_migration(definition: JobDefinition) -> bool:
    return definition.destination.get("type") == "kvm"


def migration_params(
    definition: JobDefinition, *, debug: bool = False
) -> tuple[str, str, dict[str, Any]]:
    """``(source server, vm, params)`` of a migration definition; ``BadRequest`` naming
    the field for anything malformed (globs, unknown options, wrong types, a source that
    is the target). A ``destination.libvirt_uri`` is kept as ``targetLibvirtUri``;
    ``targetServerId`` is then ``destination.server_id`` or empty, until
    ``submit_migration`` resolves the URI against the configuration
    (``migrate_target``). ``options.debug_fault`` (:data:`DEBUG_FAULTS`) is for tests,
    honoured only in debug mode (``debug``)."""
    from virtbackup.job_orchestrator.definitions import check_source, is_glob, split_path

    source = check_source(definition.source)
    server_pat, vm = split_path(definition.vm_path, source)
    if is_glob(server_pat) or is_glob(vm):
        raise BadRequest("vm_path: a migration moves one VM: name it without a glob")
    dest = definition.destination
    extra = sorted(set(dest) - DESTINATION_FIELDS)
    if extra:
        raise BadRequest(f"destination.{extra[0]}: unknown field for a kvm destination")
    uri = dest.get("libvirt_uri")
    if "libvirt_uri" in dest and (not isinstance(uri, str) or not uri):
        raise BadRequest("destination.libvirt_uri: expected a libvirt URI")
    if "server_id" not in dest and uri is None:
        raise BadRequest(
            "destination.server_id (or destination.libvirt_uri) is required for a kvm destination"
        )
    target = ""
    if "server_id" in dest:
        try:
            target = msgspec.convert(dest["server_id"], ServerId)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"destination.server_id: {exc}") from None
    if target == server_pat:
        raise BadRequest(
            f"destination.server_id: {shown(target)} is the source server: a migration "
            "moves a VM to another server"
        )
    params: dict[str, Any] = {**DEFAULTS, "targetServerId": target}
    if uri is not None:
        params["targetLibvirtUri"] = uri
    for key, value in definition.options.items():
        if key not in OPTIONS:
            raise BadRequest(
                f"options.{key}: unknown option (allowed: {', '.join(sorted(OPTIONS))})"
            )
        name, kind = OPTIONS[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise BadRequest(f"options.{key}: expected {_kind_name(kind)}, got {shown(value)}")
        params[name] = value
    if params.get("debugFault") not in (None, *DEBUG_FAULTS) or (
        "debugFault" in params and not debug
    ):
        raise BadRequest(
            "options.debug_fault: only 'cutover', 'cutover_stall', 'remove_source' or "
            "'start', and only in debug mode"
        )
    if params["removeSourceDisks"] and not params["removeSource"]:
        raise BadRequest(
            "options.remove_source_disks: deletes the source's images with the source VM: "
            "set options.remove_source too"
        )
    if params["maxDowntimeSeconds"] <= 0:
        raise BadRequest("options.max_downtime_seconds: must be more than 0")
    if not 1 <= params["maxPasses"] <= 100:
        raise BadRequest("options.max_passes: must be 1 to 100")
    if not 0 <= params["shutdownTimeoutSeconds"] <= MAX_SHUTDOWN_SECONDS:
        # The wait is in the cut-over, where a cancel is refused: unbounded, a guest that
        # ignores the ACPI request would hold the job (and the VM's lock) for good.
        raise BadRequest(
            f"options.shutdown_timeout_seconds: must be 0 to {MAX_SHUTDOWN_SECONDS:g} "
            "(the cut-over cannot be cancelled while it waits)"
        )
    mapping = params.get("networkMapping") or {}
    for src, dst in mapping.items():
        if not isinstance(dst, str) or not dst:
            raise BadRequest(f"options.network_mapping.{src}: expected a network name")
    if "targetVmName" in params:
        try:
            msgspec.convert(params["targetVmName"], VmName)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"options.vm_name: {exc}") from None
    return server_pat, vm, params


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, "an object") for k in kinds)


async def _source_disks(jc: JobContext, server_id: str, vm: str) -> list[RestoreDisk]:
    listed = await jc.bus.request(
        InventoryCmd.DISKS, VmRef(server_id=server_id, vm_name=vm), DiskList,
        timeout=timeouts.INVENTORY_QUERY,
    )  # fmt: skip
    return [
        RestoreDisk(target=d.target, path=d.path, size=d.capacity, format=d.format)
        for d in listed.disks
        if d.device == "disk"
    ]


async def _precheck(
    jc: JobContext,
    job_params: dict[str, Any],
    vm: str,
    domain_xml: str,
    disks: list[RestoreDisk],
    job_id: str = "",
) -> RestorePrecheckResult:
    """The target's placement of ``disks`` (restore rules); ``Conflict`` when a VM of the
    target name exists there (unless ``replace``, and then it must be shut off)."""
    target = job_params["targetServerId"]
    name = job_params.get("targetVmName") or vm
    request = RestorePrecheckRequest(
        server_id=target,
        vm_name=name,
        disks=disks,
        domain_xml=domain_xml,
        decision="overwrite",
        target_directory=job_params.get("targetDirectory") or "",
        storage_pool=job_params.get("storagePool") or "",
        job_id=job_id,
        directory_must_exist=True,
    )
    plan = await jc.bus.request(
        InventoryCmd.RESTORE_PRECHECK, request, RestorePrecheckResult,
        timeout=timeouts.INVENTORY_QUERY,
    )  # fmt: skip
    if plan.vm_exists and not job_params.get("replace"):
        raise Conflict(
            f"options.vm_name: vm {name} already exists on server {target}: set "
            "options.replace to replace it (it must be shut off), or choose another vm_name"
        )
    if plan.vm_exists and plan.vm_running:
        raise Conflict(f"options.vm_name: vm {name} runs on server {target}: shut it off first")
    return plan


async def submit_migration(jc: JobContext, definition: JobDefinition) -> JobSubmitResult:
    """Check a migration definition (``check_migration``), then create its job; one whose
    destination names ``via_destination_id`` goes through that backup destination
    (``migrate_via``)."""
    if "via_destination_id" in definition.destination:
        from virtbackup.job_orchestrator.migrate_via import submit_via

        return await submit_via(jc, definition)
    server_id, vm, params = await check_migration(jc, definition)
    return await submit_holding_target(jc, server_id, vm, params)


async def submit_holding_target(
    jc: JobContext, server_id: str, vm: str, params: dict[str, Any]
) -> JobSubmitResult:
    """Create the migration job of checked ``params`` (``check_migration``) holding the
    source VM and the target's name (``Conflict`` naming ``options.vm_name`` and the job
    that holds it, or naming the source VM's job).

    The target's name is held too (the lock a restore there takes), so that two
    migrations (direct or through a destination), or a restore, onto one name cannot
    both pass the checks: the second one's images and definition would replace the
    first one's at its cut-over, or (through a destination) its restore would fail once
    its source had stopped. Held from the submit until the job ends
    (``JobContext.finish`` releases it); a migration's own restore job runs under it
    (``JobContext.submit``'s ``under``)."""
    job_id = new_id()
    target, name = params["targetServerId"], params.get("targetVmName") or vm
    what = f"options.vm_name: vm {name} on server {target}"
    await jc.locks.acquire(target, name, job_id, "migration", what=what)
    try:
        job = await jc.submit(
            "migration", server_id=server_id, vm_name=vm, params=params, lock_vm=True,
            run=_run_from_submit, job_id=job_id,
        )  # fmt: skip
    except BaseException:
        await jc.locks.release(target, name, job_id)
        raise
    return JobSubmitResult(job_ids=[job.id], targets=[JobTarget(server_id=server_id, vm_name=vm)])


async def check_migration(
    jc: JobContext, definition: JobDefinition
) -> tuple[str, str, dict[str, Any]]:
    """``(source server, vm, params)`` of a migration definition checked against the
    configuration, the source VM and the target server. Refused before anything is
    created: a malformed
    field (400), an unknown server or VM (404), a VM that is not running (400: a cold
    copy is a backup and a restore), a target directory or pool the target cannot use
    (400), a VM of that name on the target (409 unless ``options.replace``)."""
    server_id, vm, params = migration_params(definition, debug=jc.settings.debug)
    cfg = await jc.config()
    known = {s.id: s for s in cfg.servers}
    if server_id not in known:
        raise NotFound(f"source.server_id: server {shown(server_id)} not found")
    target_field = "destination.server_id"
    if "targetLibvirtUri" in params:
        target_field = "destination.libvirt_uri"
        named = resolve_libvirt_uri(
            params["targetLibvirtUri"], cfg.servers, params["targetServerId"]
        )
        if named == server_id:
            raise BadRequest(
                f"destination.libvirt_uri: names server {named}, the source server: a "
                "migration moves a VM to another server"
            )
        params["targetServerId"] = named
    if params["targetServerId"] not in known:
        raise NotFound(f"destination.server_id: server {shown(params['targetServerId'])} not found")
    for sid, where in (
        (server_id, "source.server_id"),
        (params["targetServerId"], target_field),
    ):
        if known[sid].agent_id:
            raise BadRequest(
                f"{where}: server {sid} is a remote agent's: the inventory does not reach it"
            )
    ref = VmRef(server_id=server_id, vm_name=vm)
    try:
        info = await jc.bus.request(
            InventoryCmd.VM_INFO, ref, VmInfo, timeout=timeouts.INVENTORY_QUERY
        )
    except NotFound:
        raise NotFound(f"vm_path: vm {shown(vm)} not found on server {shown(server_id)}") from None
    if info.power_state != "running":
        raise BadRequest(
            f"vm_path: vm {vm} is {info.power_state}: a warm migration copies a running VM. "
            "For a cold copy, back it up and restore it on the target server "
            '(POST /jobs/submit with destination {"type": "backup"}, then a restore there)'
        )
    xml = await jc.bus.request(
        InventoryCmd.DOMAIN_XML, ref, DomainXml, timeout=timeouts.INVENTORY_QUERY
    )
    disks = await _source_disks(jc, server_id, vm)
    if not disks:
        raise BadRequest(f"vm_path: vm {vm} has no disk to migrate")
    await _check_networks(jc, params, xml.xml)
    await _precheck(jc, params, vm, xml.xml, disks)
    return server_id, vm, params


async def _check_networks(jc: JobContext, params: dict[str, Any], domain_xml: str) -> None:
    """``BadRequest`` naming the entry of ``networkMapping`` that names a network the VM
    does not use, or whose target network the
    target server does not have, or the source VM's network (``domain_xml``) that no
    entry maps and the target does not have: the VM could be defined there, but not
    started, and that would be found only once the source was stopped."""
    mapping: dict[str, str] = params.get("networkMapping") or {}
    used = vm_networks(domain_xml)
    for source in sorted(set(mapping) - set(used)):
        # A key the VM does not use is a typo more often than not: its real network
        # would go unmapped, and land on the target's network of the same name.
        raise BadRequest(
            f"options.network_mapping.{source}: the vm has no interface on network "
            f"{shown(source)} (its networks: {', '.join(used) or 'none'})"
        )
    unmapped = sorted(set(used) - set(mapping))
    if not mapping and not unmapped:
        return
    target = params["targetServerId"]
    listed = await jc.bus.request(
        InventoryCmd.NETWORKS, ServerRef(server_id=target), NetworkList,
        timeout=timeouts.INVENTORY_QUERY,
    )  # fmt: skip
    have = ", ".join(listed.names) or "none"
    for source, name in sorted(mapping.items()):
        if name not in listed.names:
            raise BadRequest(
                f"options.network_mapping.{source}: server {target} has no network "
                f"{shown(name)} (it has: {have})"
            )
    for name in unmapped:
        if name not in listed.names:
            raise BadRequest(
                f"options.network_mapping.{name}: the vm's interface on network "
                f"{shown(name)} needs a network of server {target}, which has no "
                f"{shown(name)} (it has: {have}): map it in options.network_mapping"
            )


def vm_networks(domain_xml: str) -> list[str]:
    """The libvirt networks the ``<interface type='network'>`` elements of
    ``domain_xml`` name, each once, in order."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML of the source VM
    names = (s.get("network") for s in root.findall("./devices/interface[@type='network']/source"))
    return list(dict.fromkeys(n for n in names if n))


async def _run_from_submit(jc: JobContext, job: Job) -> None:
    from virtbackup.job_orchestrator.runner import execute

    await execute(jc, job)


def map_networks(domain_xml: str, mapping: dict[str, str]) -> str:
    """``domain_xml`` with each ``<interface type='network'>``'s source network renamed by
    ``mapping`` (source name -> target name); unmapped networks stay as they are."""
    if not mapping:
        return domain_xml
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML of the source VM
    for source in root.findall("./devices/interface[@type='network']/source"):
        name = source.get("network")
        if name in mapping:
            source.set("network", mapping[name])
    return ET.tostring(root, encoding="unicode")


def ranges_of(extents: list[Extent], *, dirty: bool) -> list[tuple[int, int]]:
    """The byte ranges to copy: the dirty extents (``dirty``) or the allocated, non-zero
    ones, neighbours merged."""
    out: list[tuple[int, int]] = []
    for ext in extents:
        if ext.length <= 0:
            continue
        wanted = bool(ext.flags & STATE_DIRTY) if dirty else not ext.flags & STATE_ZERO
        if not wanted:
            continue
        if out and out[-1][0] + out[-1][1] == ext.offset:
            out[-1] = (out[-1][0], out[-1][1] + ext.length)
        else:
            out.append((ext.offset, ext.length))
    return out


def split_units(
    ranges: list[tuple[int, int]], limit: int = UNIT_BYTES
) -> list[list[tuple[int, int]]]:
    """``ranges`` in groups of at most ``limit`` bytes (a range is cut where needed)."""
    groups: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    used = 0
    for offset, length in ranges:
        while length > 0:
            step = min(length, limit - used)
            current.append((offset, step))
            used += step
            offset += step
            length -= step
            if used == limit:
                groups.append(current)
                current, used = [], 0
    if current:
        groups.append(current)
    return groups


@dataclass
class Migration:
    """What a running migration has made, so that whatever ends it can undo it."""

    job: Job
    targets: list[RestoreTarget] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    begun: BackupBegun | None = None
    result: dict[str, Any] = field(default_factory=dict)
    source_stopped: bool = False
    defined: bool = False
    target_running: bool = False
    #: NVRAM, TPM state staged on the target (moved or removed by ``RESTORE_FINISH``).
    state: list[StagedState] = field(default_factory=list)
    #: The number of the next unit: units are numbered across passes (a unit number is
    #: its message id in the work stream, which drops a repeated one).
    next_unit: int = 0
    #: Bytes the passes so far copied (the job's progress).
    copied: int = 0

    @property
    def source(self) -> str:
        return self.job.server_id or ""

    @property
    def vm(self) -> str:
        return self.job.vm_name or ""

    @property
    def target(self) -> str:
        return str(self.job.params["targetServerId"])

    @property
    def target_name(self) -> str:
        return str(self.job.params.get("targetVmName") or self.vm)


async def _record(jc: JobContext, m: Migration, **changes: Any) -> None:
    m.result.update(changes)
    await update_job(jc.store, jc.bus, m.job.id, {"result": dict(m.result)})


async def record_completed(jc: JobContext, m: Migration, copied: int, **changes: Any) -> None:
    """Record the result of a migration that succeeded (``stage: completed``, ``bytesCopied``
    and ``changes``), its progress showing every byte it ``copied`` of as many
    (``bytes_transferred`` = ``total_bytes``: 100 %)."""
    m.result.update(stage="completed", bytesCopied=copied, **changes)
    progress = {"result": dict(m.result), "bytes_transferred": copied, "total_bytes": copied}
    await update_job(jc.store, jc.bus, m.job.id, progress)


async def _begin(
    jc: JobContext, m: Migration, since: str | None, *, from_bitmaps: bool = False
) -> BackupBegun:
    """Begin a pull-mode backup of the source (incremental from ``since``); with
    ``from_bitmaps`` (the source is shut off: the cut-over) the inventory exports its
    qcow2 images from the bitmaps of ``since`` with ``qemu-nbd``, without starting QEMU
    nor making a checkpoint (``BackupBegun.export_dir``, recorded as ``exportDir`` so that
    whoever ends the job stops them), and starts the VM paused only when it cannot."""
    jc.check_canceled(m.job.id)
    begun = await jc.bus.request(
        InventoryCmd.BACKUP_BEGIN,
        BackupBeginRequest(
            server_id=m.source, vm_name=m.vm, incremental_from=since, job_id=m.job.id,
            offline_from_bitmaps=from_bitmaps,
        ),
        BackupBegun,
        timeout=timeouts.INVENTORY_JOB_STEP,
    )  # fmt: skip
    m.begun = begun
    if begun.checkpoint not in m.checkpoints:
        m.checkpoints.append(begun.checkpoint)
    if since is None:
        await jc._hold("migrate:begun")  # tests stop the orchestrator before the record
    await _record(jc, m, checkpoints=list(m.checkpoints), exportDir=begun.export_dir)
    return begun


async def _end(jc: JobContext, m: Migration, *, keep: bool) -> None:
    """End the current libvirt job; ``keep`` false drops its checkpoint too."""
    begun, m.begun = m.begun, None
    if begun is None:
        return
    end = BackupEndRequest(
        server_id=m.source, vm_name=m.vm, checkpoint=begun.checkpoint, success=keep,
        domain_id=begun.domain_id, offline=begun.offline, export_dir=begun.export_dir,
    )  # fmt: skip
    await end_libvirt_job(jc, end, keep_going=lambda: jc.holds(m.job.id))
    # The bitmaps' exports made no checkpoint: the one they read from is dropped with
    # the others (``_drop_checkpoints``). ``exportDir`` stays recorded (an end of
    # stopped exports is a no-op); this runs beside the define's records.
    if not keep and not begun.export_dir and begun.checkpoint in m.checkpoints:
        m.checkpoints.remove(begun.checkpoint)


def _units(m: Migration, begun: BackupBegun, *, first: bool) -> tuple[list[TransferUnit], int]:
    """The pass's units and the bytes they copy: the allocated extents in the first pass,
    the dirty ones after (every extent, zeros written as zeros, when a disk has no usable
    bitmap: it is copied whole again)."""
    by_target = {t.target: t for t in m.targets}
    units: list[TransferUnit] = []
    total = 0
    for disk in begun.disks:
        target = by_target.get(disk.target)
        if target is None:
            raise JobFailed(f"disk {disk.target} appeared on the source during the migration")
        ranges = _pass_ranges(disk, first=first, incremental=begun.incremental)
        total += sum(length for _, length in ranges)
        for group in split_units(ranges):
            units.append(
                TransferUnit(
                    job_id=m.job.id, unit=m.next_unit + len(units), kind="migrate",
                    destination_id="", disk=disk.target, disk_size=disk.size, nbd_url=disk.nbd_url,
                    target_nbd_url=target.nbd_url, ranges=group,
                )
            )  # fmt: skip
    m.next_unit += len(units)
    return units, total


def _pass_ranges(disk: DiskExport, *, first: bool, incremental: bool) -> list[tuple[int, int]]:
    if first:
        return ranges_of(disk.allocation, dirty=False)
    if incremental and disk.dirty is not None:
        return ranges_of(disk.dirty, dirty=True)
    return [(0, disk.size)] if disk.size else []


async def _copy(
    jc: JobContext, m: Migration, begun: BackupBegun, *, first: bool
) -> tuple[int, float]:
    """One pass: bytes copied and seconds taken. The job's progress counts the bytes of
    every pass so far (``bytes_transferred`` of ``total_bytes``)."""
    units, total = _units(m, begun, first=first)
    started = time.monotonic()
    if units:
        await jc.run_units(m.job.id, units, total, lambda _: None, bytes_before=m.copied)
    m.copied += total
    return total, time.monotonic() - started


def _dirty_bytes(begun: BackupBegun) -> int:
    return sum(
        sum(length for _, length in _pass_ranges(d, first=False, incremental=begun.incremental))
        for d in begun.disks
    )


async def _action(jc: JobContext, server: str, vm: str, action: VmAction) -> None:
    request = VmActionRequest(server_id=server, vm_name=vm, action=action)
    await jc.bus.request(InventoryCmd.ACTION, request, Ok, timeout=timeouts.INVENTORY_QUERY)


async def _wait_off(jc: JobContext, m: Migration, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if await power_state(jc, m.source, m.vm) == "shutoff":
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)


async def _shut_down_source(jc: JobContext, m: Migration) -> str:
    """Shut the source off: gracefully, then forced if allowed; returns how."""
    params = m.job.params
    with contextlib.suppress(ServiceError):
        await _action(jc, m.source, m.vm, "shutdown")
    if await _wait_off(jc, m, float(params["shutdownTimeoutSeconds"])):
        m.source_stopped = True
        return "shut down"
    if not params.get("forceShutdown", True):
        raise JobFailed(
            f"vm {m.vm} did not shut down within {params['shutdownTimeoutSeconds']} s and "
            "options.force_shutdown is false"
        )
    await _action(jc, m.source, m.vm, "forceOff")
    if not await _wait_off(jc, m, 30.0):
        raise JobFailed(f"vm {m.vm} did not stop after a forced power-off")
    m.source_stopped = True
    return "powered off (forced)"


async def run_migration(jc: JobContext, job: Job) -> str:
    """Run the migration (see the module docstring); returns the success message."""
    m = Migration(job=job)
    try:
        return await _migrate(jc, m)
    except (JobLost, asyncio.CancelledError):
        raise
    except BaseException as exc:
        if not jc.holds(job.id):
            raise
        notes = await _undo(jc, m)
        if isinstance(exc, JobCanceled):
            raise
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise JobFailed("; ".join([f"migration failed: {detail}", *notes])) from exc


async def _undo(jc: JobContext, m: Migration) -> list[str]:
    """Undo what was made (each step runs even if one before failed); what was done or
    could not be done, for the job's message."""
    notes: list[str] = []
    try:
        await jc.purge_units(m.job.id)
    except Exception as exc:
        notes.append(f"could not purge its units: {exc}")
    try:
        await _end(jc, m, keep=False)
    except ServiceError as exc:
        notes.append(f"could not end the libvirt backup job: {exc.message}")
    if m.targets and not m.defined:
        finish = RestoreFinishRequest(
            server_id=m.target, job_id=m.job.id, vm_name=m.target_name, success=False,
            disks=m.targets, state=m.state,
        )  # fmt: skip
        try:
            removed = await jc.bus.request(
                InventoryCmd.RESTORE_FINISH, finish, Ok, timeout=timeouts.INVENTORY_JOB_STEP
            )
        except ServiceError as exc:
            notes.append(f"could not remove the images on server {m.target}: {exc.message}")
        else:
            if removed.message:
                notes.append(f"on server {m.target}: {removed.message}: remove them there")
    notes.extend(await _drop_checkpoints(jc, m))
    if m.defined and not m.target_running:
        # Defined there, its images in place, but not started: said, so that a retry's
        # 409 (the name exists on the target) is no surprise.
        notes.append(
            f"vm {m.target_name} stays defined (not started) on server {m.target} with its "
            "images: undefine it there before migrating again"
        )
    if m.source_stopped and not m.target_running:
        try:
            await _action(jc, m.source, m.vm, "start")
            notes.append(f"the source vm {m.vm} was started again on server {m.source}")
        except ServiceError as exc:
            notes.append(f"the source vm {m.vm} could NOT be started again: {exc.message}")
    return notes


async def recover_migration(
    jc: JobContext, job: Job, message: str, *, own_backup_job: bool = True
) -> str:
    """End a migration whose orchestrator died (this instance holds its lease now), from
    what its ``result`` recorded: its libvirt job is ended and its checkpoints dropped,
    the target images are removed unless the VM was defined there, and a source stopped
    for the cut-over (``sourceStopped``) is started again unless the VM runs on the
    target. ``own_backup_job`` False: the migration began no libvirt backup job of its
    own (through a destination, its backup jobs end themselves), none is ended here.
    Returns ``message`` with what was done."""
    m = Migration(job=job)
    recorded = job.result
    m.checkpoints = [c for c in recorded.get("checkpoints") or [] if isinstance(c, str)]
    m.targets = msgspec.convert(recorded.get("targets") or [], list[RestoreTarget])
    m.defined = bool(recorded.get("defined"))
    m.state = msgspec.convert(recorded.get("state") or [], list[StagedState])
    m.source_stopped = bool(recorded.get("sourceStopped"))
    m.target_running = recorded.get("stage") == "completed" or bool(recorded.get("targetRunning"))
    notes: list[str] = []
    export_dir = str(recorded.get("exportDir") or "")
    # Without the bitmaps' exports, whatever backup job the source has is this job's (it
    # holds the VM): ended, with the checkpoint it made, even one that the orchestrator
    # died before recording (between a pass's begin and its record), which the last
    # checkpoint recorded would not name.
    end = BackupEndRequest(
        server_id=m.source, vm_name=m.vm, success=False, export_dir=export_dir,
        checkpoint=m.checkpoints[-1] if export_dir and m.checkpoints else None,
    )  # fmt: skip
    try:
        if own_backup_job or m.checkpoints:
            await end_libvirt_job(jc, end, keep_going=lambda: jc.holds(job.id))
    except ServiceError as exc:
        notes.append(f"could not end the libvirt backup job: {exc.message}")
    if m.source_stopped and not m.target_running and m.defined:
        notes.append(f"vm {m.target_name} is defined on server {m.target}, not started")
        m.target_running = True  # the VM is there: the source stays off
    notes.extend(await _undo(jc, m))
    return "; ".join([message, *notes])


async def _drop_checkpoints(jc: JobContext, m: Migration) -> list[str]:
    notes = []
    for checkpoint in list(m.checkpoints):
        request = CheckpointForgetRequest(
            server_id=m.source, vm_name=m.vm, checkpoint=checkpoint, job_id=m.job.id
        )
        try:
            answer = await jc.bus.request(
                InventoryCmd.CHECKPOINT_FORGET, request, Ok, timeout=timeouts.INVENTORY_JOB_STEP
            )
        except ServiceError as exc:
            notes.append(f"checkpoint {checkpoint} left on the source: {exc.message}")
            continue
        if answer.success:
            m.checkpoints.remove(checkpoint)
        else:
            notes.append(f"checkpoint {checkpoint} left on the source: {answer.message}")
    return notes


async def _migrate(jc: JobContext, m: Migration) -> str:
    job, params = m.job, m.job.params
    mapping: dict[str, str] = params.get("networkMapping") or {}
    await _record(jc, m, stage="copying", targetServerId=m.target, targetVmName=m.target_name)
    await jc.message(job.id, f"copying: beginning the pull-mode backup of {m.vm}")
    begun = await _begin(jc, m, None)
    disks = [
        RestoreDisk(target=d.target, path=d.path, size=d.size, format=d.format) for d in begun.disks
    ]
    plan = await _precheck(jc, params, m.vm, begun.domain_xml, disks, job_id=job.id)
    prepared = await jc.bus.request(
        InventoryCmd.RESTORE_PREPARE,
        RestorePrepareRequest(server_id=m.target, job_id=job.id, disks=plan.disks),
        RestorePrepared,
        timeout=timeouts.INVENTORY_JOB_STEP,
    )
    m.targets = list(prepared.disks)
    await _record(jc, m, targets=msgspec.to_builtins(m.targets))
    for t in m.targets:
        await joblog.try_append(
            jc.bus, job.id, f"disk {t.target}: to {t.path} on server {m.target}"
        )
    await jc.enter(job.id, "transferring", message=f"copying {m.vm} to server {m.target}")
    copied, seconds = await _copy(jc, m, begun, first=True)
    passes: list[dict[str, Any]] = [{"pass": 0, "bytes": copied, "seconds": round(seconds, 3)}]
    await _record(jc, m, passes=passes, copySeconds=round(seconds, 3))
    limit, budget = int(params["maxPasses"]), float(params["maxDowntimeSeconds"])
    # Bytes per second of the last pass that copied anything (none yet: any pass is quick).
    rate = copied / seconds if seconds > 0 and copied > 0 else float("inf")
    for number in range(1, limit + 1):
        await _end(jc, m, keep=True)
        begun = await _begin(jc, m, begun.checkpoint)
        dirty = _dirty_bytes(begun)
        await _record(jc, m, stage="syncing", **{"pass": number, "dirtyBytes": dirty})
        await jc.message(job.id, f"syncing: pass {number}, {dirty} dirty bytes")
        await jc._hold("migrate:syncing")  # tests aim a cancel here
        copied, seconds = await _copy(jc, m, begun, first=False)
        passes.append({"pass": number, "bytes": copied, "seconds": round(seconds, 3)})
        if seconds > 0 and copied:
            rate = copied / seconds
        await _record(jc, m, passes=passes, dirtyBytes=0)
        if copied / rate < budget:
            break
    await _end(jc, m, keep=True)
    last = begun.checkpoint
    # The point of no return: a cancel is refused from here.
    await jc.enter(job.id, "committing", message=f"cutover: stopping {m.vm} on server {m.source}")
    await _record(jc, m, stage="cutover")
    await _record(jc, m, sourceStopped=True)  # before: whoever ends the job starts it
    asked = time.monotonic()
    how = await _shut_down_source(jc, m)
    stopped = time.monotonic()
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = round(time.monotonic() - stopped, 3)

    # Offline: read from the images' bitmaps of ``last`` (qemu-nbd), or, where that
    # cannot be (raw disks), with the VM started paused.
    begun = await _begin(jc, m, last, from_bitmaps=True)
    step("begun")
    delta, _ = await _copy(jc, m, begun, first=False)
    step("copied")
    if jc.settings.debug and params.get("debugFault") == "cutover_stall":
        await _record(jc, m, stalled=True)
        await asyncio.sleep(STALL_SECONDS)
    passes.append(
        {
            "pass": len(passes),
            "bytes": delta,
            "seconds": round(time.monotonic() - stopped, 3),
            "offline": True,
            # Read from the images' bitmaps by qemu-nbd (else: the VM started paused).
            "fromBitmaps": bool(begun.export_dir),
        }
    )
    xml = await jc.bus.request(
        InventoryCmd.DOMAIN_XML, VmRef(server_id=m.source, vm_name=m.vm), DomainXml,
        timeout=timeouts.INVENTORY_QUERY,
    )  # fmt: skip
    defined_xml = map_networks(xml.xml, mapping)
    uuid = "" if m.target_name != m.vm else _uuid_of(xml.xml)
    # NVRAM, TPM state: final now (the VM is stopped), staged on the target.
    try:
        moved = await move_state(jc, job, m.target, defined_xml, m.target_name, uuid, m.state)
    finally:
        await _record(jc, m, state=msgspec.to_builtins(m.state))
    step("delta")
    if jc.settings.debug and params.get("debugFault") == "cutover":
        raise JobFailed("debug fault injected at cutover (options.debug_fault)")
    # The source's offline backup job is ended (its paused QEMU stopped, 2 s of the 7 s
    # downtime measured by bench/migrate.py) while the target defines and starts the VM:
    # the target needs only the data, which is all copied.
    ending = asyncio.create_task(_end(jc, m, keep=True))
    try:
        started_note = await _define_and_start(jc, m, defined_xml, uuid, step)
    except BaseException:
        # Settled before anything is undone: the source is started again only once off.
        await asyncio.wait([ending])
        if not ending.cancelled():
            ending.exception()  # retrieved: the undo ends what is left
        raise
    downtime = round(time.monotonic() - stopped, 3)
    steps["running" if m.target_running else "done"] = downtime
    # Whoever ends this job from here leaves the source off: the VM is on the target.
    await _record(jc, m, targetRunning=m.target_running)
    notes: list[str] = []
    try:
        await ending
    except ServiceError as exc:
        notes.append(f"the source's offline backup job could not be ended: {exc.message}")
    step("sourceEnded")
    notes += await _drop_checkpoints(jc, m)
    if summary := state_summary(moved):
        notes.insert(0, summary)
    if params.get("removeSource"):
        source_uuid = _uuid_of(xml.xml)
        if jc.settings.debug and params.get("debugFault") == "remove_source":
            source_uuid = NO_UUID
        removal, line = await remove_source(
            jc, job.id, (m.source, m.vm, source_uuid), (m.target, m.target_name),
            started=m.target_running, disks=bool(params.get("removeSourceDisks")),
        )  # fmt: skip
        await _record(jc, m, sourceRemoval=removal)
        notes.append(line)
    total = sum(p["bytes"] for p in passes)
    await record_completed(
        jc, m, total, passes=passes, downtimeSeconds=downtime, sourceShutdown=how,
        cutoverSeconds=steps, checkpoints=list(m.checkpoints),
        shutdownSeconds=round(stopped - asked, 3),
    )  # fmt: skip
    text = (
        f"migrated {m.vm} from server {m.source} to server {m.target}"
        f"{f' as {m.target_name}' if m.target_name != m.vm else ''}: {started_note} there; "
        f"{len(passes)} passes, {total} bytes copied, downtime {downtime} s (source {how})"
    )
    return "; ".join([text, *notes])


async def _define_and_start(
    jc: JobContext, m: Migration, domain_xml: str, uuid: str, step: Callable[[str], None]
) -> str:
    """Move the target images into place and define the VM there (then ``step("defined")``),
    then start it (when ``startOnTarget``); returns how it is left there."""
    finish = RestoreFinishRequest(
        server_id=m.target, job_id=m.job.id, vm_name=m.target_name, success=True,
        domain_xml=domain_xml, disks=m.targets, uuid=uuid, state=m.state,
    )  # fmt: skip
    await jc.bus.request(
        InventoryCmd.RESTORE_FINISH, finish, Ok, timeout=timeouts.INVENTORY_JOB_STEP
    )
    m.defined = True
    await _record(jc, m, defined=True)
    step("defined")
    if not m.job.params.get("startOnTarget", True):
        return "defined (not started)"
    await _record(jc, m, stage="starting")
    if jc.settings.debug and m.job.params.get("debugFault") == "start":
        raise JobFailed("debug fault injected at the start on the target (options.debug_fault)")
    await _action(jc, m.target, m.target_name, "start")
    m.target_running = True
    return "running"


def _uuid_of(domain_xml: str) -> str:
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML of the source VM
    return (root.findtext("uuid") or "").strip()
