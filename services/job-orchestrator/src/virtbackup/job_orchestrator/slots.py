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

Cost (a nightly run queues thousands of jobs at once): the line walks the queued and
running jobs only (the index keeps them apart from the finished history), and is
computed at most every ``LINE_SECONDS`` by one task per replica while jobs wait, which
wakes the jobs it admits (and those whose reason to wait changed); a waiting job does
not poll, and a job that took its slots does not make the others compute it again.
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
from virtbackup.job_orchestrator import metrics
from virtbackup.job_orchestrator.errors import JobCanceled
from virtbackup.job_orchestrator.fanout import written_destinations
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import lookup_in
from virtbackup.runtime import joblog
from virtbackup.runtime.errors import Unavailable
from virtbackup.runtime.kv import write_if
from virtbackup.runtime.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between two computations of the line while jobs of this replica wait (one
#: task computes it and wakes the jobs it admits, or whose reason to wait changed: a
#: waiting job does not poll, so thousands of queued jobs cost little).
LINE_SECONDS = 0.2
#: Seconds a waiting job sleeps at most without being woken (a safety net), and a job
#: the line does not know yet (submitted after it was computed).
WAIT_MAX_SECONDS = 30.0
POLL_SECONDS = 0.25
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
    """One look at the line: which queued jobs may start now, and why the others wait.
    ``running``: the jobs holding (or admitted to) each slot; ``count``: those and the
    places taken in line on it; ``placed``: the queued jobs placed so far."""

    at: float
    admitted: set[str] = field(default_factory=set)
    blocked: dict[str, Blocked] = field(default_factory=dict)
    running: dict[Slot, int] = field(default_factory=dict)
    count: dict[Slot, int] = field(default_factory=dict)
    placed: int = 0

    def has(self, job_id: str) -> bool:
        return job_id in self.admitted or job_id in self.blocked


def _place(line: Line, job_id: str, slots: tuple[Slot, ...], settings: Settings) -> None:
    """Put a queued job at the end of ``line``: admitted, or blocked on a full slot."""
    running, count = line.running, line.count
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
    for slot in slots if not full or line.placed == 0 else full:
        count[slot] = count.get(slot, 0) + 1
    line.placed += 1


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
    line = Line(at=time.monotonic(), running=running, count=dict(running))
    for job_id, slots in queued:
        _place(line, job_id, slots, settings)
    return line


def extend_line(line: Line, jobs: Iterable[Job], settings: Settings) -> list[str]:
    """Put the queued ``jobs`` that ``line`` lacks (submitted since it was computed) at
    its end, in id order, without walking the rest again; their ids."""
    added: list[str] = []
    for job in sorted(jobs, key=lambda j: j.id):
        if job.state != "queued" or line.has(job.id):
            continue
        slots = job_slots(job, settings)
        if slots:
            _place(line, job.id, slots, settings)
            added.append(job.id)
    return added


@dataclass
class _Replica:
    line: Line | None = None
    #: Jobs of this replica that took their slots and have not started yet.
    taking: set[str] = field(default_factory=set)
    #: Each active job's slots (``compute_line``'s ``known``).
    known: dict[str, tuple[Slot, ...]] = field(default_factory=dict)
    #: The waiting jobs of this replica, each woken when a line admits it (or it is
    #: cancelled) instead of only at its next look.
    wakers: dict[str, asyncio.Event] = field(default_factory=dict)
    #: Queued jobs seen since the line was computed (``extend_line``).
    arrived: dict[str, Job] = field(default_factory=dict)
    #: What each waiting job's message says it waits for.
    said: dict[str, Slot] = field(default_factory=dict)
    #: A look at the line is scheduled (``_soon``).
    soon: bool = False
    #: The task computing the line while jobs wait (``_keep_looking``).
    looker: asyncio.Task[None] | None = None
    #: The index's changes are followed (``_listen``).
    listening: bool = False


_replicas: dict[int, _Replica] = {}


def _replica(jc: JobContext) -> _Replica:
    return _replicas.setdefault(id(jc), _Replica())


def _listen(jc: JobContext, state: _Replica) -> None:
    """Follow the job index (once): a cancel wakes its waiting job at once, and a job
    queued since the line was computed is placed in it at the next look."""
    if state.listening:
        return
    wakers = state.wakers

    def on_change(job: Job) -> None:
        if job.cancel_requested and job.id in wakers:
            wakers[job.id].set()
        if job.state == "queued" and (state.line is None or not state.line.has(job.id)):
            state.arrived[job.id] = job

    jc.jobs.listeners.append(on_change)
    state.listening = True


def _current_line(jc: JobContext) -> Line:
    """The line, computed again when it is older than ``LINE_SECONDS`` (at most that
    often however many jobs wait and however fast slots free: a computation walks
    every active job), else extended by the jobs submitted since (``extend_line``); the
    jobs it admits are woken, and those whose reason to wait changed."""
    state = _replica(jc)
    if state.line is None or time.monotonic() - state.line.at > LINE_SECONDS:
        index = jc.jobs.jobs
        # A job that started (or was taken over by another replica) is no longer taking.
        state.taking = {
            j
            for j in state.taking
            if j not in index or (index[j].state == "queued" and index[j].owner == jc.holder)
        }
        active = jc.jobs.active()
        state.arrived.clear()
        line = state.line = compute_line(active, jc.settings, state.taking, state.known)
        metrics.SLOT_LINES.inc()
        metrics.SLOT_LINE_JOBS.inc(len(active))
        looked: Iterable[str] = list(state.wakers)
    elif state.arrived:  # jobs submitted since: at the end of the line, in id order
        arrived = list(state.arrived.values())
        state.arrived.clear()
        line = state.line
        looked = extend_line(line, arrived, jc.settings)
        metrics.SLOT_LINE_JOBS.inc(len(arrived))
    else:
        return state.line
    for job_id in looked:
        waker = state.wakers.get(job_id)
        if waker is None:
            continue
        blocked = line.blocked.get(job_id)
        if job_id in line.admitted or (blocked and blocked.slot != state.said.get(job_id)):
            waker.set()  # to start, or to say what it waits for now
    return line


async def _keep_looking(jc: JobContext, state: _Replica) -> None:
    """Compute the line every ``LINE_SECONDS`` while jobs of this replica wait (slots
    freed by other replicas are seen so)."""
    try:
        while state.wakers:
            try:
                _current_line(jc)
            except Unavailable:
                return  # stopping
            except Exception:
                log.exception("computing the job slots' line failed")
            await asyncio.sleep(LINE_SECONDS)
    finally:
        state.looker = None


def _soon(jc: JobContext) -> None:
    """Look at the line again as soon as ``LINE_SECONDS`` allows (after a slot was given
    back or found full), so that the jobs it admits start without waiting for their
    next look."""
    state = _replica(jc)
    if state.soon:
        return
    state.soon = True
    age = time.monotonic() - state.line.at if state.line is not None else LINE_SECONDS
    delay = max(0.0, LINE_SECONDS - age) + 0.001

    def look() -> None:
        state.soon = False
        if state.line is not None and time.monotonic() - state.line.at <= LINE_SECONDS:
            return  # looked at meanwhile
        with contextlib.suppress(Exception):  # stopping: nothing waits any more
            _current_line(jc)

    asyncio.get_running_loop().call_later(delay, look)


async def acquire(jc: JobContext, job: Job) -> float | None:
    """Wait for the job's turn and take its slots; the seconds it waited, or ``None``
    when it took its slots at once (or needs none). While it waits its message says what
    for (written when that changes). ``JobCanceled`` at once on a cancel."""
    slots = job_slots(job, jc.settings)
    if not slots:
        return None
    state = _replica(jc)
    _listen(jc, state)
    cancel = jc.cancel_event(job.id)
    waker = state.wakers[job.id] = asyncio.Event()
    if state.line is None or not state.line.has(job.id):
        state.arrived[job.id] = job  # the index may not have it yet
    if state.looker is None:
        state.looker = asyncio.create_task(_keep_looking(jc, state), name="slots-line")
    try:
        return await _wait_and_take(jc, job, slots, cancel, waker)
    finally:
        state.wakers.pop(job.id, None)
        state.said.pop(job.id, None)


async def _wait_and_take(
    jc: JobContext,
    job: Job,
    slots: tuple[Slot, ...],
    cancel: asyncio.Event,
    waker: asyncio.Event,
) -> float | None:
    state = _replica(jc)
    started = time.monotonic()
    waited = False
    while True:
        if cancel.is_set():
            raise JobCanceled(job.id)
        waker.clear()
        line = _current_line(jc)
        if job.id in line.admitted:
            # The line counts it as running already: the jobs behind it keep using it.
            state.taking.add(job.id)
            full = await _take_all(jc, job.id, slots)
            if full is None:
                return time.monotonic() - started if waited else None
            state.taking.discard(job.id)
            state.line = None  # it was wrong about this job: the next look computes it
            _soon(jc)
        elif job.id not in line.blocked:
            _soon(jc)  # submitted after the line was computed
        blocked = line.blocked.get(job.id)
        if blocked is not None and blocked.slot != state.said.get(job.id):
            state.said[job.id], waited = blocked.slot, True
            text = blocked.message()
            await jc.message(job.id, text)
            await joblog.try_append(jc.bus, job.id, text)
        pause = POLL_SECONDS if blocked is None else WAIT_MAX_SECONDS
        if cancel.is_set():
            raise JobCanceled(job.id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waker.wait(), pause)


async def release(jc: JobContext, job: Job) -> None:
    """Give the job's slots back (after its final state is written). Never raises: a
    slot not given back lapses once its job has ended."""
    _replica(jc).taking.discard(job.id)
    slots = job_slots(job, jc.settings)
    for slot in slots:
        try:
            await _drop(jc, slot, job.id)
        except Exception as exc:
            log.warning("giving back slot %s of job %s failed: %s", slot.key, job.id, exc)
    if slots:
        _soon(jc)  # the next in line starts now, not at its next look


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
