"""Warm migration through a backup destination: a ``migration`` job whose
``params.viaDestinationId`` names a destination D (HyperSDK ``destination:
{"type": "kvm", "server_id": T, "via_destination_id": D}``, native ``viaDestinationId``),
for hosts that cannot reach each other: each only reaches D (and the workers).

It is built on ordinary jobs, each visible in the job list with its own lease, locks,
log and result, submitted and awaited by the migration (``params.migrationJobId`` names
it):

1. ``copying``: a backup job of the running VM to D: incremental from the VM's newest
   point there when its checkpoint is still on the source, else a full read.
2. ``syncing``: further backup jobs (incremental, from the dirty bitmap), until the
   last one's bytes at the rate of the last pass that read anything take less than
   ``maxDowntimeSeconds``, or ``maxPasses`` passes were made. ``result.pass`` and
   ``result.dirtyBytes`` (the bytes that pass read) say where it is.
3. ``cutover`` (phase ``committing``: a cancel is refused from here): the source is shut
   down as the direct migration does it (``migrate``: graceful for
   ``shutdownTimeoutSeconds``, then forced if ``forceShutdown``), a last backup job
   reads the delta offline, and a restore job puts that point on the target server
   (thin images in ``targetDirectory`` or ``storagePool``, state files, ``networkMapping``
   applied to the domain, started when ``startOnTarget``). Downtime is the time from the
   source's stop to the restore's end, which writes the whole point: it grows with the
   disks' data, not only the last delta.

The points stay in D as ordinary restore points (``result.points``); their checkpoints
stay on the source, which stays defined and shut off. While the migration runs it holds
the source VM's lock and its folder in D (``locks.point_folder_lock``), so no other
backup of the VM, or into that folder, runs in between; and, from its submit, the
target's name (as a direct migration does: ``migrate.submit_holding_target``), under
which its restore job runs.

``result``: ``stage``, ``pass``, ``dirtyBytes``, ``passes`` (per pass: ``bytes``,
``seconds``, ``jobId``, ``timestamp``, ``kind``; the offline one ``offline: true``),
``points`` (the timestamps made in D), ``viaDestinationId``, ``restoreJobId``,
``bytesCopied``, ``downtimeSeconds``, ``cutoverSeconds`` (from the source's stop to: the
last point committed, the VM restored (and running)) and ``sourceShutdown``.

A cancel before the cut-over cancels the running backup job; the source keeps running
and the points already made stay in D (the final message names them). A failure after
the source stopped starts it again, and the message says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, Job, JobCancelRequest, RestoreRequest
from virtbackup.contracts.v1.schedules import JobDefinition, JobSubmitResult
from virtbackup.job_orchestrator.errors import JobCanceled, JobFailed, JobLost
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import point_folder_lock
from virtbackup.job_orchestrator.migrate import (
    Migration,
    _record,
    _shut_down_source,
    _undo,
    check_migration,
    record_completed,
    recover_migration,
    run_migration,
    submit_holding_target,
)
from virtbackup.job_orchestrator.point_lookup import open_point
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.repository.format import xml_path
from virtbackup.repository.repository import RepositoryError
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, ServiceError
from virtbackup.storage.errors import StorageError
from virtbackup.storage.probe import test_connection

log = logging.getLogger(__name__)

#: The HyperSDK destination's field, and the job's parameter.
VIA_FIELD = "via_destination_id"
VIA_PARAM = "viaDestinationId"
#: What a backup or restore job of a migration names it by.
PARENT_PARAM = "migrationJobId"
#: Seconds between two looks at a job the migration waits for.
POLL_SECONDS = 0.3
#: Seconds a taken-over migration waits for its jobs to end (their own takeover).
RECOVER_WAIT = 120.0


def is_via(job: Job) -> bool:
    return bool(job.params.get(VIA_PARAM))


async def run_any_migration(jc: JobContext, job: Job) -> str:
    """Run a migration job: through a destination (``run_via``) or host to host."""
    if is_via(job):
        return await run_via(jc, job)
    return await run_migration(jc, job)


async def recover_any_migration(jc: JobContext, job: Job, message: str) -> str:
    """End a migration whose orchestrator died (see ``recover_via``, ``recover_migration``)."""
    if is_via(job):
        return await recover_via(jc, job, message)
    return await recover_migration(jc, job, message)


async def submit_via(jc: JobContext, definition: JobDefinition) -> JobSubmitResult:
    """Check a migration through a destination and create its job. Refused before
    anything is created as the direct migration is (``migrate.check_migration``), and:
    ``destination.via_destination_id`` that is not a destination id (400), an unknown
    destination (404), a disabled one or one that cannot be written (400, with why), and
    ``options.remove_source`` (400: not available this way)."""
    dest = dict(definition.destination)
    via = dest.pop(VIA_FIELD)
    if not isinstance(via, str) or not via:
        raise BadRequest(f"destination.{VIA_FIELD}: expected a destination id, got {shown(via)}")
    server_id, vm, params = await check_migration(
        jc, msgspec.structs.replace(definition, destination=dest)
    )
    if params.get("removeSource"):
        raise BadRequest(
            "options.remove_source: not available through a backup destination: undefine "
            "the source yourself once the VM runs on the target (its restore points stay)"
        )
    cfg = await jc.config()
    found = next((d for d in cfg.destinations if d.id == via), None)
    if found is None:
        raise NotFound(f"destination.{VIA_FIELD}: destination {shown(via)} not found")
    if not found.enabled:
        raise BadRequest(f"destination.{VIA_FIELD}: destination {via} is disabled")
    await _check_writable(jc, via)
    params[VIA_PARAM] = via
    # The target's name is held from here to the job's end, as a direct migration's
    # is: its restore job (at the cut-over) runs under that hold.
    return await submit_holding_target(jc, server_id, vm, params)


async def _check_writable(jc: JobContext, via: str) -> None:
    """``BadRequest`` naming the field when destination ``via``'s repository cannot be
    opened (made if new) or a probe object cannot be written, read back and deleted."""
    try:
        repo = await jc.repository(via)
    except (StorageError, RepositoryError, OSError) as exc:
        raise BadRequest(
            f"destination.{VIA_FIELD}: destination {via} cannot be used: {exc}"
        ) from None
    except ServiceError as exc:
        raise BadRequest(
            f"destination.{VIA_FIELD}: destination {via} cannot be used: {exc.message}"
        ) from None
    try:
        await test_connection(repo.driver)
    except (StorageError, OSError) as exc:
        raise BadRequest(
            f"destination.{VIA_FIELD}: destination {via} cannot be written: {exc}"
        ) from None
    finally:
        await repo.close()


class _Via:
    """What a running migration through a destination has made."""

    def __init__(self, m: Migration) -> None:
        self.m = m
        self.via = str(m.job.params[VIA_PARAM])
        #: The backup and restore jobs submitted, in order.
        self.children: list[str] = []
        self.points: list[str] = []
        #: Bytes the ended passes read (the migration's progress adds the running one's).
        self.bytes_done = 0
        self.shown: tuple[int, int] = (0, 0)


async def run_via(jc: JobContext, job: Job) -> str:
    """Run the migration (see the module docstring); returns the success message."""
    v = _Via(Migration(job=job))
    folder = point_folder_lock("backup", v.via, v.m.vm)
    try:
        if folder is not None:
            what = f"the folder of vm {v.m.vm} in destination {v.via}"
            await jc.locks.acquire(*folder, job.id, "migration", what=what)
        return await _migrate_via(jc, v)
    except (JobLost, asyncio.CancelledError):
        raise
    except BaseException as exc:
        if not jc.holds(job.id):
            raise
        notes = await _stop_children(jc, v)
        notes.extend(await _undo(jc, v.m))
        if v.points:
            notes.append(
                f"the restore points made stay in destination {v.via}: {', '.join(v.points)}"
            )
        if isinstance(exc, JobCanceled):
            raise JobCanceled(job.id, notes=tuple(notes)) from exc
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise JobFailed("; ".join([f"migration failed: {detail}", *notes])) from exc
    finally:
        if folder is not None:
            with contextlib.suppress(Exception):
                await jc.locks.release(*folder, job.id)


async def _migrate_via(jc: JobContext, v: _Via) -> str:
    m, job, params = v.m, v.m.job, v.m.job.params
    await _record(
        jc, m, stage="copying", targetServerId=m.target, targetVmName=m.target_name,
        viaDestinationId=v.via,
    )  # fmt: skip
    await jc.enter(
        job.id, "transferring", message=f"copying: backing up {m.vm} to destination {v.via}"
    )
    passes: list[dict[str, Any]] = [await _pass(jc, v, 0)]
    limit, budget = int(params["maxPasses"]), float(params["maxDowntimeSeconds"])
    first = passes[0]
    rate = first["bytes"] / first["seconds"] if first["seconds"] > 0 and first["bytes"] else 0.0
    for number in range(1, limit + 1):
        await _record(jc, m, stage="syncing", **{"pass": number})
        await jc.message(job.id, f"syncing: pass {number}, an incremental backup to {v.via}")
        await jc._hold("migrate-via:syncing")  # tests aim a cancel here
        done = await _pass(jc, v, number)
        passes.append(done)
        await _record(jc, m, passes=passes, dirtyBytes=done["bytes"])
        if done["seconds"] > 0 and done["bytes"]:
            rate = done["bytes"] / done["seconds"]
        if not done["bytes"] or (rate and done["bytes"] / rate < budget):
            break
    # The point of no return: a cancel is refused from here.
    await jc.enter(job.id, "committing", message=f"cutover: stopping {m.vm} on server {m.source}")
    await _record(jc, m, stage="cutover")
    await _record(jc, m, sourceStopped=True)  # before: whoever ends the job starts it
    how = await _shut_down_source(jc, m)
    stopped = time.monotonic()
    last = await _pass(jc, v, len(passes), offline=True)
    passes.append(last)
    steps = {"backup": round(time.monotonic() - stopped, 3)}
    await _record(jc, m, passes=passes)
    if jc.settings.debug and params.get("debugFault") == "cutover":
        raise JobFailed("debug fault injected at cutover (options.debug_fault)")
    restored = await _restore(jc, v, last["timestamp"])
    m.defined = m.target_running = True  # the VM is there: the source stays off
    await _record(jc, m, defined=True)
    downtime = round(time.monotonic() - stopped, 3)
    started = bool(params.get("startOnTarget", True))
    steps["running" if started else "restored"] = downtime
    total = sum(p["bytes"] for p in passes)
    await record_completed(
        jc, m, total, passes=passes, downtimeSeconds=downtime, sourceShutdown=how,
        cutoverSeconds=steps,
    )  # fmt: skip
    as_name = f" as {m.target_name}" if m.target_name != m.vm else ""
    return (
        f"migrated {m.vm} from server {m.source} to server {m.target}{as_name} through "
        f"destination {v.via}: {'running' if started else 'defined (not started)'} there; "
        f"{len(passes)} backups, {total} bytes read, downtime {downtime} s (source {how}); "
        f"restore points {', '.join(v.points)} stay in {v.via}; restore: {restored}"
    )


async def _pass(jc: JobContext, v: _Via, number: int, *, offline: bool = False) -> dict[str, Any]:
    """One backup job of the VM to the destination, awaited; what it did. ``JobFailed``
    naming the job when it fails, ``JobCanceled`` when the migration is cancelled."""
    from virtbackup.job_orchestrator.runner import execute

    m = v.m
    if not offline:
        jc.check_canceled(m.job.id)
    started = time.monotonic()
    child = await jc.submit(
        "backup", server_id=m.source, vm_name=m.vm, destination_id=v.via,
        params={"fresh": False, PARENT_PARAM: m.job.id}, run=execute,
    )  # fmt: skip
    v.children.append(child.id)
    await _record(jc, m, childJobIds=list(v.children))
    ended = await _await(jc, v, child.id, cancelable=not offline)
    seconds = time.monotonic() - started
    timestamp = ended.result.get("timestamp")
    if ended.state == "success" and isinstance(timestamp, str):
        v.points.append(timestamp)
        await _record(jc, m, points=list(v.points))
    jc.check_canceled(m.job.id)
    if ended.state != "success" or not isinstance(timestamp, str):
        raise JobFailed(f"backup job {child.id} (pass {number}) {ended.state}: {ended.message}")
    done: dict[str, Any] = {
        "pass": number, "bytes": ended.bytes_transferred, "seconds": round(seconds, 3),
        "jobId": child.id, "timestamp": timestamp, "kind": _kind(ended.message),
    }  # fmt: skip
    if offline:
        done["offline"] = True
    await jc.message(m.job.id, f"pass {number}: backup {timestamp}, {done['bytes']} bytes read")
    return done


def _kind(message: str) -> str:
    return message.split(" ", 1)[0] if message.startswith(("full", "incremental")) else ""


async def _await(jc: JobContext, v: _Via, child_id: str, *, cancelable: bool) -> Job:
    """Wait for job ``child_id`` to end. A cancel of the migration (while ``cancelable``)
    is passed on to it; the migration's bytes follow its progress."""
    from virtbackup.job_orchestrator.handlers import cancel_job

    cancel = jc.cancel_event(v.m.job.id)
    asked = False
    while True:
        child, _ = await jc.store.get(child_id)
        if child.state in TERMINAL_STATES:
            if child.type == "backup":
                v.bytes_done += child.bytes_transferred
            return child
        if not jc.holds(v.m.job.id):
            raise JobLost(v.m.job.id)
        if child.type == "backup":
            await _show_progress(jc, v, child)
        if cancelable and cancel.is_set() and not asked:
            asked = True
            # Refused once the backup commits: its point is then made, and kept.
            with contextlib.suppress(Conflict, NotFound):
                await cancel_job(jc, JobCancelRequest(id=child_id))
        await asyncio.sleep(POLL_SECONDS)


