"""Restore points as resources (list, get, protect, notes, delete) and prune jobs.

Deleting a point (``DELETE /api/v1/restore-points/{id}``, and each removal of a prune)
is refused (409) while the point is protected or a job uses it:

* a restore or sanity check reading it, a verify of its destination (and VM), an
  instant-access export serving one of its disks;
* a backup of its VM into that destination building on it: a backup records the point
  it builds on (``result.parentTimestamp``) before the libvirt job begins, and holds its
  VM folder's lock (``locks.point_folder_lock``) from its submit to its end. A delete
  takes that lock for the moment it deletes, so no backup can start and pick the point
  as its parent meanwhile; while a backup holds it, the delete goes ahead only if the
  backup has recorded another parent (and 409 before it has recorded one).

A delete also takes a second lock, ``(@<destination>, points:<folder>)``, that ``PATCH``
takes too: a point cannot be protected between the delete's look at ``point.json`` and
its removal. Both locks name the operation, not a job: they lapse
``locks.ORPHAN_GRACE`` seconds after an instance died holding them.

A prune after every successful backup of a VM with a policy is a job of its own
(``type: prune``, ``params.automatic``), submitted when the backup has finished: the
backup's outcome stays the backup's, a prune that fails or is cancelled shows as such,
and the same code runs it as an on-demand prune (locks, in-use checks, progress, result).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import msgspec

from virtbackup.contracts.subjects import EventType, JobCmd
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.config import (
    AgentConfig,
    ConfigError,
    Destination,
    check_retention,
)
from virtbackup.contracts.v1.exports import LIVE_EXPORT_STATES
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.points import (
    PointDeleted,
    PointDeleteRequest,
    PointDisk,
    PointInfo,
    PointList,
    PointListRequest,
    PointRef,
    PointUpdateRequest,
    PointVerification,
    PruneDecision,
    PrunePlan,
    PruneRequest,
    parse_point_id,
    point_id,
)
from virtbackup.contracts.v1.retention import KeepRules
from virtbackup.job_orchestrator import checkpoints_left, exports
from virtbackup.job_orchestrator.errors import JobFailed
from virtbackup.job_orchestrator.fanout import parent_of, written_destinations
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.lifecycle_gc import (
    claim_destination,
    claimed,
    release_destination,
)
from virtbackup.job_orchestrator.locks import Busy, point_folder_lock
from virtbackup.job_orchestrator.point_lookup import destination_faults
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.repository import retention
from virtbackup.repository.format import parse_vm_segment, record_key, xml_path
from virtbackup.repository.lifecycle import (
    PointMeta,
    SidecarError,
    read_point_meta,
    read_verification,
    write_point_meta,
)
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import (
    NoRepositoryError,
    Repository,
    RepositoryError,
    UnreadableRecord,
)
from virtbackup.runtime.agent_config import find_destination
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, Unavailable
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)
point_commands: Commands[JobContext] = Commands()

#: Job types that read restore points of their destination (``verify`` is added by the
#: verify jobs; ``gc`` runs exclude prunes).
READERS: Final = frozenset({"restore", "sanity", "verify", "copy"})
GC_TYPE: Final = "gc"
#: Points whose sidecars a listing reads at once.
READ_AHEAD: Final = 16


# -- reading ----------------------------------------------------------------------------


async def point_info(repo: Repository, destination_id: str, point: RestorePoint) -> PointInfo:
    """A point as the API shows it, with its sidecars (defaults when absent)."""
    meta = await read_point_meta(repo, point.vm_name, point.timestamp)
    verified = await read_verification(repo, point.vm_name, point.timestamp)
    parent = (
        point_id(destination_id, point.vm_name, point.parent_timestamp)
        if point.parent_timestamp and point.kind == "incremental"
        else None
    )
    return PointInfo(
        id=point_id(destination_id, point.vm_name, point.timestamp),
        destination_id=destination_id,
        vm_name=point.vm_name,
        server_id=point.source_server_id,
        server_name=point.source_server_name,
        timestamp=point.timestamp,
        created_at=point.created_at,
        kind=point.kind,
        parent=parent,
        parent_timestamp=point.parent_timestamp if parent else None,
        xml_path=point.xml_path,
        disks=[
            PointDisk(target=d.target, basename=d.basename, format=d.format, size=d.size)
            for d in point.disks
        ],
        logical_bytes=sum(d.size for d in point.disks),
        stored_bytes=point.bytes_written,
        protected=meta.protected,
        notes=meta.notes,
        verification=PointVerification(
            state=verified.state or "none",
            verified_at=verified.verified_at,
            mode=verified.mode,
            chunks_checked=verified.chunks_checked,
            damaged_chunks=len(verified.damaged_chunks),
        ),
    )


def unreadable_info(destination_id: str, record: UnreadableRecord) -> PointInfo:
    """A point whose record exists but cannot be read, as far as its key tells:
    ``state: unreadable``, ``reason``, the VM (its folder's name) and timestamp."""
    parts = record.key.split("/")
    segment, timestamp = parts[1], parts[2]
    try:
        vm = parse_vm_segment(segment) or segment
    except ValueError:
        vm = segment
    return PointInfo(
        id=point_id(destination_id, vm, timestamp),
        destination_id=destination_id,
        vm_name=vm,
        server_id="",
        server_name="",
        timestamp=timestamp,
        created_at="",
        kind="unknown",
        xml_path=record.xml_path,
        disks=[],
        logical_bytes=0,
        stored_bytes=0,
        state="unreadable",
        reason=f"its record {record.key} cannot be read: {record.reason}",
    )


async def _infos(
    repo: Repository, destination_id: str, points: list[RestorePoint]
) -> list[PointInfo]:
    """``point_info`` of each point, ``READ_AHEAD`` at a time (two small reads each)."""
    gate = asyncio.Semaphore(READ_AHEAD)

    async def one(point: RestorePoint) -> PointInfo:
        async with gate:
            return await point_info(repo, destination_id, point)

    return list(await asyncio.gather(*(one(p) for p in points)))


@asynccontextmanager
async def opened(
    jc: JobContext, destination_id: str, *, locked: bool = True
) -> AsyncIterator[Repository | None]:
    """The destination's repository (``None`` when it has none), closed on exit; its
    storage faults as 404/503 naming it, and an unreadable repository (``unusable``) as
    503 naming it."""
    with destination_faults(destination_id):
        try:
            repo = await jc.repository(destination_id, create=False, locked=locked)
        except NoRepositoryError:
            yield None
            return
        except RepositoryError as exc:
            raise unusable(destination_id, exc) from None
        try:
            yield repo
        finally:
            await repo.close()


def unusable(destination_id: str, exc: RepositoryError) -> Unavailable:
    """503 for a destination whose repository cannot be opened (an unreadable
    ``repository.json``, another format): the same status and form as a destination
    whose storage cannot be used (``point_lookup.destination_faults``)."""
    return Unavailable(f"destination {shown(destination_id)} cannot be used: {exc}")


def destination(cfg: AgentConfig, destination_id: str) -> Destination:
    """The configured destination ``destination_id``; ``NotFound`` naming the field as
    every field error does: ``destination 'x' not found - at `destinationId``` (every
    lifecycle command says it so). An empty id is a ``BadRequest``: ``find_destination``
    would take it for "the default destination"."""
    if not destination_id:
        raise BadRequest(
            "destinationId is empty: name a destination, or leave it out to mean every"
            " destination - at `destinationId`"
        )
    try:
        return find_destination(cfg, destination_id)
    except NotFound as exc:
        raise NotFound(f"{exc.message} - at `destinationId`") from None


def _parse(value: str) -> tuple[str, str, str]:
    try:
        return parse_point_id(value)
    except ValueError as exc:
        raise BadRequest(f"restore point id {shown(value)}: {exc} - at `pointId`") from None


async def _find(repo: Repository | None, dest: str, vm: str, ts: str, pid: str) -> RestorePoint:
    if repo is None:
        raise NotFound(f"restore point {shown(pid)} not found (destination {dest} is empty)")
    try:
        return await repo.restore_point(xml_path(vm, ts))
    except (NotFoundError, ValueError):
        raise NotFound(f"restore point {shown(pid)} not found") from None
    except RepositoryError as exc:  # its backup.json exists but does not decode
        raise Conflict(f"restore point {shown(pid)} cannot be read: {exc}") from None


@point_commands.handler(JobCmd.POINTS, PointListRequest)
async def list_points(jc: JobContext, req: PointListRequest) -> PointList:
    """Points newest first (then by VM name), of ``destination_id`` (404 if unknown) or of
    every enabled destination (one that cannot be read is named in ``unreadable``, and so
    is every point record that exists but cannot be read: ``<destination>: <key>:
    <reason>``)."""
    cfg = await jc.config()
    if req.destination_id is not None:
        dests = [destination(cfg, req.destination_id)]
    else:
        dests = [d for d in cfg.destinations if d.enabled]
    found: list[PointInfo] = []
    unreadable: list[str] = []
    unreadable_ids: list[str] = []
    for dest in dests:
        try:
            async with opened(jc, dest.id) as repo:
                if repo is None:
                    continue
                scan = await repo.scan_points(req.vm_name)
                # A record that exists but cannot be read: its point is unknown, not
                # absent. It is listed whatever serverId asks for: its server is unknown.
                unreadable += [f"{dest.id}: {u}" for u in scan.unreadable]
                found += [unreadable_info(dest.id, u) for u in scan.unreadable]
                points = [
                    p
                    for p in scan.points
                    if req.server_id is None or p.source_server_id == req.server_id
                ]
                found += await _infos(repo, dest.id, points)
        except (BadRequest, NotFound, Conflict) as exc:
            if req.destination_id is not None:
                raise
            unreadable.append(f"{dest.id}: {exc.message}")
            unreadable_ids.append(dest.id)
        except Exception as exc:  # Unavailable and storage faults of one destination
            if req.destination_id is not None:
                raise
            unreadable.append(f"{dest.id}: {getattr(exc, 'message', None) or exc}")
            unreadable_ids.append(dest.id)
    found.sort(key=lambda p: (p.vm_name, p.destination_id))
    found.sort(key=lambda p: p.timestamp, reverse=True)
    return PointList(points=found, unreadable=unreadable, unreadable_destinations=unreadable_ids)


@point_commands.handler(JobCmd.POINT_GET, PointRef)
async def get_point(jc: JobContext, req: PointRef) -> PointInfo:
    """One point; 400 naming ``id`` for a malformed id, 404 if it does not exist."""
    dest_id, vm, ts = _parse(req.id)
    find_destination(await jc.config(), dest_id)
    async with opened(jc, dest_id) as repo:
        point = await _find(repo, dest_id, vm, ts, req.id)
        assert repo is not None
        return await point_info(repo, dest_id, point)


@point_commands.handler(JobCmd.POINT_UPDATE, PointUpdateRequest)
async def update_point(jc: JobContext, req: PointUpdateRequest) -> PointInfo:
    """Set ``protected`` and/or ``notes`` in the point's ``point.json``."""
    dest_id, vm, ts = _parse(req.id)
    find_destination(await jc.config(), dest_id)
    async with opened(jc, dest_id) as repo, _meta_lock(jc, dest_id, vm, "update"):
        point = await _find(repo, dest_id, vm, ts, req.id)
        assert repo is not None
        try:
            meta = await read_point_meta(repo, vm, ts, strict=True)
        except SidecarError:
            meta = PointMeta(protected=True)  # unreadable: keep it safe, rewrite it whole
        changes: dict[str, Any] = {}
        if req.protected is not None:
            changes["protected"] = req.protected
        if req.notes is not None:
            changes["notes"] = req.notes
        updated = msgspec.structs.replace(meta, **changes)
        if updated != meta or req.protected is not None:
            await write_point_meta(repo, vm, ts, updated)
        return await point_info(repo, dest_id, point)


@point_commands.handler(JobCmd.POINT_DELETE, PointDeleteRequest)
async def delete_point(jc: JobContext, req: PointDeleteRequest) -> PointDeleted:
    """Delete a point (``Repository.delete_point``); 409 while it is protected or a job
    uses it (the message names why), 404 if it does not exist. A point whose record
    cannot be read is a 409 saying so, unless ``force`` (``_remove_unreadable``)."""
    dest_id, vm, ts = _parse(req.id)
    find_destination(await jc.config(), dest_id)
    async with opened(jc, dest_id) as repo:
        try:
            point = await _find(repo, dest_id, vm, ts, req.id)
        except Conflict as exc:
            if not req.force:
                raise Conflict(
                    f"{exc.message}; delete it with force=true to remove its folder (its"
                    " chunks stay for garbage collection)"
                ) from None
            assert repo is not None
            return await _remove_unreadable(jc, repo, dest_id, vm, ts, exc.message)
        assert repo is not None
        info = await point_info(repo, dest_id, point)
        await remove_point(jc, repo, dest_id, point)
        return PointDeleted(point=info)


async def _remove_unreadable(
    jc: JobContext, repo: Repository, dest_id: str, vm: str, ts: str, why: str
) -> PointDeleted:
    """Delete the folder of a point whose record cannot be read (record first), with the
    checks of any deletion (protected per a readable ``point.json``, jobs and exports
    using its ``xmlPath``). Its chunks stay: garbage collection, which refused to run
    while the record existed, decides about them."""
    stand_in = RestorePoint(
        vm_name=vm,
        timestamp=ts,
        source_server_id="",
        source_server_name="",
        kind="full",
        disks=[],  # every object left in its folder is deleted by listing it
        created_at="",
    )
    record = UnreadableRecord(key=record_key(vm, ts), reason=why)
    info = unreadable_info(dest_id, record)
    await remove_point(jc, repo, dest_id, stand_in, unreadable=True)
    return PointDeleted(point=info)


# -- deleting ---------------------------------------------------------------------------


@asynccontextmanager
async def _lock(
    jc: JobContext, key: tuple[str, str], what: str, op_type: str, *, wait: float = 0.0
) -> AsyncIterator[None]:
    """Hold lock ``key`` for an operation (no job) of ``op_type``. While another
    operation holds it (``locks.Busy``), try again for up to ``wait`` seconds, then
    raise the ``Busy`` (409: another change is in progress, retry); a job holding it is
    a ``Conflict`` at once."""
    op = new_id()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    pause = 0.02
    while True:
        try:
            await jc.locks.acquire(*key, op, op_type, what=what, operation=True)
            break
        except Busy:
            if loop.time() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
    try:
        yield
    finally:
        await jc.locks.release(*key, op)


#: Seconds a change of a VM's points waits for another one to end (each takes moments).
META_LOCK_WAIT: Final = 10.0


def _meta_lock(jc: JobContext, dest_id: str, vm: str, op_type: str) -> Any:
    """The lock of the ``point.json`` files of ``vm``'s points in ``dest_id``: changes
    (``PATCH``, delete) take turns, waiting ``META_LOCK_WAIT`` seconds at most."""
    folder = point_folder_lock("backup", dest_id, vm)
    assert folder is not None
    key = (folder[0], f"points:{folder[1]}")
    what = f"the restore points of vm {vm} in destination {dest_id}"
    return _lock(jc, key, what, op_type, wait=META_LOCK_WAIT)


def users(jc: JobContext, dest_id: str, point: RestorePoint) -> list[str]:
    """What uses ``point`` now (each as a reason), from the job index and the exports."""
    found = []
    for job in jc.jobs.active():
        if job.destination_id != dest_id or job.type not in READERS:
            continue
        wanted = job.params.get("xmlPath")
        if str(job.type) == "verify":
            vm = job.params.get("vmName") or job.vm_name
            if vm in (None, point.vm_name):
                found.append(f"verify job {job.id} reads the points of this destination")
        elif wanted == point.xml_path:
            found.append(f"{job.type} job {job.id} reads it")
    # Unavailable (503) while the instance starts: a retry can help, a guess could not.
    for record in exports.store(jc).all():
        if (
            record.state in LIVE_EXPORT_STATES
            and record.destination_id == dest_id
            and record.vm_name == point.vm_name
            and record.timestamp == point.timestamp
        ):
            found.append(f"instant-access export {record.id} serves it")
    return found


async def _backup_holding(jc: JobContext, dest_id: str, point: RestorePoint) -> Job | None:
    """The active backup that holds the point's VM folder lock, if any."""
    folder = point_folder_lock("backup", dest_id, point.vm_name)
    assert folder is not None
    for job in jc.jobs.active():
        if job.type != "backup" or dest_id not in written_destinations(job):
            continue
        other = point_folder_lock("backup", dest_id, job.vm_name)
        if other == folder:
            return job
    return None


async def remove_point(
    jc: JobContext,
    repo: Repository,
    dest_id: str,
    point: RestorePoint,
    *,
    unreadable: bool = False,
) -> None:
    """Delete ``point`` unless it is protected or in use (``Conflict`` saying why), or
    already gone (``NotFound``: another deletion removed its record first); see
    the module docstring for the locks that make the checks hold until it is gone.
    ``unreadable``: its record cannot be read (a forced delete), and neither may its
    ``point.json`` be (then nothing says it is protected)."""
    vm = point.vm_name
    folder = point_folder_lock("backup", dest_id, vm)
    assert folder is not None
    what = f"the folder of vm {vm} in destination {dest_id}"
    async with _meta_lock(jc, dest_id, vm, "delete"):
        # Found before the lock: a deletion that held it meanwhile (another DELETE, a
        # prune) may have removed it, and that one alone says it did. (A forced delete
        # of an unreadable point removes whatever of its folder is left.)
        if not unreadable and not await repo.driver.exists(record_key(vm, point.timestamp)):
            raise NotFound(f"restore point {point.timestamp} of vm {vm} not found: already deleted")
        try:
            meta = await read_point_meta(repo, vm, point.timestamp, strict=True)
        except SidecarError as exc:
            if not unreadable:
                raise Conflict(f"restore point {point.timestamp} of {vm}: {exc}") from None
            meta = PointMeta()
        if meta.protected:
            raise Conflict(
                f"restore point {point.timestamp} of vm {vm} is protected: unprotect it "
                "first (PATCH with protected: false)"
            )
        used = users(jc, dest_id, point)
        if used:
            raise Conflict(
                f"restore point {point.timestamp} of vm {vm} is in use: {'; '.join(used)}"
            )
        try:
            async with _lock(jc, folder, what, "delete"):
                await repo.delete_point(point)
            await forget_checkpoint(jc, point)
            return
        except Conflict as busy:
            backup = await _backup_holding(jc, dest_id, point)
            known, parent = parent_of(backup, dest_id) if backup else (False, None)
            if backup is None or not known:
                raise Conflict(
                    f"restore point {point.timestamp} of vm {vm}: the VM's folder is busy, "
                    f"a backup may be starting on it ({busy.message})"
                ) from None
            if parent == point.timestamp:
                raise Conflict(
                    f"restore point {point.timestamp} of vm {vm} is in use: backup job "
                    f"{backup.id} builds on it"
                ) from None
        # A backup runs and builds on another point: it will not pick this one.
        await repo.delete_point(point)
        await forget_checkpoint(jc, point)


async def forget_checkpoint(jc: JobContext, point: RestorePoint) -> None:
    """Ask the point's server to delete the libvirt checkpoint the point marked: each
    checkpoint is a dirty bitmap QEMU updates on every write, and no other point uses it
    (every backup makes its own). Best effort: a checkpoint the server keeps (a job holds
    the VM) or that cannot be asked for (the server is unreachable) is remembered and
    asked for again after the VM's next backup ends (``checkpoints_left``); one of a
    server that is not configured any more, or that a remote agent backs up, is left,
    logged. Never fails the deletion: the point is gone already."""
    if not point.checkpoint or not point.source_server_id:
        return
    ok, message = await checkpoints_left.forget(
        jc, point.source_server_id, point.vm_name, point.checkpoint
    )
    if ok:
        log.info("restore point %s of %s deleted: %s", point.timestamp, point.vm_name, message)
        return
    log.info(
        "restore point %s of %s deleted; its checkpoint %s is left for now: %s",
        point.timestamp,
        point.vm_name,
        point.checkpoint,
        message,
    )
    try:
        servers = (await jc.config()).servers
        # The inventory reaches it: configured, and not backed up by a remote agent.
        reached = any(s.id == point.source_server_id and not s.agent_id for s in servers)
    except Exception:
        reached = True  # unknown now: remember it (a retry that fails only logs)
    if reached:
        await checkpoints_left.remember(jc, point.source_server_id, point.vm_name, point.checkpoint)


# -- prune ------------------------------------------------------------------------------


def _request_policy(req: PruneRequest) -> KeepRules | None:
    """The keep rules the request gives, ``None`` when it gives none (each VM's
    configured policy applies); 400 naming the field for a set that keeps nothing."""
    if not req.given():
        return None
    try:
        check_retention(req, "$")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    return req.rules()


async def plan_prune(
    jc: JobContext, repo: Repository | None, dest: Destination, req: PruneRequest
) -> tuple[PrunePlan, list[RestorePoint]]:
    """What the prune does, and the points it removes (newest first). ``BadRequest``
    naming ``vmName`` when a VM it is asked for has no policy and the request gives none,
    and when the request gives none for a destination that has none at all (a prune of
    nothing)."""
    given = _request_policy(req)
    if given is None and req.vm_name is not None and dest.retention_for(req.vm_name) is None:
        raise BadRequest(
            f"vm {shown(req.vm_name)} has no retention policy in destination "
            f"{dest.id}: give keep rules (keepLast, keepDaily, ...) or configure one "
            "(retention or vmRetention of the destination) - at `$.vmName`"
        )
    if given is None and req.vm_name is None and dest.retention is None and not dest.vm_retention:
        raise BadRequest(
            f"destination {dest.id} has no retention policy: give keep rules (keepLast, "
            "keepDaily, ...) or configure one (retention or vmRetention of the destination)"
        )
    plan = PrunePlan(destination_id=dest.id, dry_run=req.dry_run)
    doomed: list[RestorePoint] = []
    if repo is None:
        return plan, doomed
    # One group per VM of one source server (two servers' VMs of one name are two VMs).
    groups: dict[tuple[str, str], list[RestorePoint]] = {}
    for point in await repo.restore_points(req.vm_name):
        if req.server_id is not None and point.source_server_id != req.server_id:
            continue
        groups.setdefault((point.vm_name, point.source_server_id), []).append(point)
    gate = asyncio.Semaphore(READ_AHEAD)
    for (vm, _server), points in sorted(groups.items()):
        policy = given or dest.retention_for(vm)
        if policy is None or policy.keep_all is True:
            continue
        plan.policies[vm] = policy.wire()
        candidates = list(await asyncio.gather(*(_candidate(repo, gate, p) for p in points)))
        by_ts = {p.timestamp: p for p in points}
        for decision in retention.select(candidates, policy):
            ts = decision.candidate.key
            entry = PruneDecision(
                id=point_id(dest.id, vm, ts),
                vm_name=vm,
                timestamp=ts,
                keep=decision.keep,
                reason=decision.reason,
            )
            if decision.keep:
                plan.keep.append(entry)
                continue
            # What the removal would refuse (remove_point checks again when it runs):
            # the plan, dry run included, says what the prune does.
            used = users(jc, dest.id, by_ts[ts])
            backup = await _backup_holding(jc, dest.id, by_ts[ts])
            if backup is not None and parent_of(backup, dest.id) == (True, ts):
                used.append(f"backup job {backup.id} builds on it")
            if used:
                reason = f"in use: {'; '.join(used)}"
                plan.skipped.append(msgspec.structs.replace(entry, reason=reason))
                continue
            plan.remove.append(entry)
            doomed.append(by_ts[ts])
    return plan, doomed


async def _candidate(
    repo: Repository, gate: asyncio.Semaphore, point: RestorePoint
) -> retention.Candidate:
    async with gate:
        try:
            meta = await read_point_meta(repo, point.vm_name, point.timestamp, strict=True)
            protected = meta.protected
        except SidecarError:
            protected = True  # unreadable: never removed by a prune
    return retention.Candidate(key=point.timestamp, timestamp=point.timestamp, protected=protected)


def gc_running(jc: JobContext, dest_id: str) -> Job | None:
    """The active GC job of the destination, if one runs."""
    for job in jc.jobs.active():
        if str(job.type) == GC_TYPE and job.destination_id == dest_id:
            return job
    return None


async def check_selection(
    jc: JobContext,
    repo: Repository | None,
    dest_id: str,
    server_id: str | None,
    vm_name: str | None,
) -> None:
    """Refuse a selection (of a prune or a verify) that names nothing: ``NotFound``
    (404) naming ``$.serverId`` for a server that is not configured and has no restore
    point in the destination, ``$.vmName`` for a VM without one (of that server, when
    given). A record that cannot be read may be of any VM and server: with one, only a
    VM (or server) that none of the readable points and no record can be is refused."""
    if server_id is None and vm_name is None:
        return
    scan = await repo.scan_points(vm_name) if repo is not None else None
    points = scan.points if scan is not None else []
    if server_id is not None:
        configured = any(s.id == server_id for s in (await jc.config()).servers)
        unknown = not configured and not any(p.source_server_id == server_id for p in points)
        if unknown and not (scan and scan.unreadable):
            raise NotFound(
                f"server {shown(server_id)} is not configured and has no restore point"
                f" in destination {dest_id} - at `$.serverId`"
            )
    if vm_name is not None:
        mine = [p for p in points if server_id is None or p.source_server_id == server_id]
        if not mine and not (scan and scan.unreadable):
            of = f" of server {server_id}" if server_id is not None else ""
            raise NotFound(
                f"vm {shown(vm_name)}{of} has no restore point in destination {dest_id}"
                " - at `$.vmName`"
            )


@point_commands.handler(JobCmd.PRUNE_PLAN, PruneRequest)
async def prune_plan(jc: JobContext, req: PruneRequest) -> PrunePlan:
    """A dry run: which points the prune would keep (and by which rule) and remove.
    ``NotFound`` as ``check_selection`` for a VM or server without points."""
    dest = destination(await jc.config(), req.destination_id)
    async with opened(jc, dest.id) as repo:
        await check_selection(jc, repo, dest.id, req.server_id, req.vm_name)
        plan, _ = await plan_prune(jc, repo, dest, req)
    return msgspec.structs.replace(plan, dry_run=True)


@point_commands.handler(JobCmd.PRUNE, PruneRequest)
async def prune(jc: JobContext, req: PruneRequest) -> Job:
    """Start a prune job (409 while a GC of the destination is queued or running; 400 and
    404 as ``prune_plan``)."""
    from virtbackup.job_orchestrator.runner import execute

    dest = destination(await jc.config(), req.destination_id)
    # Claimed first, in one compare-and-swap with any GC's claim: 409 whether that GC is
    # queued or running, never a job that fails at once.
    async with claimed(jc, dest.id, "prune") as job_id:
        async with opened(jc, dest.id) as repo:
            await check_selection(jc, repo, dest.id, req.server_id, req.vm_name)
            await plan_prune(jc, repo, dest, req)  # bad input is a 400 now, not a failed job
        return await submit_prune(jc, req, execute, job_id)


async def submit_prune(
    jc: JobContext,
    req: PruneRequest,
    run: Callable[[JobContext, Job], Awaitable[None]],
    job_id: str,
) -> Job:
    """Submit the prune job ``job_id`` (the id the destination was claimed for)."""
    params = msgspec.to_builtins(msgspec.structs.replace(req, dry_run=False))
    assert isinstance(params, dict)
    params = {k: v for k, v in params.items() if v is not None and k != "destinationId"}
    return await jc.submit(
        "prune",
        server_id=req.server_id,
        vm_name=req.vm_name,
        destination_id=req.destination_id,
        params=params,
        run=run,
        job_id=job_id,
    )


async def run_prune(jc: JobContext, job: Job) -> str:
    """Remove what the policy does not keep, one point at a time (each removal atomic:
    its record goes first), checking for a cancel between two. A point that is protected
    or in use by then is skipped and named. The result lists what was removed."""
    assert job.destination_id
    req = msgspec.convert({**job.params, "destinationId": job.destination_id}, PruneRequest)
    dest = find_destination(await jc.config(), job.destination_id)
    await claim_destination(jc, dest.id, "prune", job.id)  # held since its submit
    try:
        return await _prune(jc, job, req, dest)
    finally:
        await release_destination(jc, dest.id, job.id)


async def _prune(jc: JobContext, job: Job, req: PruneRequest, dest: Destination) -> str:
    async with opened(jc, dest.id) as repo:
        plan, doomed = await plan_prune(jc, repo, dest, req)
        removed: list[dict[str, str]] = []
        skipped: list[dict[str, str]] = [
            {"id": d.id, "vmName": d.vm_name, "timestamp": d.timestamp, "reason": d.reason or ""}
            for d in plan.skipped
        ]

        def result() -> dict[str, Any]:
            return {
                "removed": removed,
                "skipped": skipped,
                "kept": [
                    {"id": d.id, "vmName": d.vm_name, "timestamp": d.timestamp, "reason": d.reason}
                    for d in plan.keep
                ],
                "policies": plan.policies,
            }

        await jc.enter(
            job.id,
            "transferring",
            message=(
                f"removing {len(doomed)} of"
                f" {len(doomed) + len(plan.keep) + len(plan.skipped)} restore points"
            ),
            total_units=len(doomed),
            result=result(),
        )
        for index, point in enumerate(doomed):
            jc.check_canceled(job.id)
            if gc_running(jc, dest.id) is not None:
                raise JobFailed("a garbage collection of the destination started: prune stopped")
            entry = {
                "id": point_id(dest.id, point.vm_name, point.timestamp),
                "vmName": point.vm_name,
                "timestamp": point.timestamp,
            }
            assert repo is not None
            try:
                await remove_point(jc, repo, dest.id, point)
                removed.append(entry)
            except (Conflict, NotFound) as exc:  # NotFound: another prune took it first
                skipped.append({**entry, "reason": exc.message})
            await update_job(
                jc.store,
                jc.bus,
                job.id,
                {"completed_units": index + 1, "result": result()},
            )
    summary = f"prune: {len(removed)} restore points removed, {len(plan.keep)} kept"
    if skipped:
        summary += f", {len(skipped)} skipped (protected, in use or already deleted)"
    return summary


async def auto_prune(
    jc: JobContext, backup: Job, run: Callable[[JobContext, Job], Awaitable[None]]
) -> Job | None:
    """After a successful backup: a prune job of the VM's points in the destination, if
    the VM has a retention policy there; ``None`` when it has none, or when a GC (or
    another prune) holds the destination: the next backup prunes then, and the backup
    job's message says so (``retention prune skipped: ...``). Never raises for a
    refusal."""
    if not (backup.destination_id and backup.vm_name and backup.server_id):
        return None
    cfg = await jc.config()
    try:
        dest = find_destination(cfg, backup.destination_id)
    except NotFound:
        return None
    policy = dest.retention_for(backup.vm_name)
    if policy is None or policy.keep_all is True:
        return None
    req = PruneRequest(
        destination_id=dest.id,
        vm_name=backup.vm_name,
        server_id=None,
        automatic=True,
    )
    try:
        async with claimed(jc, dest.id, "prune") as job_id:
            return await submit_prune(jc, req, run, job_id)
    except Conflict as busy:
        log.info("not pruning %s after backup %s: %s", backup.vm_name, backup.id, busy.message)
        await _note_skipped_prune(jc, backup, busy.message)
        return None


async def _note_skipped_prune(jc: JobContext, backup: Job, why: str) -> None:
    """Append to the (finished) backup job's message that its prune was skipped, and
    publish ``job.updated`` with it, so that it is seen where the backup is."""
    line = f"retention prune skipped: {why}; the next backup of the VM prunes"

    def note(job: Job) -> Job:
        if line in job.message:
            return job
        message = f"{job.message}; {line}" if job.message else line
        return msgspec.structs.replace(job, message=message, updated_at=utcnow_iso())

    try:
        job = await jc.store.update(backup.id, note)
        await jc.bus.publish_event(EventType.JOB_UPDATED, msgspec.to_builtins(job), key=job.id)
    except Exception as exc:
        log.warning("could not note the skipped prune on job %s: %s", backup.id, exc)
