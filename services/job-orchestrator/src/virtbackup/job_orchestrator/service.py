"""The job-orchestrator: the job state machine and the backup, restore and sanity runners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from xml.etree import ElementTree as ET

import msgspec

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.subjects import EventType, InventoryCmd, JobCmd
from virtbackup.contracts.v1.events import JobFailure
from virtbackup.contracts.v1.inventory import (
    BackupEndRequest,
    Ok,
    RestoreDisk,
    RestorePrecheckRequest,
    RestorePrecheckResult,
    VmInfo,
    VmRef,
)
from virtbackup.contracts.v1.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    BackupRequest,
    Job,
    JobCancelRequest,
    JobGetRequest,
    JobList,
    JobListRequest,
    JobSubmitRequest,
    JobType,
    PrecheckRequest,
    PrecheckResult,
    RestoreEntries,
    RestoreEntriesRequest,
    RestoreEntry,
    RestoreRequest,
    SanityRequest,
)
from virtbackup.job_orchestrator.backup import run_backup
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.restore import run_restore, run_sanity
from virtbackup.job_orchestrator.store import JobStore
from virtbackup.job_orchestrator.tracker import JobCanceled
from virtbackup.repository.format import parse_xml_key
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.runtime.agent_config import find_destination, find_server
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, ServiceError
from virtbackup.runtime.service import ServiceContext, ServiceSpec
from virtbackup.storage.errors import NotFoundError, StorageError

log = logging.getLogger(__name__)
Runner = Callable[[JobContext, Job], Awaitable[str]]
RUNNERS: dict[str, Runner] = {"backup": run_backup, "restore": run_restore, "sanity": run_sanity}
INVENTORY_TIMEOUT = 60.0

_contexts: dict[str, JobContext] = {}


def job_event_payload(job: Job) -> dict[str, object]:
    out = msgspec.to_builtins(job)
    assert isinstance(out, dict)
    return out


async def execute(jc: JobContext, job: Job) -> None:
    """Run a job to its end state; a cancel that came first is never overwritten."""
    store = jc.store
    now = utcnow_iso()
    job = await update_job(store, jc.bus, job.id, {"state": "running", "started_at": now})
    state, message = "success", ""
    try:
        message = await RUNNERS[job.type](jc, job)
    except JobCanceled:
        state, message = "canceled", "cancelled by user"
    except Exception as exc:
        state = "failure"
        known = (ServiceError, StorageError, RepositoryError, OSError, ValueError, TimeoutError)
        if isinstance(exc, ServiceError):
            message = exc.message
        elif isinstance(exc, known) or type(exc).__name__ in {"UnitFailed", "SanityFailed"}:
            message = str(exc) or type(exc).__name__
        else:
            log.exception("job %s crashed", job.id)
            message = f"internal error: {type(exc).__name__}: {exc}"
    finally:
        jc.cancels.pop(job.id, None)
    final = await update_job(
        store,
        jc.bus,
        job.id,
        {"state": state, "message": message, "finished_at": utcnow_iso(), "writer_backlog": 0},
        event=EventType.JOB_FINISHED,
    )
    if final.state == "failure":
        failure = JobFailure(job_id=job.id, type=job.type, message=final.message)
        await jc.bus.publish_event(EventType.JOB_FAILURE, failure, key=job.id)


async def register(ctx: ServiceContext) -> None:
    jc = JobContext(ctx)
    _contexts[ctx.name] = jc
    submit_lock = asyncio.Lock()

    def store() -> JobStore:
        return JobStore(ctx.bucket(buckets.JOBS))

    async def create(
        job_type: JobType,
        *,
        server_id: str | None = None,
        vm_name: str | None = None,
        destination_id: str | None = None,
        params: dict[str, object] | None = None,
        start: bool = True,
    ) -> Job:
        now = utcnow_iso()
        job = Job(
            id=new_id(),
            type=job_type,
            state="queued",
            server_id=server_id,
            vm_name=vm_name,
            destination_id=destination_id,
            params=params or {},
            created_at=now,
            updated_at=now,
        )
        await store().create(job)
        await ctx.bus.publish_event(EventType.JOB_CREATED, job_event_payload(job), key=job.id)
        if start:
            jc.tasks[job.id] = asyncio.create_task(execute(jc, job), name=f"job-{job.id}")
            jc.tasks[job.id].add_done_callback(lambda _: jc.tasks.pop(job.id, None))
        return job

    async def busy_with(server_id: str, vm_name: str) -> Job | None:
        for job in await store().list():
            if (
                job.state in ACTIVE_STATES
                and job.server_id == server_id
                and job.vm_name == vm_name
                and job.type in {"backup", "restore"}
            ):
                return job
        return None

    @ctx.bus.handle(JobCmd.LIST, JobListRequest)
    async def list_jobs(req: JobListRequest) -> JobList:
        jobs = [
            j
            for j in await store().list()
            if (req.state is None or j.state == req.state)
            and (req.type is None or j.type == req.type)
        ]
        return JobList(jobs=jobs[: max(req.limit, 0)])

    @ctx.bus.handle(JobCmd.GET, JobGetRequest)
    async def get_job(req: JobGetRequest) -> Job:
        return (await store().get(req.id))[0]

    @ctx.bus.handle(JobCmd.SUBMIT, JobSubmitRequest)
    async def submit_job(req: JobSubmitRequest) -> Job:
        """A bare job record (for agents and tests); it is not run by this orchestrator."""
        return await create(
            req.type,
            server_id=req.server_id,
            vm_name=req.vm_name,
            destination_id=req.destination_id,
            params=req.params,
            start=False,
        )

    @ctx.bus.handle(JobCmd.CANCEL, JobCancelRequest)
    async def cancel_job(req: JobCancelRequest) -> Job:
        def cancel(job: Job) -> Job:
            if job.state in TERMINAL_STATES:
                raise Conflict(f"job {job.id} has already finished ({job.state})")
            now = utcnow_iso()
            return msgspec.structs.replace(
                job, state="canceled", message=req.reason, updated_at=now, finished_at=now
            )

        job = await store().update(req.id, cancel)
        jc.cancel_event(job.id).set()
        await ctx.bus.publish_event(EventType.JOB_CANCELED, job_event_payload(job), key=job.id)
        return job

    @ctx.bus.handle(JobCmd.BACKUP, BackupRequest)
    async def backup(req: BackupRequest) -> Job:
        cfg = await jc.config()
        find_server(cfg, req.server_id)
        dest = find_destination(cfg, req.destination_id)
        # The VM must exist (404 from the inventory otherwise).
        await ctx.bus.request(
            InventoryCmd.VM_INFO,
            VmRef(server_id=req.server_id, vm_name=req.vm_name),
            VmInfo,
            timeout=INVENTORY_TIMEOUT,
        )
        async with submit_lock:
            running = await busy_with(req.server_id, req.vm_name)
            if running is not None:
                raise Conflict(f"vm {req.vm_name} is already being backed up (job {running.id})")
            return await create(
                "backup",
                server_id=req.server_id,
                vm_name=req.vm_name,
                destination_id=dest.id,
                params={"fresh": req.fresh and ctx.settings.debug},
            )

    async def open_point(
        xml_path: str, destination_id: str | None, *, restore: bool
    ) -> tuple[str, RestorePoint]:
        """The destination and restore point a request names (400, 404 otherwise)."""
        try:
            parse_xml_key(xml_path)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        cfg = await jc.config()
        wanted = destination_id or (cfg.restore_destination_id if restore else None)
        dest = find_destination(cfg, wanted or cfg.backup_destination_id)
        try:
            repo = await jc.repository(dest.id, create=False)
        except RepositoryError as exc:
            if "no repository" in str(exc):
                raise NotFound(f"destination {dest.id}: {exc}") from None
            raise BadRequest(f"destination {dest.id}: {exc}") from None
        try:
            return dest.id, await repo.restore_point(xml_path)
        except NotFoundError:
            raise NotFound(f"no restore point {xml_path} in destination {dest.id}") from None
        finally:
            await repo.driver.close()

    async def precheck_point(server_id: str, point: RestorePoint) -> RestorePrecheckResult:
        request = RestorePrecheckRequest(
            server_id=server_id,
            vm_name=point.vm_name,
            disks=[RestoreDisk(target=d.target, path=d.path, size=d.size) for d in point.disks],
        )
        return await ctx.bus.request(
            InventoryCmd.RESTORE_PRECHECK, request, RestorePrecheckResult, timeout=INVENTORY_TIMEOUT
        )

    @ctx.bus.handle(JobCmd.RESTORE_PRECHECK, PrecheckRequest)
    async def restore_precheck(req: PrecheckRequest) -> PrecheckResult:
        find_server(await jc.config(), req.server_id)
        _, point = await open_point(req.xml_path, req.destination_id, restore=True)
        result = await precheck_point(req.server_id, point)
        return PrecheckResult(
            vm_exists=result.vm_exists,
            can_define_only=result.can_define_only,
            vm_running=result.vm_running,
        )

    @ctx.bus.handle(JobCmd.RESTORE, RestoreRequest)
    async def restore(req: RestoreRequest) -> Job:
        find_server(await jc.config(), req.server_id)
        dest_id, point = await open_point(req.xml_path, req.destination_id, restore=True)
        check = await precheck_point(req.server_id, point)
        if req.decision == "overwrite" and check.vm_running:
            raise Conflict(f"vm {point.vm_name} is running: shut it off before overwriting it")
        if req.decision == "define" and not check.can_define_only:
            raise Conflict(
                "cannot define only: " + "; ".join(check.problems or ["disks do not match"])
            )
        async with submit_lock:
            running = await busy_with(req.server_id, point.vm_name)
            if running is not None:
                raise Conflict(
                    f"vm {point.vm_name} has a {running.type} job running ({running.id})"
                )
            return await create(
                "restore",
                server_id=req.server_id,
                vm_name=point.vm_name,
                destination_id=dest_id,
                params={"xmlPath": req.xml_path, "decision": req.decision},
            )

    @ctx.bus.handle(JobCmd.SANITY, SanityRequest)
    async def sanity(req: SanityRequest) -> Job:
        dest_id, point = await open_point(req.xml_path, req.destination_id, restore=True)
        if req.timestamp and req.timestamp != point.timestamp:
            raise BadRequest(
                f"timestamp {req.timestamp!r} does not match xmlPath ({point.timestamp})"
            )
        return await create(
            "sanity",
            server_id=point.source_server_id,
            vm_name=point.vm_name,
            destination_id=dest_id,
            params={"xmlPath": req.xml_path, "timestamp": point.timestamp},
        )

    @ctx.bus.handle(JobCmd.RESTORE_ENTRIES, RestoreEntriesRequest)
    async def restore_entries(req: RestoreEntriesRequest) -> RestoreEntries:
        cfg = await jc.config()
        if req.destination_id:
            dest = find_destination(cfg, req.destination_id)
        elif req.driver_id:
            matching = [d for d in cfg.destinations if d.driver_id == req.driver_id]
            if not matching:
                raise NotFound(f"no destination with driverId {req.driver_id!r}")
            dest = matching[0]
        else:
            dest = find_destination(cfg, cfg.restore_destination_id or cfg.backup_destination_id)
        try:
            # Listing needs no key: backup.json is plaintext.
            repo = await jc.repository(dest.id, create=False, locked=True)
        except RepositoryError:
            return RestoreEntries(entries=[])
        try:
            entries = []
            for point in await repo.restore_points():
                entries.append(await _entry(repo, point, dest.id))
            entries.sort(key=lambda e: (e.vm_name, e.timestamp), reverse=True)
            return RestoreEntries(entries=entries)
        finally:
            await repo.driver.close()


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


async def start(ctx: ServiceContext) -> None:
    """Jobs left queued or running by a previous orchestrator are failed, and a backup's
    libvirt job is ended, so that nothing is left half done."""
    jc = _contexts[ctx.name]
    for job in await jc.store.list():
        if job.state not in ACTIVE_STATES or job.id in jc.tasks:
            continue
        if job.type == "backup" and job.server_id and job.vm_name:
            with contextlib.suppress(ServiceError):
                end = BackupEndRequest(server_id=job.server_id, vm_name=job.vm_name, success=False)
                await ctx.bus.request(InventoryCmd.BACKUP_END, end, Ok, timeout=INVENTORY_TIMEOUT)
        await update_job(
            jc.store,
            ctx.bus,
            job.id,
            {
                "state": "failure",
                "message": "the job-orchestrator stopped while the job ran",
                "finished_at": utcnow_iso(),
            },
            event=EventType.JOB_FINISHED,
        )


async def stop(ctx: ServiceContext) -> None:
    jc = _contexts.pop(ctx.name)
    for task in list(jc.tasks.values()):
        task.cancel()
    await asyncio.gather(*jc.tasks.values(), return_exceptions=True)


SPEC = ServiceSpec(
    name=subjects.JOB_ORCHESTRATOR,
    streams=(streams.EVENTS, streams.WORK),
    buckets=(buckets.JOBS, buckets.SCHEDULES, buckets.CONFIG),
    register=register,
    start=start,
    stop=stop,
)
