"""Job control for backend-api.md (``vb.cmd.job.{query,delete,...}``, ``v1.jobctl``).

Queries are answered from the replica's job index (newest first, offset pagination).
Deletes and flushes remove only finished jobs, each with a compare-and-swap on its
record's revision, then its output log (``VB_JOB_LOGS``) and its files
(``VB_JOB_FILES``). A clear-queue cancels, by compare-and-swap, exactly the jobs that
are still ``queued`` when their record is written: one that started meanwhile is left
running. Reruns rebuild the original request from the job's record and submit it as
the command that made it would, with the same checks (4xx before any job exists).

Artifacts are made on demand from the job and its restore point (never stored twice):
``output.log``, ``job.json``, and for a job tied to a point (a successful backup, a
restore, a sanity check) ``domain.xml``, ``backup.json`` and ``manifest-<disk>.json``;
plus what agents posted (``VB_JOB_FILES``, at most ``ARTIFACT_MAX_BYTES`` each).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import EventType, JobCtlCmd
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.jobctl import (
    ARTIFACT_MAX_BYTES,
    ARTIFACT_PIECE_BYTES,
    CANCEL_LINE,
    ArtifactGetRequest,
    ArtifactInfo,
    ArtifactList,
    ArtifactPiece,
    ArtifactPutRequest,
    CheckList,
    CheckOutcome,
    ChecksPutRequest,
    ClearedQueue,
    ClearQueueRequest,
    Flushed,
    FlushRequest,
    JobPage,
    JobQuery,
    JobRef,
    Rerun,
)
from virtbackup.contracts.v1.jobs import (
    TERMINAL_STATES,
    BackupRequest,
    CopyRequest,
    Job,
    RestoreRequest,
    SanityRequest,
)
from virtbackup.contracts.v1.lifecycle_gc import GcRequest, VerifyRequest
from virtbackup.contracts.v1.points import PruneRequest
from virtbackup.job_orchestrator.agent_jobs import waiting_for_lease
from virtbackup.job_orchestrator.jobctx import JobContext, job_payload
from virtbackup.repository.format import xml_path
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import RepositoryError
from virtbackup.runtime import joblog
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound
from virtbackup.runtime.kv import keys, read_value, write_if
from virtbackup.storage.errors import StorageError

jobctl_commands: Commands[JobContext] = Commands()
_encoder = msgspec.json.Encoder()

#: Backend status -> the job states it covers.
STATUS_STATES = {
    "queued": {"queued"},
    "running": {"running"},
    "succeeded": {"success"},
    "failed": {"failure", "canceled"},
}
#: Names of the artifacts VirtBackup makes itself (an agent may not post these).
RESERVED = ("output.log", "job.json", "domain.xml", "backup.json")


def parse_when(value: str, field: str) -> datetime:
    """An ISO-8601 date or time (naive is UTC); ``BadRequest`` naming ``field``."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"not an ISO-8601 date or time: {shown(value)} - at `{field}`") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def _created(job: Job) -> datetime:
    return parse_when(job.created_at, "createdAt")


@jobctl_commands.handler(JobCtlCmd.QUERY, JobQuery)
async def query(jc: JobContext, req: JobQuery) -> JobPage:
    """One page of the jobs matching every filter given, newest first."""
    since = parse_when(req.since, "since") if req.since else None
    until = parse_when(req.until, "until") if req.until else None
    states = STATUS_STATES[req.status] if req.status else None
    index = jc.jobs.jobs
    matches: list[Job] = []
    for job_id in sorted(index, reverse=True):
        job = index[job_id]
        if states is not None and job.state not in states:
            continue
        if req.state is not None and job.state != req.state:
            continue
        if req.type is not None and job.type != req.type:
            continue
        if req.server_id is not None and job.server_id != req.server_id:
            continue
        if req.vm_name is not None and job.vm_name != req.vm_name:
            continue
        if req.destination_id is not None and job.destination_id != req.destination_id:
            continue
        if since is not None or until is not None:
            created = _created(job)
            if (since is not None and created < since) or (until is not None and created >= until):
                continue
        matches.append(job)
    page = matches[req.offset : req.offset + req.limit]
    return JobPage(jobs=page, total=len(matches), limit=req.limit, offset=req.offset)


