"""Instant-access exports (``vb.cmd.export.*``): create, list and stop them.

An export is a record in ``VB_EXPORTS`` (``virtbackup.contracts.v1.exports``), not a job:
it holds no VM lock (backups and restores of the VM go on while it is served), has no
units or progress, is owned by the transfer worker that serves it rather than by an
orchestrator replica (a job's lease would end it when its replica dies, while the worker
serving it is fine), and lasts up to a day, which ``GET /jobs`` (a running job of the
agent API's types) would show as a job that never ends. What the job store gives jobs
is kept here too: every change is a compare-and-swap on the record, any replica answers
any command, and nothing that decides the outcome lives in one process.

* create: check the request (``ttlSeconds`` in range, the point and its disk exist),
  write the record ``starting``, ask one transfer worker to serve it and return what it
  answered (the address and the certificates). A worker that refuses or does not answer
  leaves the record ``failed`` with its reason.
* list: every record, newest first, each as it is *now*: a live record whose lifetime is
  over is ``expired``, one whose worker is gone (its ``VB_WORKERS`` heartbeat expired, or
  belongs to a later process of that name) or that no worker took within
  :data:`START_GRACE_SECONDS` is ``failed``. What is found is written back, so the
  record never turns live again. An ended export is listed for 2 days after it ended:
  ``VB_EXPORTS`` has a TTL (``buckets.EXPORT_RECORD_SECONDS``) and drops a record that
  long after its last change; the index drops it then too.
* caps: at most ``VIRTBACKUP_INSTANT_MAX_EXPORTS`` (default 32) live exports in all, and
  ``VIRTBACKUP_INSTANT_MAX_PER_WORKER`` (default 8) on one worker; a create beyond either
  is a 409 naming the cap.
* stop: ``stopping`` by compare-and-swap, then wait (up to :data:`STOP_WAIT_SECONDS`) for
  the worker to close the export and write ``stopped``; a worker that is gone cannot, and
  the record is ``stopped`` at once. Stopping an ended export changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import ExportCmd, WorkerCmd
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.exports import (
    DEFAULT_TTL_SECONDS,
    LIVE_EXPORT_STATES,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    ExportCreated,
    ExportCreateRequest,
    ExportList,
    ExportListRequest,
    ExportServeRequest,
    ExportState,
    ExportStopRequest,
    InstantExport,
)
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.point_lookup import open_point
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, ServiceError, Unavailable
from virtbackup.runtime.kv import keys

#: How long the orchestrator waits for a worker to start serving an export.
SERVE_TIMEOUT_SECONDS: Final = 60.0
#: A ``starting`` record older than this was taken by no worker.
START_GRACE_SECONDS: Final = SERVE_TIMEOUT_SECONDS + 30.0
#: How long a stop waits for the worker to close the export.
STOP_WAIT_SECONDS: Final = 10.0
MAX_CAS_ATTEMPTS: Final = 50
#: Workers asked at least, when the ones asked serve their cap.
SERVE_ATTEMPTS: Final = 3

log = logging.getLogger(__name__)
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_decoder = msgspec.json.Decoder(InstantExport)
_encoder = msgspec.json.Encoder()

export_commands: Commands[JobContext] = Commands()


class _Heartbeat(msgspec.Struct, rename="camel"):
    """What a worker's entry in ``VB_WORKERS`` says that matters here."""

    started_at: str = ""


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ended(record: InstantExport, state: ExportState, message: str) -> InstantExport | None:
    """``record`` ended in ``state`` with ``message`` (None when it has already ended)."""
    if record.state not in LIVE_EXPORT_STATES:
        return None
    return msgspec.structs.replace(record, state=state, message=message, ended_at=utcnow_iso())


