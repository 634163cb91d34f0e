"""Agent API: the live event stream (SSE)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import msgspec
from litestar import Controller, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy

from virtbackup.contracts import subjects
from virtbackup.contracts.v1.events import Event
from virtbackup.gateway.state import Gateway

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


class EventsController(Controller):
    @get("/events")
    async def events(
        self,
        gw: Gateway,
        last_event_id: int | None = Parameter(header="Last-Event-ID", default=None, ge=0),
    ) -> ServerSentEvent:
        """``ready``, then every event of ``VB_EVENTS`` as it happens.

        Each message's SSE id is its stream sequence: a client that reconnects with
        ``Last-Event-ID`` resumes after it, within the stream's retention.
        """
        if last_event_id is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_event_id + 1
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        # Subscribe before "ready" so that nothing published after "ready" is missed.
        sub = await gw.bus.js.subscribe(subjects.EVENTS_ALL, ordered_consumer=True, config=config)

        async def stream() -> AsyncGenerator[ServerSentEventMessage, None]:
            try:
                yield ServerSentEventMessage(event="ready", data="ok")
                while True:
                    try:
                        msg = await sub.next_msg(timeout=KEEPALIVE_SECONDS)
                    except (NatsTimeoutError, TimeoutError):
                        yield ServerSentEventMessage(comment="keep-alive")
                        continue
                    try:
                        event = _decoder.decode(msg.data)
                    except msgspec.DecodeError:
                        log.warning("undecodable event on %s", msg.subject)
                        continue
                    data = _encoder.encode({"type": event.type, "payload": event.payload})
                    yield ServerSentEventMessage(
                        event=event.type, data=data.decode(), id=msg.metadata.sequence.stream
                    )
            finally:
                await sub.unsubscribe()

        return ServerSentEvent(stream())
