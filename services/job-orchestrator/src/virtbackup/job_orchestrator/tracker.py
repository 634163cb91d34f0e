"""Publishing a job's units and gathering their results.

Units go to ``VB_WORK`` with the current trace context, so the workers' spans join the
job's trace. Results are read from ``VB_EVENTS`` with an event feed opened before the
first unit is published, so none is missed; a unit done twice (redelivered after its
worker died) is counted once. The tracker gives up when the job is cancelled, when a
unit fails, or when no unit finishes for ``stall_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec

from virtbackup.contracts import streams, subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import JobCanceled, UnitFailed
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.events import EventFeed
from virtbackup.runtime.work import publish_work, purge_subject


@dataclass
class UnitTracker:
    """One job's units: ``open``, ``publish``, iterate ``results``, then ``close``
    (``purge`` first when giving up)."""

    bus: Bus
    job_id: str
    canceled: asyncio.Event
    stall_seconds: float = 600.0
    #: The transfer worker (``VB_WORKERS`` key) the units go to, or any worker (None).
    pinned_worker: str | None = None
    done: dict[int, UnitResult] = field(default_factory=dict)
    #: Distinct units published (a unit published twice counts once).
    published: int = 0
    _feed: EventFeed | None = None
    _units: set[int] = field(default_factory=set)

    async def open(self) -> None:
        """Start following the job's unit results (before any unit is published)."""
        subject = subjects.event(EventType.UNIT_DONE, self.job_id)
        self._feed = await EventFeed(self.bus, subject, start="new").open()

    async def publish(self, units: Sequence[TransferUnit]) -> None:
        """Queue ``units`` on ``vb.work.transfer.<job>`` (``vb.work.pinned.<worker>.<job>``
        when pinned); a unit published twice (same job and unit number, within the
        stream's duplicate window) is queued once."""
        subject = (
            subjects.work_pinned(self.pinned_worker, self.job_id)
            if self.pinned_worker
            else subjects.work_transfer(self.job_id)
        )
        for unit in units:
            await publish_work(
                self.bus,
                subject,
                unit,
                stream=streams.WORK,
                msg_id=f"{self.job_id}-{unit.unit}",
            )
            if unit.unit not in self._units:
                self._units.add(unit.unit)
                self.published += 1

    async def results(self) -> AsyncIterator[UnitResult]:
        """Each unit's first result, until every published unit is done."""
        feed = self._feed
        assert feed is not None, "UnitTracker.results before open"
        last_progress = time.monotonic()
        while len(self.done) < self.published:
            if self.canceled.is_set():
                raise JobCanceled
            stored = await feed.next(timeout=0.5)
            if stored is None:
                if time.monotonic() - last_progress > self.stall_seconds:
                    raise UnitFailed(
                        f"no transfer worker finished a unit in {self.stall_seconds:.0f} s"
                    )
                continue
            result = msgspec.convert(stored.event.payload, UnitResult)
            if result.unit in self.done:
                continue
            if not result.ok:
                raise UnitFailed(f"unit {result.unit} ({result.disk}): {result.error}")
            self.done[result.unit] = result
            last_progress = time.monotonic()
            yield result

    async def purge(self) -> None:
        """Drop the job's units still queued (after a cancel or a failure), pinned or not."""
        await purge_subject(self.bus, streams.WORK, subjects.work_transfer(self.job_id))
        await purge_subject(self.bus, streams.WORK, subjects.work_pinned("*", self.job_id))

    async def close(self) -> None:
        """Stop following results (idempotent)."""
        if self._feed is not None:
            await self._feed.close()
            self._feed = None
