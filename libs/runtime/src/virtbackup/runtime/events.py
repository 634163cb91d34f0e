"""Following ``VB_EVENTS``: decoded events in stream order, with their stream sequence.

An ``EventFeed`` reads through an ordered consumer of its own (ephemeral, flow-controlled,
recreated by nats-py after a gap), so every event after its start point arrives once and
in order. Open it before doing what causes the events you wait for: events stored after
``open`` returns are never missed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import EVENTS
from virtbackup.contracts.v1.events import Event
from virtbackup.runtime.bus import Bus

log = logging.getLogger(__name__)

#: Where a feed starts: ``"new"`` (events stored from now on), ``"all"`` (every stored
#: event), or a stream sequence (that event and every later one).
EventStart = Literal["new", "all"] | int

_decoder = msgspec.json.Decoder(Event)


@dataclass(frozen=True)
class StoredEvent:
    """An event as ``VB_EVENTS`` holds it."""

    #: Its stream sequence (what SSE sends as the event id; 1 is the first event).
    sequence: int
    subject: str
    event: Event

    @property
    def key(self) -> str | None:
        """What the subject names after ``vb.evt.<aggregate>.<event>`` (e.g. a job id)."""
        parts = self.subject.split(".", 4)
        return parts[4] if len(parts) == 5 else None


class EventFeed:
    """Events of ``VB_EVENTS`` on ``subject`` (wildcards allowed), from ``start`` on.

    Use as ``async with EventFeed(bus, ...) as feed`` or ``await feed.open()`` / ``close()``;
    then ``await feed.next(timeout)`` or ``async for stored in feed``. Events that do not
    decode as ``Event`` are skipped with a warning.
    """

    def __init__(
        self, bus: Bus, subject: str = subjects.EVENTS_ALL, *, start: EventStart = "new"
    ) -> None:
        if isinstance(start, int) and start < 1:
            raise ValueError(f"a stream sequence starts at 1, got {start}")
        self.bus = bus
        self.subject = subject
        self.start = start
        self._sub: Any = None

    async def open(self) -> EventFeed:
        """Create the consumer; from now on no matching event is missed. Returns self."""
        if self._sub is None:
            if self.start == "new":
                config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
            elif self.start == "all":
                config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
            else:
                config = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start
                )
            self._sub = await self.bus.js.subscribe(
                self.subject, stream=EVENTS.name, ordered_consumer=True, config=config
            )
        return self

    async def next(self, timeout: float) -> StoredEvent | None:
        """The next event, or None when none came within ``timeout`` seconds."""
        if self._sub is None:
            raise RuntimeError("EventFeed.next before open")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                msg = await self._sub.next_msg(timeout=remaining)
            except (NatsTimeoutError, TimeoutError):
                return None
            try:
                event = _decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("undecodable event on %s: %s", msg.subject, exc)
                continue
            return StoredEvent(
                sequence=msg.metadata.sequence.stream, subject=msg.subject, event=event
            )

    async def __aiter__(self) -> AsyncIterator[StoredEvent]:
        """Every event, waiting as long as it takes (opens the feed if needed)."""
        await self.open()
        while True:
            stored = await self.next(timeout=60.0)
            if stored is not None:
                yield stored

    async def close(self) -> None:
        """Delete the consumer (idempotent)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("closing an event feed: %s", exc)

    async def __aenter__(self) -> EventFeed:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