async def _remove(jc: JobContext, job_id: str, *, only: Callable[[Job], bool] | None = None) -> Job:
    """Remove a finished job: its record (compare-and-swap on the revision read), its
    log, its files. ``Conflict`` while it is queued or running."""
    kv = jc.ctx.bucket(buckets.JOBS)
    for _ in range(10):
        job, revision = await jc.store.get(job_id)
        if job.state not in TERMINAL_STATES:
            raise Conflict(
                f"job {job_id} is {job.state}: only a finished job can be deleted (cancel it first)"
            )
        if only is not None and not only(job):
            return job
        try:
            await kv.delete(job_id, last=revision)
        except KeyWrongLastSequenceError:
            continue
        with contextlib.suppress(KeyNotFoundError):
            await kv.purge(job_id)
        await joblog.purge(jc.bus, job_id)
        files = jc.ctx.bucket(buckets.JOB_FILES)
        for key in [*await keys(files, f"art.{job_id}."), f"checks.{job_id}"]:
            with contextlib.suppress(KeyNotFoundError):
                await files.purge(key)
        return job
    raise Conflict(f"job {job_id} kept changing; try again")


@jobctl_commands.handler(JobCtlCmd.DELETE, JobRef)
async def delete(jc: JobContext, req: JobRef) -> Job:
    """Delete a finished job with its log and artifacts; 409 while it is active."""
    return await _remove(jc, req.id)


@jobctl_commands.handler(JobCtlCmd.FLUSH, FlushRequest)
async def flush_history(jc: JobContext, req: FlushRequest) -> Flushed:
    """Remove every finished job (that finished before ``older_than``, when given)."""
    cutoff = parse_when(req.older_than, "olderThan") if req.older_than else None

    def old_enough(job: Job) -> bool:
        if cutoff is None:
            return True
        ended = job.finished_at or job.updated_at
        return parse_when(ended, "finishedAt") < cutoff

    removed: list[str] = []
    for job in list(jc.jobs.jobs.values()):
        if job.state not in TERMINAL_STATES or not old_enough(job):
            continue
        try:
            await _remove(jc, job.id, only=old_enough)
        except (NotFound, Conflict):
            continue  # gone meanwhile (another flush), or never finished
        removed.append(job.id)
    return Flushed(removed=len(removed), ids=sorted(removed))


async def mark_cancelled(jc: JobContext, job_id: str, *, queued_only: bool = False) -> Job | None:
    """Ask a job to stop (``cancelRequested``) and add ``CANCEL_LINE`` to its log; with
    ``queued_only``, only while it is still queued or waiting for its agent's lease
    (``None`` when it was not)."""
    newly = False

    def cancel(job: Job) -> Job:
        nonlocal newly
        if queued_only and job.state != "queued" and not waiting_for_lease(job):
            raise _NotQueued
        if job.cancel_requested or job.state in TERMINAL_STATES:
            return job
        newly = True
        return msgspec.structs.replace(
            job, cancel_requested=True, message="cancelling", updated_at=utcnow_iso()
        )

    try:
        job = await jc.store.update(job_id, cancel)
    except _NotQueued:
        return None
    if newly:
        await joblog.try_append(jc.bus, job_id, CANCEL_LINE, "warn")
        await jc.bus.publish_event(EventType.JOB_UPDATED, job_payload(job), key=job.id)
    return job


class _NotQueued(Exception):
    pass


@jobctl_commands.handler(JobCtlCmd.CLEAR_QUEUE, ClearQueueRequest)
async def clear_queue(jc: JobContext, _: ClearQueueRequest) -> ClearedQueue:
    """Cancel every job still queued (a remote agent's job its agent has not leased yet
    included: ``agent_jobs.waiting_for_lease``); running ones are left alone."""
    cancelled: list[str] = []
    for job in jc.jobs.active():
        if job.state != "queued" and not waiting_for_lease(job):
            continue
        with contextlib.suppress(NotFound):
            if await mark_cancelled(jc, job.id, queued_only=True) is not None:
                cancelled.append(job.id)
    return ClearedQueue(cancelled=sorted(cancelled))


