"""Jobs in the ``VB_JOBS`` key-value bucket, and an in-memory index of them.

Every change to a job is a compare-and-swap on the key's revision (``JobStore.update``),
so a cancel, a phase step and a progress write can race without losing one another.
``JobIndex`` answers list queries from memory: it loads the bucket once through a watch
and then applies every change the watch delivers, so a list of 10,000 jobs costs no
round trip to NATS and a submit never lists.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import re
from collections.abc import Callable

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.jobs import ACTIVE_STATES, Job, JobState, JobType
from virtbackup.runtime.errors import NotFound

log = logging.getLogger(__name__)
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_decoder = msgspec.json.Decoder(Job)
_encoder = msgspec.json.Encoder()

#: Compare-and-swap attempts before an update gives up (each loses only to another write).
MAX_CAS_ATTEMPTS = 100


class JobStore:
    """CRUD on ``VB_JOBS``: key = job id, value = the ``Job`` as JSON."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, job: Job) -> Job:
        await self.kv.create(job.id, _encoder.encode(job))
        return job

    async def get(self, job_id: str) -> tuple[Job, int]:
        """The job and its revision; ``NotFound`` for an unknown or malformed id."""
        if not _VALID_ID.match(job_id):
            raise NotFound(f"job {shown(job_id)} not found")
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            raise NotFound(f"job {shown(job_id)} not found") from None
        if entry.value is None:
            raise NotFound(f"job {shown(job_id)} not found")
        return _decoder.decode(entry.value), entry.revision or 0

    async def update(self, job_id: str, change: Callable[[Job], Job]) -> Job:
        """Apply ``change`` atomically: read, change, write if nobody wrote in between,
        else read again. ``change`` may raise to refuse (nothing is written then); when it
        returns the job unchanged, nothing is written either."""
        for _ in range(MAX_CAS_ATTEMPTS):
            job, revision = await self.get(job_id)
            updated = change(job)
            if updated is job:
                return job
            try:
                await self.kv.update(job_id, _encoder.encode(updated), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return updated
        raise RuntimeError(f"job {job_id}: {MAX_CAS_ATTEMPTS} concurrent updates in a row")


Listener = Callable[[Job], None]


class JobIndex:
    """Every job in memory, current within milliseconds of the bucket.

    ``start`` returns once the bucket's content is loaded; from then on the watch keeps
    it current. Listeners are called with each changed job (cancel signals use this).
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.jobs: dict[str, Job] = {}
        #: The queued and running jobs of ``jobs`` (kept with it: a nightly run's queue
        #: is looked at many times a second, the finished history need not be walked).
        self.active_jobs: dict[str, Job] = {}
        self.listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    async def start(self) -> None:
        watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher), name="job-index")
        await self._loaded.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, watcher: object) -> None:
        try:
            while True:
                entry = await watcher.updates(timeout=None)  # type: ignore[attr-defined]
                if entry is None:  # the initial values are all delivered
                    self._loaded.set()
                    continue
                if entry.operation in {"DEL", "PURGE"} or entry.value is None:
                    self.jobs.pop(entry.key, None)
                    self.active_jobs.pop(entry.key, None)
                    continue
                try:
                    job = _decoder.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning("undecodable job record %s", entry.key)
                    continue
                self.jobs[job.id] = job
                if job.state in ACTIVE_STATES:
                    self.active_jobs[job.id] = job
                else:
                    self.active_jobs.pop(job.id, None)
                for listener in self.listeners:
                    listener(job)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[attr-defined]

    def list(
        self,
        *,
        state: JobState | None = None,
        type: JobType | None = None,
        limit: int = 1000,
        before: str | None = None,
    ) -> list[Job]:
        """Jobs newest first (ids sort by creation time), filtered, at most ``limit``;
        with ``before``, only those whose id sorts before it (the next page)."""
        out: list[Job] = []
        if limit <= 0:
            return out
        for job_id in sorted(self.jobs, reverse=True):
            if before is not None and job_id >= before:
                continue
            job = self.jobs[job_id]
            if (state is None or job.state == state) and (type is None or job.type == type):
                out.append(job)
                if len(out) >= limit:
                    break
        return out

    def active(self) -> builtins.list[Job]:
        """The queued and running jobs."""
        return builtins.list(self.active_jobs.values())