async def _show_progress(jc: JobContext, v: _Via, child: Job) -> None:
    """The migration's ``bytesTransferred`` and ``totalBytes``: the ended passes' bytes
    plus the running backup's (written only when they change)."""
    shown = (v.bytes_done + child.bytes_transferred, v.bytes_done + child.total_bytes)
    if shown != v.shown:
        v.shown = shown
        changes: dict[str, object] = {"bytes_transferred": shown[0], "total_bytes": shown[1]}
        await update_job(jc.store, jc.bus, v.m.job.id, changes)


async def _restore(jc: JobContext, v: _Via, timestamp: str) -> str:
    """Restore point ``timestamp`` onto the target (a restore job, awaited); its
    message. ``JobFailed`` naming the job when it does not succeed."""
    from virtbackup.job_orchestrator.restore import plan_restore, restore_params, target_name
    from virtbackup.job_orchestrator.runner import execute

    m, params = v.m, v.m.job.params
    request = RestoreRequest(
        server_id=m.target,
        xml_path=xml_path(m.vm, timestamp),
        decision="overwrite",
        destination_id=v.via,
        vm_name=m.target_name if m.target_name != m.vm else None,
        target_directory=params.get("targetDirectory") or None,
        storage_pool=params.get("storagePool") or None,
        start=bool(params.get("startOnTarget", True)),
    )
    dest_id, point = await open_point(jc, request.xml_path, v.via)
    restore = {**restore_params(request), PARENT_PARAM: m.job.id}
    if mapping := params.get("networkMapping"):
        restore["networkMapping"] = mapping
    plan = await plan_restore(jc, m.target, dest_id, point, restore)
    if plan.vm_exists and not params.get("replace"):  # defined there since the submit
        raise JobFailed(
            f"vm {m.target_name} now exists on server {m.target} (options.replace is false)"
        )
    job_id = new_id()
    v.children.append(job_id)
    # Recorded first: whoever ends this migration looks at what the restore did.
    await _record(jc, m, childJobIds=list(v.children), restoreJobId=job_id)
    await jc.message(m.job.id, f"cutover: restoring {timestamp} onto server {m.target}")
    # Under the migration's hold of the target's name (taken at its submit): a lock of
    # its own would collide with it.
    await jc.submit(
        "restore", server_id=m.target, vm_name=target_name(point, restore),
        destination_id=dest_id, params=restore, lock_vm=True, run=execute, job_id=job_id,
        under=m.job.id,
    )  # fmt: skip
    ended = await _await(jc, v, job_id, cancelable=False)
    if ended.state != "success":
        raise JobFailed(f"restore job {job_id} {ended.state}: {ended.message}")
    return ended.message


