"""The bus as services use it: typed commands (request/reply), events, buckets.

A command handler takes a typed request and returns a typed result, or raises a
``ServiceError``; the reply on the wire is always ``Reply{result|error}`` so that the
caller can tell "not found" from "the service is down". Malformed requests are answered
with ``bad_request`` and never reach the handler.

Every NATS call of the services goes through ``virtbackup.runtime``: this module, ``work``
(work queues), ``events`` (following ``VB_EVENTS``) and ``kv`` (reading buckets). Each
message stored in a stream carries the W3C trace context of its publisher in its headers
(``traceparent``), so one trace spans the services that handle it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from faststream.exceptions import IncorrectState
from faststream.nats import NatsBroker, NatsMessage
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import propagate, trace

from virtbackup.contracts import subjects
from virtbackup.contracts.buckets import BucketSpec
from virtbackup.contracts.streams import EVENTS, StreamSpec
from virtbackup.contracts.v1.common import Fault, Reply
from virtbackup.contracts.v1.events import Event
from virtbackup.contracts.v1.readable import readable
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, NotFound, ServiceError, Unavailable

log = logging.getLogger(__name__)
tracer = trace.get_tracer("virtbackup.bus")

Req = TypeVar("Req", bound=msgspec.Struct)
Res = TypeVar("Res")

Handler = Callable[[Req], Awaitable[Res]]

_encoder = msgspec.json.Encoder()


#: Bytes of a reply's message kept for its headers under the server's ``max_payload``.
REPLY_HEADROOM = 4096


class Bus:
    """A service's view of NATS: FastStream for subscribers, nats-py for KV and streams.

    ``nc`` and ``js`` are for ``virtbackup.runtime`` itself; services use the typed
    methods here and the functions of ``work``, ``events`` and ``kv``.
    """

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

    @property
    def connected(self) -> bool:
        """True while the connection to NATS is up (false before connecting, while
        reconnecting, and after closing)."""
        try:
            conn: Client = self.broker.connection
        except IncorrectState:  # never connected
            return False
        return bool(conn.is_connected)

    async def key_value(self, spec: BucketSpec) -> KeyValue:
        """The existing bucket ``spec`` names (a service that owns a bucket gets it from
        ``ServiceContext.bucket`` instead). ``NotFound`` when nobody has created it yet."""
        try:
            return await self.js.key_value(spec.name)
        except BucketNotFoundError:
            raise NotFound(f"bucket {spec.name} does not exist") from None

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
            self.broker.subscriber(
                subject,
                queue=queue or self.service,
                max_workers=max_workers,
                title=f"{subject}:{self.service}",
                description=f"Command answered by {self.service}: a {request_type.__name__} "
                "(JSON), answered with Reply{result|error}.",
            )(endpoint)
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
                # The subject is no client's business: a gateway passes this on.
                raise BadRequest(readable(f"invalid request: {exc}")) from None
            result = await fn(request)
            answer = _encoder.encode(Reply[Any](result=result))
            return (
                answer if len(answer) <= self._reply_limit() else self._too_large(subject, answer)
            )
        except ServiceError as exc:
            return _encoder.encode(Reply[Any](error=exc.to_fault()))
        except (NatsTimeoutError, TimeoutError, NoRespondersError, ConnectionError) as exc:
            # NATS itself (a key-value read, a stream publish) did not answer in time:
            # transient, a retry can help.
            log.warning("command %s: NATS did not answer: %r", subject, exc)
            fault = Fault(code="unavailable", message=f"{subject}: NATS did not answer in time")
            return _encoder.encode(Reply[Any](error=fault))
        except Exception as exc:
            log.exception("command %s failed", subject)
            fault = Fault(code="internal", message=f"{type(exc).__name__}: {exc}")
            return _encoder.encode(Reply[Any](error=fault))

    def _reply_limit(self) -> int:
        """The largest message the server takes (its ``max_payload``), less room for the
        reply's headers; no limit when the connection is not up or not a server's."""
        try:
            limit = self.nc.max_payload
        except Exception:
            return 1 << 62
        if type(limit) is not int or limit <= REPLY_HEADROOM:  # not a server's (a test broker)
            return 1 << 62
        return limit - REPLY_HEADROOM

    def _too_large(self, subject: str, answer: bytes) -> bytes:
        """The fault answered instead of a reply the server would refuse to carry: without
        it the requester would wait out its timeout and say nobody answered."""
        log.warning("command %s: answer of %d bytes is over the bus's limit", subject, len(answer))
        fault = Fault(
            code="unavailable",
            message=f"{subject}: the answer ({len(answer)} bytes) is larger than the bus "
            f"carries ({self._reply_limit()} bytes): ask for less (a filter, a page)",
        )
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
        await self.publish_stored(
            subjects.event(event_type, key), _encoder.encode(event), stream=EVENTS, msg_id=event.id
        )
        return event

    async def publish_core(self, subject: str, body: bytes) -> None:
        """Publish ``body`` on ``subject`` with core NATS (no acknowledgement: a stream
        whose subjects include it keeps it, e.g. the jobs' output logs ``vb.log.job.*``)."""
        await self.nc.publish(subject, body)

    async def publish_stored(
        self, subject: str, body: bytes, *, stream: StreamSpec, msg_id: str
    ) -> bool:
        """Store ``body`` on ``subject`` of ``stream``; returns False when JetStream already
        had ``msg_id`` within the stream's duplicate window (then nothing was stored).

        Waits for JetStream's acknowledgement (``Unavailable`` when none comes in time).
        The headers carry ``Nats-Msg-Id: <msg_id>`` and the current W3C trace context
        (``traceparent``; FastStream's telemetry middleware narrows it to its publish span).
        """
        headers = {"Nats-Msg-Id": msg_id}
        propagate.inject(headers)
        try:
            ack = await self.broker.publish(
                body, subject, stream=stream.name, headers=headers, timeout=self.request_timeout
            )
        except (NatsTimeoutError, TimeoutError, NoRespondersError):
            raise Unavailable(f"stream {stream.name} did not acknowledge {subject}") from None
        return not bool(getattr(ack, "duplicate", False))


def new_id(prefix: str = "") -> str:
    """A sortable unique id: 12 hex digits of time in ms, then random."""
    import time

    return f"{prefix}{int(time.time() * 1000):012x}{os.urandom(6).hex()}"
