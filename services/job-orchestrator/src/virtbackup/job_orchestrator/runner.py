"""Running a job to its end, and ending the jobs of an instance that died.

``execute`` runs a job this instance submitted. ``sweep`` runs in every instance: a job
that is still active but whose lease has expired lost its holder (killed, or cut off
from NATS for longer than ``LEASE_SECONDS``); the first instance to take the lease ends
the job cleanly with ``recover``: queued units are purged, the libvirt backup job is
ended (its new checkpoint dropped), restore images are removed, and the final state
says what happened. A job that died while committing ends in what its commit did: a
backup whose restore point is in the repository is a success. A job that was still
queued waiting for a slot (``slots``) has done nothing yet: it is run instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import (
    BackupEndRequest,
    Ok,
    RestoreFinishRequest,
    RestoreTarget,
)
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, Job, JobState
from virtbackup.job_orchestrator import checkpoints_left, simulated, slots
from virtbackup.job_orchestrator.backup import end_libvirt_job, run_backup
from virtbackup.job_orchestrator.backup_checks import after_backup
from virtbackup.job_orchestrator.errors import JobCanceled, JobFailed, JobLost
from virtbackup.job_orchestrator.fanout import also_destinations
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.lifecycle_gc import admitted, run_gc, run_verify
from virtbackup.job_orchestrator.migrate_via import recover_any_migration, run_any_migration
from virtbackup.job_orchestrator.point_copy import run_copy
from virtbackup.job_orchestrator.points import auto_prune, run_prune
from virtbackup.job_orchestrator.restore import prepared_targets, run_restore, run_sanity
from virtbackup.repository.format import xml_path
from virtbackup.repository.repository import RepositoryError
from virtbackup.runtime import timeouts
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import ServiceError
from virtbackup.storage.errors import NotFoundError, StorageError

log = logging.getLogger(__name__)

Runner = Callable[[JobContext, Job], Awaitable[str]]
RUNNERS: dict[str, Runner] = {
    "backup": run_backup,
    "restore": run_restore,
    "sanity": run_sanity,
    "prune": run_prune,
    "gc": run_gc,
    "verify": run_verify,
    "copy": run_copy,
    "migration": run_any_migration,
}
#: Seconds between two looks for jobs whose holder died.
SWEEP_SECONDS = 2.0
#: Errors whose message is shown to the user as the job's reason (TimeoutError is an
#: OSError); anything else is a bug.
KNOWN_ERRORS = (JobFailed, ServiceError, StorageError, RepositoryError, OSError, ValueError)


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return exc.message
    if isinstance(exc, KNOWN_ERRORS):
        return str(exc) or type(exc).__name__
    return f"internal error: {type(exc).__name__}: {exc}"


async def execute(jc: JobContext, job: Job) -> None:
    """Run ``job`` (held by this instance) to its final state."""
    state: JobState = "success"
    try:
        # Queued while its server or destination has no free slot (slots.py).
        waited = await slots.acquire(jc, job)
        async with admitted(jc, job):  # a backup waits here while a GC sweeps
            changes = {} if waited is None else {"message": slots.started_after(waited)}
            job = await jc.enter(job.id, "preparing", started_at=utcnow_iso(), **changes)
            message = await RUNNERS[job.type](jc, job)
    except JobLost:
        return
    except asyncio.CancelledError:
        if jc.ctx.stopping.is_set() or not jc.holds(job.id):
            raise  # shutting down or taken over: another instance ends the job
        state, message = "failure", "internal error: the job's task was cancelled"
    except JobCanceled as exc:
        state, message = "canceled", "; ".join(["cancelled by user", *exc.notes])
    except Exception as exc:
        if not isinstance(exc, KNOWN_ERRORS):
            log.exception("job %s crashed", job.id)
        state, message = "failure", failure_message(exc)
    try:
        ended = await jc.finish(job.id, state, message)
    except Exception:
        # NATS unreachable for longer than its retries: stop renewing the lease, so that
        # it lapses and the sweep of another instance (or of this one) ends the job.
        jc.leases.forget(job.id)
        log.exception("could not write the final state of job %s (%s)", job.id, state)
        return
    await slots.release(jc, job)  # after the final state: its successor never runs beside it
    if job.type == "backup" and state == "success" and not simulated.is_simulated(ended or job):
        await after_backup(jc, ended or job)  # definition drift, size anomaly (never raises)
        # Retention: a prune job of its own once the backup has ended (points.auto_prune),
        # in each destination it wrote; not for a migration's backups (migrate_via): the
        # migration holds the VM's folder, and the VM's next backup prunes.
        written = [job.destination_id, *also_destinations(job)]
        for dest in [] if job.params.get("migrationJobId") else written:
            try:
                await auto_prune(jc, msgspec.structs.replace(job, destination_id=dest), execute)
            except Exception:
                log.exception("could not start the prune after backup %s in %s", job.id, dest)
    if job.type == "backup" and job.server_id and job.vm_name and not job.params.get("agentId"):
        # Checkpoints that deleted points left while a job held the VM (never raises).
        await checkpoints_left.retry_left(jc, job.server_id, job.vm_name, job.id)


async def sweep(jc: JobContext) -> None:
    """Forever: take over and end active jobs whose lease has expired."""
    while not jc.ctx.stopping.is_set():
        try:
            await sweep_once(jc)
        except Exception:
            log.exception("looking for orphaned jobs failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(jc.ctx.stopping.wait(), SWEEP_SECONDS)


async def sweep_once(jc: JobContext) -> list[str]:
    """One look; returns the ids of the jobs taken over. A job whose lease this very
    instance holds but runs no task for (its run died before it could finish the job)
    is ended too."""
    taken = []
    for job in jc.jobs.active():
        if job.id in jc.runs:
            continue
        holder = await jc.leases.holder_of(job.id)
        mine = holder == jc.holder and job.id in jc.leases.held
        if holder is not None and not mine:
            continue
        if mine or await jc.leases.take(job.id):
            taken.append(job.id)
            jc.start_run(job, recover)
    return taken


async def recover(jc: JobContext, job: Job) -> None:
    """End a job whose holder died (this instance holds its lease now); one still queued
    that waits for a slot (``slots.job_slots``) is run here instead."""
    previous = job.owner or "unknown"

    def adopt(current: Job) -> Job:
        if current.state in TERMINAL_STATES:
            return current
        return msgspec.structs.replace(current, owner=jc.holder, updated_at=utcnow_iso())

    try:
        job = await jc.store.update(job.id, adopt)
    except Exception:
        jc.leases.forget(job.id)  # lapses; a later sweep tries again
        log.exception("taking over job %s failed", job.id)
        return
    if job.state in TERMINAL_STATES:
        await jc.leases.release(job.id)
        return
    waiting = job.state == "queued" and not job.cancel_requested
    if waiting and previous != jc.holder and slots.job_slots(job, jc.settings):
        # It never started (it waited for a slot: perhaps for hours, in a nightly run):
        # nothing to clean up, so it is run here, keeping its place in line. (Not a job
        # whose own run here died: that would only die again.)
        log.warning("taking over queued job %s of %s: running it here", job.id, previous)
        await execute(jc, job)
        return
    log.warning("taking over job %s of %s (phase %s)", job.id, previous, job.phase)
    lost = f"the job-orchestrator instance running it ({previous}) stopped"
    state: JobState = "canceled" if job.cancel_requested else "failure"
    message = "cancelled by user" if job.cancel_requested else f"{lost} while {job.phase}"
    try:
        if job.params.get("agentId"):
            # Its agent ends its libvirt job, or removes the images of its restore, when
            # its next report is answered `cancel`.
            pass
        elif simulated.is_simulated(job):
            pass  # a simulated transfer (benchmarks): no libvirt job, no unit, nothing written
        elif job.type == "backup":
            state, message = await _recover_backup(jc, job, state, message)
        elif job.type == "restore":
            state, message = await _recover_restore(jc, job, state, message)
        elif job.type == "migration":
            message = await recover_any_migration(jc, job, message)
        else:
            await jc.purge_units(job.id)
    except Exception as exc:
        log.exception("cleaning up job %s failed", job.id)
        state, message = "failure", f"{lost}; cleaning up failed: {failure_message(exc)}"
    try:
        await jc.finish(job.id, state, message)
    except Exception:
        jc.leases.forget(job.id)
        log.exception("could not write the final state of job %s (%s)", job.id, state)
        return
    await slots.release(jc, job)


async def _recover_backup(
    jc: JobContext, job: Job, state: JobState, message: str
) -> tuple[JobState, str]:
    """Each step runs even if one before it failed; what could not be done is named."""
    assert job.server_id and job.vm_name and job.destination_id
    problems: list[str] = []
    committed: bool | None = False
    timestamp = job.result.get("timestamp")
    if job.phase == "committing" and isinstance(timestamp, str):
        try:
            committed = await _point_committed(jc, job, timestamp)
        except Exception as exc:
            committed = None  # unknown: keep the checkpoint, it is harmless either way
            problems.append(f"could not look for the restore point: {failure_message(exc)}")
    if not committed:
        try:
            await jc.purge_units(job.id)
        except Exception as exc:
            problems.append(f"could not purge its units: {failure_message(exc)}")
    checkpoint = job.result.get("checkpoint")
    end = BackupEndRequest(
        server_id=job.server_id,
        vm_name=job.vm_name,
        checkpoint=checkpoint if isinstance(checkpoint, str) else None,
        success=committed is not False,
    )
    try:
        await end_libvirt_job(jc, end, keep_going=lambda: jc.holds(job.id))
    except ServiceError as exc:
        problems.append(f"could not end the libvirt backup job: {exc.message}")
    if committed:
        return "success", f"backup {timestamp} committed before its orchestrator stopped"
    if committed is None:
        state = "failure"
        message = f"{message}; whether restore point {timestamp} was committed is unknown"
    return state, "; ".join([message, *problems])


async def _point_committed(jc: JobContext, job: Job, timestamp: str) -> bool:
    """Whether the restore point this job was committing is in the repository."""
    assert job.destination_id and job.vm_name
    repo = await jc.repository(job.destination_id, create=False, locked=True)
    try:
        point = await repo.restore_point(xml_path(job.vm_name, timestamp))
    except NotFoundError:
        return False
    finally:
        await repo.close()
    return point.job_id == job.id


async def _finish_request(
    jc: JobContext, job: Job, targets: list[RestoreTarget]
) -> RestoreFinishRequest:
    """The request that commits a restore: the images and the saved domain XML."""
    assert job.server_id and job.vm_name and job.destination_id
    repo = await jc.repository(job.destination_id, create=False)
    try:
        point = await repo.restore_point(job.params["xmlPath"])
        domain_xml = await repo.domain_xml(point)
    finally:
        await repo.close()
    return RestoreFinishRequest(
        server_id=job.server_id,
        job_id=job.id,
        vm_name=job.vm_name,
        success=True,
        domain_xml=domain_xml,
        disks=targets,
    )


async def _recover_restore(
    jc: JobContext, job: Job, state: JobState, message: str
) -> tuple[JobState, str]:
    assert job.server_id and job.vm_name
    targets = prepared_targets(job)
    if job.phase == "committing":
        # The commit (move the images into place, define the domain) may have been cut
        # short: do it again; what it answers is what happened.
        await jc.bus.request(
            InventoryCmd.RESTORE_FINISH,
            await _finish_request(jc, job, targets),
            Ok,
            timeout=timeouts.INVENTORY_JOB_STEP,
        )
        return "success", "restore committed by another orchestrator instance"
    await jc.purge_units(job.id)
    if targets:
        finish = RestoreFinishRequest(
            server_id=job.server_id,
            job_id=job.id,
            vm_name=job.vm_name,
            success=False,
            disks=targets,
        )
        await jc.bus.request(
            InventoryCmd.RESTORE_FINISH, finish, Ok, timeout=timeouts.INVENTORY_JOB_STEP
        )
    return state, message
