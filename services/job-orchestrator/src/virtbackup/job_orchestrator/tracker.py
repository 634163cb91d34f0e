"""Publishing a job's units and gathering their results.

Results are read from ``VB_EVENTS`` with an ordered consumer created before the first
unit is published, so none is missed; a unit done twice (redelivered after its worker
died) is counted once. The tracker gives up when the job is cancelled, when a unit
fails, or when no unit finishes for ``stall_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy

from virtbackup.contracts import streams, subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.events import Event
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import JobCanceled, UnitFailed
from virtbackup.runtime.bus import Bus

_event_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


@dataclass
class UnitTracker:
    bus: Bus
    job_id: str
    canceled: asyncio.Event
    stall_seconds: float = 600.0
    done: dict[int, UnitResult] = field(default_factory=dict)
    published: int = 0
    _sub: object | None = None

    async def open(self) -> None:
        subject = subjects.event(EventType.UNIT_DONE, self.job_id)
        self._sub = await self.bus.js.subscribe(
            subject,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )

    async def publish(self, units: Sequence[TransferUnit]) -> None:
        subject = subjects.work_transfer(self.job_id)
        for unit in units:
            await self.bus.js.publish(
                subject,
                _encoder.encode(unit),
                stream=streams.WORK.name,
                headers={"Nats-Msg-Id": f"{self.job_id}-{unit.unit}"},
            )
            self.published += 1

    async def results(self) -> AsyncIterator[UnitResult]:
        """Each unit's first result, until every published unit is done."""
        sub = self._sub
        assert sub is not None
        last_progress = time.monotonic()
        while len(self.done) < self.published:
            if self.canceled.is_set():
                raise JobCanceled
            try:
                msg = await sub.next_msg(timeout=0.5)  # type: ignore[attr-defined]
            except (NatsTimeoutError, TimeoutError):
                if time.monotonic() - last_progress > self.stall_seconds:
                    raise UnitFailed(
                        f"no transfer worker finished a unit in {self.stall_seconds:.0f} s"
                    ) from None
                continue
            result = msgspec.convert(_event_decoder.decode(msg.data).payload, UnitResult)
            if result.unit in self.done:
                continue
            if not result.ok:
                raise UnitFailed(f"unit {result.unit} ({result.disk}): {result.error}")
            self.done[result.unit] = result
            last_progress = time.monotonic()
            yield result

    async def purge(self) -> None:
        """Drop the job's units still queued (after a cancel or a failure)."""
        await self.bus.js.purge_stream(
            streams.WORK.name, subject=subjects.work_transfer(self.job_id)
        )

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None
