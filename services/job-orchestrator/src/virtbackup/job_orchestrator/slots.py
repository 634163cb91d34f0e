"""Admission control: at most ``VIRTBACKUP_MAX_JOBS_PER_SERVER`` jobs hold a server and
``VIRTBACKUP_MAX_JOBS_PER_DESTINATION`` a destination at once, across replicas (0: no
limit). A job over a limit stays ``queued``, its message saying what it waits for, and
starts in submit order when a slot frees.

What holds what (``job_slots``): a backup (offline ones too) its server and every
destination it writes; a restore its target server and the destination it reads; a
migration its source and target servers (and, through a destination, that one), its own
backup and restore jobs running under its slots (``params.migrationJobId``); a sanity
check and a verify the destination they read; a copy both destinations. GC and prune
jobs take no slot (a GC's sweep excludes backups through its own gate).

The slots of one server or destination are one record in ``VB_LOCKS`` (key
``slots.srv.<server>`` or ``slots.dst.<destination>``, base64url), changed only by
compare-and-swap::

    {"holders": {"<job id>": <seconds since the epoch when taken>, ...}}

A job takes a slot in each of its records (in key order; it gives back what it took
when one is full, so no job waits holding a slot) only while fewer than the limit of
the record's holders are active; a holder whose job has ended (finished, or ended by
another replica after its orchestrator died) does not count and is dropped by the next
write, so no crash leaves a slot taken for good. A job gives its slots back once its
final state is written (``release``), so its successor never runs beside it.

Order: every replica computes the same line from its job index (``Line``): queued jobs
by id (ids sort by submit time); a waiting job keeps its place on each server or
destination it is blocked on, and the first job in line on every one of its own, so a
job waiting for a busy destination is not overtaken for ever by later jobs of its
server (no starvation), while a job waiting for its busy server does not hold back
other servers' jobs on a shared destination. Only a job its line admits tries the
compare-and-swap; the records decide.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.jobs import ACTIVE_STATES, Job
from virtbackup.job_orchestrator.errors import JobCanceled
from virtbackup.job_orchestrator.fanout import written_destinations
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import lookup_in
from virtbackup.runtime import joblog
from virtbackup.runtime.kv import write_if
from virtbackup.runtime.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between two looks of a waiting job at the line; a job far back in line looks
#: less often (a limit's worth of jobs ahead adds ``POLL_SECONDS``), at most
#: ``POLL_MAX_SECONDS``: thousands of queued jobs cost little. A cancel is seen at once.
POLL_SECONDS = 0.25
POLL_MAX_SECONDS = 5.0
#: Seconds a computed line is reused by the jobs that look at it.
LINE_SECONDS = 0.2
#: Seconds a holder whose job record is missing still counts (a read that lags).
ORPHAN_GRACE = 30.0
#: Params that name the migration a job runs under (``migrate_via.PARENT_PARAM``) and a
#: migration's target server and destination.
PARENT_PARAM = "migrationJobId"
TARGET_PARAM = "targetServerId"
VIA_PARAM = "viaDestinationId"

SERVER_SETTING = "VIRTBACKUP_MAX_JOBS_PER_SERVER"
DESTINATION_SETTING = "VIRTBACKUP_MAX_JOBS_PER_DESTINATION"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") or "_"


@dataclass(frozen=True, order=True)
class Slot:
    """A server's or a destination's slots."""

    kind: str  # "server" | "destination"
    id: str

    @property
    def key(self) -> str:
        """``slots.srv.<id>`` or ``slots.dst.<id>`` in ``VB_LOCKS`` (id base64url)."""
        return f"slots.{'srv' if self.kind == 'server' else 'dst'}.{_b64(self.id)}"

    @property
    def setting(self) -> str:
        return SERVER_SETTING if self.kind == "server" else DESTINATION_SETTING


def limit_of(settings: Settings, slot: Slot) -> int:
    """The slot's limit (0: none)."""
    if slot.kind == "server":
        return settings.max_jobs_per_server
    return settings.max_jobs_per_destination


