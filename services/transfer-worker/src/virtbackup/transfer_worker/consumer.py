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
* Units of a cancelled job are dropped (``term``) without being worked on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.nbd import NbdClient, NbdError
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.runtime.agent_config import (
    find_destination,
    read_agent_config,
    update_gdrive_settings,
)
from virtbackup.runtime.service import ServiceContext
from virtbackup.storage.errors import PermanentError, StorageError, TransientError
from virtbackup.storage.google_auth import GoogleTokens
from virtbackup.transfer_worker.units import UnitContext, backup_unit, restore_unit, verify_unit

log = logging.getLogger(__name__)
_unit_decoder = msgspec.json.Decoder(TransferUnit)


@dataclass
class Resources:
    """Repositories and NBD connections kept across the units of a job."""

    ctx: ServiceContext
    repos: dict[str, Repository] = field(default_factory=dict)
    nbd: dict[str, NbdClient] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    config_revision: int = 0

    async def repository(self, destination_id: str) -> Repository:
        async with self.lock:
            cfg, revision = await read_agent_config(self.ctx.bucket(buckets.CONFIG))
            if revision != self.config_revision:
                await self._close_repos()
                self.config_revision = revision
            repo = self.repos.get(destination_id)
            if repo is None:
                dest = find_destination(cfg, destination_id)
                repo = await open_repository(dest, cfg, on_refresh=self.store_tokens)
                self.repos[destination_id] = repo
            return repo

    async def store_tokens(self, tokens: GoogleTokens) -> None:
        """Keep a refreshed Google access token in the configuration."""
        await update_gdrive_settings(self.ctx.bucket(buckets.CONFIG), tokens.apply_to)

    async def nbd_client(self, url: str) -> NbdClient:
        async with self.lock:
            client = self.nbd.get(url)
            if client is None or client.closed:
                client = await NbdClient.connect_uri(url)
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
    def __init__(self, ctx: ServiceContext, uctx: UnitContext) -> None:
        self.ctx = ctx
        self.uctx = uctx
        self.res = Resources(ctx)
        self.canceled: set[str] = set()
        self.active: dict[str, set[str]] = {}
        self.slots = asyncio.Semaphore(max(1, ctx.settings.worker_units))

    async def run(self) -> None:
        js = self.ctx.bus.js
        sub = await js.pull_subscribe_bind(
            durable=streams.TRANSFER_CONSUMER.durable, stream=streams.WORK.name
        )
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not self.ctx.stopping.is_set():
                await self.slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=2)
                except (NatsTimeoutError, TimeoutError):
                    self.slots.release()
                    continue
                except Exception:
                    self.slots.release()
                    if self.ctx.stopping.is_set():
                        break
                    log.exception("fetching units failed")
                    await asyncio.sleep(1)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._handle(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Unsubscribe now: a pending pull would hold the connection's drain.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self.res.close()

    async def on_job_finished(self, job_id: str, canceled: bool) -> None:
        if canceled:
            self.canceled.add(job_id)
        self.uctx.known.pop(job_id, None)
        for url in self.active.pop(job_id, set()):
            await self.res.drop_nbd(url)

    async def _handle(self, msg: Msg) -> None:
        try:
            unit = _unit_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable unit on %s", msg.subject)
            await msg.term()
            self.slots.release()
            return
        keepalive = asyncio.create_task(self._keepalive(msg))
        try:
            if unit.job_id in self.canceled:
                await msg.term()
                return
            try:
                result = await self._process(unit)
            except (TransientError, NbdError, OSError, TimeoutError) as exc:
                retryable = getattr(exc, "retryable", True)
                meta = msg.metadata
                last = meta.num_delivered >= streams.TRANSFER_CONSUMER.max_deliver
                if retryable and not last:
                    log.warning("unit %s/%s will be retried: %s", unit.job_id, unit.unit, exc)
                    if unit.nbd_url:
                        await self.res.drop_nbd(unit.nbd_url)
                    await msg.nak(delay=2.0)
                    return
                result = self._failed(unit, f"{type(exc).__name__}: {exc}")
            except (PermanentError, RepositoryError, CorruptChunkError) as exc:
                result = self._failed(unit, str(exc))
            except Exception as exc:
                log.exception("unit %s/%s crashed", unit.job_id, unit.unit)
                result = self._failed(unit, f"{type(exc).__name__}: {exc}")
            if unit.job_id in self.canceled:
                await msg.term()
                return
            await self.ctx.bus.publish_event(EventType.UNIT_DONE, result, key=unit.job_id)
            await msg.ack_sync()
        finally:
            keepalive.cancel()
            self.slots.release()

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

    async def _process(self, unit: TransferUnit) -> UnitResult:
        repo = await self.res.repository(unit.destination_id)
        if unit.kind == "verify":
            return await verify_unit(unit, repo, self.uctx)
        self.active.setdefault(unit.job_id, set()).add(unit.nbd_url)
        nbd = await self.res.nbd_client(unit.nbd_url)
        if unit.kind == "backup":
            return await backup_unit(unit, repo, nbd, self.uctx)
        return await restore_unit(unit, repo, nbd, self.uctx)

    async def _keepalive(self, msg: Msg) -> None:
        interval = max(0.5, self.ctx.settings.work_ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()


async def job_events(ctx: ServiceContext) -> AsyncIterator[tuple[str, bool]]:
    """(job id, canceled) for every job that finishes or is cancelled from now on."""
    sub = await ctx.bus.nc.subscribe(f"{subjects.EVT_ROOT}.job.>")
    try:
        async for msg in sub.messages:
            parts = msg.subject.split(".")
            if len(parts) >= 5 and parts[3] in {"canceled", "finished"}:
                yield parts[4], parts[3] == "canceled"
    finally:
        await sub.unsubscribe()
