"""Job leases in ``VB_LEASES``: which orchestrator instance runs a job, while it lives.

The bucket's entries expire ``LEASE_SECONDS`` after their last write. The holder
renews its leases every third of that; an instance that dies stops renewing, its
leases vanish, and another instance ``take``s the job (a create, so exactly one wins)
and ends it cleanly. A holder whose renewal finds the lease gone or taken has lost the
job and must stop working on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import LEASE_SECONDS

log = logging.getLogger(__name__)


class JobLeases:
    def __init__(self, kv: KeyValue, holder: str) -> None:
        self.kv = kv
        self.holder = holder
        #: job id -> revision of our lease entry.
        self.held: dict[str, int] = {}

    async def take(self, job_id: str) -> bool:
        """Take the job's lease; ``False`` if a live holder has it."""
        try:
            self.held[job_id] = await self.kv.create(job_id, self.holder.encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def holder_of(self, job_id: str) -> str | None:
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def release(self, job_id: str) -> None:
        revision = self.held.pop(job_id, None)
        if revision is None:
            return
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
            await self.kv.delete(job_id, last=revision)

    async def renew_all(self) -> list[str]:
        """Renew every held lease; returns the jobs whose lease was lost."""
        lost: list[str] = []
        for job_id, revision in list(self.held.items()):
            try:
                self.held[job_id] = await self.kv.update(
                    job_id, self.holder.encode(), last=revision
                )
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                # Expired (we stalled past the TTL) and perhaps taken by another.
                self.held.pop(job_id, None)
                lost.append(job_id)
        return lost

    async def keep_alive(self, stopping: asyncio.Event, on_lost: Callable[[str], None]) -> None:
        """Renew every ``LEASE_SECONDS / 3`` until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                for job_id in await self.renew_all():
                    log.error("lost the lease of job %s: another instance took it", job_id)
                    on_lost(job_id)
            except Exception:
                log.exception("renewing job leases failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), LEASE_SECONDS / 3)
