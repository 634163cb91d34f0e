"""The job-orchestrator's commands (``vb.cmd.job.*``), one module-level function each.

Every handler takes the instance's ``JobContext`` and a typed request, and returns a
typed result or raises a ``virtbackup.runtime.errors.ServiceError`` (400/404/409/503 at
the gateway). Any replica can answer any command: the state they read and change is in
JetStream.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree as ET

import msgspec

from virtbackup.contracts.subjects import EventType, InventoryCmd, JobCmd
from virtbackup.contracts.v1.common import Empty, shown
from virtbackup.contracts.v1.inventory import (
    VmInfo,
    VmRef,
)
from virtbackup.contracts.v1.jobctl import CANCEL_LINE
from virtbackup.contracts.v1.jobs import (
    TERMINAL_STATES,
    BackupRequest,
    CopyRequest,
    Job,
    JobCancelRequest,
    JobCounts,
    JobGetRequest,
    JobList,
    JobListRequest,
    PrecheckRequest,
    PrecheckResult,
    RestoreEntries,
    RestoreEntriesRequest,
    RestoreEntry,
    RestoreRequest,
    SanityRequest,
)
from virtbackup.job_orchestrator.agent_jobs import agent_of
from virtbackup.job_orchestrator.agent_restore import agent_precheck, check_agent_restore
from virtbackup.job_orchestrator.fanout import PARAM as ALSO_PARAM
from virtbackup.job_orchestrator.fanout_submit import also_folders, check_also_destinations
from virtbackup.job_orchestrator.jobctx import JobContext, job_payload
from virtbackup.job_orchestrator.point_copy import submit_copy
from virtbackup.job_orchestrator.point_lookup import destination_faults, open_point
from virtbackup.job_orchestrator.points import unusable
from virtbackup.job_orchestrator.restore import (
    plan_restore,
    request_plan,
    restore_params,
    target_name,
)
from virtbackup.job_orchestrator.runner import execute
from virtbackup.repository.format import vm_segment
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import NoRepositoryError, Repository, RepositoryError
from virtbackup.runtime import joblog, timeouts
from virtbackup.runtime.agent_config import find_destination, find_server
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)
commands: Commands[JobContext] = Commands()


@commands.handler(JobCmd.COUNTS, Empty)
async def count_jobs(jc: JobContext, req: Empty) -> JobCounts:
    """Every job counted by state, from the in-memory index (``/status`` and ``/ws`` ask
    for this every few seconds: no job is sent)."""
    counts = collections.Counter(job.state for job in list(jc.jobs.jobs.values()))
    return JobCounts(
        total=sum(counts.values()),
        queued=counts["queued"],
        running=counts["running"],
        success=counts["success"],
        failure=counts["failure"],
        canceled=counts["canceled"],
    )


@commands.handler(JobCmd.LIST, JobListRequest)
async def list_jobs(jc: JobContext, req: JobListRequest) -> JobList:
    """Jobs newest first, from the in-memory index (no round trip per job)."""
    return JobList(
        jobs=jc.jobs.list(
            state=req.state, type=req.type, limit=max(req.limit, 0), before=req.before
        )
    )


@commands.handler(JobCmd.GET, JobGetRequest)
async def get_job(jc: JobContext, req: JobGetRequest) -> Job:
    return (await jc.store.get(req.id))[0]


@commands.handler(JobCmd.CANCEL, JobCancelRequest)
async def cancel_job(jc: JobContext, req: JobCancelRequest) -> Job:
    """Ask a job to stop: its runner ends it ``canceled`` at its next step.

    ``Conflict`` once the job has finished, or once it is committing (past the point of
    no return it ends in what its commit does). Asking twice is harmless. The first ask
    adds ``[control] job cancelled by user`` to the job's output log (backend-api.md);
    the job then ends ``canceled`` with the message ``cancelled by user``."""
    newly = False

    def cancel(job: Job) -> Job:
        nonlocal newly
        if job.state in TERMINAL_STATES:
            raise Conflict(f"job {job.id} has already finished ({job.state})")
        if job.phase == "committing":
            raise Conflict(
                f"job {job.id} is committing: past the point of no return, it can no longer "
                "be cancelled"
            )
        if job.cancel_requested:
            return job
        newly = True
        return msgspec.structs.replace(
            job, cancel_requested=True, message="cancelling", updated_at=utcnow_iso()
        )

    job = await jc.store.update(req.id, cancel)
    if newly:
        await joblog.try_append(jc.bus, job.id, CANCEL_LINE, "warn")
    await jc.bus.publish_event(EventType.JOB_UPDATED, job_payload(job), key=job.id)
    return job


@commands.handler(JobCmd.BACKUP, BackupRequest)
async def backup(jc: JobContext, req: BackupRequest) -> Job:
    """Start a backup of every disk of a VM (``submit_backup``)."""
    return await submit_backup(jc, req)


async def submit_backup(
    jc: JobContext, req: BackupRequest, params: Mapping[str, Any] | None = None
) -> Job:
    """Start a backup of every disk of a VM, with ``params`` added to the job's (a plan
    run's ``planRunId`` and the like); ``Conflict`` naming the job if the VM already has
    a backup or restore running (on any replica). Any name libvirt accepts has a folder
    in the repository (``repository.format.vm_segment``; a long one's is hashed);
    ``BadRequest`` naming ``vmName`` only for text no name can be, ``alsoDestinationIds``
    for extra destinations that are unknown or that a remote agent's server cannot have;
    ``NotFound`` for an unknown server, destination or (on a server the inventory
    reaches) VM. A server whose ``agentId`` names a remote agent is backed up by that
    agent (``params.agentId``)."""
    try:
        vm_segment(req.vm_name)
    except ValueError as exc:
        raise BadRequest(f"vmName: {exc}") from None
    cfg = await jc.config()
    find_server(cfg, req.server_id)
    dest = find_destination(cfg, req.destination_id)
    agent_id = agent_of(cfg, req.server_id)
    also = check_also_destinations(cfg, dest.id, req.also_destination_ids)
    if agent_id is not None and also:
        raise BadRequest(
            f"alsoDestinationIds: server {req.server_id} is backed up by remote agent "
            f"{agent_id}, which writes one destination per backup"
        )
    if agent_id is None:
        # The VM must exist (404 from the inventory otherwise); a remote agent's host is
        # not the inventory's to reach: its agent fails the job if the VM is unknown.
        await jc.bus.request(
            InventoryCmd.VM_INFO,
            VmRef(server_id=req.server_id, vm_name=req.vm_name),
            VmInfo,
            timeout=timeouts.INVENTORY_QUERY,
        )
    params = {"fresh": req.fresh and jc.settings.debug, **(params or {})}
    if agent_id is not None:
        params["agentId"] = agent_id
    if not also:
        return await jc.submit(
            "backup",
            server_id=req.server_id,
            vm_name=req.vm_name,
            destination_id=dest.id,
            params=params,
            lock_vm=True,
            run=execute,
        )
    async with also_folders(jc, req.vm_name, also) as job_id:
        return await jc.submit(
            "backup",
            server_id=req.server_id,
            vm_name=req.vm_name,
            destination_id=dest.id,
            params={**params, ALSO_PARAM: also},
            lock_vm=True,
            run=execute,
            job_id=job_id,
        )


@commands.handler(JobCmd.COPY, CopyRequest)
async def copy_point(jc: JobContext, req: CopyRequest) -> Job:
    """Start a copy of a restore point to another destination (``point_copy``): 404 for
    an unknown source destination or point, 400 naming ``targetDestinationId`` or
    ``vmName``, 409 while the VM's folder in the target is being written."""
    return await submit_copy(jc, req, execute)


@commands.handler(JobCmd.RESTORE_PRECHECK, PrecheckRequest)
async def restore_precheck(jc: JobContext, req: PrecheckRequest) -> PrecheckResult:
    """What a restore of the point onto the server would find, for the VM it would define
    (``vm_name``, else the saved name) with its disks where it would put them. The
    placement fields are checked as ``restore`` checks them (400 naming
    ``targetDirectory`` or ``storagePool``; 409 for a record that disagrees with the
    point's sealed data); nothing changes on the server."""
    server = find_server(await jc.config(), req.server_id)
    dest_id, point = await open_point(jc, req.xml_path, req.destination_id)
    params: dict[str, Any] = {"decision": "define"}  # plans placements, writes nothing
    if req.vm_name:
        params["vmName"] = req.vm_name
    if req.target_directory:
        params["targetDirectory"] = req.target_directory
    if req.storage_pool:
        params["storagePool"] = req.storage_pool
    if server.agent_id:  # a remote agent's host: checked here as far as it can be
        with destination_faults(dest_id):
            exists, running = await check_agent_restore(
                jc, server, dest_id, point, params, req.host_domains, precheck=True
            )
        return agent_precheck(server, exists, running)
    with destination_faults(dest_id):
        result = await request_plan(jc, req.server_id, dest_id, point, params)
    return PrecheckResult(
        vm_exists=result.vm_exists,
        can_define_only=result.can_define_only,
        vm_running=result.vm_running,
        problems=result.problems,
    )


@commands.handler(JobCmd.RESTORE, RestoreRequest)
async def restore(jc: JobContext, req: RestoreRequest) -> Job:
    """Start a restore (``overwrite``: new disks, then define; ``define``: define only),
    planned and checked by the target server first (see ``restore.plan_restore``); onto
    a remote agent's host, checked here and run by that agent (``agent_restore``)."""
    server = find_server(await jc.config(), req.server_id)
    dest_id, point = await open_point(jc, req.xml_path, req.destination_id)
    params = restore_params(req)
    with destination_faults(dest_id):
        if server.agent_id:
            await check_agent_restore(jc, server, dest_id, point, params, req.host_domains)
            params["agentId"] = server.agent_id
        else:
            await plan_restore(jc, req.server_id, dest_id, point, params)
    return await jc.submit(
        "restore",
        server_id=req.server_id,
        vm_name=target_name(point, params),
        destination_id=dest_id,
        params=params,
        lock_vm=True,
        run=execute,
    )


@commands.handler(JobCmd.SANITY, SanityRequest)
async def sanity(jc: JobContext, req: SanityRequest) -> Job:
    """Start a check of every manifest and chunk of a restore point."""
    dest_id, point = await open_point(jc, req.xml_path, req.destination_id)
    if req.timestamp and req.timestamp != point.timestamp:
        raise BadRequest(
            f"timestamp {shown(req.timestamp)} does not match xmlPath ({point.timestamp})"
        )
    return await jc.submit(
        "sanity",
        server_id=point.source_server_id,
        vm_name=point.vm_name,
        destination_id=dest_id,
        params={"xmlPath": req.xml_path, "timestamp": point.timestamp},
        run=execute,
    )


@commands.handler(JobCmd.RESTORE_ENTRIES, RestoreEntriesRequest)
async def restore_entries(jc: JobContext, req: RestoreEntriesRequest) -> RestoreEntries:
    """Every restore point of a destination, newest first per VM; none when it has no
    repository yet, 503 naming the destination and the reason when its repository cannot
    be opened (a newer format, an unreadable ``repository.json``)."""
    cfg = await jc.config()
    if req.destination_id:
        dest = find_destination(cfg, req.destination_id)
    elif req.driver_id:
        matching = [d for d in cfg.destinations if d.driver_id == req.driver_id]
        if not matching:
            raise NotFound(f"no destination with driverId {shown(req.driver_id)}")
        dest = matching[0]
    else:
        dest = find_destination(cfg, cfg.restore_destination_id or cfg.backup_destination_id)
    with destination_faults(dest.id):
        try:
            # Listing needs no key: backup.json is plaintext.
            repo = await jc.repository(dest.id, create=False, locked=True)
        except NoRepositoryError:
            return RestoreEntries(entries=[])
        except RepositoryError as exc:  # another format, an unreadable repository.json
            raise unusable(dest.id, exc) from None
        try:
            points = await repo.restore_points()
            entries = [await _entry(repo, point, dest.id) for point in points]
            entries.sort(key=lambda e: (e.vm_name, e.timestamp), reverse=True)
            return RestoreEntries(entries=entries)
        finally:
            await repo.close()


async def _entry(repo: Repository, point: RestorePoint, destination_id: str) -> RestoreEntry:
    backed_up = {d.target for d in point.disks}
    missing: list[str] = []
    with contextlib.suppress(NotFoundError, RepositoryError, ET.ParseError):
        root = ET.fromstring(await repo.domain_xml(point))  # noqa: S314 - our own backup
        for disk in root.iter("disk"):
            target = disk.find("target")
            source = disk.find("source")
            if disk.get("device", "disk") != "disk" or target is None:
                continue
            if target.get("dev") not in backed_up:
                path = (source.get("file") or source.get("dev") or "") if source is not None else ""
                missing.append(os.path.basename(path) or str(target.get("dev")))
    return RestoreEntry(
        xml_path=point.xml_path,
        vm_name=point.vm_name,
        timestamp=point.timestamp,
        disk_basenames=[d.basename for d in point.disks],
        missing_disk_basenames=missing,
        source_server_id=point.source_server_id,
        source_server_name=point.source_server_name,
        kind=point.kind,
        destination_id=destination_id,
    )
