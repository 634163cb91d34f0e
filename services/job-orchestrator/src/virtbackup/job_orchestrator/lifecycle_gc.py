"""Garbage collection and verification jobs, and the per-destination gate that makes a
collection's sweep exclusive (docs/repository-format.md, "Garbage collection").

The gate is one record per destination in ``VB_LOCKS`` (key ``gc.<destination,
base64url>``), changed only by compare-and-swap::

    {"gcJob": "<job id>" | null, "sweeping": bool, "writers": ["<backup job id>", ...]}

* A backup passes the gate before its first step (``backup_gate``): while a live GC
  job sweeps, it waits (still ``queued``; its message says it waits for the GC);
  otherwise it adds itself to ``writers`` in the same compare-and-swap that saw
  ``sweeping`` false. It also writes a backup lock object in the repository (for
  *other* installations' collections), and removes both when it ends.
* A GC claims the gate (``gcJob``; another live one: ``Conflict``), marks, then sets
  ``sweeping`` and waits until no writer's job is still active: from then on no backup
  of this installation runs on the destination until it releases the gate.

A writer or ``gcJob`` whose job is no longer active (finished, or ended by another
replica after its orchestrator died) does not count: no crash leaves a destination
gated for good.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.events import JobFailure
from virtbackup.contracts.v1.jobs import ACTIVE_STATES, Job
from virtbackup.contracts.v1.work import BadChunk, UnitResult
from virtbackup.job_orchestrator import simulated
from virtbackup.job_orchestrator.errors import JobFailed
from virtbackup.job_orchestrator.fanout import written_destinations
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import lookup_in
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.verify_units import verify_units
from virtbackup.repository.format import record_key, vm_prefix
from virtbackup.repository.lifecycle_gc import (
    DEFAULT_GRACE_SECONDS,
    LOCK_REFRESH_SECONDS,
    GarbageCollection,
    GcResult,
    LockRecord,
    point_chunks,
    remove_lock,
    repository_stats,
    write_lock,
)
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.repository.verification import (
    Verification,
    VerifyState,
    read_verification,
    write_verification,
)
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict
from virtbackup.runtime.kv import write_if
from virtbackup.storage.errors import NotFoundError
from virtbackup.storage.retry import RetryingDriver

log = logging.getLogger(__name__)

#: Seconds between two looks at the gate while waiting.
GATE_POLL_SECONDS = 0.5
#: The ``VB_LOCKS`` key of this installation's id (names its lock objects).
INSTALLATION_KEY = "installation"
#: Job types that hold a destination for themselves (one at a time per destination).
EXCLUSIVE_TYPES = frozenset({"gc", "prune"})


class GateRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    gc_job: str | None = None
    sweeping: bool = False
    writers: list[str] = msgspec.field(default_factory=list)


def gate_key(destination_id: str) -> str:
    """``gc.<destination id, base64url without padding>`` in ``VB_LOCKS``."""
    encoded = base64.urlsafe_b64encode(destination_id.encode()).decode().rstrip("=")
    return f"gc.{encoded}"


def retrying(repo: Repository) -> Repository:
    """The same repository, its requests retried on transient errors (a collection or a
    verify makes many; one hiccup should not end it). Close the original, not this."""
    return Repository(RetryingDriver(repo.driver), repo.config, repo.sealer)


async def installation_id(jc: JobContext) -> str:
    """This installation's id (32 hex digits), made once and kept in ``VB_LOCKS``."""
    kv = jc.ctx.bucket(buckets.LOCKS)
    for _ in range(5):
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(INSTALLATION_KEY)
            if entry.value:
                return entry.value.decode()
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(INSTALLATION_KEY, uuid.uuid4().hex.encode())
    raise Conflict("could not read or make this installation's id")


async def _read_gate(kv: KeyValue, key: str) -> tuple[GateRecord, int | None]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return GateRecord(), None
    if not entry.value:
        return GateRecord(), entry.revision
    return msgspec.json.decode(entry.value, type=GateRecord), entry.revision


