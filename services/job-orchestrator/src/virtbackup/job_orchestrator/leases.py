"""Job leases in ``VB_LEASES``: which orchestrator instance runs a job, while it lives.

The bucket's entries expire ``LEASE_SECONDS`` after their last write. The holder
renews its leases every third of that; an instance that dies stops renewing, its
leases vanish, and another instance ``take``s the job (a create, so exactly one wins)
and ends it cleanly. A holder whose renewal finds the lease gone or taken has lost the
job and must stop working on it; so has one that could not renew for half the lease
(cut off from NATS, or stalled): ``valid`` is false then, before anyone else can take
the job, and the holder must not commit. A lease that lapsed while nobody took it (the
holder's renewals lagged: a busy instance holding thousands of queued jobs' leases) is
taken again by its holder at its next renewal, as any other instance would have taken
it; every change of the job record checks its owner, so nothing is done twice.
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

#: Leases renewed at once (each a compare-and-swap in ``VB_LEASES``).
RENEW_IN_FLIGHT = 64


class JobLeases:
    def __init__(self, kv: KeyValue, holder: str) -> None:
        self.kv = kv
        self.holder = holder
        #: job id -> revision of our lease entry.
        self.held: dict[str, int] = {}
        #: job id -> when (monotonic) the lease was last written.
        self.renewed: dict[str, float] = {}
        #: job id -> the renewal of its lease under way (``_renew``).
        self._renewing: dict[str, asyncio.Future[bool]] = {}

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
        """Renew every held lease, ``RENEW_IN_FLIGHT`` at a time (a nightly run holds
        thousands: one after the other, a round outlasted the lease); returns the jobs
        whose lease was lost."""
        lost: list[str] = []
        failed: list[BaseException] = []
        pending = iter(list(self.held))

        async def renewer() -> None:
            for job_id in pending:
                try:
                    if not await self._renew(job_id):
                        lost.append(job_id)
                except Exception as exc:  # NATS slow or away: the next round tries again
                    failed.append(exc)

        await asyncio.gather(*(renewer() for _ in range(RENEW_IN_FLIGHT)))
        if failed:
            log.warning("%d job leases could not be renewed: %s", len(failed), failed[-1])
        return lost

    async def confirm(self, job_id: str) -> bool:
        """Whether this instance surely still holds the job (``valid``), renewing its
        lease first when it is held but its last renewal is getting old (the renewals
        lag on a busy instance: that is no reason to give a job up)."""
        if job_id in self.held and not self.valid(job_id):
            await self._renew(job_id)
        return self.valid(job_id)

    async def _renew(self, job_id: str) -> bool:
        """Renew one lease; ``False`` when it was lost (then it is forgotten). One renewal
        of a lease at a time: a second caller (a round and ``confirm``) shares the
        first's (two at once would each see the other's write as a loss)."""
        running = self._renewing.get(job_id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._renewing[job_id] = future
        try:
            kept = await self._renew_once(job_id)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without sharers
            raise
        else:
            future.set_result(kept)
            return kept
        finally:
            del self._renewing[job_id]

    async def _renew_once(self, job_id: str) -> bool:
        revision = self.held.get(job_id)
        if revision is None:
            return True  # released meanwhile
        sent = time.monotonic()  # the lease lives from about now: counted from the send
        try:
            written = await self.kv.update(job_id, self.holder.encode(), last=revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            if self.held.get(job_id) != revision:
                return True  # renewed (or released) by another call meanwhile
            # Expired: this instance stalled (or its renewals lagged) past the TTL. Taken
            # again when nobody took it meanwhile (a create: exactly one wins), else lost.
            try:
                written = await self.kv.create(job_id, self.holder.encode())
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                self.forget(job_id)
                return False
            if self.held.get(job_id) != revision:  # released while we waited
                with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError, APIError):
                    await self.kv.delete(job_id, last=written)
                return True
            log.warning("the lease of job %s lapsed (renewals lagged): taken again", job_id)
        if self.held.get(job_id) == revision:  # not released while we waited
            self.held[job_id] = written
            self.renewed[job_id] = sent
        return True

    async def keep_alive(self, stopping: asyncio.Event, on_lost: Callable[[str], None]) -> None:
        """Renew every ``LEASE_SECONDS / 3`` (from the start of one round to the start of
        the next) until ``stopping`` is set."""
        while not stopping.is_set():
            began = time.monotonic()
            count = len(self.held)
            try:
                for job_id in await self.renew_all():
                    log.error("lost the lease of job %s: another instance took it", job_id)
                    on_lost(job_id)
            except Exception:
                log.exception("renewing job leases failed")
            took = time.monotonic() - began
            if took > LEASE_SECONDS / 3:
                log.warning("renewing %d job leases took %.1f s", count, took)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.1, LEASE_SECONDS / 3 - took))
