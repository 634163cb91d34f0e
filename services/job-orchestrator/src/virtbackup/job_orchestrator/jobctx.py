"""What one orchestrator instance runs jobs with, and the job's state machine.

Every transition of a job is a compare-and-swap on its record in ``VB_JOBS``:

* ``submit``: the VM's lock (``VB_LOCKS``), the job's lease (``VB_LEASES``), then the
  record (``queued``, ``owner`` = this instance), then the run starts here.
* ``enter(phase)``: refused with ``JobCanceled`` when a cancel was requested, and with
  ``JobLost`` when another instance has taken the job over. ``committing`` is the point
  of no return: the cancel command refuses (409) from then on, so exactly one of "the
  commit happens" and "the job is cancelled" wins.
* ``finish``: the final state, then the lock and the lease are released.

Nothing here is kept only in process memory that another replica would need: the
``runs`` map holds this instance's tasks and a cache of their cancel flags, both
rebuilt from the bucket (the index's watch sets a run's flag when its record says
``cancelRequested``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.config import AgentConfig
from virtbackup.contracts.v1.events import JobFailure
from virtbackup.contracts.v1.jobctl import LogLevel
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, Job, JobPhase, JobState, JobType
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import JobCanceled, JobLost
from virtbackup.job_orchestrator.fanout import written_destinations
from virtbackup.job_orchestrator.leases import JobLeases
from virtbackup.job_orchestrator.locks import VmLocks, lookup_in, point_folder_lock
from virtbackup.job_orchestrator.metrics import job_finished
from virtbackup.job_orchestrator.progress import Progress, update_job
from virtbackup.job_orchestrator.store import JobIndex, JobStore
from virtbackup.job_orchestrator.tracker import UnitTracker
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.repository import Repository
from virtbackup.runtime import joblog
from virtbackup.runtime.agent_config import (
    find_destination,
    read_agent_config,
    update_gdrive_settings,
)
from virtbackup.runtime.bus import Bus, new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.settings import Settings
from virtbackup.runtime.vault import resolve_destination, service_box
from virtbackup.storage.google_auth import GoogleTokens

log = logging.getLogger(__name__)


def job_payload(job: Job) -> dict[str, Any]:
    out = msgspec.to_builtins(job)
    assert isinstance(out, dict)
    return out


def queued_line(job: Job) -> str:
    """The first line of a job's output log: what it is and what it works on."""
    parts = [f"queued: {job.type} job {job.id}"]
    if job.vm_name:
        parts.append(f"vm {job.vm_name}")
    if job.server_id:
        parts.append(f"on server {job.server_id}")
    if job.destination_id:
        parts.append(f"destination {job.destination_id}")
    return " ".join(parts)


#: Times ``enter`` renews a lease found stale and tries again before giving the job up.
STALE_TRIES = 5


class _LeaseStale(Exception):
    """The lease is held but was renewed too long ago to be sure of it (``enter``)."""