def _request_of(job: Job) -> tuple[str, msgspec.Struct]:
    """The command and request that make a job like ``job`` (its definition)."""
    p = dict(job.params)
    try:
        if job.type == "backup":
            return "backup", BackupRequest(
                server_id=job.server_id or "",
                vm_name=job.vm_name or "",
                destination_id=job.destination_id,
                fresh=bool(p.get("fresh", False)),
                # A fan-out backup writes the same destinations again (checked as then).
                also_destination_ids=[str(d) for d in p.get("alsoDestinationIds") or []],
            )
        if job.type == "restore":
            return "restore", msgspec.convert(
                {**p, "serverId": job.server_id, "destinationId": job.destination_id},
                RestoreRequest,
            )
        if job.type == "sanity":
            return "sanity", msgspec.convert(
                {**p, "destinationId": job.destination_id}, SanityRequest
            )
        if job.type == "copy":  # the same point again (a no-op once it is in the target)
            return "copy", msgspec.convert(
                {
                    "destinationId": job.destination_id,
                    "targetDestinationId": p.get("targetDestinationId"),
                    "vmName": job.vm_name,
                    "serverId": job.server_id,
                    "timestamp": p.get("timestamp"),
                },
                CopyRequest,
            )
        if job.type == "gc":
            return "gc", msgspec.convert({**p, "destinationId": job.destination_id}, GcRequest)
        if job.type == "verify":
            return "verify", msgspec.convert(
                {**p, "destinationId": job.destination_id}, VerifyRequest
            )
        if job.type == "prune":
            p.pop("automatic", None)
            return "prune", msgspec.convert(
                {**p, "destinationId": job.destination_id}, PruneRequest
            )
    except msgspec.ValidationError as exc:
        raise Conflict(f"job {job.id}'s definition cannot be submitted again: {exc}") from None
    raise Conflict(f"a {job.type} job cannot be rerun: submit its definition again")


@jobctl_commands.handler(JobCtlCmd.RERUN, JobRef)
async def rerun(jc: JobContext, req: JobRef) -> Rerun:
    """Submit a new job from ``req.id``'s definition, checked as the original request was
    (4xx before any job exists, e.g. 409 while the VM has a backup running)."""
    from virtbackup.job_orchestrator import handlers, lifecycle_gc_commands, points

    job, _ = await jc.store.get(req.id)
    kind, request = _request_of(job)
    submitters: dict[str, Callable[[JobContext, Any], Any]] = {
        "backup": handlers.backup,
        "copy": handlers.copy_point,
        "restore": handlers.restore,
        "sanity": handlers.sanity,
        "gc": lifecycle_gc_commands.gc,
        "verify": lifecycle_gc_commands.verify,
        "prune": points.prune,
    }
    new: Job = await submitters[kind](jc, request)
    await joblog.try_append(jc.bus, new.id, f"[control] rerun of job {job.id}")
    return Rerun(job=new, rerun_of=job.id)


# -- artifacts ------------------------------------------------------------------------


class _Posted(msgspec.Struct, rename="camel"):
    media_type: str
    data: bytes
    posted_at: str


def point_of(job: Job) -> tuple[str, str] | None:
    """The destination and ``xmlPath`` of the restore point a job made or read."""
    if not job.destination_id:
        return None
    if job.type == "backup" and job.state == "success" and job.vm_name:
        timestamp = job.result.get("timestamp")
        if isinstance(timestamp, str):
            return job.destination_id, xml_path(job.vm_name, timestamp)
    if job.type in {"restore", "sanity"} and isinstance(job.params.get("xmlPath"), str):
        return job.destination_id, job.params["xmlPath"]
    return None


async def _point_files(jc: JobContext, job: Job) -> dict[str, tuple[str, bytes]]:
    """``domain.xml``, ``backup.json`` and each ``manifest-<disk>.json`` of the job's
    point (none when the point is gone or its destination cannot be read)."""
    where = point_of(job)
    if where is None:
        return {}
    dest_id, path = where
    out: dict[str, tuple[str, bytes]] = {}
    try:
        repo = await jc.repository(dest_id, create=False)
    except (RepositoryError, StorageError, NotFound):
        return {}
    try:
        point: RestorePoint = await repo.restore_point(path)
        out["backup.json"] = ("application/json", msgspec.json.format(_encoder.encode(point)))
        out["domain.xml"] = ("application/xml", (await repo.domain_xml(point)).encode())
        for disk in point.disks:
            manifest = await repo.manifest(point, disk.target)
            out[f"manifest-{disk.target}.json"] = ("application/json", _encoder.encode(manifest))
    except (RepositoryError, StorageError):
        pass
    finally:
        await repo.close()
    return out