async def _write_gate(kv: KeyValue, key: str, record: GateRecord, revision: int | None) -> bool:
    """Compare-and-swap; False when someone wrote in between."""
    return await write_if(kv, key, msgspec.json.encode(record), revision)


async def _active(jc: JobContext, job_id: str | None, *, missing: bool = False) -> bool:
    """Whether the job is queued or running; ``missing`` is the answer for a job whose
    record is not there (yet: a read may lag a write to another bucket)."""
    if not job_id:
        return False
    job = await lookup_in(jc.store.get, job_id)
    if job is None:
        return missing
    return job.state in ACTIVE_STATES


async def _change_gate(
    jc: JobContext, destination_id: str, change: Callable[[GateRecord], GateRecord]
) -> GateRecord:
    kv = jc.ctx.bucket(buckets.LOCKS)
    key = gate_key(destination_id)
    while True:
        record, revision = await _read_gate(kv, key)
        updated = change(record)
        if updated == record or await _write_gate(kv, key, updated, revision):
            return updated


@contextlib.asynccontextmanager
async def backup_gate(
    jc: JobContext, job: Job, destination_id: str | None = None
) -> AsyncIterator[None]:
    """Hold a backup back while a GC sweeps its destination (``destination_id``, else
    the job's), then register it as a writer (in the gate, and as a lock object in the
    repository) until it ends. A copy job is a writer of its target the same way."""
    await enter_gate(jc, job, destination_id)
    try:
        if await _simulated(jc, job):  # benchmarks only: it opens no repository
            yield
            return
        async with _repository_lock(jc, job, "backup", destination_id):
            yield
    finally:
        await leave_gate(jc, job, destination_id)


async def _simulated(jc: JobContext, job: Job) -> bool:
    """Whether ``job`` is a simulated backup (``simulated.py``, benchmarks only): it
    reads and writes nothing, so it neither opens its destination's repository nor
    writes a lock object there (it is still one of the gate's writers)."""
    if job.type != "backup" or not job.server_id:
        return False
    if jc.settings.simulate_transfer_seconds is None:
        return False
    cfg = await jc.config()
    server = next((s for s in cfg.servers if s.id == job.server_id), None)
    return server is not None and simulated.seconds_for(jc, server) is not None


async def enter_gate(jc: JobContext, job: Job, destination_id: str | None = None) -> None:
    """Wait while a live GC sweeps the destination (``destination_id``, else the job's;
    the job's message says so; ``JobCanceled`` on a cancel), then add the job to the
    gate's writers."""
    dest = destination_id or job.destination_id
    assert dest
    kv = jc.ctx.bucket(buckets.LOCKS)
    key = gate_key(dest)
    announced = False
    while True:
        jc.check_canceled(job.id)
        record, revision = await _read_gate(kv, key)
        # A GC's record is written before it claims the gate: one not found yet is alive.
        if record.sweeping and await _active(jc, record.gc_job, missing=True):
            if not announced:
                announced = True
                await jc.message(
                    job.id,
                    f"waiting for garbage collection {record.gc_job} of destination {dest} "
                    "to finish its sweep",
                )
            await asyncio.sleep(GATE_POLL_SECONDS)
            continue
        writers = sorted({*record.writers, job.id})
        if record.sweeping:  # its GC is no longer active: the gate is open again
            record = GateRecord(writers=record.writers)
        updated = msgspec.structs.replace(record, writers=writers)
        if await _write_gate(kv, key, updated, revision):
            return


async def leave_gate(jc: JobContext, job: Job, destination_id: str | None = None) -> None:
    """Remove the job from the writers of its destination (or ``destination_id``)."""
    dest = destination_id or job.destination_id
    assert dest
    await _change_gate(
        jc,
        dest,
        lambda r: msgspec.structs.replace(r, writers=[w for w in r.writers if w != job.id]),
    )


