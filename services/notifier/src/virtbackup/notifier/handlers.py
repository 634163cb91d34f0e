"""The notifier's commands (``vb.cmd.notify.*``): webhooks and the ntfy test."""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from virtbackup.contracts.subjects import NotifyCmd
from virtbackup.contracts.v1.common import Empty, shown
from virtbackup.contracts.v1.webhooks import (
    TEST_EVENTS,
    Notification,
    NtfyTest,
    TestResult,
    Webhook,
    WebhookAdded,
    WebhookIndex,
    WebhookList,
    WebhookTest,
    WebhookView,
    webhook_view,
)
from virtbackup.notifier import delivery as hooks
from virtbackup.notifier import ntfy, targets
from virtbackup.notifier.pipeline import Pipeline
from virtbackup.notifier.store import check_url
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest

#: Seconds a test delivery (webhook or ntfy) may take.
TEST_TIMEOUT = 10.0


def register_commands(pipeline: Pipeline) -> None:
    """Declare the command handlers on the pipeline's bus (before the broker starts)."""
    bus = pipeline.ctx.bus
    store = pipeline.store

    @bus.handle(NotifyCmd.WEBHOOKS_LIST, Empty)
    async def list_webhooks(_: Empty) -> WebhookList:
        found = await store.all()
        statuses = await asyncio.gather(*(store.status(h.id) for h in found))
        return WebhookList(
            webhooks=[webhook_view(h, s) for h, s in zip(found, statuses, strict=True)]
        )

    allow_private = pipeline.ctx.settings.webhooks_allow_private

    async def check_target(url: str) -> None:
        """400 naming ``url`` for a target refused by ``targets`` (when set so)."""
        check_url(url)
        if not allow_private:
            try:
                await targets.check_public(url)
            except targets.PrivateTarget as exc:
                raise BadRequest(f"url: {exc}") from None

    @bus.handle(NotifyCmd.WEBHOOKS_ADD, Webhook)
    async def add_webhook(add: Webhook) -> WebhookAdded:
        await check_target(add.url)
        hook = await store.add(add)
        await pipeline.reconcile()  # its consumer exists before the reply
        return WebhookAdded(webhook=webhook_view(hook, None))

    @bus.handle(NotifyCmd.WEBHOOKS_DELETE, WebhookIndex)
    async def delete_webhook(req: WebhookIndex) -> WebhookView:
        hook = await store.delete(req.index, webhook_id=req.id)
        await pipeline.reconcile()
        return webhook_view(hook, None)

    @bus.handle(NotifyCmd.WEBHOOKS_TEST, WebhookTest)
    async def test_webhook(req: WebhookTest) -> TestResult:
        if req.event not in TEST_EVENTS:
            raise BadRequest(
                f"event: {shown(req.event)} is not a webhook event; expected one of "
                f"{', '.join(TEST_EVENTS)}"
            )
        await check_target(req.url)
        configured = next((h for h in await store.all() if h.url == req.url), None)
        hook = configured or Webhook(id="test", url=req.url, events=[])
        hook = msgspec.structs.replace(
            hook, timeout=min(hook.timeout, int(TEST_TIMEOUT)), retry_count=0
        )
        ident = uuid.uuid4().hex
        body = msgspec.json.encode(
            {
                "event": req.event,
                "delivery_id": ident,
                "timestamp": utcnow_iso(),
                "data": {"message": "test webhook from VirtBackup"},
            }
        )
        outcome = await hooks.deliver(
            pipeline.client, hook, req.event, ident, body, allow_private=allow_private
        )
        return TestResult(
            ok=outcome.ok, status_code=outcome.status_code, error=outcome.error, delivery_id=ident
        )

    @bus.handle(NotifyCmd.NTFY_TEST, NtfyTest)
    async def test_ntfy(req: NtfyTest) -> TestResult:
        cfg = await pipeline.config()
        token = cfg.ntfyme_token if req.token is None else store.box.open(req.token)
        note = Notification(
            severity="info",
            fields={"event": "test"},
            title="VirtBackup test notification",
            message="Notifications from VirtBackup reach this topic.",
            tags=["white_check_mark"],
        )
        try:
            code = await ntfy.publish(pipeline.client, cfg.ntfy, token, note, timeout=TEST_TIMEOUT)
        except ntfy.NtfyError as exc:
            return TestResult(ok=False, status_code=exc.status_code, error=str(exc))
        return TestResult(ok=True, status_code=code)
