"""The work loop: pull units from ``VB_WORK``, do them, report, acknowledge.

* A unit's result is published to ``VB_EVENTS`` (and acknowledged by JetStream) before
  the unit is acknowledged, so a result is never lost; a worker that dies after
  publishing makes the unit run twice, which is harmless (units are idempotent and the
  orchestrator counts each unit once).
* While a unit runs, the message is kept alive (``in_progress``) every third of the ack
  wait; a worker killed mid-unit stops doing so and the unit is redelivered to another.
* Transient failures (destination or NBD hiccups) are negatively acknowledged with a
  delay and retried, up to the consumer's ``max_deliver``; permanent ones are reported
  as a failed unit, which fails the job.
* Units of a job that has ended or is being cancelled are dropped (``term``): the job's
  record in ``VB_JOBS`` is read before a unit is worked on and again before its result
  is published. Nothing that decides this lives in the worker's memory, so any worker
  (a new one too) decides the same.
* A unit in progress is abandoned (its task cancelled, the message ``term``-ed) as soon as
  its job ends: at the job's ``job.finished``/``job.canceled`` event, or at the latest
  ``JOB_CHECK_SECONDS`` later, when a look at its record finds it over (one read per
  running unit, so a lost event feed delays, never prevents). Without this, a job failed
  by another orchestrator replica kept workers reading its disks until every unit in
  their hands was done.
* Each unit is worked on inside a span that continues the trace of the job that
  published it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field

from virtbackup.contracts import buckets, subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, Job
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.nbd import NbdClient, NbdError, NbdUri
from virtbackup.nbd.tls import CLIENT_CERT, client_context_from_dir
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.runtime.agent_config import (
    find_destination,
    read_agent_config,
    update_gdrive_settings,
)
from virtbackup.runtime.events import EventFeed, EventStart
from virtbackup.runtime.kv import read_value
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.vault import resolve_destination, service_box
from virtbackup.runtime.work import WorkConsumer, WorkMessage
from virtbackup.storage.errors import PermanentError, StorageError, TransientError
from virtbackup.storage.google_auth import GoogleTokens
from virtbackup.transfer_worker.metrics import unit_done
from virtbackup.transfer_worker.migrate_unit import migrate_unit
from virtbackup.transfer_worker.units import (
    UnitContext,
    backup_unit,
    copy_unit,
    restore_unit,
    verify_unit,
)

log = logging.getLogger(__name__)

#: Events after which a job's units are never worked on again.
JOB_END_EVENTS = frozenset({EventType.JOB_FINISHED, EventType.JOB_CANCELED})
#: Seconds between two looks at the job of a unit in progress.
JOB_CHECK_SECONDS = 2.0


class UnitAbandoned(Exception):
    """The unit's job ended while the unit ran: its work was stopped."""


@dataclass
class Resources:
    """Repositories and NBD connections kept across the units of a job."""

    ctx: ServiceContext
    repos: dict[str, Repository] = field(default_factory=dict)
    nbd: dict[str, NbdClient] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    config_revision: int = 0
    #: The TLS client context for ``nbds://`` exports, and the client certificate's
    #: modification time it was loaded at (a renewed certificate is loaded again).
    tls: tuple[float, ssl.SSLContext] | None = None

    async def repository(self, destination_id: str) -> Repository:
        async with self.lock:
            cfg, revision = await read_agent_config(self.ctx.bucket(buckets.CONFIG))
            if revision != self.config_revision:
                await self._close_repos()
                self.config_revision = revision
            repo = self.repos.get(destination_id)
            if repo is None:
                dest = find_destination(cfg, destination_id)
                box = service_box(self.ctx)
                dest, google = await resolve_destination(self.ctx.bus, box, dest)
                repo = await open_repository(dest, cfg, on_refresh=self.store_tokens, google=google)
                self.repos[destination_id] = repo
            return repo

    async def store_tokens(self, tokens: GoogleTokens) -> None:
        """Keep a refreshed Google access token in the configuration."""
        await update_gdrive_settings(self.ctx.bucket(buckets.CONFIG), tokens.apply_to)

    def tls_context(self) -> ssl.SSLContext:
        """The client certificate the inventory made for the workers
        (``<pki_dir>/nbd-client``, see ``virtbackup.virt.pki``). Raises OSError or
        ssl.SSLError when it cannot be read (a unit is then retried)."""
        directory = self.ctx.settings.nbd_pki_dir / "nbd-client"
        mtime = (directory / CLIENT_CERT).stat().st_mtime
        if self.tls is None or self.tls[0] != mtime:
            self.tls = (mtime, client_context_from_dir(directory))
        return self.tls[1]

    async def nbd_client(self, url: str) -> NbdClient:
        """A connection to the export at ``url`` (kept for the job's later units);
        ``nbds://`` exports are reached with TLS and the workers' client certificate."""
        async with self.lock:
            client = self.nbd.get(url)
            if client is None or client.closed:
                tls = self.tls_context() if NbdUri.parse(url).tls else None
                client = await NbdClient.connect_uri(url, tls=tls)
                self.nbd[url] = client
            return client

    async def drop_nbd(self, url: str) -> None:
        client = self.nbd.pop(url, None)
        if client is not None:
            with contextlib.suppress(NbdError, OSError):
                await client.disconnect()

    async def _close_repos(self) -> None:
        for repo in self.repos.values():
            with contextlib.suppress(StorageError):
                await repo.driver.close()
        self.repos.clear()

    async def close(self) -> None:
        await self._close_repos()
        for url in list(self.nbd):
            await self.drop_nbd(url)