@contextlib.asynccontextmanager
async def _repository_lock(
    jc: JobContext, job: Job, kind: str, destination_id: str | None = None
) -> AsyncIterator[None]:
    """A lock object in the repository for the job's duration, rewritten every
    ``LOCK_REFRESH_SECONDS`` (so that another installation's GC sees it is alive)."""
    dest = destination_id or job.destination_id
    assert dest
    opened = await jc.repository(dest)
    repo = retrying(opened)
    try:
        record = LockRecord(
            kind=kind,
            installation=await installation_id(jc),
            job_id=job.id,
            host=jc.holder,
            created_at=utcnow_iso(),
        )
        lock = await write_lock(repo, record)

        async def refresh() -> None:
            while True:
                await asyncio.sleep(LOCK_REFRESH_SECONDS)
                try:
                    await write_lock(repo, record)
                except Exception as exc:
                    log.warning("refreshing lock %s failed: %s", lock, exc)

        refresher = asyncio.create_task(refresh())
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            try:
                await remove_lock(repo, lock)
            except Exception as exc:  # it lapses on its own
                log.warning("removing lock %s failed: %s", lock, exc)
    finally:
        await opened.close()


def admitted(jc: JobContext, job: Job) -> contextlib.AbstractAsyncContextManager[None]:
    """What a job passes before its first step: the gate of every destination a backup
    writes (its own and its ``alsoDestinationIds``) or a copy writes (its target):
    ``backup_gate``; nothing for other jobs."""
    if job.type in {"backup", "copy"} and job.destination_id:
        return _gates(jc, job, written_destinations(job))
    return contextlib.nullcontext()


@contextlib.asynccontextmanager
async def _gates(jc: JobContext, job: Job, destinations: list[str]) -> AsyncIterator[None]:
    """``backup_gate`` of each destination, in order (a gate only ever waits for a GC's
    sweep, and a sweep never waits for a job that is not yet its writer: no cycle)."""
    async with contextlib.AsyncExitStack() as stack:
        for dest in destinations:
            await stack.enter_async_context(backup_gate(jc, job, dest))
        yield


def exclusive_job(jc: JobContext, destination_id: str, *, besides: str = "") -> Job | None:
    """An active GC or prune of the destination (other than ``besides``), if any."""
    for job in jc.jobs.active():
        if (
            job.destination_id == destination_id
            and job.type in EXCLUSIVE_TYPES
            and job.id != besides
        ):
            return job
    return None


class ClaimRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``VB_LOCKS`` ``excl.<destination, base64url>``: the jobs that hold the destination:
    one ``gc`` job, or any number of ``prune`` jobs (never both). Each with the time it
    was claimed (seconds since the epoch), so that a claim whose job record never
    appeared lapses."""

    gc: dict[str, float] = msgspec.field(default_factory=dict)
    prune: dict[str, float] = msgspec.field(default_factory=dict)


#: A claim whose job has no record this long after it was made does not count (its
#: submit died between the claim and the record).
CLAIM_UNBORN_SECONDS = 60.0


def claim_key(destination_id: str) -> str:
    """``excl.<destination id, base64url without padding>`` in ``VB_LOCKS``."""
    return "excl." + gate_key(destination_id).removeprefix("gc.")


async def _live_claims(jc: JobContext, claims: dict[str, float]) -> dict[str, float]:
    now = time.time()
    return {
        job_id: at
        for job_id, at in claims.items()
        if await _active(jc, job_id, missing=now - at < CLAIM_UNBORN_SECONDS)
    }


async def _read_claim(kv: KeyValue, key: str) -> tuple[ClaimRecord, int | None]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return ClaimRecord(), None
    try:
        return msgspec.json.decode(entry.value or b"{}", type=ClaimRecord), entry.revision
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ClaimRecord(), entry.revision


async def claim_destination(
    jc: JobContext, destination_id: str, job_type: str, job_id: str
) -> None:
    """Make ``job_id`` (a ``gc`` or ``prune`` job, submitted next or running) hold the
    destination, in one compare-and-swap made before its job is submitted: a GC holds it
    alone, prunes together (each removes points one at a time, the GC would mark points
    they remove). So a GC and a prune of one destination never both pass, whether the
    other is queued or running and however the job index lags. Idempotent for a holder.
    ``Conflict`` (409) naming the other job while it is active."""
    kv = jc.ctx.bucket(buckets.LOCKS)
    key = claim_key(destination_id)
    while True:
        record, revision = await _read_claim(kv, key)
        if job_id in (record.gc if job_type == "gc" else record.prune):
            return
        gcs = await _live_claims(jc, record.gc)
        prunes = await _live_claims(jc, record.prune)
        others = list(gcs) + (list(prunes) if job_type == "gc" else [])
        if others:
            kind = "gc" if others[0] in gcs else "prune"
            raise Conflict(f"destination {destination_id} has a {kind} job running ({others[0]})")
        other = exclusive_job(jc, destination_id, besides=job_id)
        if other is not None and (job_type == "gc" or other.type == "gc"):
            raise Conflict(
                f"destination {destination_id} has a {other.type} job running ({other.id})"
            )
        if job_type == "gc":
            mine = ClaimRecord(gc={job_id: time.time()}, prune={})
        else:
            mine = ClaimRecord(gc={}, prune={**prunes, job_id: time.time()})
        if await _write_claim(kv, key, mine, revision):
            return


async def _write_claim(kv: KeyValue, key: str, record: ClaimRecord, revision: int | None) -> bool:
    return await write_if(kv, key, msgspec.json.encode(record), revision)


async def release_destination(jc: JobContext, destination_id: str, job_id: str) -> None:
    """Give up ``job_id``'s hold on the destination (idempotent)."""
    kv = jc.ctx.bucket(buckets.LOCKS)
    key = claim_key(destination_id)
    while True:
        record, revision = await _read_claim(kv, key)
        if revision is None or (job_id not in record.gc and job_id not in record.prune):
            return
        rest = ClaimRecord(
            gc={k: v for k, v in record.gc.items() if k != job_id},
            prune={k: v for k, v in record.prune.items() if k != job_id},
        )
        if await _write_claim(kv, key, rest, revision):
            return


@contextlib.asynccontextmanager
async def claimed(jc: JobContext, destination_id: str, job_type: str) -> AsyncIterator[str]:
    """Claim the destination for a job about to be submitted: yields its id (pass it to
    ``jc.submit``); released again when the block raises (nothing was submitted).
    ``Conflict`` as ``claim_destination``."""
    job_id = new_id()
    await claim_destination(jc, destination_id, job_type, job_id)
    try:
        yield job_id
    except BaseException:
        await release_destination(jc, destination_id, job_id)
        raise


async def claim_gate(jc: JobContext, job: Job) -> None:
    """Take the destination's gate for this GC; ``Conflict`` while another GC (or a
    prune) of the destination is active."""
    assert job.destination_id
    other = exclusive_job(jc, job.destination_id, besides=job.id)
    if other is not None:
        raise Conflict(
            f"destination {job.destination_id} has a {other.type} job running ({other.id})"
        )
    kv = jc.ctx.bucket(buckets.LOCKS)
    key = gate_key(job.destination_id)
    while True:
        record, revision = await _read_gate(kv, key)
        holder = record.gc_job
        if holder and holder != job.id and await _active(jc, holder):
            raise Conflict(f"destination {job.destination_id} has a gc job running ({holder})")
        if await _write_gate(kv, key, GateRecord(gc_job=job.id, writers=record.writers), revision):
            return


async def release_gate(jc: JobContext, job: Job) -> None:
    """Open the gate again, dropping writers whose jobs ended without leaving it (their
    orchestrator died)."""
    assert job.destination_id
    seen, _ = await _read_gate(jc.ctx.bucket(buckets.LOCKS), gate_key(job.destination_id))
    ended = {w for w in seen.writers if not await _active(jc, w, missing=True)}

    def release(r: GateRecord) -> GateRecord:
        writers = [w for w in r.writers if w not in ended]
        if r.gc_job != job.id:
            return msgspec.structs.replace(r, writers=writers)
        return GateRecord(writers=writers)

    await _change_gate(jc, job.destination_id, release)


