"""The HyperSDK API's webhooks (``/webhooks``), kept and delivered by the notifier.

The routes are the document's; a webhook is shown with the document's fields and three
of VirtBackup's (``id``, ``has_secret``, ``last_status``: the outcome of its last
delivery). ``secret`` is write-only; header values read as ``********`` (those that
look like credentials, ``Authorization``, ``*token*``, ``*key*`` ..., are also sealed
at rest).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, delete, get, post
from litestar.exceptions import HTTPException

from virtbackup.contracts.subjects import NotifyCmd
from virtbackup.contracts.v1.common import Empty
from virtbackup.contracts.v1.webhooks import (
    TestResult,
    Webhook,
    WebhookAdd,
    WebhookAdded,
    WebhookIndex,
    WebhookList,
    WebhookTest,
    WebhookView,
    is_credential_header,
)
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest

#: Seconds the gateway waits for a test delivery (the notifier gives it 10 s).
TEST_WAIT = 15.0


def _view(hook: WebhookView) -> dict[str, Any]:
    out = msgspec.to_builtins(hook)
    assert isinstance(out, dict)
    return out


class WebhooksController(Controller):
    path = "/webhooks"

    @get()
    async def list_webhooks(self, gw: Gateway) -> dict[str, Any]:
        """Every webhook, in order (the index of ``DELETE /webhooks/{index}``), each with
        its ``id``."""
        found = await gw.bus.request(NotifyCmd.WEBHOOKS_LIST, Empty(), WebhookList)
        return {
            "webhooks": [_view(h) for h in found.webhooks],
            "total": len(found.webhooks),
            "timestamp": utcnow_iso(),
        }

    @post(status_code=201, responses=responses(400))
    async def add_webhook(self, gw: Gateway, data: WebhookAdd) -> dict[str, Any]:
        """Add a webhook (201); a URL that is not http(s), an unknown event or a header
        VirtBackup sets itself is a 400 naming the field, and nothing is added."""
        box = gw.secrets

        def sealed(value: str) -> str:  # nothing goes on the bus in clear
            return box.seal(value) if box is not None and value else value

        hook = Webhook(
            id="",
            url=data.url,
            events=list(data.events),
            enabled=data.enabled,
            timeout=data.timeout,
            retry_count=data.retry_count,
            headers={
                k: sealed(v) if is_credential_header(k) else v for k, v in data.headers.items()
            },
            secret=sealed(data.secret),
        )
        added = await gw.bus.request(NotifyCmd.WEBHOOKS_ADD, hook, WebhookAdded)
        return {"message": "webhook added successfully", "webhook": _view(added.webhook)}

    @delete("/{index:str}", status_code=200, responses=responses(400, 404))
    async def delete_webhook(self, gw: Gateway, index: str) -> dict[str, str]:
        """Delete the webhook at ``index`` (0-based); 404 when there is none."""
        if not index.isdigit() or len(index) > 6:
            raise BadRequest(f"index must be a non-negative integer, got {index[:20]!r}")
        await gw.bus.request(NotifyCmd.WEBHOOKS_DELETE, WebhookIndex(index=int(index)), WebhookView)
        return {"message": "webhook deleted successfully"}

    @post("/test", status_code=200, responses=responses(400, 502))
    async def test_webhook(self, gw: Gateway, data: WebhookTest) -> dict[str, Any]:
        """Send one test delivery to ``url`` (signed with the secret of the configured
        webhook of that URL, if any); 502 naming the receiver's answer when it is not
        2xx."""
        result = await gw.bus.request(NotifyCmd.WEBHOOKS_TEST, data, TestResult, timeout=TEST_WAIT)
        if not result.ok:
            raise HTTPException(
                status_code=502, detail=f"the test webhook was not delivered: {result.error}"
            )
        return {"message": "test webhook sent", "delivery_id": result.delivery_id}