async def _posted(jc: JobContext, job_id: str) -> dict[str, _Posted]:
    files = jc.ctx.bucket(buckets.JOB_FILES)
    out: dict[str, _Posted] = {}
    prefix = f"art.{job_id}."
    for key in await keys(files, prefix):
        value = await read_value(files, key, _Posted)
        if value is not None:
            out[key[len(prefix) :]] = value
    return out


async def _artifacts(jc: JobContext, job_id: str) -> dict[str, tuple[str, bytes, str]]:
    job, _ = await jc.store.get(job_id)
    lines = await joblog.read(jc.bus, job_id)
    made: dict[str, tuple[str, bytes, str]] = {
        "output.log": ("text/plain; charset=utf-8", joblog.render(lines).encode(), "job"),
        "job.json": ("application/json", _encoder.encode(job), "job"),
    }
    for name, (media, data) in (await _point_files(jc, job)).items():
        made[name] = (media, data, "job")
    for name, posted in (await _posted(jc, job_id)).items():
        made.setdefault(name, (posted.media_type, posted.data, "agent"))
    return made


@jobctl_commands.handler(JobCtlCmd.ARTIFACTS, JobRef)
async def artifacts(jc: JobContext, req: JobRef) -> ArtifactList:
    """What the job produced: name, size in bytes, media type, who made it."""
    made = await _artifacts(jc, req.id)
    return ArtifactList(
        artifacts=[
            ArtifactInfo(name=name, size=len(data), media_type=media, source=source)  # type: ignore[arg-type]
            for name, (media, data, source) in sorted(made.items())
        ]
    )


@jobctl_commands.handler(JobCtlCmd.ARTIFACT_GET, ArtifactGetRequest)
async def artifact_get(jc: JobContext, req: ArtifactGetRequest) -> ArtifactPiece:
    """Up to ``ARTIFACT_PIECE_BYTES`` of one artifact from ``offset``; 404 naming it."""
    made = await _artifacts(jc, req.id)
    if req.name not in made:
        raise NotFound(f"job {req.id} has no artifact {shown(req.name)}")
    media, data, _ = made[req.name]
    if req.offset < 0 or req.offset > len(data):
        raise BadRequest(f"offset beyond the artifact's {len(data)} bytes - at `offset`")
    piece = data[req.offset : req.offset + ARTIFACT_PIECE_BYTES]
    return ArtifactPiece(
        name=req.name, media_type=media, size=len(data), offset=req.offset, data=piece
    )


def _refuse_ended(job: Job) -> None:
    """Reports (artifacts, test results) belong to a running job: ``Conflict`` naming
    the state of one that has ended."""
    if job.state in TERMINAL_STATES:
        raise Conflict(f"job {job.id} has ended ({job.state}): it takes no more reports")


@jobctl_commands.handler(JobCtlCmd.ARTIFACT_PUT, ArtifactPutRequest)
async def artifact_put(jc: JobContext, req: ArtifactPutRequest) -> ArtifactInfo:
    """Keep an artifact an agent posted (at most ``ARTIFACT_MAX_BYTES``; a name
    VirtBackup makes itself, a name posted already, or a job that has ended is a 409)."""
    job, _ = await jc.store.get(req.id)  # 404 for an unknown job
    _refuse_ended(job)
    if len(req.data) > ARTIFACT_MAX_BYTES:
        raise BadRequest(f"an artifact is at most {ARTIFACT_MAX_BYTES} bytes - at `$.data`")
    if req.name in RESERVED or req.name.startswith("manifest-"):
        raise Conflict(f"artifact {req.name} is made by VirtBackup and cannot be posted")
    files = jc.ctx.bucket(buckets.JOB_FILES)
    value = _Posted(media_type=req.media_type, data=req.data, posted_at=utcnow_iso())
    try:
        # A create: what was posted once is never replaced silently.
        await files.create(f"art.{req.id}.{req.name}", _encoder.encode(value))
    except KeyWrongLastSequenceError:
        raise Conflict(f"job {req.id} has an artifact {req.name} already") from None
    return ArtifactInfo(
        name=req.name, size=len(req.data), media_type=req.media_type, source="agent"
    )


