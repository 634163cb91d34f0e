"""One feed of ``VB_EVENTS`` and of the jobs' log lines for every live ``/events`` stream.

A stream that starts now (no ``Last-Event-ID``) joins the :class:`SseHub`: the hub reads
the bus through one ordered consumer of events and one of log lines (open while at least
one stream is joined), encodes each message once as server-sent-event bytes
(:class:`SharedMessage`) and offers the same object to every stream's bounded queue.
Before it, each stream had consumers of its own: every event crossed the bus, was parsed,
decoded and encoded once per stream, and 100 streams woke at once for each event, which
held the gateway's event loop for tens of milliseconds (``bench/load.py``).

A stream that resumes (``Last-Event-ID``) keeps a feed of its own, from that sequence on
(``controllers.events``). Order is kept per stream: its queue is filled in the order the
hub's feeds deliver. A stream whose queue is full (``QUEUE_SIZE`` messages behind) is told
so (``Listener.ended``) and ends at once; its client reconnects with ``Last-Event-ID``
(``EventSource`` does) and resumes after the last event it got; log lines, which have no
id, are not replayed (as documented for ``/events``). A feed that fails (the bus gone)
ends every joined stream the same way; the next stream to join opens new feeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar.response import ServerSentEventMessage

from virtbackup.contracts import subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.jobctl import LogLine
from virtbackup.gateway.fanout import Outbox, offer_in_batches, stop_tasks
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.events import EventFeed, StoredEvent
from virtbackup.runtime.joblog import LogFeed

log = logging.getLogger(__name__)

#: Messages a stream may fall behind before it is ended (its client resumes by id).
QUEUE_SIZE = 1024
#: How long a feed waits for its next message before it asks again, in seconds.
FEED_WAIT_SECONDS = 30.0

_encoder = msgspec.json.Encoder()


class SharedMessage(ServerSentEventMessage):
    """A server-sent event encoded once (the first :meth:`encode`), however many
    streams send it; the same bytes every time after."""

    _encoded: bytes | None = None

    def encode(self) -> bytes:
        if self._encoded is None:
            self._encoded = super().encode()
        return self._encoded


def event_message(stored: StoredEvent) -> ServerSentEventMessage:
    """An event of ``VB_EVENTS`` as ``/events`` sends it: ``event: <type>``, ``id: <stream
    sequence>``, data ``{"type", "payload"}`` (JSON)."""
    event = stored.event
    data = _encoder.encode({"type": event.type, "payload": event.payload})
    return SharedMessage(event=event.type, data=data.decode(), id=stored.sequence)


def log_message(job_id: str, entry: LogLine) -> ServerSentEventMessage:
    """A job's log line as ``/events`` sends it: ``event: job.log``, no id, data
    ``{"type": "job.log", "payload": {"jobId", "ts", "level", "line"}}`` (JSON)."""
    payload = {"jobId": job_id, "ts": entry.ts, "level": entry.level, "line": entry.line}
    data = _encoder.encode({"type": EventType.JOB_LOG, "payload": payload})
    return SharedMessage(event=EventType.JOB_LOG, data=data.decode())


class Listener(Outbox[ServerSentEventMessage]):
    """One stream's bounded queue of messages; ``ended`` is set when it overflowed or
    the hub's feeds failed (the stream then ends)."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        super().__init__(size)

    @property
    def ended(self) -> asyncio.Event:
        """Set once the stream must end (it fell behind, or the hub's feeds failed)."""
        return self.full

    def end(self) -> None:
        """Set ``ended`` and wake a reader waiting on the empty queue (it sees ``ended``
        and sends nothing more)."""
        self.ended.set()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(ServerSentEventMessage(comment="end"))


class SseHub:
    """Fans events and log lines out to the ``/events`` streams that started now.

    ``encoded`` counts the messages encoded (once each, whatever the count of streams)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.clients: set[Listener] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.lock = asyncio.Lock()
        self.encoded = 0

    async def join(self, client: Listener) -> None:
        """Add ``client``; the first one opens the feeds (open when this returns: no
        event stored after it is missed). Errors of the bus (``ServiceError``, nats-py's)
        propagate, and ``client`` is not added then."""
        async with self.lock:
            if not self.tasks:
                events = EventFeed(self.bus, subjects.EVENTS_ALL, start="new")
                logs = LogFeed(self.bus)
                try:
                    await events.open()
                    await logs.open()
                except BaseException:
                    await events.close()
                    await logs.close()
                    raise
                self.tasks = [
                    asyncio.create_task(self._pump_events(events), name="sse-events"),
                    asyncio.create_task(self._pump_logs(logs), name="sse-job-logs"),
                ]
            self.clients.add(client)

    async def leave(self, client: Listener) -> None:
        """Remove ``client``; the last one closes the feeds."""
        async with self.lock:
            self.clients.discard(client)
            if self.clients or not self.tasks:
                return
            tasks, self.tasks = self.tasks, []
        await stop_tasks(tasks)

    async def broadcast(self, message: ServerSentEventMessage) -> None:
        """Encode ``message`` once and offer it to every stream, never waiting for one
        (``fanout.offer_in_batches``: the event loop runs between batches)."""
        message.encode()
        self.encoded += 1
        clients = list(self.clients)
        await offer_in_batches(clients, message)
        # An ended stream gets nothing more: let go of it now, even if its response never
        # ran far enough to leave (a client gone before the stream started).
        self.clients.difference_update([c for c in clients if c.ended.is_set()])

    async def _pump_events(self, feed: EventFeed) -> None:
        await self._pump(feed.close, lambda: feed.next(timeout=FEED_WAIT_SECONDS), event_message)

    async def _pump_logs(self, feed: LogFeed) -> None:
        await self._pump(
            feed.close,
            lambda: feed.next(timeout=FEED_WAIT_SECONDS),
            lambda line: log_message(*line),
        )

    async def _pump(
        self,
        close: Callable[[], Awaitable[None]],
        next_item: Callable[[], Awaitable[Any]],
        to_message: Callable[[Any], ServerSentEventMessage],
    ) -> None:
        try:
            while True:
                item = await next_item()
                if item is not None:
                    await self.broadcast(to_message(item))
        except Exception as exc:  # the bus failed: end the streams, they reconnect
            log.warning("/events feed failed, its streams end: %r", exc)
            async with self.lock:
                ended, self.clients = self.clients, set()
                others, self.tasks = self.tasks, []
            for client in ended:
                client.end()
            for task in others:
                if task is not asyncio.current_task():
                    task.cancel()
        finally:
            await close()


_hubs: dict[int, SseHub] = {}


def sse_hub_of(bus: Bus) -> SseHub:
    """The hub of ``bus`` (one per gateway process)."""
    hub = _hubs.get(id(bus))
    if hub is None:
        hub = _hubs[id(bus)] = SseHub(bus)
    return hub