def current(record: InstantExport, now: dt.datetime, worker_alive: bool) -> InstantExport | None:
    """What a live ``record`` has become by ``now`` (see the module docstring), or None
    when it is as it says. ``worker_alive``: the worker it names still runs."""
    if record.state not in LIVE_EXPORT_STATES:
        return None
    if _parse_time(record.expires_at) <= now:
        return ended(record, "expired", "its lifetime is over")
    if record.state == "starting":
        age = (now - _parse_time(record.created_at)).total_seconds()
        if age > START_GRACE_SECONDS:
            return ended(record, "failed", "no transfer worker started serving it")
        return None
    if not worker_alive:
        return ended(record, "failed", f"the transfer worker {record.worker} is gone")
    return None


def expired_from_bucket(record: InstantExport, now: dt.datetime) -> bool:
    """Whether ``VB_EXPORTS`` has dropped ``record`` by now: the bucket keeps a record
    ``buckets.EXPORT_RECORD_SECONDS`` (2 days) after its last change, which is its end
    (``ended_at``) or, for one that never ended, at the latest its creation plus its
    longest life. So an ended export is listed for 2 days, then it is gone."""
    last = record.ended_at or record.created_at
    age = (now - _parse_time(last)).total_seconds()
    return age > buckets.EXPORT_RECORD_SECONDS + (0 if record.ended_at else MAX_TTL_SECONDS)


