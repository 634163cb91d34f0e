"""A backup job, from the libvirt job's begin to the committed restore point.

1. Find the VM's latest restore point in the destination; ask the inventory to begin a
   pull-mode backup, incremental from that point's checkpoint when the chain is intact.
   The inventory answers with each disk's export and its allocation map (and dirty
   bitmap): the orchestrator never touches NBD. A shut-off VM is backed up offline (the
   inventory starts it paused and shuts it off again at the end; the message says so).
2. Per disk, plan the chunks to read, and publish them as units (phase ``transferring``).
   In an incremental backup a disk that is new, resized, or has no usable bitmap is read
   in full alone; the message names each such disk and why.
3. Gather the unit results, enter ``committing`` (the point of no return: a cancel is
   refused from here), then write the manifests, the domain XML and ``backup.json``
   (only now is the restore point visible), and end the libvirt job, keeping its new
   checkpoint. On any failure or cancel, the libvirt job ends, the new checkpoint is
   dropped (so the next incremental still covers every change) and nothing is committed;
   when the VM stopped during the backup, the job's message says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Literal

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import (
    BackupBeginRequest,
    BackupBegun,
    BackupEnded,
    BackupEndRequest,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import JobCanceled, JobFailed, JobLost
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.planner import (
    DEFAULT_PARTIAL_MAX_FRACTION,
    DiskPlan,
    build_manifest,
    group_units,
    partial_max_fraction,
    plan_disk,
)
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.state_files import capture
from virtbackup.repository.format import manifest_key
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.repository.verification import read_verification
from virtbackup.runtime import joblog, timeouts
from virtbackup.runtime.agent_config import find_destination
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import ServiceError, Unavailable
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)

#: Seconds the end of a libvirt backup job is asked for again while no inventory answers.
END_PATIENCE = 120.0
#: Seconds between two asks, and the longest one ask may wait for its answer (ending a
#: job waits up to 30 s for libvirt).
END_RETRY_DELAY = 1.0
END_TIMEOUT = 60.0


async def end_libvirt_job(
    jc: JobContext,
    end: BackupEndRequest,
    *,
    patience: float = END_PATIENCE,
    keep_going: Callable[[], bool] = lambda: True,
) -> BackupEnded:
    """Ask the inventory to end the backup job (``BACKUP_END``), again every second while
    no inventory answers (killed, restarting, or NATS away) for up to ``patience``
    seconds and as long as ``keep_going()``: a libvirt job left up blocks every later
    backup of the VM. Returns the inventory's answer (whether the VM stopped during the
    backup). Raises the error the inventory answered with, or Unavailable when it never
    answered (the inventory then ends the job when it starts, see its ``reconcile``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await jc.bus.request(
                InventoryCmd.BACKUP_END, end, BackupEnded, timeout=END_TIMEOUT
            )
        except Unavailable as exc:
            if loop.time() + END_RETRY_DELAY >= deadline or not keep_going():
                raise
            log.info("ending the backup job of %s: %s; asking again", end.vm_name, exc.message)
            await asyncio.sleep(END_RETRY_DELAY)


async def latest_point(repo: Repository, vm: str, server_id: str) -> RestorePoint | None:
    """The point the next backup of ``vm`` (from ``server_id``) builds on: its newest
    restore point that exists now (a deleted point is no parent: its record is gone
    first), or ``None``. Its checkpoint is where the incremental starts; the inventory
    checks that libvirt still has it (else a full read)."""
    points = [p for p in await repo.restore_points(vm) if p.source_server_id == server_id]
    return points[-1] if points else None


def _parent_result(parent: RestorePoint | None) -> dict[str, str | None]:
    """What a backup job's ``result`` says of its parent point (``points.remove_point``
    reads it): its timestamp, ``None`` for a full read."""
    return {"parentTimestamp": parent.timestamp if parent else None}


async def plan(
    begun: BackupBegun,
    repo: Repository,
    parent: RestorePoint | None,
    partial_max_fraction: float = DEFAULT_PARTIAL_MAX_FRACTION,
) -> list[DiskPlan]:
    """One plan per disk of ``begun``, from the extent maps the inventory read at the begin:
    incremental where the disk has a dirty map and ``parent`` a manifest of it, else a
    full read of what is allocated (``partial_max_fraction``: see ``plan_disk``)."""
    plans = []
    for disk in begun.disks:
        parent_manifest: DiskManifest | None = None
        if begun.incremental and parent is not None and disk.dirty is not None:
            with contextlib.suppress(NotFoundError):
                parent_manifest = await repo.manifest(parent, disk.target)
        plans.append(
            plan_disk(
                target=disk.target,
                path=disk.path,
                fmt=disk.format,
                size=disk.size,
                chunk_size=repo.chunk_size,
                nbd_url=disk.nbd_url,
                allocation=disk.allocation,
                dirty=disk.dirty,
                parent=parent_manifest,
                partial_max_fraction=partial_max_fraction,
            )
        )
    return plans


def backup_units(job_id: str, destination_id: str, plans: list[DiskPlan]) -> list[TransferUnit]:
    """The units of a backup, numbered from 0 across its disks: each disk's chunks to
    read, :func:`group_units` at a time, with those that may be read in part."""
    units: list[TransferUnit] = []
    for disk in plans:
        for indices in group_units(disk.read):
            units.append(
                TransferUnit(
                    job_id=job_id,
                    unit=len(units),
                    kind="backup",
                    destination_id=destination_id,
                    disk=disk.target,
                    disk_size=disk.size,
                    chunk_size=disk.chunk_size,
                    nbd_url=disk.nbd_url,
                    indices=indices,
                    partial=disk.partial_of(indices),
                )
            )
    return units


def full_reasons(
    begun: BackupBegun, parent: RestorePoint | None, plans: list[DiskPlan]
) -> dict[str, str]:
    """Why each disk of an incremental backup is read in full (target -> reason, in disk
    order): a disk not in ``parent`` is new, one whose size changed was grown or shrunk,
    else the inventory's reason (a raw image, a broken bitmap). Empty for a full backup:
    ``begun.full_reason`` says why the whole backup is one."""
    if not begun.incremental or parent is None:
        return {}
    exports = {d.target: d for d in begun.disks}
    previous = {d.target: d for d in parent.disks}
    reasons: dict[str, str] = {}
    for p in plans:
        if p.incremental:
            continue
        old, export = previous.get(p.target), exports[p.target]
        if old is None:
            reasons[p.target] = "new disk"
        elif old.size != p.size:
            change = "grown" if p.size > old.size else "shrunk"
            reasons[p.target] = f"{change} from {old.size} to {p.size} bytes"
        elif export.full_reason:
            reasons[p.target] = export.full_reason
        elif export.dirty is None:
            reasons[p.target] = "no dirty bitmap"
        else:
            reasons[p.target] = "its manifest in the previous restore point does not match"
    return reasons


async def run_backup(jc: JobContext, job: Job) -> str:
    """Run the backup; returns the success message (raises on failure or cancel)."""
    assert job.server_id and job.vm_name and job.destination_id
    started = time.monotonic()
    cfg = await jc.config()
    server = next(s for s in cfg.servers if s.id == job.server_id)
    fraction = partial_max_fraction(find_destination(cfg, job.destination_id).driver_id)
    repo = await jc.repository(job.destination_id)
    try:
        fresh = bool(job.params.get("fresh"))
        parent = None if fresh else await latest_point(repo, job.vm_name, job.server_id)
        if (
            parent is not None
            and (await read_verification(repo, parent.vm_name, parent.timestamp)).state == "damaged"
        ):
            # An incremental would name the parent's chunks it does not read, damaged
            # (quarantined) ones included: a full read stores them again instead.
            await jc.message(
                job.id,
                f"the newest point {parent.timestamp} failed verify: a full read, "
                "storing its damaged chunks again",
            )
            parent = None
        # Recorded before anything builds on it: from now on a delete of the parent point
        # is refused (409), and before, while this job holds the VM folder's lock, too
        # (``points.remove_point``). So the incremental below is relative to a checkpoint
        # whose point exists, and stays so until this job ends.
        await update_job(jc.store, jc.bus, job.id, {"result": _parent_result(parent)})
        if fresh and jc.settings.debug:
            await jc.message(job.id, "fresh: the next backup is a full read")
        await jc.message(job.id, "beginning the libvirt backup job")
        jc.check_canceled(job.id)
        begun = await jc.bus.request(
            InventoryCmd.BACKUP_BEGIN,
            BackupBeginRequest(
                server_id=job.server_id,
                vm_name=job.vm_name,
                incremental_from=parent.checkpoint if parent else None,
                job_id=job.id,
            ),
            BackupBegun,
            timeout=timeouts.INVENTORY_JOB_STEP,
        )
        # Recorded at once, so that whoever ends this job can drop the new checkpoint.
        await update_job(
            jc.store,
            jc.bus,
            job.id,
            {"result": {**_parent_result(parent), "checkpoint": begun.checkpoint}},
        )
        success = ended = False

        async def end_job() -> BackupEnded | None:
            # A runner that no longer holds the job (cut off or stalled past its lease)
            # leaves it alone: its new holder ends the libvirt job.
            if not (success or jc.holds(job.id)):
                return None
            end = BackupEndRequest(
                server_id=job.server_id or "",
                vm_name=job.vm_name or "",
                checkpoint=begun.checkpoint,
                success=success,
                domain_id=begun.domain_id,
                offline=begun.offline,
            )
            try:
                return await end_libvirt_job(jc, end, keep_going=lambda: jc.holds(job.id))
            except ServiceError as exc:
                log.warning("ending the backup job of %s failed: %s", job.vm_name, exc)
                return None

        try:
            message = await _transfer(
                jc,
                job,
                repo,
                begun,
                parent,
                server.name or server.id,
                started,
                fraction,
            )
            success = True
            return message
        except (JobCanceled, JobLost):
            raise
        except Exception as exc:
            answer, ended = await end_job(), True
            if answer is not None and answer.vm_stopped:
                detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                raise JobFailed(
                    "the VM stopped during the backup: no restore point was made, and the "
                    f"next backup reads every change since the previous one ({detail})"
                ) from exc
            raise
        finally:
            if not ended:
                await end_job()
    finally:
        await repo.close()


async def _transfer(
    jc: JobContext,
    job: Job,
    repo: Repository,
    begun: BackupBegun,
    parent: RestorePoint | None,
    server_name: str,
    started: float,
    fraction: float,
) -> str:
    assert job.server_id and job.vm_name and job.destination_id
    files = await capture(jc, job, repo)  # NVRAM, TPM state: as at the backup's begin
    timestamp = await repo.new_timestamp(job.vm_name)
    plans = await plan(begun, repo, parent if begun.incremental else None, fraction)
    units = backup_units(job.id, job.destination_id, plans)
    kind: Literal["full", "incremental"] = (
        "incremental" if begun.incremental and any(p.incremental for p in plans) else "full"
    )
    reasons = full_reasons(begun, parent, plans)
    if kind == "full":
        read_in_full = begun.full_reason or "; ".join(f"{t}: {r}" for t, r in reasons.items())
    else:
        read_in_full = "; ".join(f"{t}: {r}" for t, r in reasons.items())
    offline = " (offline: the VM was shut off)" if begun.offline else ""
    total_bytes = sum(p.read_bytes for p in plans)
    results: dict[str, dict[int, str | None]] = {p.target: {} for p in plans}
    stats = {"stored": 0, "dedup": 0, "fallbacks": 0}

    def on_result(result: UnitResult) -> None:
        for ref in result.chunks:
            results[result.disk][ref.index] = ref.id
        stats["stored"] += result.chunks_stored
        stats["dedup"] += result.chunks_deduplicated
        stats["fallbacks"] += result.partial_fallbacks

    reason = f" (read in full: {read_in_full})" if read_in_full else ""
    for p in plans:  # the job's output log: one line per disk
        why = reasons.get(p.target) or begun.full_reason
        how = "incremental" if p.incremental else f"full ({why})" if why else "full"
        await joblog.try_append(
            jc.bus,
            job.id,
            f"disk {p.target} ({p.path}, {p.format}, {p.size} bytes): {how}, "
            f"{len(p.read)} of {p.count} chunks to read, {len(p.partial)} in part",
        )
    await jc.enter(
        job.id,
        "transferring",
        message=f"{kind} backup{offline}{reason}: reading {len(units)} units",
        result={**_parent_result(parent), "checkpoint": begun.checkpoint},
    )
    progress = await jc.run_units(job.id, units, total_bytes, on_result)
    manifests = [build_manifest(p, results[p.target]) for p in plans]
    point = RestorePoint(
        vm_name=job.vm_name,
        timestamp=timestamp,
        source_server_id=job.server_id,
        source_server_name=server_name,
        kind=kind,
        checkpoint=begun.checkpoint,
        parent_checkpoint=begun.parent_checkpoint,
        parent_timestamp=parent.timestamp if parent and kind == "incremental" else None,
        disks=[
            DiskRecord(
                target=p.target,
                basename=os.path.basename(p.path) or p.target,
                path=p.path,
                format=p.format,
                size=p.size,
                manifest=manifest_key(job.vm_name, timestamp, p.target),
                stored_chunks=sum(1 for c in m.chunks if c is not None),
                zero_chunks=sum(1 for c in m.chunks if c is None),
            )
            for p, m in zip(plans, manifests, strict=True)
        ],
        created_at=utcnow_iso(),
        duration_seconds=round(time.monotonic() - started, 3),
        bytes_read=progress.bytes_transferred,
        bytes_written=progress.physical_bytes,
        job_id=job.id,
        files=files,
    )
    # The point of no return: from here a cancel is refused, and the job ends in what
    # the commit does.
    await jc.enter(
        job.id,
        "committing",
        message="committing the restore point",
        result={**_parent_result(parent), "checkpoint": begun.checkpoint, "timestamp": timestamp},
    )
    await repo.commit(point, manifests, begun.domain_xml)
    read_chunks = sum(len(p.read) for p in plans)
    in_part = sum(len(p.partial) for p in plans)
    part = f" ({in_part} in part)" if in_part else ""
    summary = (
        f"{kind} backup {timestamp}{offline}: {read_chunks} chunks read{part}, "
        f"{stats['stored']} stored, {stats['dedup']} deduplicated"
    )
    if stats["fallbacks"]:
        # The new point is whole (those chunks were read whole), older ones may not be.
        summary += (
            f"; {stats['fallbacks']} chunks of the previous restore point were missing or "
            "damaged in the repository (read whole instead): check older points with a "
            "sanity check"
        )
    return f"{summary}; read in full: {read_in_full}" if read_in_full else summary