async def close_gate(jc: JobContext, job: Job) -> None:
    """Set ``sweeping`` and wait until no backup of the destination is running."""
    assert job.destination_id

    def sweep(r: GateRecord) -> GateRecord:
        if r.gc_job != job.id:
            raise JobFailed("lost the destination's gate (another gc took it over)")
        return msgspec.structs.replace(r, sweeping=True)

    # The writers of the record this compare-and-swap replaced are exactly those that
    # passed the gate before it closed: no backup can add itself to a sweeping record.
    closed = await _change_gate(jc, job.destination_id, sweep)
    running = list(closed.writers)
    said = -1
    while True:
        running = [w for w in running if await _active(jc, w, missing=True)]
        if not running:
            return
        if len(running) != said:
            said = len(running)
            await jc.message(
                job.id,
                f"waiting for {said} running backup(s) of the destination to finish "
                f"({', '.join(running)}); new ones wait for this gc",
            )
        jc.check_canceled(job.id)
        await asyncio.sleep(GATE_POLL_SECONDS)


def _grace(job: Job) -> float:
    grace = job.params.get("graceSeconds")
    return float(DEFAULT_GRACE_SECONDS if grace is None else grace)


async def _record_partial(jc: JobContext, job: Job, done: GcResult | None) -> None:
    """Keep what a sweep cut short (cancelled, or failed midway) had removed as the job's
    ``result`` (with ``"partial": true``): its final record says what happened."""
    if done is None:
        return
    with contextlib.suppress(Exception):
        await update_job(jc.store, jc.bus, job.id, {"result": {**done.as_dict(), "partial": True}})


async def run_gc(jc: JobContext, job: Job) -> str:
    """Collect the garbage of the job's destination (see the module docstring)."""
    assert job.destination_id
    dry_run = bool(job.params.get("dryRun"))
    try:
        await claim_destination(jc, job.destination_id, "gc", job.id)
        await claim_gate(jc, job)
    except BaseException:
        await release_destination(jc, job.destination_id, job.id)
        raise
    try:
        opened = await jc.repository(job.destination_id, create=False)
        repo = retrying(opened)
        try:

            async def progress(text: str) -> None:
                await jc.message(job.id, text)

            installation = await installation_id(jc)

            async def ended(lock: LockRecord) -> bool:
                # Job records are never deleted: one not found is a read that lags.
                mine = lock.installation == installation
                return mine and not await _active(jc, lock.job_id, missing=True)

            gc = GarbageCollection(
                repo,
                installation=installation,
                ended=ended,
                job_id=job.id,
                grace_seconds=_grace(job),
                dry_run=dry_run,
                host=jc.holder,
                progress=progress,
            )
            await gc.begin()
            try:
                await jc.message(job.id, "marking: reading every restore point")
                await gc.mark()
                await close_gate(jc, job)
                await jc.enter(job.id, "transferring", message="sweeping")
                try:
                    result = await gc.sweep()
                except BaseException:
                    await _record_partial(jc, job, gc.done)
                    raise
            finally:
                await gc.end()
        finally:
            await opened.close()
    finally:
        await release_gate(jc, job)
        await release_destination(jc, job.destination_id, job.id)
    figures = await _stats_figures(jc, job.destination_id)
    await update_job(jc.store, jc.bus, job.id, {"result": {**result.as_dict(), "stats": figures}})
    verb = "would remove" if dry_run else "removed"
    return (
        f"gc{' (dry run)' if dry_run else ''}: {verb} {result.chunks_removed} chunks "
        f"({result.bytes_removed} bytes), kept {result.chunks_kept} "
        f"({result.chunks_too_young} unreferenced but younger than the grace period) "
        f"in {result.duration_seconds:.1f} s"
        + (
            f"; quarantined chunks: {verb} {result.quarantined_removed}, "
            f"kept {result.quarantined_kept}"
            if result.quarantined_removed or result.quarantined_kept
            else ""
        )
    )


