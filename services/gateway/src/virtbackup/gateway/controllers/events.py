"""Agent API: the live event stream (SSE)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec
from litestar import Controller, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from virtbackup.contracts import subjects
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.events import EventFeed, EventStart

KEEPALIVE_SECONDS = 15.0
#: The largest ``Last-Event-ID``: a stream sequence (JetStream's are unsigned 64-bit).
MAX_EVENT_ID = 2**63 - 1
_encoder = msgspec.json.Encoder()


class EventsController(Controller):
    @get("/events")
    async def events(
        self,
        gw: Gateway,
        last_event_id: int | None = Parameter(
            header="Last-Event-ID",
            default=None,
            ge=0,
            le=MAX_EVENT_ID,
            description="Resume after this event (its stream sequence)",
        ),
    ) -> ServerSentEvent:
        """``ready``, then every event of ``VB_EVENTS`` as it happens.

        Each message's SSE id is its stream sequence: a client that reconnects with
        ``Last-Event-ID`` resumes after it, within the stream's retention. A
        ``Last-Event-ID`` that is not an integer from 0 to ``MAX_EVENT_ID`` is a 400.
        """
        start: EventStart = "new" if last_event_id is None else last_event_id + 1
        # Open the feed before "ready" so that nothing published after "ready" is missed.
        feed = await EventFeed(gw.bus, subjects.EVENTS_ALL, start=start).open()

        async def stream() -> AsyncGenerator[ServerSentEventMessage, None]:
            try:
                yield ServerSentEventMessage(event="ready", data="ok")
                while True:
                    stored = await feed.next(timeout=KEEPALIVE_SECONDS)
                    if stored is None:
                        yield ServerSentEventMessage(comment="keep-alive")
                        continue
                    event = stored.event
                    data = _encoder.encode({"type": event.type, "payload": event.payload})
                    yield ServerSentEventMessage(
                        event=event.type, data=data.decode(), id=stored.sequence
                    )
            finally:
                await feed.close()

        return ServerSentEvent(stream())
