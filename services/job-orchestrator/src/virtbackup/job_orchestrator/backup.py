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
from typing import Any, Literal

import msgspec
from nats.js.errors import InvalidKeyError, KeyNotFoundError

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import (
    BackupBeginRequest,
    BackupBegun,
    BackupEnded,
    BackupEndRequest,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator import simulated
from virtbackup.job_orchestrator.agent_jobs import run_agent_backup
from virtbackup.job_orchestrator.errors import JobCanceled, JobFailed, JobLost
from virtbackup.job_orchestrator.fanout import FanOut, also_destinations, outcome, summary
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.planner import (
    DEFAULT_PARTIAL_MAX_FRACTION,
    DiskPlan,
    build_manifest,
    group_units,
    partial_max_fraction,
    plan_disk,
    unit_chunks,
)
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.state_files import capture, capture_into
from virtbackup.repository.format import manifest_key
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint, StateFileRecord
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.repository.verification import read_verification
from virtbackup.runtime import joblog, timeouts
from virtbackup.runtime.agent_config import find_destination
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import NotFound, ServiceError, Unavailable
from virtbackup.storage.errors import NotFoundError, StorageError

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


async def parent_point(repo: Repository, job: Job) -> RestorePoint | None:
    """The point this backup builds on: the newest (``latest_point``), or the one its
    ``params.sourceRef`` names (a backup plan's ``source_ref``: a timestamp of one of the
    VM's points from its server, or ``full`` for none). ``JobFailed`` when the named point
    is gone (deleted since the run was asked for)."""
    assert job.vm_name and job.server_id
    ref = job.params.get("sourceRef")
    if ref is None:
        return await latest_point(repo, job.vm_name, job.server_id)
    if ref == "full":
        return None
    for point in await repo.restore_points(job.vm_name):
        if point.timestamp == ref and point.source_server_id == job.server_id:
            return point
    raise JobFailed(f"source_ref {ref}: no such restore point of the VM any more")


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
        for indices in group_units(disk.read, unit_chunks(disk.chunk_size)):
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


async def _parent(
    repo: Repository, job: Job, fresh: bool, *, primary: bool
) -> tuple[RestorePoint | None, bool]:
    """The point a backup into ``repo`` builds on (``parent_point`` in the job's own
    destination, which honours a plan's ``source_ref``; the newest point in an extra
    one), and whether it was left out because its last verify found it damaged."""
    assert job.vm_name and job.server_id
    parent: RestorePoint | None
    if fresh:
        parent = None
    elif primary:
        parent = await parent_point(repo, job)
    else:
        parent = await latest_point(repo, job.vm_name, job.server_id)
    if (
        parent is not None
        and (await read_verification(repo, parent.vm_name, parent.timestamp)).state == "damaged"
    ):
        # An incremental would name the parent's chunks it does not read, damaged
        # (quarantined) ones included: a full read stores them again instead.
        return None, True
    return parent, False


#: How a plan run pins a backup to one transfer worker: ``params.pinnedAgentId`` is
#: ``worker:<its VB_WORKERS key>`` (as ``eligible-agents`` lists it).
WORKER_PIN_PREFIX = "worker:"


async def pinned_worker(jc: JobContext, job: Job) -> str | None:
    """The ``VB_WORKERS`` key of the transfer worker the job is pinned to, or ``None``
    when it is not pinned to a worker. Raises ``JobFailed`` when that worker is not
    running (no heartbeat record): its units would wait for it until the job stalls."""
    pin = job.params.get("pinnedAgentId")
    if not isinstance(pin, str) or not pin.startswith(WORKER_PIN_PREFIX):
        return None
    key = pin[len(WORKER_PIN_PREFIX) :]
    try:
        entry = await (await jc.bus.key_value(buckets.WORKERS)).get(key)
        alive = entry.value is not None
    except (NotFound, KeyNotFoundError, InvalidKeyError):
        alive = False
    if not alive:
        raise JobFailed(
            f"the run is pinned to transfer worker {key!r}, which is not running "
            "(GET /api/v1/agents lists the live ones)"
        )
    return key


async def run_backup(jc: JobContext, job: Job) -> str:
    """Run the backup; returns the success message (raises on failure or cancel).

    With ``params.alsoDestinationIds`` the same read is written to those destinations
    too (``fanout``): a destination that fails is left out and the others commit; the
    job then fails with a message starting ``partial failure`` (after the libvirt job
    ended keeping its checkpoint, which the committed points name)."""
    assert job.server_id and job.vm_name and job.destination_id
    started = time.monotonic()
    cfg = await jc.config()
    server = next(s for s in cfg.servers if s.id == job.server_id)
    if job.params.get("agentId"):
        return await run_agent_backup(jc, job)  # its agent reads and writes (agent_jobs)
    if (simulate := simulated.seconds_for(jc, server)) is not None:
        return await simulated.run_simulated_backup(jc, job, simulate)  # benchmarks only
    await pinned_worker(jc, job)  # checked before the begin: nothing to undo if gone
    fraction = partial_max_fraction(find_destination(cfg, job.destination_id).driver_id)
    order = [job.destination_id, *also_destinations(job)]
    repos: dict[str, Repository] = {}
    #: Extra destinations that failed before anything was read (they commit nothing).
    early: dict[str, str] = {}
    try:
        repos[job.destination_id] = await jc.repository(job.destination_id)
        for dest in order[1:]:
            try:
                repos[dest] = await jc.repository(dest)
            except (StorageError, RepositoryError, ServiceError) as exc:
                early[dest] = f"opening its repository: {getattr(exc, 'message', None) or exc}"
                continue
            if repos[dest].chunk_size != repos[job.destination_id].chunk_size:
                early[dest] = (
                    f"its repository has chunks of {repos[dest].chunk_size} bytes, "
                    f"{job.destination_id} of {repos[job.destination_id].chunk_size}: one read "
                    "serves only repositories of one chunk size"
                )
                await repos.pop(dest).close()
        fresh = bool(job.params.get("fresh"))
        parents: dict[str, RestorePoint | None] = {}
        #: Why the backup has no parent when there are points it could have built on
        #: (the inventory only knows that it was given none).
        no_parent_reason = "fresh: a full read was asked for" if fresh else ""
        for dest in list(repos):
            try:
                found, damaged = await _parent(
                    repos[dest], job, fresh, primary=dest == job.destination_id
                )
            except (StorageError, RepositoryError) as exc:
                if dest == job.destination_id:
                    raise
                early[dest] = f"listing its restore points: {exc}"
                await repos.pop(dest).close()
                continue
            parents[dest] = found
            if damaged and dest == job.destination_id:
                no_parent_reason = (
                    f"the newest restore point in destination {dest} failed verify"
                    " (damaged): its damaged chunks are stored again"
                )
            if damaged:
                await jc.message(
                    job.id,
                    f"the newest point in destination {dest} failed verify: a full read, "
                    "storing its damaged chunks again",
                )
        parent = parents[job.destination_id]
        # Extra destinations build on their own newest point only when it marks the
        # checkpoint the libvirt job starts from; else they get a full read.
        for dest in list(parents)[1:]:
            own = parents[dest]
            if own is not None and (parent is None or own.checkpoint != parent.checkpoint):
                parents[dest] = None
        fanned = len(order) > 1
        recorded = _recorded(parents, order, early) if fanned else {}
        # Recorded before anything builds on it: from now on a delete of the parent point
        # is refused (409), and before, while this job holds the VM folder's lock, too
        # (``points.remove_point``). So the incremental below is relative to a checkpoint
        # whose point exists, and stays so until this job ends.
        await update_job(
            jc.store, jc.bus, job.id, {"result": {**_parent_result(parent), **recorded}}
        )
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
        if parent is None and no_parent_reason:
            begun = msgspec.structs.replace(begun, full_reason=no_parent_reason)
        # Recorded at once, so that whoever ends this job can drop the new checkpoint.
        await update_job(
            jc.store,
            jc.bus,
            job.id,
            {"result": {**_parent_result(parent), "checkpoint": begun.checkpoint, **recorded}},
        )
        success = ended = False
        partial: str | None = None

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
            message, partial = await _transfer(
                jc,
                job,
                order,
                early,
                repos,
                begun,
                parents,
                server.name or server.id,
                started,
                fraction,
            )
            success = True
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
        if partial is not None:
            raise JobFailed(partial)
        return message
    finally:
        for opened in repos.values():
            await opened.close()


def _recorded(
    parents: dict[str, RestorePoint | None], order: list[str], failed: dict[str, str]
) -> dict[str, Any]:
    """``result.destinations`` before the commit: each destination's parent (and those
    that failed already)."""
    stamps = {d: (p.timestamp if p else None) for d, p in parents.items()}
    return {"destinations": outcome(order, {}, failed, stamps)}


async def _transfer(
    jc: JobContext,
    job: Job,
    order: list[str],
    early: dict[str, str],
    repos: dict[str, Repository],
    begun: BackupBegun,
    parents: dict[str, RestorePoint | None],
    server_name: str,
    started: float,
    fraction: float,
) -> tuple[str, str | None]:
    """Read once, store in every destination of ``repos`` (those of ``order`` that did
    not fail ``early``), commit in each that did not fail. Returns the success message
    and, when some destination failed but not all, the partial failure's message
    (``None`` otherwise); raises when every destination failed."""
    assert job.server_id and job.vm_name and job.destination_id
    live = list(repos)
    repo = repos[job.destination_id]
    parent = parents[job.destination_id]
    fanned = len(order) > 1
    failed: dict[str, str] = dict(early)
    files_by: dict[str, list[StateFileRecord]] = {}
    if fanned:
        # NVRAM, TPM state: as at the backup's begin, read once, stored in each.
        files_by, failing = await capture_into(jc, job, repos)
        failed.update(failing)
    else:
        files_by[job.destination_id] = await capture(jc, job, repo)
    timestamps = {d: await repos[d].new_timestamp(job.vm_name) for d in live}
    timestamp = timestamps[job.destination_id]
    plans_by = {
        d: await plan(
            begun,
            repos[d],
            parents[d] if begun.incremental else None,
            fraction if d == job.destination_id else 0.0,
        )
        for d in live
    }
    plans = plans_by[job.destination_id]
    fan = FanOut(job.id, live, plans_by)
    fan.failed.update(failed)
    kinds = {d: _kind(begun, plans_by[d]) for d in live}
    kind = kinds[job.destination_id]
    reasons = full_reasons(begun, parent, plans)
    if kind == "full":
        read_in_full = begun.full_reason or "; ".join(f"{t}: {r}" for t, r in reasons.items())
    else:
        read_in_full = "; ".join(f"{t}: {r}" for t, r in reasons.items())
    offline = " (offline: the VM was shut off)" if begun.offline else ""
    stats = {"fallbacks": 0}

    def on_result(result: UnitResult) -> None:
        fan.on_result(result)
        stats["fallbacks"] += result.partial_fallbacks

    reason = f" (read in full: {read_in_full})" if read_in_full else ""
    also = full_note = ""
    if fanned:
        full_ones = [d for d in live[1:] if kinds[d] == "full" and kind == "incremental"]
        also = f", written to {len(order)} destinations"
        if full_ones:
            full_note = f"{', '.join(full_ones)} in full: no point of this checkpoint there"
            also += f" ({full_note})"
    stamps = {d: (p.timestamp if p else None) for d, p in parents.items()}
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
        message=f"{kind} backup{offline}{reason}{also}: reading {len(fan.units)} units",
        result={
            **_parent_result(parent),
            "checkpoint": begun.checkpoint,
            **({"destinations": outcome(order, {}, fan.failed, stamps)} if fanned else {}),
        },
    )
    progress = await jc.run_units(
        job.id, fan.units, fan.total_bytes, on_result, pinned_worker=await pinned_worker(jc, job)
    )
    if not fan.alive():
        raise JobFailed("every destination failed: " + summary(order, {}, fan.failed))

    def point_for(dest: str) -> tuple[RestorePoint, list[DiskManifest]]:
        ts = timestamps[dest]
        manifests = [build_manifest(p, fan.results[dest][p.target]) for p in plans_by[dest]]
        dest_kind, own = kinds[dest], parents[dest]
        point = RestorePoint(
            vm_name=job.vm_name or "",
            timestamp=ts,
            source_server_id=job.server_id or "",
            source_server_name=server_name,
            kind=dest_kind,
            checkpoint=begun.checkpoint,
            parent_checkpoint=(
                begun.parent_checkpoint
                if dest_kind == "incremental" or dest == job.destination_id
                else None
            ),
            parent_timestamp=own.timestamp if own and dest_kind == "incremental" else None,
            disks=[
                DiskRecord(
                    target=p.target,
                    basename=os.path.basename(p.path) or p.target,
                    path=p.path,
                    format=p.format,
                    size=p.size,
                    manifest=manifest_key(job.vm_name or "", ts, p.target),
                    stored_chunks=sum(1 for c in m.chunks if c is not None),
                    zero_chunks=sum(1 for c in m.chunks if c is None),
                )
                for p, m in zip(plans_by[dest], manifests, strict=True)
            ],
            created_at=utcnow_iso(),
            duration_seconds=round(time.monotonic() - started, 3),
            bytes_read=progress.bytes_transferred,
            bytes_written=progress.physical_bytes,
            job_id=job.id,
            files=files_by.get(dest, []),
        )
        return point, manifests

    # The point of no return: from here a cancel is refused, and the job ends in what
    # the commit does.
    await jc.enter(
        job.id,
        "committing",
        message="committing the restore point",
        result={
            **_parent_result(parent),
            "checkpoint": begun.checkpoint,
            "timestamp": timestamp,
            **({"destinations": outcome(order, {}, fan.failed, stamps)} if fanned else {}),
        },
    )
    committed: dict[str, dict[str, Any]] = {}
    for dest in fan.alive():
        point, manifests = point_for(dest)
        if not fanned:
            await repos[dest].commit(point, manifests, begun.domain_xml)
        else:
            try:
                await repos[dest].commit(point, manifests, begun.domain_xml)
            except (StorageError, RepositoryError, OSError) as exc:
                fan.failed[dest] = f"committing: {type(exc).__name__}: {exc}"
                continue
        committed[dest] = {"timestamp": point.timestamp, "kind": point.kind}
    if not committed:
        raise JobFailed("every destination failed: " + summary(order, {}, fan.failed))
    read_chunks = fan.chunks_read
    in_part = sum(len(u.partial) for u in fan.units)
    part = f" ({in_part} in part)" if in_part else ""
    stored = sum(s["stored"] for s in fan.stats.values())
    dedup = sum(s["dedup"] for s in fan.stats.values())
    summary_text = (
        f"{kind} backup {timestamp}{offline}: {read_chunks} chunks read{part}, "
        f"{stored} stored, {dedup} deduplicated"
    )
    if fanned:
        summary_text += "; " + summary(order, committed, fan.failed)
        if full_note:
            summary_text += f" ({full_note})"
        await update_job(
            jc.store,
            jc.bus,
            job.id,
            {
                "result": {
                    **_parent_result(parent),
                    "checkpoint": begun.checkpoint,
                    "timestamp": timestamp,
                    "destinations": outcome(order, committed, fan.failed, stamps),
                }
            },
        )
    if stats["fallbacks"]:
        # The new point is whole (those chunks were read whole), older ones may not be.
        summary_text += (
            f"; {stats['fallbacks']} chunks of the previous restore point were missing or "
            "damaged in the repository (read whole instead): check older points with a "
            "sanity check"
        )
    message = f"{summary_text}; read in full: {read_in_full}" if read_in_full else summary_text
    partial = f"partial failure: {summary(order, committed, fan.failed)}" if fan.failed else None
    return message, partial


def _kind(begun: BackupBegun, plans: list[DiskPlan]) -> Literal["full", "incremental"]:
    return "incremental" if begun.incremental and any(p.incremental for p in plans) else "full"