@dataclass
class LocalRun:
    """A job this instance runs: its task and a cache of its cancel flag."""

    task: asyncio.Task[None] | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class JobContext:
    ctx: ServiceContext
    #: This process's identity as a lease holder (an instance restarted under the same
    #: name is a new holder: it must not think it still runs its predecessor's jobs).
    holder: str = ""
    runs: dict[str, LocalRun] = field(default_factory=dict)
    index: JobIndex | None = None
    leases: JobLeases = field(init=False)
    #: The configuration last decoded, with the config bucket's last sequence then.
    _config: tuple[int, AgentConfig] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.holder:
            self.holder = f"{self.ctx.settings.instance}/{os.urandom(4).hex()}"

    @property
    def bus(self) -> Bus:
        return self.ctx.bus

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def store(self) -> JobStore:
        return JobStore(self.ctx.bucket(buckets.JOBS))

    @property
    def locks(self) -> VmLocks:
        return VmLocks(self.ctx.bucket(buckets.LOCKS), lambda i: lookup_in(self.store.get, i))

    @property
    def jobs(self) -> JobIndex:
        """The job index; ``Unavailable`` while the instance starts or stops."""
        if self.index is None or self.ctx.stopping.is_set():
            raise Unavailable("the job-orchestrator is starting or stopping; try again")
        return self.index

    def holds(self, job_id: str) -> bool:
        """Whether this instance surely still holds the job (see ``JobLeases.valid``).
        A runner that does not must leave the job alone: its new holder cleans up."""
        return self.leases.valid(job_id)

    async def open(self) -> None:
        """Load the job index and follow it; called once the buckets exist."""
        self.leases = JobLeases(self.ctx.bucket(buckets.LEASES), self.holder)
        self.index = JobIndex(self.ctx.bucket(buckets.JOBS))
        self.index.listeners.append(self._on_change)
        await self.index.start()

    async def close(self) -> None:
        """Stop this instance's runs without ending their jobs, and give up their leases
        so that another replica ends them now rather than when the leases expire."""
        tasks = [r.task for r in self.runs.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job_id in list(self.leases.held):
            await self.leases.release(job_id)
        if self.index is not None:
            await self.index.stop()

    def _on_change(self, job: Job) -> None:
        run = self.runs.get(job.id)
        if run is not None and job.cancel_requested:
            run.cancel.set()

    def on_lease_lost(self, job_id: str) -> None:
        """Another instance took the job over: stop working on it (it ends the job)."""
        run = self.runs.get(job_id)
        if run is not None and run.task is not None:
            run.task.cancel()

    # -- configuration and repositories ---------------------------------------------------

    async def config(self) -> AgentConfig:
        """The stored configuration, current as of the call (as a read of the bucket), but
        read and decoded again only when the bucket has changed since the last call: a
        fleet's configuration of 1,000 servers is hundreds of kilobytes, tens of
        milliseconds to decode and check, and every job asks for it several times. The
        change is seen in the bucket's last sequence (a small request). Shared between
        callers: never change it."""
        kv = self.ctx.bucket(buckets.CONFIG)
        last = (await kv.status()).stream_info.state.last_seq
        cached = self._config
        if cached is not None and cached[0] == last:
            return cached[1]
        cfg, _revision = await read_agent_config(kv)
        self._config = (last, cfg)  # a write since ``last`` changes it: read again then
        return cfg

    async def repository(
        self, destination_id: str, *, create: bool = True, locked: bool = False
    ) -> Repository:
        cfg = await self.config()
        dest = find_destination(cfg, destination_id)
        dest, google = await resolve_destination(self.ctx.bus, service_box(self.ctx), dest)
        return await open_repository(
            dest, cfg, create=create, locked=locked, on_refresh=self.store_tokens, google=google
        )

    async def store_tokens(self, tokens: GoogleTokens) -> None:
        """Keep a refreshed Google access token in the configuration."""
        await update_gdrive_settings(self.ctx.bucket(buckets.CONFIG), tokens.apply_to)

    # -- the state machine ------------------------------------------------------------

    async def submit(
        self,
        job_type: JobType,
        *,
        server_id: str | None = None,
        vm_name: str | None = None,
        destination_id: str | None = None,
        params: dict[str, Any] | None = None,
        lock_vm: bool = False,
        run: Callable[[JobContext, Job], Any] | None = None,
        job_id: str | None = None,
        under: str | None = None,
    ) -> Job:
        """Create a job and start running it here; ``Conflict`` when ``lock_vm`` and the
        VM has an active backup or restore (the message names that job). ``job_id``: an
        id from ``new_id`` the caller made beforehand (to claim something in its name),
        else a new one. ``under``: the job (a migration) this one is part of; when the
        VM's lock names it, this job runs under that lock (it neither takes nor releases
        it), else it takes the lock as any job does."""
        self.jobs  # noqa: B018 - Unavailable until the index is loaded, and while stopping
        job_id = job_id or new_id()
        # Claimed here before the record exists, so that this instance's sweep never
        # takes the new job for one whose run died.
        self.runs[job_id] = LocalRun()
        folder = point_folder_lock(job_type, destination_id, vm_name) if lock_vm else None
        holder = job_id
        try:
            if lock_vm:
                assert server_id and vm_name
                if under and await self.locks.holds(server_id, vm_name, under):
                    holder = under  # part of the job that holds the VM: under its lock
                else:
                    await self.locks.acquire(server_id, vm_name, job_id, job_type)
            if folder is not None:
                try:
                    what = f"the folder of vm {vm_name} in destination {destination_id}"
                    await self.locks.acquire(*folder, job_id, job_type, what=what)
                except BaseException:
                    assert server_id and vm_name
                    await self.locks.release(server_id, vm_name, job_id)
                    raise
        except BaseException:
            self.runs.pop(job_id, None)
            raise
        try:
            if not await self.leases.take(job_id):
                raise RuntimeError(f"job id {job_id} already leased")
            now = utcnow_iso()
            job = Job(
                id=job_id,
                type=job_type,
                state="queued",
                phase="queued",
                owner=self.holder,
                server_id=server_id,
                vm_name=vm_name,
                destination_id=destination_id,
                params=params or {},
                created_at=now,
                updated_at=now,
            )
            await self.store.create(job)
        except BaseException:
            self.runs.pop(job_id, None)
            if lock_vm and server_id and vm_name:
                await self.locks.release(server_id, vm_name, job_id)
            if folder is not None:
                await self.locks.release(*folder, job_id)
            await self.leases.release(job_id)
            raise
        if (
            lock_vm
            and server_id
            and vm_name
            and not await self.locks.holds(server_id, vm_name, holder)
        ):
            # Stalled past the lock's grace between the lock and the record: another
            # job may have the VM now. Never run two.
            await self.finish(job_id, "failure", "lost the VM's lock before starting")
            self.runs.pop(job_id, None)
            raise Conflict(f"vm {vm_name}: another job took it while this one was created")
        await joblog.try_append(self.bus, job.id, queued_line(job))
        if run is not None:
            self.start_run(job, run)
        try:
            await self.bus.publish_event(EventType.JOB_CREATED, job_payload(job), key=job.id)
        except Unavailable:
            log.warning("job %s was created but its job.created event was not stored", job_id)
        return job

    def start_run(self, job: Job, run: Callable[[JobContext, Job], Any]) -> None:
        local = self.runs.setdefault(job.id, LocalRun())
        if job.cancel_requested:
            local.cancel.set()
        local.task = asyncio.create_task(run(self, job), name=f"job-{job.id}")

        def done(_: asyncio.Task[None]) -> None:
            self.runs.pop(job.id, None)

        local.task.add_done_callback(done)

    async def enter(self, job_id: str, phase: JobPhase, **changes: Any) -> Job:
        """Move the job to ``phase`` (and apply ``changes``) in one compare-and-swap.

        Raises ``JobCanceled`` if a cancel came first, ``JobLost`` if this instance no
        longer holds the job."""
        await self._hold(f"before:{phase}")

        def step(job: Job) -> Job:
            if job.owner != self.holder or job_id not in self.leases.held:
                raise JobLost(job_id)
            if not self.leases.valid(job_id):
                raise _LeaseStale(job_id)
            if job.state in TERMINAL_STATES or job.cancel_requested:
                raise JobCanceled(job_id)
            return msgspec.structs.replace(
                job, phase=phase, state="running", updated_at=utcnow_iso(), **changes
            )

        # A late renewal is no reason to give the job up (a busy instance: thousands of
        # leases, round trips of seconds): renewed here and tried again, a few times.
        for attempt in range(STALE_TRIES):
            await self.leases.confirm(job_id)
            try:
                job = await self.store.update(job_id, step)
                break
            except _LeaseStale:
                if attempt == STALE_TRIES - 1:
                    raise JobLost(job_id) from None
        await joblog.try_append(
            self.bus, job_id, f"{phase}: {job.message}" if "message" in changes else phase
        )
        await self.bus.publish_event(EventType.JOB_UPDATED, job_payload(job), key=job_id)
        await self._hold(f"after:{phase}")
        return job

    async def _hold(self, moment: str) -> None:
        if self.settings.debug and (seconds := self.settings.debug_holds.get(moment)):
            log.warning("debug hold: %s s %s", seconds, moment)
            await asyncio.sleep(seconds)

    def check_canceled(self, job_id: str) -> None:
        """``JobCanceled`` if a cancel of the job has been seen (between steps)."""
        run = self.runs.get(job_id)
        if run is not None and run.cancel.is_set():
            raise JobCanceled(job_id)

    async def finish(self, job_id: str, state: JobState, message: str) -> Job | None:
        """Write the final state (only while this instance holds the job), publish
        ``job.finished`` (and ``agent.job_failure``), release the VM lock and the lease.
        ``None`` when the job was not ours to finish."""

        ended = False

        def end(job: Job) -> Job:
            nonlocal ended
            if job.owner != self.holder:
                raise JobLost(job_id)
            if job.state in TERMINAL_STATES:
                return job
            ended = True
            now = utcnow_iso()
            return msgspec.structs.replace(
                job,
                state=state,
                phase="finished",
                message=message,
                finished_at=now,
                updated_at=now,
                writer_backlog=0,
                eta_seconds=None,
            )

        try:
            job = await self.store.update(job_id, end)
        except JobLost:
            log.warning("job %s was taken over by another instance; not finishing it", job_id)
            return None
        if ended:  # the job's last line, once
            level: LogLevel = "info" if job.state == "success" else "error"
            await joblog.try_append(self.bus, job_id, f"{job.state}: {job.message}", level)
        await self.bus.publish_event(EventType.JOB_FINISHED, job_payload(job), key=job_id)
        job_finished(job)
        if job.state == "canceled":
            await self.bus.publish_event(EventType.JOB_CANCELED, job_payload(job), key=job_id)
        if job.state == "failure":
            failure = JobFailure(job_id=job.id, type=job.type, message=job.message)
            await self.bus.publish_event(EventType.JOB_FAILURE, failure, key=job.id)
        if job.server_id and job.vm_name and job.type in {"backup", "restore", "migration"}:
            await self.locks.release(job.server_id, job.vm_name, job.id)
            folder = point_folder_lock(job.type, job.destination_id, job.vm_name)
            if folder is not None:
                await self.locks.release(*folder, job.id)
        if job.type == "migration":  # the target's name, held by a direct migration
            target = job.params.get("targetServerId")
            name = job.params.get("targetVmName") or job.vm_name
            if isinstance(target, str) and target and isinstance(name, str) and name:
                await self.locks.release(target, name, job.id)
        await self._release_written_folders(job)
        await self.leases.release(job_id)
        return job

    async def _release_written_folders(self, job: Job) -> None:
        """The VM folder locks of the other destinations a backup (``alsoDestinationIds``)
        or a copy (its target) writes, taken before its submit."""
        if job.type not in {"backup", "copy"} or not job.vm_name:
            return
        for dest in written_destinations(job):
            if dest == job.destination_id and job.type == "backup":
                continue
            folder = point_folder_lock("backup", dest, job.vm_name)
            if folder is not None:
                await self.locks.release(*folder, job.id)

    async def message(self, job_id: str, text: str) -> None:
        self.check_canceled(job_id)
        await update_job(self.store, self.bus, job_id, {"message": text})

    # -- units ------------------------------------------------------------------------

    def cancel_event(self, job_id: str) -> asyncio.Event:
        """Set once the job's record asks for a cancel (kept current by the index)."""
        run = self.runs.get(job_id)
        if run is None:
            run = self.runs[job_id] = LocalRun()
            known = self.index.jobs.get(job_id) if self.index is not None else None
            if known is not None and known.cancel_requested:
                run.cancel.set()
        return run.cancel

    async def run_units(
        self,
        job_id: str,
        units: Sequence[TransferUnit],
        total_bytes: int,
        on_result: Callable[[UnitResult], None],
        *,
        pinned_worker: str | None = None,
        bytes_before: int = 0,
    ) -> Progress:
        """Publish ``units`` and wait for all of them, updating the job's progress;
        ``pinned_worker``: the only transfer worker (its ``VB_WORKERS`` key) to read them;
        ``bytes_before``: bytes earlier steps of the job transferred (shown in its
        ``bytes_transferred`` and ``total_bytes`` with this step's).

        Raises ``JobCanceled`` or ``UnitFailed``; the job's queued units are purged then.
        """
        tracker = UnitTracker(
            self.bus,
            job_id,
            self.cancel_event(job_id),
            stall_seconds=self.settings.job_stall_timeout,
            pinned_worker=pinned_worker,
        )
        progress = Progress(
            self.store, self.bus, job_id, total_units=len(units), total_bytes=total_bytes,
            bytes_before=bytes_before,
        )  # fmt: skip
        await tracker.open()
        try:
            await progress.write(0, force=True)
            await tracker.publish(units)
            async for result in tracker.results():
                on_result(result)
                progress.add(result)
                await progress.write(tracker.published)
            await progress.write(tracker.published, force=True)
            return progress
        except BaseException:
            await tracker.purge()
            raise
        finally:
            await tracker.close()

    async def purge_units(self, job_id: str) -> None:
        """Drop the job's queued units (a job taken over after its holder died)."""
        await UnitTracker(self.bus, job_id, asyncio.Event()).purge()