async def _stats_figures(jc: JobContext, destination_id: str) -> dict[str, Any]:
    repo = await jc.repository(destination_id, create=False)
    try:
        figures = (await repository_stats(repo)).as_dict()
    finally:
        await repo.close()
    figures.pop("vms", None)
    return figures


def _in_selection(record: str, params: dict[str, Any]) -> bool:
    """Whether an unreadable record may belong to the selection (its VM and server are
    unknown: only a ``vmName`` whose folder it is not in rules it out)."""
    vm = params.get("vmName")
    if vm is None:
        return True
    try:
        return record.lower().startswith(vm_prefix(str(vm)).lower())
    except ValueError:
        return False


async def _quarantine(repo: Repository, bad: dict[str, BadChunk]) -> set[str]:
    """Quarantine the chunks the workers found corrupt (``Repository.quarantine_chunk``
    reads each again and moves it only if it still fails to decode); never a missing
    one. A chunk that cannot be moved now stays where it was (logged)."""
    quarantined: set[str] = set()
    for chunk_id in sorted(bad):
        if bad[chunk_id].problem != "corrupt":
            continue
        try:
            if await repo.quarantine_chunk(chunk_id):
                quarantined.add(chunk_id)
        except Exception as exc:
            log.warning("could not quarantine damaged chunk %s: %s", chunk_id, exc)
    return quarantined


def _selected(point: RestorePoint, params: dict[str, Any]) -> bool:
    server, vm = params.get("serverId"), params.get("vmName")
    return (server is None or point.source_server_id == server) and (
        vm is None or point.vm_name == vm
    )