async def _stop_children(jc: JobContext, v: _Via, wait: float = RECOVER_WAIT) -> list[str]:
    """Cancel the migration's jobs still running and wait (up to ``wait`` seconds) for
    them to end; what could not be done, for the job's message."""
    from virtbackup.job_orchestrator.handlers import cancel_job

    notes: list[str] = []
    deadline = time.monotonic() + wait
    for child_id in v.children:
        try:
            child, _ = await jc.store.get(child_id)
        except NotFound:
            continue
        if child.state in TERMINAL_STATES:
            continue
        with contextlib.suppress(Conflict, NotFound):
            await cancel_job(jc, JobCancelRequest(id=child_id))
        while child.state not in TERMINAL_STATES and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            child, _ = await jc.store.get(child_id)
        if child.state not in TERMINAL_STATES:
            notes.append(f"{child.type} job {child_id} had not ended")
        elif (
            child.state == "success"
            and child.type == "backup"
            and isinstance(ts := child.result.get("timestamp"), str)
            and ts not in v.points
        ):
            v.points.append(ts)
    return notes


async def recover_via(jc: JobContext, job: Job, message: str) -> str:
    """End a migration through a destination whose orchestrator died (this instance
    holds its lease now): its backup and restore jobs are cancelled and awaited (each
    is taken over as any job is); a restore that succeeded means the VM is on the
    target (the source stays off), else a source stopped for the cut-over is started
    again. Returns ``message`` with what was done."""
    v = _Via(Migration(job=job))
    v.children = [c for c in job.result.get("childJobIds") or [] if isinstance(c, str)]
    v.points = [p for p in job.result.get("points") or [] if isinstance(p, str)]
    notes = await _stop_children(jc, v)
    result = dict(job.result)
    restore_id = result.get("restoreJobId")
    if isinstance(restore_id, str):
        with contextlib.suppress(NotFound):
            restored, _ = await jc.store.get(restore_id)
            if restored.state == "success":
                result["defined"] = True
    recorded = msgspec.structs.replace(job, result=result)
    text = await recover_migration(jc, recorded, message, own_backup_job=False)
    if v.points:
        notes.append(f"the restore points made stay in destination {v.via}: {', '.join(v.points)}")
    return "; ".join([text, *notes])
