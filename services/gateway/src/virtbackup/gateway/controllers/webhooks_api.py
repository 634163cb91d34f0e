"""The HyperSDK API's webhooks on the HTTPS listener too, under ``/api/v1/webhooks``.

The same routes, bodies, answers and errors as the HyperSDK listener's ``/webhooks``
(``hypersdk_hooks``; snake_case fields): ``GET`` (``{"webhooks", "total",
"timestamp"}``), ``POST`` (add, 201) and ``POST /test`` (``{"url", "event"}``; 502
naming the receiver's answer when it is not 2xx), except that a webhook is deleted by
its ``id`` (``DELETE /{id}``, as listed), not by its position: two admins deleting at
once each remove the webhook they saw, where a position may have moved under them.
They are here so that a client of this listener (the web console, whose cookie session
and origin are this listener's, and the CLI) reaches them without the HyperSDK
listener, which binds to loopback by default. Permissions: ``config:read`` to list,
``config:write`` to change or test.
"""

from __future__ import annotations

import re
from typing import Final

from litestar import delete

from virtbackup.contracts.subjects import NotifyCmd
from virtbackup.contracts.v1.webhooks import WebhookIndex, WebhookView
from virtbackup.gateway.errors import responses
from virtbackup.gateway.hypersdk_hooks import WebhooksController
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest

#: A webhook's id as the notifier makes them (32 hex digits; ``uuid4().hex``).
WEBHOOK_ID: Final = re.compile(r"[0-9a-f]{32}")


class ApiWebhooksController(WebhooksController):
    path = "/api/v1/webhooks"

    @delete("/{webhook_id:str}", status_code=200, responses=responses(400, 404))
    async def delete_webhook(self, gw: Gateway, webhook_id: str) -> dict[str, str]:
        """Delete the webhook whose ``id`` is ``webhook_id`` (``{"message"}``); 400 when
        it is not an id (32 lowercase hex digits), 404 naming it when no webhook has it.
        Nothing else is removed, whatever was added or deleted since it was listed."""
        if not WEBHOOK_ID.fullmatch(webhook_id):
            raise BadRequest(
                f"id: {webhook_id[:40]!r} is not a webhook id (32 hex digits, as listed)"
            )
        await gw.bus.request(NotifyCmd.WEBHOOKS_DELETE, WebhookIndex(id=webhook_id), WebhookView)
        return {"message": "webhook deleted successfully"}
