"""Work queues: typed items stored in a work-queue stream and pulled by a durable consumer.

Publishing (``publish_work``) stores an item once per id: JetStream drops a second item
with the same ``Nats-Msg-Id`` inside the stream's duplicate window. The publisher's W3C
trace context travels in the headers.

Pulling (``WorkConsumer``) takes one item at a time, and only when a slot is free, so an
item never waits in a worker's memory while its ack wait runs out. Each item is handled
inside a span whose parent is the publisher's trace context, and is kept alive
(``in_progress``) every third of the consumer's ack wait while its handler runs; a worker
that dies stops doing so and the item is redelivered to another.

FastStream's pull subscriber is not used for this: its pull loop fetches the next message
before a handler slot is free, and that message then waits without ``in_progress``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from opentelemetry import propagate, trace
from opentelemetry.context import Context

from virtbackup.contracts.streams import ConsumerSpec, StreamSpec
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.provision import delete_consumer, ensure_consumer

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)

_encoder = msgspec.json.Encoder()


async def publish_work(
    bus: Bus, subject: str, item: msgspec.Struct, *, stream: StreamSpec, msg_id: str
) -> bool:
    """Store ``item`` (JSON) on ``subject`` of the work-queue ``stream``.

    Returns False when an item with ``msg_id`` was already stored within the stream's
    duplicate window (nothing is stored then). Waits for JetStream's acknowledgement;
    ``Unavailable`` when none comes in time. The current trace context goes along.
    """
    return await bus.publish_stored(subject, _encoder.encode(item), stream=stream, msg_id=msg_id)


async def purge_subject(bus: Bus, stream: StreamSpec, subject: str) -> None:
    """Drop every message of ``stream`` on ``subject`` (wildcards allowed) that no consumer
    has acknowledged yet. Messages already handed to a worker are dropped too: their
    acknowledgement then changes nothing."""
    await bus.js.purge_stream(stream.name, subject=subject)


async def ensure_work_consumer(
    bus: Bus, spec: ConsumerSpec, *, keep_existing: bool = False, new_only: bool = False
) -> None:
    """Create the durable consumer ``spec`` (see ``provision.ensure_consumer`` for
    ``keep_existing`` and ``new_only``)."""
    await ensure_consumer(bus.js, spec, keep_existing=keep_existing, new_only=new_only)


async def drop_work_consumer(bus: Bus, stream: StreamSpec, durable: str) -> None:
    """Delete the durable consumer ``durable`` of ``stream`` (missing: not an error)."""
    await delete_consumer(bus.js, stream.name, durable)


@dataclass
class WorkMessage(Generic[T]):
    """One item pulled from a work queue, with its acknowledgement controls.

    Settle it exactly once: ``ack`` (done), ``nak`` (redeliver, after ``delay`` seconds)
    or ``term`` (drop, never redelivered). ``in_progress`` restarts its ack wait.
    ``num_delivered`` is 1 on first delivery and counts up with each redelivery.
    """

    item: T
    subject: str
    num_delivered: int
    #: The publisher's trace context (empty when it sent none).
    trace_context: Context
    _msg: Msg = field(repr=False)

    async def ack(self) -> None:
        """Acknowledge, waiting until the server has taken it (``TimeoutError`` if not)."""
        await self._msg.ack_sync()

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after ``delay`` seconds (at once when None)."""
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        """Drop the item: it is not redelivered."""
        await self._msg.term()

    async def in_progress(self) -> None:
        """Tell the server the item is still being worked on (restarts its ack wait)."""
        await self._msg.in_progress()


Handler = Callable[[WorkMessage[T]], Awaitable[None]]


class WorkConsumer(Generic[T]):
    """A durable pull consumer (``spec``) of items of type ``item_type``.

    ``fetch`` takes one item; ``serve`` runs a handler over items until told to stop.
    Items that do not decode as ``item_type`` are dropped (``term``) and logged.
    """

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        item_type: type[T],
        *,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.tracer = tracer or trace.get_tracer("virtbackup.work")
        self._decoder = msgspec.json.Decoder(item_type)
        self._sub: JetStreamContext.PullSubscription | None = None

    async def ensure(self) -> None:
        """Create the durable consumer as ``spec`` says (idempotent)."""
        await ensure_consumer(self.bus.js, self.spec)

    async def fetch(self, timeout: float) -> WorkMessage[T] | None:
        """The next item, or None when none came within ``timeout`` seconds (or it did not
        decode). Binds to the durable consumer on first use (it must exist)."""
        if self._sub is None:
            self._sub = await self.bus.js.pull_subscribe_bind(
                durable=self.spec.durable, stream=self.spec.stream
            )
        try:
            msgs = await self._sub.fetch(1, timeout=timeout)
        except (NatsTimeoutError, TimeoutError):
            return None
        msg = msgs[0]
        try:
            item = self._decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("undecodable work item on %s: %s", msg.subject, exc)
            await msg.term()
            return None
        return WorkMessage(
            item=item,
            subject=msg.subject,
            num_delivered=msg.metadata.num_delivered,
            trace_context=propagate.extract(msg.headers or {}),
            _msg=msg,
        )

    async def close(self) -> None:
        """Stop pulling (a pending pull would otherwise hold up the connection's drain)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def serve(
        self,
        handler: Handler[T],
        *,
        concurrency: int,
        stopping: asyncio.Event,
        retry_delay: float = 2.0,
    ) -> None:
        """Handle items, ``concurrency`` at a time, until ``stopping`` is set.

        Each handler runs in a span ``<subject> process`` whose parent is the publisher's
        trace context, with the item kept alive meanwhile; the handler settles the item.
        A handler that raises has its item redelivered after ``retry_delay`` seconds (up
        to the consumer's ``max_deliver``). When ``stopping`` is set, handlers still
        running are cancelled; their items are redelivered after the ack wait.
        """
        slots = asyncio.Semaphore(max(1, concurrency))
        tasks: set[asyncio.Task[None]] = set()
        stop = asyncio.create_task(stopping.wait())
        try:
            while not stopping.is_set():
                acquire = asyncio.create_task(slots.acquire())
                await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not acquire.done():
                    acquire.cancel()
                    break
                pull = asyncio.create_task(self.fetch(timeout=2.0))
                await asyncio.wait({pull, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not pull.done():  # stopping: an item that comes now is redelivered
                    pull.cancel()
                    slots.release()
                    break
                try:
                    message = pull.result()
                except Exception:
                    slots.release()
                    if stopping.is_set():
                        break
                    log.exception("pulling from %s failed", self.spec.durable)
                    await asyncio.sleep(1.0)
                    continue
                if message is None:
                    slots.release()
                    continue
                task = asyncio.create_task(self._run(handler, message, slots, retry_delay))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            stop.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def _run(
        self,
        handler: Handler[T],
        message: WorkMessage[T],
        slots: asyncio.Semaphore,
        retry_delay: float,
    ) -> None:
        keepalive = asyncio.create_task(self._keepalive(message))
        try:
            with self.tracer.start_as_current_span(
                f"{message.subject} process",
                context=message.trace_context,
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.consumer.group.name": self.spec.durable,
                    "messaging.destination.name": message.subject,
                    "messaging.nats.num_delivered": message.num_delivered,
                },
            ) as span:
                try:
                    await handler(message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("handling %s failed", message.subject)
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                    with contextlib.suppress(Exception):
                        await message.nak(delay=retry_delay)
        finally:
            keepalive.cancel()
            slots.release()

    async def _keepalive(self, message: WorkMessage[T]) -> None:
        interval = max(0.5, self.spec.ack_wait_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await message.in_progress()
