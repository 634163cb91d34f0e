"""The HyperSDK API's webhooks on the HTTPS listener too, under ``/api/v1/webhooks``.

The same routes, bodies, answers and errors as the HyperSDK listener's ``/webhooks``
(``hypersdk_hooks``; snake_case fields): ``GET`` (``{"webhooks", "total",
"timestamp"}``), ``POST`` (add, 201), ``DELETE /{index}`` and ``POST /test``
(``{"url", "event"}``; 502 naming the receiver's answer when it is not 2xx). They are
here so that a client of this listener (the web console, whose cookie session and
origin are this listener's) reaches them without the HyperSDK listener, which binds
to loopback by default. Permissions: ``config:read`` to list, ``config:write`` to
change or test.
"""

from __future__ import annotations

from virtbackup.gateway.hypersdk_hooks import WebhooksController


class ApiWebhooksController(WebhooksController):
    path = "/api/v1/webhooks"