class ExportIndex:
    """Every record of ``VB_EXPORTS`` in memory, kept current by a watch of the bucket
    (as the job index is): a list needs no round trip per record. (nats-py's
    ``KeyValue.keys`` cannot be trusted for this: its watch may report the end of the
    initial values before they arrive, and it then answers an empty list.)"""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.records: dict[str, InstantExport] = {}
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    async def start(self) -> None:
        """Load the bucket; returns once its content is in memory."""
        watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher), name="export-index")
        await self._loaded.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            while True:
                entry = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
                if entry is None:  # the initial values are all delivered
                    self._loaded.set()
                    continue
                if entry.operation in {"DEL", "PURGE"} or entry.value is None:
                    self.records.pop(entry.key, None)
                    continue
                try:
                    self.records[entry.key] = _decoder.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning("undecodable export record %s", entry.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


_indexes: dict[int, ExportIndex] = {}


async def open_exports(jc: JobContext) -> None:
    """Load the export index of this orchestrator instance (at start)."""
    index = ExportIndex(jc.ctx.bucket(buckets.EXPORTS))
    await index.start()
    _indexes[id(jc.ctx)] = index


async def close_exports(jc: JobContext) -> None:
    index = _indexes.pop(id(jc.ctx), None)
    if index is not None:
        await index.stop()


class ExportStore:
    """``VB_EXPORTS``: key = export id, value = the ``InstantExport`` as JSON."""

    def __init__(
        self,
        kv: KeyValue,
        workers: Callable[[], Awaitable[KeyValue | None]],
        index: ExportIndex | None = None,
    ) -> None:
        self.kv = kv
        self._workers = workers
        self.index = index

    async def get(self, export_id: str) -> tuple[InstantExport, int]:
        """The record and its revision; NotFound for an unknown or malformed id."""
        if not _VALID_ID.match(export_id):
            raise NotFound(f"export {shown(export_id)} not found")
        try:
            entry = await self.kv.get(export_id)
        except KeyNotFoundError:
            raise NotFound(f"export {shown(export_id)} not found") from None
        if entry.value is None:
            raise NotFound(f"export {shown(export_id)} not found")
        return _decoder.decode(entry.value), entry.revision or 0

    async def create(self, record: InstantExport) -> None:
        await self.kv.create(record.id, _encoder.encode(record))

    async def change(
        self, export_id: str, change: Callable[[InstantExport], InstantExport | None]
    ) -> InstantExport:
        """Apply ``change`` by compare-and-swap (None: leave it); the record as it is after."""
        for _ in range(MAX_CAS_ATTEMPTS):
            record, revision = await self.get(export_id)
            updated = change(record)
            if updated is None:
                return record
            try:
                await self.kv.update(export_id, _encoder.encode(updated), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return updated
        raise RuntimeError(f"export {export_id}: {MAX_CAS_ATTEMPTS} concurrent updates in a row")

    async def alive(self, record: InstantExport) -> bool:
        """Whether the worker ``record`` names runs (the same process that took it)."""
        if not record.worker:
            return False
        workers = await self._workers()
        if workers is None:
            return False
        try:
            entry = await workers.get(record.worker)
        except KeyNotFoundError:
            return False
        if entry.value is None:
            return False
        try:
            beat = msgspec.json.decode(entry.value, type=_Heartbeat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return beat.started_at == record.worker_started_at

    async def refresh(self, record: InstantExport) -> InstantExport:
        """``record`` as it is now, the change written back (see :func:`current`)."""
        if record.state not in LIVE_EXPORT_STATES:
            return record
        alive = await self.alive(record) if record.state != "starting" else False
        if current(record, dt.datetime.now(dt.UTC), alive) is None:
            return record
        seen = (record.state, record.worker, record.worker_started_at)

        def now_is(r: InstantExport) -> InstantExport | None:
            if (r.state, r.worker, r.worker_started_at) != seen:
                return None  # changed meanwhile (e.g. a worker took it): as it says
            return current(r, dt.datetime.now(dt.UTC), alive)

        return await self.change(record.id, now_is)

    async def worker_count(self) -> int:
        """How many transfer workers are live (their ``VB_WORKERS`` heartbeats)."""
        workers = await self._workers()
        return len(await keys(workers)) if workers is not None else 0

    def all(self) -> list[InstantExport]:
        """Every record, from the index (``Unavailable`` while the instance starts),
        but those the bucket's TTL has removed (see :func:`expired_from_bucket`): a
        watch is told of deletes, not of records that age out."""
        if self.index is None:
            raise Unavailable("the job-orchestrator is starting or stopping; try again")
        now = dt.datetime.now(dt.UTC)
        records = self.index.records
        for gone in [k for k, r in records.items() if expired_from_bucket(r, now)]:
            records.pop(gone, None)
        return list(records.values())

    async def current(self, record: InstantExport) -> InstantExport | None:
        """:meth:`refresh`, or None when the record is gone from the bucket (dropped
        from the index too)."""
        try:
            return await self.refresh(record)
        except NotFound:
            if self.index is not None:
                self.index.records.pop(record.id, None)
            return None


def store(jc: JobContext) -> ExportStore:
    async def workers() -> KeyValue | None:
        try:
            return await jc.bus.key_value(buckets.WORKERS)
        except NotFound:
            return None

    return ExportStore(jc.ctx.bucket(buckets.EXPORTS), workers, _indexes.get(id(jc.ctx)))


@export_commands.handler(ExportCmd.CREATE, ExportCreateRequest)
async def create_export(jc: JobContext, req: ExportCreateRequest) -> ExportCreated:
    """Export one disk of a restore point; see the module docstring.

    BadRequest: ``ttlSeconds`` out of range, a malformed ``xmlPath``, no ``disk``.
    NotFound: no such destination, point or disk (the message names it). Conflict:
    ``instant_max_exports`` exports are live already, or every worker asked serves its
    ``instant_max_per_worker`` (the message names the cap). Unavailable: no worker
    answered, or the destination cannot be read.

    The total is counted from this replica's index: two replicas creating the last free
    export at the same moment may both succeed (the cap is exceeded by one for a while);
    the per-worker cap is exact (each worker counts what it serves)."""
    ttl = DEFAULT_TTL_SECONDS if req.ttl_seconds is None else req.ttl_seconds
    if not MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS:
        raise BadRequest(
            f"ttlSeconds must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}, got {ttl}"
        )
    if not req.disk:
        raise BadRequest("disk: give the target of a disk of the restore point (e.g. vda)")
    exports = store(jc)
    cap = jc.settings.instant_max_exports
    now_seen = [await exports.current(r) for r in exports.all()]
    live = [r for r in now_seen if r is not None and r.state in LIVE_EXPORT_STATES]
    if len(live) >= cap:
        raise Conflict(
            f"{len(live)} instant-access exports are live, the cap "
            f"(VIRTBACKUP_INSTANT_MAX_EXPORTS={cap}): stop one, or wait for one to expire"
        )
    dest_id, point = await open_point(jc, req.xml_path, req.destination_id)
    disk = next((d for d in point.disks if d.target == req.disk), None)
    if disk is None:
        targets = ", ".join(d.target for d in point.disks) or "none"
        raise NotFound(
            f"disk {shown(req.disk)} is not in restore point {point.xml_path} "
            f"(its disks: {targets})"
        )
    now = dt.datetime.now(dt.UTC)
    record = InstantExport(
        id=new_id(),
        state="starting",
        xml_path=point.xml_path,
        vm_name=point.vm_name,
        timestamp=point.timestamp,
        disk=disk.target,
        size=disk.size,
        destination_id=dest_id,
        created_at=_iso(now),
        expires_at=_iso(now + dt.timedelta(seconds=ttl)),
    )
    await exports.create(record)
    try:
        return await _serve(jc, exports, record, req.client_public_key)
    except ServiceError as exc:
        reason = f"not started: {exc.message}"
        await exports.change(
            record.id, lambda r: ended(r, "failed", reason) if r.state == "starting" else None
        )
        raise


async def _serve(
    jc: JobContext, exports: ExportStore, record: InstantExport, client_public_key: str
) -> ExportCreated:
    """Ask a worker (the queue group picks one) to serve ``record``. A worker at its cap
    refuses (Conflict) and leaves the record ``starting``: then another is asked, up to
    once per live worker (and at least :data:`SERVE_ATTEMPTS` times); any other answer
    (the record stopped or expired meanwhile, a bad key, ...) is final."""
    attempts = max(SERVE_ATTEMPTS, await exports.worker_count() + 1)
    for attempt in range(attempts):
        try:
            return await jc.bus.request(
                WorkerCmd.SERVE_EXPORT,
                ExportServeRequest(id=record.id, client_public_key=client_public_key),
                ExportCreated,
                timeout=SERVE_TIMEOUT_SECONDS,
            )
        except Conflict:
            now, _ = await exports.get(record.id)
            expired = _parse_time(now.expires_at) <= dt.datetime.now(dt.UTC)
            if now.state != "starting" or expired or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@export_commands.handler(ExportCmd.LIST, ExportListRequest)
async def list_exports(jc: JobContext, req: ExportListRequest) -> ExportList:
    """Every export newest first, each as it is now (see the module docstring)."""
    exports = store(jc)
    records = [r for r in [await exports.current(r) for r in exports.all()] if r is not None]
    if req.live_only:
        records = [r for r in records if r.state in LIVE_EXPORT_STATES]
    records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    return ExportList(exports=records)


@export_commands.handler(ExportCmd.STOP, ExportStopRequest)
async def stop_export(jc: JobContext, req: ExportStopRequest) -> InstantExport:
    """Stop an export: once this answers ``stopped`` its listener and connections are
    closed. NotFound for an unknown id; an export that has ended is returned as it is."""
    exports = store(jc)
    record = await exports.refresh((await exports.get(req.id))[0])
    if record.state not in LIVE_EXPORT_STATES:
        return record

    def ask(r: InstantExport) -> InstantExport | None:
        if r.state == "starting":  # its worker's compare-and-swap to active now fails
            return ended(r, "stopped", "stopped on request")
        if r.state == "active":
            return msgspec.structs.replace(r, state="stopping", message="stopping on request")
        return None

    record = await exports.change(req.id, ask)
    deadline = asyncio.get_running_loop().time() + STOP_WAIT_SECONDS
    while record.state == "stopping":
        if not await exports.alive(record):
            return await exports.change(
                req.id, lambda r: ended(r, "stopped", "stopped on request (its worker is gone)")
            )
        if asyncio.get_running_loop().time() >= deadline:
            return record
        await asyncio.sleep(0.05)
        record = (await exports.get(req.id))[0]
    return record
