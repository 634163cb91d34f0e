"""Durable delivery: events -> owed deliveries (``VB_NOTIFY``) -> receivers.

Two stages, each a durable JetStream consumer, so that a notifier that dies (even
SIGKILL) loses nothing: what it had not acknowledged is redelivered, after the consumer's
ack wait (``VIRTBACKUP_NOTIFIER_ACK_WAIT``, 30 s by default), to the next notifier.

1. ``notifier-events`` reads ``VB_EVENTS`` in order. For each event it derives the
   webhook events (``derive``) and the notification, and stores one item per enabled
   webhook that subscribed to it on ``vb.notify.webhook.<webhook id>`` (and one on
   ``vb.notify.ntfy`` when a matcher matches), with the delivery id as ``Nats-Msg-Id``,
   so an event read twice owes each delivery once. Only then is the event acknowledged.
2. Each webhook has a durable consumer of its own (``webhook-<id>``), served one item at
   a time, in order (``max_ack_pending=1``: also across a restart, and across replicas):
   a receiver that hangs or fails delays only its own deliveries, never another
   webhook's. An item is retried as its webhook says (``delivery``), then
   acknowledged: delivered, or given up (logged, ``last_status`` in ``GET /webhooks``
   and a ``notify.gave_up`` event). ntfy has one consumer too (3 attempts).

A webhook deleted has its consumer deleted and its owed deliveries purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import msgspec

from virtbackup.contracts import streams, subjects
from virtbackup.contracts.streams import ConsumerSpec
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.events import Event
from virtbackup.contracts.v1.webhooks import DeliveryStatus, Notification, NtfyProjection
from virtbackup.notifier import delivery as hooks
from virtbackup.notifier import ntfy
from virtbackup.notifier.derive import Deriver, notification
from virtbackup.notifier.store import WebhookStore
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.work import (
    WorkConsumer,
    WorkMessage,
    drop_work_consumer,
    ensure_work_consumer,
    publish_work,
    purge_subject,
)

log = logging.getLogger(__name__)

#: Seconds between two looks at the webhook list (to start and stop their consumers).
RECONCILE_SECONDS: Final = 1.0
NTFY_ATTEMPTS: Final = 3

_encoder = msgspec.json.Encoder()


class OwedDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """An item of ``vb.notify.webhook.<id>``: the body to POST (no secret: the webhook's
    secret and headers are read when it is delivered)."""

    delivery_id: str
    webhook_id: str
    event: str
    body: str


class OwedNotification(msgspec.Struct, frozen=True, kw_only=True):
    """An item of ``vb.notify.ntfy``."""

    id: str
    notification: Notification


def _age(event: Event) -> float:
    try:
        when = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(UTC) - when).total_seconds())


@dataclass
class Pipeline:
    """The notifier's two stages (see the module's docstring)."""

    ctx: ServiceContext
    store: WebhookStore
    client: httpx.AsyncClient
    deriver: Deriver = field(default_factory=Deriver)
    serving: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)
    #: One reconcile at a time: two (webhooks deleted at once) would each stop and
    #: forget the same consumer, the second finding it gone (a 500 to its delete).
    reconciling: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Seconds before the first retry of a webhook (doubling each time).
    backoff_initial: float = hooks.BACKOFF_INITIAL

    @property
    def ack_wait(self) -> float:
        return self.ctx.settings.notifier_ack_wait

    async def config(self) -> NtfyProjection:
        """The ntfy settings and token (the gateway's copy, ``NtfyProjection``)."""
        return await self.store.ntfy()

    # -- stage 1 ------------------------------------------------------------------------

    async def ensure_consumer(self, spec: ConsumerSpec, *, new_only: bool = False) -> None:
        """Create the durable consumer ``spec`` unless it exists (an existing one keeps
        its position). ``new_only``: a new one starts at the next message stored."""
        await ensure_work_consumer(self.ctx.bus, spec, keep_existing=True, new_only=new_only)

    async def fan_out(self, message: WorkMessage[Event]) -> None:
        """Stage 1 for one event: store what it owes, then acknowledge it."""
        event = message.item
        if not (event.type.startswith("job.") or event.type.startswith("schedule.")):
            await message.ack()
            return
        derived = self.deriver.webhook_events(event, age=_age(event))
        note = notification(event)
        if derived:
            for hook in await self.store.all():
                if not hook.enabled:
                    continue
                for item in derived:
                    if item.name not in hook.events:
                        continue
                    ident = hooks.delivery_id(hook.id, item.name, item.key)
                    body = {
                        "event": item.name,
                        "delivery_id": ident,
                        "timestamp": event.time,
                        "data": item.data,
                    }
                    owed = OwedDelivery(
                        delivery_id=ident,
                        webhook_id=hook.id,
                        event=item.name,
                        body=_encoder.encode(body).decode(),
                    )
                    await publish_work(
                        self.ctx.bus,
                        subjects.notify_webhook(hook.id),
                        owed,
                        stream=streams.NOTIFY,
                        msg_id=ident,
                    )
        if note is not None:
            cfg = await self.config()
            if ntfy.should_notify(cfg.ntfy, note):
                ident = f"ntfy-{event.id}"
                await publish_work(
                    self.ctx.bus,
                    subjects.NOTIFY_NTFY,
                    OwedNotification(id=ident, notification=note),
                    stream=streams.NOTIFY,
                    msg_id=ident,
                )
        await message.ack()

    # -- stage 2 ------------------------------------------------------------------------

    async def deliver_owed(self, message: WorkMessage[OwedDelivery]) -> None:
        """Stage 2 for one webhook delivery: attempts, then acknowledge and record."""
        owed = message.item
        hook = next((h for h in await self.store.all() if h.id == owed.webhook_id), None)
        if hook is None:  # deleted meanwhile
            await message.ack()
            return
        outcome = await hooks.deliver(
            self.client,
            hook,
            owed.event,
            owed.delivery_id,
            owed.body.encode(),
            backoff_initial=self.backoff_initial,
            allow_private=self.ctx.settings.webhooks_allow_private,
        )
        status = DeliveryStatus(
            delivery_id=owed.delivery_id,
            event=owed.event,
            state="delivered" if outcome.ok else "failed",
            attempts=outcome.attempts,
            http_status=outcome.status_code,
            error=outcome.error,
            at=utcnow_iso(),
        )
        if not outcome.ok:
            log.error(
                "webhook delivery given up after %d attempts: %s",
                outcome.attempts,
                outcome.error,
                extra={
                    "webhook": hook.id,
                    "url": hook.url,
                    "event": owed.event,
                    "delivery": owed.delivery_id,
                },
            )
            with contextlib.suppress(Exception):
                await self.ctx.bus.publish_event(
                    EventType.NOTIFY_GAVE_UP,
                    {
                        "kind": "webhook",
                        "webhook_id": hook.id,
                        "url": hook.url,
                        "event": owed.event,
                        "delivery_id": owed.delivery_id,
                        "attempts": outcome.attempts,
                        "http_status": outcome.status_code,
                        "error": outcome.error,
                    },
                    key=hook.id,
                )
        await self.store.set_status(hook.id, status)
        await message.ack()

    async def deliver_ntfy(self, message: WorkMessage[OwedNotification]) -> None:
        """One notification to ntfy: up to ``NTFY_ATTEMPTS`` attempts, then given up."""
        cfg = await self.config()
        error = ""
        for attempt in range(NTFY_ATTEMPTS):
            try:
                await ntfy.publish(
                    self.client, cfg.ntfy, cfg.ntfyme_token, message.item.notification
                )
                await message.ack()
                return
            except ntfy.NtfyError as exc:
                error = str(exc)
                if attempt + 1 < NTFY_ATTEMPTS:
                    await asyncio.sleep(self.backoff_initial * 2**attempt)
        log.error("ntfy notification given up after %d attempts: %s", NTFY_ATTEMPTS, error)
        with contextlib.suppress(Exception):
            await self.ctx.bus.publish_event(
                EventType.NOTIFY_GAVE_UP,
                {"kind": "ntfy", "id": message.item.id, "error": error},
            )
        await message.ack()

    def _serve(
        self,
        spec: ConsumerSpec,
        consumer: WorkConsumer[Any],
        handler: Callable[[WorkMessage[Any]], Awaitable[None]],
    ) -> asyncio.Event:
        stop = asyncio.Event()

        async def run() -> None:
            while not stop.is_set() and not self.ctx.stopping.is_set():
                try:
                    await self.ensure_consumer(spec)
                    await consumer.serve(handler, concurrency=1, stopping=stop)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("serving %s failed; again in 1 s", spec.durable)
                    await asyncio.sleep(1.0)

        task = asyncio.create_task(run(), name=f"serve-{spec.durable}")
        self.serving[spec.durable] = (task, stop)
        return stop

    async def reconcile(self) -> None:
        """Serve a consumer for every webhook; drop those of deleted webhooks (one call
        at a time: each sees what the one before it left)."""
        async with self.reconciling:
            await self._reconcile()

    async def _reconcile(self) -> None:
        hooks_now = {h.id: h for h in await self.store.all()}
        for webhook_id in hooks_now:
            spec = streams.webhook_consumer(webhook_id, self.ack_wait)
            if spec.durable not in self.serving:
                consumer = WorkConsumer(self.ctx.bus, spec, OwedDelivery)
                self._serve(spec, consumer, self.deliver_owed)
        for durable in list(self.serving):
            if not durable.startswith("webhook-") or durable[len("webhook-") :] in hooks_now:
                continue
            task, stop = self.serving.pop(durable)
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5.0)
            await self.forget(durable[len("webhook-") :])

    async def forget(self, webhook_id: str) -> None:
        """Delete a webhook's consumer and what it was still owed."""
        await drop_work_consumer(self.ctx.bus, streams.NOTIFY, f"webhook-{webhook_id}")
        await purge_subject(self.ctx.bus, streams.NOTIFY, subjects.notify_webhook(webhook_id))

    async def run(self) -> None:
        """Both stages, until the service stops."""
        events_spec = msgspec.structs.replace(
            streams.NOTIFIER_EVENTS_CONSUMER, ack_wait_seconds=self.ack_wait
        )
        await self.ensure_consumer(events_spec, new_only=True)
        self._serve(events_spec, WorkConsumer(self.ctx.bus, events_spec, Event), self.fan_out)
        ntfy_spec = streams.ntfy_consumer(self.ack_wait)
        self._serve(
            ntfy_spec, WorkConsumer(self.ctx.bus, ntfy_spec, OwedNotification), self.deliver_ntfy
        )
        while not self.ctx.stopping.is_set():
            try:
                await self.reconcile()
            except Exception:
                log.exception("looking at the webhooks failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ctx.stopping.wait(), RECONCILE_SECONDS)

    async def stop(self) -> None:
        for _, stop in self.serving.values():
            stop.set()
        tasks = [t for t, _ in self.serving.values()]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.serving.clear()