def _recent(verification: Verification, days: int | None, now: datetime) -> bool:
    if days is None or verification.verified_at is None:
        return False
    try:
        at = datetime.fromisoformat(verification.verified_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    return now - at < timedelta(days=days)


async def _choose(
    repo: Repository, point: RestorePoint, mode: str, percent: int
) -> tuple[list[str], str | None]:
    """The chunk ids to check of one point (every one, or a random sample), or the
    problem that keeps its chunks from being listed."""
    try:
        ids = sorted({chunk_id for chunk_id, _ in await point_chunks(repo, point)})
    except (NotFoundError, RepositoryError) as exc:
        return [], str(exc)
    if mode == "sample" and ids:
        count = max(1, math.ceil(len(ids) * percent / 100))
        ids = sorted(random.sample(ids, min(count, len(ids))))
    return ids, None


async def run_verify(jc: JobContext, job: Job) -> str:
    """Check the selected points' chunks (every one, or a sample per point) as a restore
    does (hash against id; the AEAD first when encrypted), store each point's outcome in
    its ``verify.json`` and raise ``agent.job_failure`` for each damaged point. A chunk
    proven corrupt (not a missing one) is quarantined (``Repository.quarantine_chunk``),
    so the next backup with its data stores it again. The job fails when a point is
    damaged or a record in the selection cannot be read (named in the message and in
    ``result.unreadablePoints``)."""
    assert job.destination_id
    params = job.params
    mode = str(params.get("mode") or "full")
    percent = int(params.get("samplePercent") or 100)
    days = params.get("outdatedAfterDays")
    now = datetime.now(UTC)
    opened = await jc.repository(job.destination_id, create=False)
    repo = retrying(opened)
    try:
        chosen: dict[str, tuple[RestorePoint, list[str], str | None]] = {}
        skipped = 0
        scan = await repo.scan_points()
        unreadable = [str(u) for u in scan.unreadable if _in_selection(u.key, params)]
        for point in scan.points:
            if not _selected(point, params):
                continue
            if days is not None:
                last = await read_verification(repo, point.vm_name, point.timestamp)
                if _recent(last, days, now):
                    skipped += 1
                    continue
            ids, problem = await _choose(repo, point, mode, percent)
            chosen[point.xml_path] = (point, ids, problem)
        every = sorted({chunk_id for _, ids, _ in chosen.values() for chunk_id in ids})
        units = verify_units(job.id, job.destination_id, repo.chunk_size, every)
        bad: dict[str, BadChunk] = {}

        def collect(result: UnitResult) -> None:
            bad.update((b.id, b) for b in result.bad)

        await jc.enter(
            job.id,
            "transferring",
            message=(
                f"{mode} verify of {len(chosen)} restore points ({skipped} verified recently): "
                f"{len(every)} chunks in {len(units)} units"
            ),
        )
        started = time.monotonic()
        await jc.run_units(job.id, units, 0, collect)
        quarantined = await _quarantine(repo, bad)
        outcomes: list[dict[str, Any]] = []
        damaged_points: list[str] = []
        for xml_path, (point, ids, problem) in chosen.items():
            if not await repo.driver.exists(record_key(point.vm_name, point.timestamp)):
                continue  # deleted meanwhile: no sidecar without its point, no alarm
            damaged = [chunk_id for chunk_id in ids if chunk_id in bad]
            state: VerifyState = "damaged" if damaged or problem else "ok"
            await write_verification(
                repo,
                point.vm_name,
                point.timestamp,
                Verification(
                    state=state,
                    verified_at=utcnow_iso(),
                    mode="sample" if mode == "sample" else "full",
                    chunks_checked=len(ids),
                    damaged_chunks=damaged,
                ),
            )
            outcome: dict[str, Any] = {
                "xmlPath": xml_path,
                "vmName": point.vm_name,
                "timestamp": point.timestamp,
                "state": state,
                "chunksChecked": len(ids),
                "damagedChunks": [
                    {
                        "id": c,
                        "problem": bad[c].problem,
                        "detail": bad[c].detail,
                        "quarantined": c in quarantined,
                    }
                    for c in damaged
                ],
            }
            if problem:
                outcome["problem"] = problem
            outcomes.append(outcome)
            if state == "damaged":
                what = (
                    f"{len(damaged)} damaged chunks ({', '.join(damaged)})" if damaged else problem
                )
                text = f"restore point {point.vm_name} {point.timestamp} is damaged: {what}"
                damaged_points.append(text)
                failure = JobFailure(job_id=job.id, type=job.type, message=text)
                await jc.bus.publish_event(EventType.JOB_FAILURE, failure, key=job.id)
        result = {
            "mode": mode,
            "samplePercent": percent if mode == "sample" else 100,
            "pointsChecked": len(outcomes),
            "pointsSkipped": skipped,
            "pointsDamaged": len(damaged_points),
            "chunksChecked": len(every),
            "chunksDamaged": len(bad),
            "chunksQuarantined": sorted(quarantined),
            "unreadablePoints": unreadable,
            "durationSeconds": round(time.monotonic() - started, 3),
            "points": outcomes,
        }
    finally:
        await opened.close()
    result["stats"] = await _stats_figures(jc, job.destination_id)
    await update_job(jc.store, jc.bus, job.id, {"result": result})
    if damaged_points or unreadable:
        parts = []
        if damaged_points:
            parts.append(
                f"{len(damaged_points)} of {len(outcomes)} restore points damaged: "
                + "; ".join(damaged_points)
            )
        if quarantined:
            parts.append(
                f"{len(quarantined)} damaged chunks quarantined (chunks/<id>.bad): the next "
                "backup that has their data stores them again, which heals these points"
            )
        if unreadable:
            parts.append(
                f"{len(unreadable)} restore point records cannot be read: " + "; ".join(unreadable)
            )
        raise JobFailed("; ".join(parts))
    return (
        f"{mode} verify: {len(outcomes)} restore points ok ({len(every)} chunks checked, "
        f"{skipped} skipped as verified recently)"
    )