def job_slots(job: Job, settings: Settings) -> tuple[Slot, ...]:
    """The slots ``job`` must hold to run (see the module docstring), each once, servers
    first; none of a kind whose limit is 0."""
    if job.params.get(PARENT_PARAM):
        return ()  # under its migration's slots
    servers: list[str] = []
    dests: list[str] = []
    if job.type in {"backup", "restore", "migration"} and job.server_id:
        servers.append(job.server_id)
    if job.type == "migration":
        target, via = job.params.get(TARGET_PARAM), job.params.get(VIA_PARAM)
        if isinstance(target, str) and target:
            servers.append(target)
        if isinstance(via, str) and via:
            dests.append(via)
    if job.type in {"restore", "sanity", "verify", "copy"} and job.destination_id:
        dests.append(job.destination_id)
    if job.type in {"backup", "copy"}:
        dests.extend(written_destinations(job))
    out: list[Slot] = []
    if settings.max_jobs_per_server > 0:
        out += [Slot("server", s) for s in dict.fromkeys(servers)]
    if settings.max_jobs_per_destination > 0:
        out += [Slot("destination", d) for d in dict.fromkeys(dests)]
    return tuple(out)


class SlotRecord(msgspec.Struct, frozen=True, kw_only=True):
    holders: dict[str, float] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class Blocked:
    """Why a job waits: the slot, its running jobs and the jobs before it in line."""

    slot: Slot
    running: int
    ahead: int
    limit: int

    def message(self) -> str:
        jobs = "job" if self.running == 1 else "jobs"
        before = f", {self.ahead} waiting before this one" if self.ahead else ""
        return (
            f"waiting for a slot on {self.slot.kind} {self.slot.id}: {self.running} {jobs} "
            f"running{before} ({self.slot.setting}={self.limit})"
        )


@dataclass
class Line:
    """One look at the line: which queued jobs may start now, and why the others wait."""

    at: float
    admitted: set[str] = field(default_factory=set)
    blocked: dict[str, Blocked] = field(default_factory=dict)


def compute_line(
    jobs: Iterable[Job],
    settings: Settings,
    taking: set[str],
    known: dict[str, tuple[Slot, ...]] | None = None,
) -> Line:
    """The line from a job index (see the module docstring). ``taking``: queued jobs of
    this replica that hold their slots already (between the take and their start).
    ``known``: each active job's slots from the previous call (a job's slots never
    change), replaced by this call's."""
    running: dict[Slot, int] = {}
    queued: list[tuple[str, tuple[Slot, ...]]] = []
    before = dict(known or {})
    if known is not None:
        known.clear()
    for job in jobs:
        if job.state not in ACTIVE_STATES:
            continue
        slots = before.get(job.id)
        if slots is None:
            slots = job_slots(job, settings)
        if known is not None:
            known[job.id] = slots
        if not slots:
            continue
        if job.state == "running" or job.id in taking:
            for slot in slots:
                running[slot] = running.get(slot, 0) + 1
        else:
            queued.append((job.id, slots))
    queued.sort()
    count = dict(running)
    line = Line(at=time.monotonic())
    for index, (job_id, slots) in enumerate(queued):
        full = [s for s in slots if count.get(s, 0) >= limit_of(settings, s)]
        if not full:
            line.admitted.add(job_id)
            for slot in slots:  # starting now: shown as running to those behind it
                running[slot] = running.get(slot, 0) + 1
        else:
            first = full[0]
            line.blocked[job_id] = Blocked(
                slot=first,
                running=running.get(first, 0),
                ahead=max(0, count.get(first, 0) - running.get(first, 0)),
                limit=limit_of(settings, first),
            )
        # Its place in line: where it is blocked, or everywhere when it is admitted or
        # first in line.
        for slot in slots if not full or index == 0 else full:
            count[slot] = count.get(slot, 0) + 1
    return line


@dataclass
class _Replica:
    line: Line | None = None
    #: Jobs of this replica that took their slots and have not started yet.
    taking: set[str] = field(default_factory=set)
    #: Each active job's slots (``compute_line``'s ``known``).
    known: dict[str, tuple[Slot, ...]] = field(default_factory=dict)


_replicas: dict[int, _Replica] = {}


def _replica(jc: JobContext) -> _Replica:
    return _replicas.setdefault(id(jc), _Replica())


def _current_line(jc: JobContext) -> Line:
    state = _replica(jc)
    if state.line is None or time.monotonic() - state.line.at > LINE_SECONDS:
        index = jc.jobs.jobs
        # A job that started (or was taken over by another replica) is no longer taking.
        state.taking = {
            j
            for j in state.taking
            if j not in index or (index[j].state == "queued" and index[j].owner == jc.holder)
        }
        state.line = compute_line(list(index.values()), jc.settings, state.taking, state.known)
    return state.line


