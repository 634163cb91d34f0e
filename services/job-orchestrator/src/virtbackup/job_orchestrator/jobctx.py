"""What every job runner needs: settings, the bus, the job store, config, repositories,
cancel signals, and running units to completion with progress."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.config import AgentConfig
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator.progress import Progress, update_job
from virtbackup.job_orchestrator.store import JobStore
from virtbackup.job_orchestrator.tracker import UnitTracker
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.repository import Repository
from virtbackup.runtime.agent_config import (
    find_destination,
    read_agent_config,
    update_gdrive_settings,
)
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.settings import Settings
from virtbackup.storage.google_auth import GoogleTokens


@dataclass
class JobContext:
    ctx: ServiceContext
    cancels: dict[str, asyncio.Event] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def bus(self) -> Bus:
        return self.ctx.bus

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def store(self) -> JobStore:
        return JobStore(self.ctx.bucket(buckets.JOBS))

    async def config(self) -> AgentConfig:
        return (await read_agent_config(self.ctx.bucket(buckets.CONFIG)))[0]

    async def repository(
        self, destination_id: str, *, create: bool = True, locked: bool = False
    ) -> Repository:
        cfg = await self.config()
        dest = find_destination(cfg, destination_id)
        return await open_repository(
            dest,
            cfg,
            create=create,
            locked=locked,
            on_refresh=self.store_tokens,
        )

    async def store_tokens(self, tokens: GoogleTokens) -> None:
        """Keep a refreshed Google access token in the configuration."""
        await update_gdrive_settings(self.ctx.bucket(buckets.CONFIG), tokens.apply_to)

    async def message(self, job_id: str, text: str) -> None:
        await update_job(self.store, self.bus, job_id, {"message": text})

    def cancel_event(self, job_id: str) -> asyncio.Event:
        return self.cancels.setdefault(job_id, asyncio.Event())

    async def run_units(
        self,
        job_id: str,
        units: Sequence[TransferUnit],
        total_bytes: int,
        on_result: Callable[[UnitResult], None],
    ) -> Progress:
        """Publish ``units`` and wait for all of them, updating the job's progress.

        Raises ``JobCanceled`` or ``UnitFailed``; the job's queued units are purged then.
        """
        tracker = UnitTracker(
            self.bus,
            job_id,
            self.cancel_event(job_id),
            stall_seconds=self.settings.job_stall_timeout,
        )
        progress = Progress(
            self.store, self.bus, job_id, total_units=len(units), total_bytes=total_bytes
        )
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
