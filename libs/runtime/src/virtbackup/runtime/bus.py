"""The bus as services use it: typed commands (request/reply) and events.

A command handler takes a typed request and returns a typed result, or raises a
``ServiceError``; the reply on the wire is always ``Reply{result|error}`` so that the
caller can tell "not found" from "the service is down". Malformed requests are answered
with ``bad_request`` and never reach the handler.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from faststream.nats import NatsBroker, NatsMessage
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from opentelemetry import trace

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import EVENTS
from virtbackup.contracts.v1.common import Fault, Reply
from virtbackup.contracts.v1.events import Event
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, ServiceError, Unavailable

log = logging.getLogger(__name__)
tracer = trace.get_tracer("virtbackup.bus")

Req = TypeVar("Req", bound=msgspec.Struct)
Res = TypeVar("Res")

Handler = Callable[[Req], Awaitable[Res]]

_encoder = msgspec.json.Encoder()


class Bus:
    """A service's view of NATS: FastStream for subscribers, nats-py for KV and streams."""

    def __init__(self, broker: NatsBroker, service: str, *, request_timeout: float = 10.0):
        self.broker = broker
        self.service = service
        self.request_timeout = request_timeout

    @property
    def nc(self) -> Client:
        conn: Client = self.broker.connection
        return conn

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    # -- commands ---------------------------------------------------------------------

    def handle(
        self,
        subject: str,
        request_type: type[Req],
        *,
        queue: str | None = None,
        max_workers: int = 16,
    ) -> Callable[[Handler[Req, Res]], Handler[Req, Res]]:
        """Register ``fn`` as the handler of command ``subject`` (load-balanced in ``queue``)."""
        decoder = msgspec.json.Decoder(request_type)

        def register(fn: Handler[Req, Res]) -> Handler[Req, Res]:
            async def endpoint(msg: NatsMessage) -> bytes:
                return await self._dispatch(fn, decoder, msg.body, subject)

            endpoint.__name__ = f"{fn.__name__}_endpoint"
            self.broker.subscriber(subject, queue=queue or self.service, max_workers=max_workers)(
                endpoint
            )
            return fn

        return register

    async def _dispatch(
        self,
        fn: Handler[Req, Res],
        decoder: msgspec.json.Decoder[Req],
        body: bytes,
        subject: str,
    ) -> bytes:
        try:
            try:
                request = decoder.decode(body or b"{}")
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise BadRequest(f"invalid {subject} request: {exc}") from None
            result = await fn(request)
            return _encoder.encode(Reply[Any](result=result))
        except ServiceError as exc:
            return _encoder.encode(Reply[Any](error=exc.to_fault()))
        except Exception as exc:
            log.exception("command %s failed", subject)
            fault = Fault(code="internal", message=f"{type(exc).__name__}: {exc}")
            return _encoder.encode(Reply[Any](error=fault))

    async def request(
        self,
        subject: str,
        message: msgspec.Struct,
        result_type: type[Res],
        *,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Res:
        """Send a command and return its result, or raise the ``ServiceError`` it answered.

        No responder or no answer in time raises ``Unavailable``.
        """
        try:
            reply_msg = await self.broker.request(
                _encoder.encode(message),
                subject,
                timeout=timeout or self.request_timeout,
                headers=headers,
            )
        except NoRespondersError:
            raise Unavailable(f"no service answers {subject}") from None
        except (NatsTimeoutError, TimeoutError):
            raise Unavailable(f"no answer on {subject} in time") from None
        reply = msgspec.json.decode(reply_msg.body, type=Reply[result_type])  # type: ignore[valid-type]
        if reply.error is not None:
            raise ServiceError.from_fault(reply.error)
        if reply.result is None:
            raise ServiceError(f"empty reply on {subject}")
        return reply.result

    # -- events -----------------------------------------------------------------------

    async def publish_event(
        self, event_type: str, payload: msgspec.Struct | dict[str, Any], *, key: str | None = None
    ) -> Event:
        """Store an event in ``VB_EVENTS`` (acknowledged by JetStream) and return it."""
        body = msgspec.to_builtins(payload) if isinstance(payload, msgspec.Struct) else payload
        event = Event(
            type=event_type,
            payload=body,
            id=uuid.uuid4().hex,
            time=utcnow_iso(),
            source=self.service,
        )
        await self.broker.publish(
            _encoder.encode(event),
            subjects.event(event_type, key),
            stream=EVENTS.name,
            headers={"Nats-Msg-Id": event.id},
        )
        return event


def new_id(prefix: str = "") -> str:
    """A sortable unique id: 12 hex digits of time in ms, then random."""
    import time

    return f"{prefix}{int(time.time() * 1000):012x}{os.urandom(6).hex()}"