async def acquire(jc: JobContext, job: Job) -> float | None:
    """Wait for the job's turn and take its slots; the seconds it waited, or ``None``
    when it took its slots at once (or needs none). While it waits its message says what
    for (written when that changes). ``JobCanceled`` at once on a cancel."""
    slots = job_slots(job, jc.settings)
    if not slots:
        return None
    state = _replica(jc)
    cancel = jc.cancel_event(job.id)
    started = time.monotonic()
    said: Slot | None = None
    waited = False
    while True:
        if cancel.is_set():
            raise JobCanceled(job.id)
        line = _current_line(jc)
        if job.id in line.admitted:
            state.taking.add(job.id)
            full = await _take_all(jc, job.id, slots)
            if full is None:
                state.line = None  # the next job looks again
                return time.monotonic() - started if waited else None
            state.taking.discard(job.id)
            state.line = None
        blocked = line.blocked.get(job.id)
        if blocked is not None and blocked.slot != said:
            said, waited = blocked.slot, True
            text = blocked.message()
            await jc.message(job.id, text)
            await joblog.try_append(jc.bus, job.id, text)
        pause = POLL_SECONDS
        if blocked is not None:
            pause = min(POLL_MAX_SECONDS, POLL_SECONDS * (1 + blocked.ahead // blocked.limit))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel.wait(), pause)


async def release(jc: JobContext, job: Job) -> None:
    """Give the job's slots back (after its final state is written). Never raises: a
    slot not given back lapses once its job has ended."""
    _replica(jc).taking.discard(job.id)
    _replica(jc).line = None
    for slot in job_slots(job, jc.settings):
        try:
            await _drop(jc, slot, job.id)
        except Exception as exc:
            log.warning("giving back slot %s of job %s failed: %s", slot.key, job.id, exc)


def _kv(jc: JobContext) -> KeyValue:
    return jc.ctx.bucket(buckets.LOCKS)


async def _read(kv: KeyValue, key: str) -> tuple[SlotRecord, int | None]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return SlotRecord(), None
    try:
        return msgspec.json.decode(entry.value or b"{}", type=SlotRecord), entry.revision
    except (msgspec.DecodeError, msgspec.ValidationError):
        return SlotRecord(), entry.revision


async def _write(kv: KeyValue, key: str, record: SlotRecord, revision: int | None) -> bool:
    """Compare-and-swap; False when someone wrote in between."""
    return await write_if(kv, key, msgspec.json.encode(record), revision)


async def _alive(jc: JobContext, job_id: str, taken_at: float) -> bool:
    """Whether a holder's job is active (an ended job never becomes active again, so a
    stale index that says ended is right)."""
    job = jc.jobs.jobs.get(job_id)
    if job is None:
        job = await lookup_in(jc.store.get, job_id)
        if job is None:
            return time.time() - taken_at < ORPHAN_GRACE
    return job.state in ACTIVE_STATES


async def _take(jc: JobContext, slot: Slot, job_id: str) -> bool:
    """Take one slot for ``job_id``; False while the limit's holders are active."""
    kv, key, limit = _kv(jc), slot.key, limit_of(jc.settings, slot)
    while True:
        record, revision = await _read(kv, key)
        if job_id in record.holders:
            return True
        live = {j: t for j, t in record.holders.items() if await _alive(jc, j, t)}
        if len(live) >= limit:
            return False
        updated = SlotRecord(holders={**live, job_id: time.time()})
        if await _write(kv, key, updated, revision):
            return True


async def _drop(jc: JobContext, slot: Slot, job_id: str) -> None:
    kv, key = _kv(jc), slot.key
    while True:
        record, revision = await _read(kv, key)
        if job_id not in record.holders or revision is None:
            return
        holders = {j: t for j, t in record.holders.items() if j != job_id}
        if await _write(kv, key, SlotRecord(holders=holders), revision):
            return


async def _take_all(jc: JobContext, job_id: str, slots: tuple[Slot, ...]) -> Slot | None:
    """Take every slot (in key order) or none; the first full one, or ``None``."""
    taken: list[Slot] = []
    for slot in sorted(slots, key=lambda s: s.key):
        if not await _take(jc, slot, job_id):
            for done in taken:
                await _drop(jc, done, job_id)
            return slot
        taken.append(slot)
    return None


def started_after(seconds: float) -> str:
    """The message of a job that waited for its slots, when it starts."""
    return f"started after {seconds:.1f} s waiting for a slot"
