"""Job leases in ``VB_LEASES``: which orchestrator instance runs a job, while it lives.

The bucket's entries expire ``LEASE_SECONDS`` after their last write. The holder
renews its leases every third of that; an instance that dies stops renewing, its
leases vanish, and another instance ``take``s the job (a create, so exactly one wins)
and ends it cleanly. A holder whose renewal finds the lease gone or taken has lost the
job and must stop working on it; so has one that could not renew for half the lease
(cut off from NATS, or stalled): ``valid`` is false then, before anyone else can take
the job, and the holder must not commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import LEASE_SECONDS

log = logging.getLogger(__name__)


class JobLeases:
    def __init__(self, kv: KeyValue, holder: str) -> None:
        self.kv = kv
        self.holder = holder
        #: job id -> revision of our lease entry.
        self.held: dict[str, int] = {}
        #: job id -> when (monotonic) the lease was last written.
        self.renewed: dict[str, float] = {}

    async def take(self, job_id: str) -> bool:
        """Take the job's lease; ``False`` if a live holder has it."""
        try:
            self.held[job_id] = await self.kv.create(job_id, self.holder.encode())
        except KeyWrongLastSequenceError:
            return False
        self.renewed[job_id] = time.monotonic()
        return True

    def valid(self, job_id: str) -> bool:
        """Whether this instance surely still holds the job: the lease is held and was
        written less than half its life ago (nobody can have taken it over)."""
        written = self.renewed.get(job_id)
        return (
            job_id in self.held
            and written is not None
            and time.monotonic() - written < LEASE_SECONDS / 2
        )

    def forget(self, job_id: str) -> None:
        """Stop renewing the lease (it lapses, and a sweep ends the job)."""
        self.held.pop(job_id, None)
        self.renewed.pop(job_id, None)

    async def holder_of(self, job_id: str) -> str | None:
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def release(self, job_id: str) -> None:
        revision = self.held.pop(job_id, None)
        self.renewed.pop(job_id, None)
        if revision is None:
            return
        # A conditional delete of a lease that expired or was taken meanwhile is refused
        # (JetStream answers a bad request, not a wrong sequence): then it is not ours.
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError, APIError):
            await self.kv.delete(job_id, last=revision)

    async def renew_all(self) -> list[str]:
        """Renew every held lease; returns the jobs whose lease was lost."""
        lost: list[str] = []
        for job_id, revision in list(self.held.items()):
            try:
                written = await self.kv.update(job_id, self.holder.encode(), last=revision)
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                # Expired (we stalled past the TTL) and perhaps taken by another.
                self.forget(job_id)
                lost.append(job_id)
                continue
            if job_id in self.held:  # not released while we waited
                self.held[job_id] = written
                self.renewed[job_id] = time.monotonic()
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
