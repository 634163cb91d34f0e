"""Webhooks and notifications: the commands the notifier answers and what it stores.

Webhooks are those of the HyperSDK API (``hypersdk-api.md``, "Webhooks API"); their
fields are snake_case on the bus as on the wire. The notifier keeps them in
``VB_WEBHOOKS`` (key :data:`WEBHOOKS_KEY`, the whole list, in order: an index of the
HyperSDK listener's ``DELETE /webhooks/{index}`` is a position in it; the HTTPS
listener's ``DELETE /api/v1/webhooks/{id}`` names a webhook's ``id``), each webhook's
last delivery under ``status.<webhook id>``. A webhook's ``secret`` and the values of
its credential-like headers (:func:`is_credential_header`) are sealed at rest and never
leave the notifier in clear; replies carry :data:`SECRET_MASK` instead of every header's
value.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

from virtbackup.contracts.v1.config import SECRET_MASK, NtfySettings
from virtbackup.contracts.v1.readable import described

#: The webhook events of the HyperSDK document, plus ``schedule.failed`` (a scheduled
#: run that failed, which the document has no name for).
WEBHOOK_EVENTS: Final = (
    "job.submitted",
    "job.started",
    "job.completed",
    "job.failed",
    "job.progress",
    "schedule.triggered",
    "schedule.completed",
    "schedule.failed",
)
#: The events ``POST /webhooks/test`` may name: ``test`` (the document's example and
#: the default) and the webhook events.
TEST_EVENTS: Final = ("test", *WEBHOOK_EVENTS)
WebhookEvent = Literal[
    "job.submitted",
    "job.started",
    "job.completed",
    "job.failed",
    "job.progress",
    "schedule.triggered",
    "schedule.completed",
    "schedule.failed",
]
WEBHOOKS_KEY: Final = "webhooks"
#: The key of :class:`NtfyProjection` in ``VB_WEBHOOKS``.
NTFY_KEY: Final = "ntfy"
MAX_WEBHOOKS: Final = 100
MAX_HEADERS: Final = 32
#: Headers the notifier sets itself; a webhook's ``headers`` may not name them.
RESERVED_HEADERS: Final = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "transfer-encoding",
        "connection",
        "x-virtbackup-event",
        "x-virtbackup-delivery",
        "x-virtbackup-signature",
        "x-virtbackup-timestamp",
    }
)
_CREDENTIAL_NAME: Final = re.compile(
    r"auth|token|secret|key|password|passwd|cookie|signature|credential|session", re.I
)

#: ``(?![\s\S])`` is the end of the string: ``$`` would let a final newline through,
#: and a header that ends in one is refused by the HTTP client at every delivery.
_HEADER_NAME: Final = described(
    r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+(?![\s\S])", "a header name (letters, digits and !#$%&'*+.^_`|~-)"
)
_LINE: Final = described(r"^[^\x00-\x1f\x7f]*(?![\s\S])", "one line of text (no control character)")
#: A header name as a client gives it.
HeaderName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_HEADER_NAME)]
#: A header value as a client gives it (one printable line).
HeaderValue = Annotated[str, msgspec.Meta(max_length=2048, pattern=_LINE)]
#: A header name and value on the bus and at rest (checked as above when added; read
#: with the earlier patterns, whose ``$`` let a final newline through, so that a webhook
#: stored before still decodes): room for a sealed value (``vbsec:v1:...``).
_STORED_HEADER_NAME: Final = described(
    r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", "a header name (letters, digits and !#$%&'*+.^_`|~-)"
)
_STORED_LINE: Final = described(r"^[^\x00-\x1f\x7f]*$", "one line of text (no control character)")
StoredHeaderName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=_STORED_HEADER_NAME)
]
StoredHeaderValue = Annotated[str, msgspec.Meta(max_length=4096, pattern=_STORED_LINE)]
WebhookUrl = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]


def is_credential_header(name: str) -> bool:
    """True for a header whose value is treated as a secret (masked, sealed at rest):
    ``Authorization``, ``Cookie``, and any name containing ``auth``, ``token``,
    ``secret``, ``key``, ``password``, ``signature``, ``credential`` or ``session``."""
    return bool(_CREDENTIAL_NAME.search(name))


class Webhook(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook as stored (secrets in clear inside the notifier only), and the request
    of ``vb.cmd.notify.webhooks-add`` (``id`` empty; the gateway seals ``secret`` and the
    credential header values before they go on the bus).

    ``timeout``: seconds one attempt may take (1-300); ``retry_count``: attempts after
    the first (0-10), with exponential backoff between them.
    """

    id: str
    url: WebhookUrl
    events: list[WebhookEvent]
    enabled: bool = True
    timeout: Annotated[int, msgspec.Meta(ge=1, le=300)] = 30
    retry_count: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    headers: dict[StoredHeaderName, StoredHeaderValue] = msgspec.field(default_factory=dict)
    secret: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    created_at: str = ""


class DeliveryStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a webhook's last delivery (``last_status`` in ``GET /webhooks``).

    ``state``: ``delivered`` or ``failed`` (given up after every attempt);
    ``http_status``: the last answer's status (None when none came: a timeout, a
    refused or closed connection); ``error``: why the last attempt failed."""

    delivery_id: str
    event: str
    state: Literal["delivered", "failed"]
    attempts: int
    http_status: int | None = None
    error: str = ""
    at: str


class WebhookView(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook as the API shows it: the document's fields, then VirtBackup's own
    (``id``, ``has_secret``, ``last_status``); credential header values masked."""

    url: str
    events: list[str]
    enabled: bool
    timeout: int
    retry_count: int
    headers: dict[str, str]
    id: str
    has_secret: bool
    last_status: DeliveryStatus | None = None


def webhook_view(hook: Webhook, status: DeliveryStatus | None) -> WebhookView:
    """``hook`` with its secret left out and every header value masked: a header's name
    does not tell whether its value is a credential (``X-Honeycomb-Team``, ``X-Pass``
    are), and whoever may list webhooks (``config:read``) may not read secrets."""
    return WebhookView(
        url=hook.url,
        events=list(hook.events),
        enabled=hook.enabled,
        timeout=hook.timeout,
        retry_count=hook.retry_count,
        headers={k: SECRET_MASK if v else v for k, v in hook.headers.items()},
        id=hook.id,
        has_secret=bool(hook.secret),
        last_status=status,
    )


class WebhookAdd(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /webhooks`` (the document's fields, plus ``secret``: the key
    of the HMAC-SHA256 signature of every delivery's body)."""

    url: WebhookUrl
    events: Annotated[list[WebhookEvent], msgspec.Meta(min_length=1, max_length=16)]
    enabled: bool = True
    timeout: Annotated[int, msgspec.Meta(ge=1, le=300)] = 30
    retry_count: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    headers: dict[HeaderName, HeaderValue] = msgspec.field(default_factory=dict)
    secret: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class WebhookList(msgspec.Struct, frozen=True, kw_only=True):
    webhooks: list[WebhookView]


class WebhookAdded(msgspec.Struct, frozen=True, kw_only=True):
    webhook: WebhookView


class WebhookIndex(msgspec.Struct, frozen=True, kw_only=True):
    """The request of ``vb.cmd.notify.webhooks-delete``: the webhook to remove, by its
    ``id`` when that is given (``DELETE /api/v1/webhooks/{id}``: it names one webhook,
    whatever others are deleted meanwhile), else by its position ``index`` (0-based:
    the HyperSDK document's ``DELETE /webhooks/{index}``)."""

    index: int = -1
    id: str = ""


class WebhookTest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /webhooks/test``: one delivery of a ``test`` event (or the
    event named: one of :data:`TEST_EVENTS`, else a 400 naming ``event``) to ``url``,
    signed and with the headers of the configured webhook of that URL if there is one;
    no retry."""

    url: WebhookUrl
    event: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "test"


class TestResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a test delivery went: ``ok`` when the receiver answered 2xx."""

    ok: bool
    status_code: int | None = None
    error: str = ""
    delivery_id: str = ""


class NtfyTest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /ntfyme/test``: ``token`` overrides the configured ``ntfymeToken``."""

    token: str | None = None


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """What a matcher looks at, and what ntfy is sent (``title``, ``message``)."""

    severity: Literal["info", "notice", "warning", "error"]
    fields: dict[str, str]
    title: str
    message: str
    tags: list[str] = msgspec.field(default_factory=list)


class NtfyProjection(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the notifier needs of the agent configuration, kept by the gateway in
    ``VB_WEBHOOKS`` under :data:`NTFY_KEY` whenever the configuration changes: the
    notifier may not read ``VB_CONFIG`` (it holds every server's and destination's
    secrets). ``ntfymeToken`` is sealed at rest as in ``VB_CONFIG``."""

    ntfy: NtfySettings = msgspec.field(default_factory=NtfySettings)
    ntfyme_token: str = ""