# -- verification results ("tests") -----------------------------------------------------


def _derived_checks(job: Job, disks: list[str]) -> list[CheckOutcome]:
    """Sanity and verify outcomes from the job's result: per disk for a sanity check, per
    restore point for a verify."""
    out: list[CheckOutcome] = []
    at = job.finished_at
    if job.type == "sanity" and job.state in TERMINAL_STATES and "checkedChunks" in job.result:
        damaged = job.result.get("damaged") or []
        point = job.params.get("xmlPath")
        for disk in disks:
            bad = [d for d in damaged if disk in (d.get("disks") or [])]
            out.append(
                CheckOutcome(
                    check="sanity",
                    status="failed" if bad else "passed",
                    disk=disk,
                    point=point,
                    detail=(
                        f"{len(bad)} damaged chunks" if bad else "every chunk read back and hashed"
                    ),
                    data={"damaged": bad},
                    source="job",
                    reported_at=at,
                )
            )
        for problem in job.result.get("problems") or []:
            out.append(
                CheckOutcome(
                    check="sanity", status="failed", point=point, detail=str(problem),
                    source="job", reported_at=at,
                )
            )  # fmt: skip
    if job.type == "verify":
        for outcome in job.result.get("points") or []:
            damaged = outcome.get("damagedChunks") or []
            out.append(
                CheckOutcome(
                    check="verify",
                    status="passed" if outcome.get("state") == "ok" else "failed",
                    point=outcome.get("xmlPath"),
                    detail=outcome.get("problem")
                    or f"{outcome.get('chunksChecked', 0)} chunks checked, {len(damaged)} damaged",
                    data={"chunksChecked": outcome.get("chunksChecked", 0), "damaged": damaged},
                    source="job",
                    reported_at=at,
                )
            )
    return out


async def _disks_of(jc: JobContext, job: Job) -> list[str]:
    where = point_of(job)
    if where is None:
        return []
    try:
        repo = await jc.repository(where[0], create=False, locked=True)
    except (RepositoryError, StorageError, NotFound):
        return []
    try:
        point = await repo.restore_point(where[1])
        return [d.target for d in point.disks]
    except (RepositoryError, StorageError):
        return []
    finally:
        await repo.close()


class _Checks(msgspec.Struct):
    tests: list[CheckOutcome]


@jobctl_commands.handler(JobCtlCmd.CHECKS, JobRef)
async def checks(jc: JobContext, req: JobRef) -> CheckList:
    """The job's verification results: sanity per disk and verify per point (from its
    result), then what agents reported."""
    job, _ = await jc.store.get(req.id)
    derived = _derived_checks(job, await _disks_of(jc, job) if job.type == "sanity" else [])
    posted = await read_value(jc.ctx.bucket(buckets.JOB_FILES), f"checks.{req.id}", _Checks)
    return CheckList(tests=derived + (posted.tests if posted else []))


@jobctl_commands.handler(JobCtlCmd.CHECKS_PUT, ChecksPutRequest)
async def checks_put(jc: JobContext, req: ChecksPutRequest) -> CheckList:
    """Add an agent's verification results to the job's (at most 1000 in all); a
    ``Conflict`` naming the state for a job that has ended (but a verification of a
    backup that succeeded)."""
    job, _ = await jc.store.get(req.id)
    if not (req.verification and job.state == "success"):
        _refuse_ended(job)
    files = jc.ctx.bucket(buckets.JOB_FILES)
    key = f"checks.{req.id}"
    now = utcnow_iso()
    added = [
        msgspec.structs.replace(t, source="agent", reported_at=t.reported_at or now)
        for t in req.tests
    ]
    for _ in range(20):
        try:
            entry = await files.get(key)
            current = msgspec.json.decode(entry.value or b'{"tests": []}', type=_Checks)
            revision: int | None = entry.revision
        except KeyNotFoundError:
            current, revision = _Checks(tests=[]), None
        merged = current.tests + added
        if len(merged) > 1000:
            raise BadRequest("a job keeps at most 1000 test results - at `$.tests`")
        if not await write_if(files, key, _encoder.encode(_Checks(tests=merged)), revision):
            continue
        return CheckList(tests=merged)
    raise Conflict(f"job {req.id}'s test results kept changing; try again")