class Worker:
    """Works the units ``consumer`` hands out, ``worker_units`` at a time, and those of
    ``pinned`` (this worker's own consumer of the units pinned to it, if given), as many
    again: both share the byte budget, the caches and the job-end handling."""

    def __init__(
        self,
        ctx: ServiceContext,
        uctx: UnitContext,
        consumer: WorkConsumer[TransferUnit],
        pinned: WorkConsumer[TransferUnit] | None = None,
    ) -> None:
        self.ctx = ctx
        self.uctx = uctx
        self.consumer = consumer
        self.pinned = pinned
        self.res = Resources(ctx)
        #: NBD exports in use per job: a cache, dropped when the job ends.
        self.active: dict[str, set[str]] = {}
        #: The tasks of the units in progress, per job (cancelled when the job ends).
        self.running: dict[str, set[asyncio.Task[UnitResult]]] = {}
        #: Set whenever a unit starts or ends (the heartbeat reports ``busy_units`` then).
        self.changed = asyncio.Event()

    @property
    def busy_units(self) -> int:
        """Units this worker is working on now."""
        return sum(len(tasks) for tasks in self.running.values())

    async def run(self) -> None:
        """Work units until the service stops."""
        consumers = [self.consumer, *([self.pinned] if self.pinned else [])]
        try:
            await asyncio.gather(
                *(
                    c.serve(
                        self.handle,
                        concurrency=self.ctx.settings.worker_units,
                        stopping=self.ctx.stopping,
                    )
                    for c in consumers
                )
            )
        finally:
            await self.res.close()

    async def job_over(self, job_id: str) -> bool:
        """Whether the job's units must not be worked on (or reported): its record in
        ``VB_JOBS`` is gone, is in a terminal state, or asks for a cancel."""
        job = await read_value(self.ctx.bucket(buckets.JOBS), job_id, Job)
        return job is None or job.state in TERMINAL_STATES or job.cancel_requested

    async def on_job_finished(self, job_id: str) -> None:
        """Abandon the job's units in progress; drop its caches: its known chunks and its
        NBD connections."""
        for task in self.running.get(job_id, ()):
            task.cancel()
        self.uctx.known.pop(job_id, None)
        for url in self.active.pop(job_id, set()):
            await self.res.drop_nbd(url)

    async def handle(self, msg: WorkMessage[TransferUnit]) -> None:
        """Work one unit and settle its message (see the module docstring)."""
        unit = msg.item
        if await self.job_over(unit.job_id):
            await msg.term()
            return
        try:
            result = await self._run(unit)
        except UnitAbandoned:
            log.info("unit %s/%s abandoned: its job is over", unit.job_id, unit.unit)
            await msg.term()
            return
        except (TransientError, NbdError, OSError, TimeoutError) as exc:
            retryable = getattr(exc, "retryable", True)
            last = msg.num_delivered >= self.consumer.spec.max_deliver
            if retryable and not last:
                log.warning("unit %s/%s will be retried: %s", unit.job_id, unit.unit, exc)
                for url in (unit.nbd_url, unit.target_nbd_url):
                    if url:
                        await self.res.drop_nbd(url)
                await msg.nak(delay=2.0)
                return
            result = self._failed(unit, f"{type(exc).__name__}: {exc}")
        except (PermanentError, RepositoryError, CorruptChunkError) as exc:
            result = self._failed(unit, str(exc))
        except Exception as exc:
            log.exception("unit %s/%s crashed", unit.job_id, unit.unit)
            result = self._failed(unit, f"{type(exc).__name__}: {exc}")
        if await self.job_over(unit.job_id):
            await msg.term()
            return
        await self.ctx.bus.publish_event(EventType.UNIT_DONE, result, key=unit.job_id)
        await msg.ack()
        unit_done(result)

    async def _run(self, unit: TransferUnit) -> UnitResult:
        """:meth:`_process` in a task of its own, cancelled when the job ends (see the
        module docstring); raises UnitAbandoned then, and whatever the unit raised."""
        task = asyncio.create_task(self._process(unit), name=f"unit-{unit.job_id}-{unit.unit}")
        tasks = self.running.setdefault(unit.job_id, set())
        tasks.add(task)
        self.changed.set()
        watch = asyncio.create_task(self._watch_job(unit.job_id, task))
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the service stops: not the job's end
            raise UnitAbandoned(unit.job_id) from None
        finally:
            watch.cancel()
            tasks.discard(task)
            if not tasks:
                self.running.pop(unit.job_id, None)
            self.changed.set()

    async def _watch_job(self, job_id: str, task: asyncio.Task[UnitResult]) -> None:
        """Cancel ``task`` once a look at the job's record finds the job over."""
        while not task.done():
            await asyncio.sleep(JOB_CHECK_SECONDS)
            try:
                over = await self.job_over(job_id)
            except Exception as exc:  # NATS away: the event or a later look decides
                log.debug("looking at job %s failed: %s", job_id, exc)
                continue
            if over:
                task.cancel()
                return

    def _failed(self, unit: TransferUnit, error: str) -> UnitResult:
        return UnitResult(
            job_id=unit.job_id,
            unit=unit.unit,
            kind=unit.kind,
            disk=unit.disk,
            worker=self.uctx.worker,
            ok=False,
            error=error,
        )

    async def _also(self, unit: TransferUnit) -> list[tuple[str, Repository]]:
        """The repositories of a backup unit's ``also_destination_ids``, in that order.
        Raises as for the unit's own destination when one cannot be opened (the
        orchestrator opened each of them before it published the units)."""
        also: list[tuple[str, Repository]] = []
        for dest in unit.also_destination_ids:
            also.append((dest, await self.res.repository(dest)))
        return also

    async def _process(self, unit: TransferUnit) -> UnitResult:
        if unit.kind == "migrate":  # export to export: no repository
            self.active.setdefault(unit.job_id, set()).add(unit.target_nbd_url)
            # The source export is a new libvirt job's at each pass, at the same
            # address: its own connection per unit, never a cached one of a job ended.
            writer = await self.res.nbd_client(unit.target_nbd_url)
            tls = self.res.tls_context() if NbdUri.parse(unit.nbd_url).tls else None
            reader = await NbdClient.connect_uri(unit.nbd_url, tls=tls)
            try:
                return await migrate_unit(unit, reader, writer, self.uctx)
            finally:
                with contextlib.suppress(NbdError, OSError):
                    await reader.disconnect()
        repo = await self.res.repository(unit.destination_id)
        if unit.kind == "verify":
            return await verify_unit(unit, repo, self.uctx)
        if unit.kind == "copy":
            target = await self.res.repository(unit.target_destination_id)
            return await copy_unit(unit, repo, target, self.uctx)
        self.active.setdefault(unit.job_id, set()).add(unit.nbd_url)
        nbd = await self.res.nbd_client(unit.nbd_url)
        if unit.kind == "backup":
            also = await self._also(unit)
            return await backup_unit(unit, repo, nbd, self.uctx, also)
        return await restore_unit(unit, repo, nbd, self.uctx)


async def follow_job_ends(ctx: ServiceContext, worker: Worker) -> None:
    """Drop a job's caches when it finishes or is cancelled (from now on, for the life of
    the service); a lost feed is opened again where it stopped."""
    start: EventStart = "new"
    while not ctx.stopping.is_set():
        try:
            async with EventFeed(ctx.bus, f"{subjects.EVT_ROOT}.job.>", start=start) as feed:
                async for stored in feed:
                    start = stored.sequence + 1
                    if stored.event.type in JOB_END_EVENTS and stored.key:
                        await worker.on_job_finished(stored.key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following job events failed; again in 1 s")
            await asyncio.sleep(1.0)
