"""One webhook delivery: an HTTP POST, signed, retried with exponential backoff.

The request (the wire contract a receiver relies on)::

    POST <url>
    Content-Type: application/json
    User-Agent: VirtBackup-Webhook/1
    X-VirtBackup-Event: job.completed
    X-VirtBackup-Delivery: <delivery id>      (the same on every attempt and redelivery)
    X-VirtBackup-Timestamp: <unix seconds of this attempt>
    X-VirtBackup-Signature: sha256=<hex>      (only when the webhook has a secret)
    <the webhook's own headers>

    {"event": "job.completed", "delivery_id": "...", "timestamp": "<ISO-8601 UTC>",
     "data": {...}}

The signature is ``HMAC-SHA256(secret, raw body bytes)`` in lowercase hex: a receiver
computes it over the body exactly as received and compares in constant time
(``hmac.compare_digest``); the body's ``timestamp`` (the time of the source event) and
``delivery_id`` are inside what is signed. A delivery id seen before is a duplicate (a
retry after a lost answer, or a redelivery after a notifier restart) and can be dropped.

An attempt succeeds on any 2xx answer. Anything else (another status, no answer within
the webhook's ``timeout``, a refused or closed connection) is retried ``retry_count``
times, waiting 1 s, 2 s, 4 s ... (at most 60 s) between attempts; then it is given up.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Final

import httpx
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from virtbackup.contracts.v1.webhooks import Webhook
from virtbackup.notifier import targets

USER_AGENT: Final = "VirtBackup-Webhook/1"
BACKOFF_INITIAL: Final = 1.0
BACKOFF_MAX: Final = 60.0


def signature(secret: str, body: bytes) -> str:
    """The ``X-VirtBackup-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(webhook_id: str, event: str, key: str) -> str:
    """The id of the delivery of ``event`` (made unique by ``key``) to a webhook: the
    same whenever the same delivery is computed again."""
    return hashlib.sha256(f"{webhook_id}\0{event}\0{key}".encode()).hexdigest()[:32]


class AttemptFailed(Exception):
    """One attempt did not get a 2xx answer."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Outcome:
    """How a delivery ended: ``ok``, how many ``attempts``, the last status and error."""

    ok: bool
    attempts: int
    status_code: int | None
    error: str


def request_headers(hook: Webhook, event: str, delivery: str, body: bytes) -> dict[str, str]:
    headers = dict(hook.headers)
    headers.update(
        {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-VirtBackup-Event": event,
            "X-VirtBackup-Delivery": delivery,
            "X-VirtBackup-Timestamp": str(int(time.time())),
        }
    )
    if hook.secret:
        headers["X-VirtBackup-Signature"] = signature(hook.secret, body)
    return headers


async def attempt(
    client: httpx.AsyncClient,
    hook: Webhook,
    event: str,
    delivery: str,
    body: bytes,
    *,
    allow_private: bool = True,
) -> int:
    """One POST; returns the 2xx status, else raises ``AttemptFailed`` (also, unless
    ``allow_private``, when the URL's host resolves to an address that is not public:
    ``targets``)."""
    if not allow_private:
        try:
            await targets.check_public(hook.url)
        except targets.PrivateTarget as exc:
            raise AttemptFailed(f"not sent: {exc}") from None
    try:
        resp = await client.post(
            hook.url,
            content=body,
            headers=request_headers(hook, event, delivery, body),
            timeout=httpx.Timeout(hook.timeout),
        )
    except httpx.TimeoutException:
        raise AttemptFailed(f"no answer within {hook.timeout} s") from None
    except httpx.HTTPError as exc:
        raise AttemptFailed(f"{type(exc).__name__}: {exc}") from None
    if not 200 <= resp.status_code < 300:
        raise AttemptFailed(f"answered {resp.status_code}", resp.status_code)
    return resp.status_code


async def deliver(
    client: httpx.AsyncClient,
    hook: Webhook,
    event: str,
    delivery: str,
    body: bytes,
    *,
    backoff_initial: float = BACKOFF_INITIAL,
    allow_private: bool = True,
) -> Outcome:
    """Deliver ``body`` with up to ``1 + hook.retry_count`` attempts (exponential
    backoff; ``allow_private`` as ``attempt``'s). Never raises for the receiver's
    behaviour: the outcome says how it went."""
    attempts = 0
    try:
        async for round_ in AsyncRetrying(
            stop=stop_after_attempt(1 + hook.retry_count),
            wait=wait_exponential(multiplier=backoff_initial, max=BACKOFF_MAX),
            reraise=False,
        ):
            with round_:
                attempts += 1
                status = await attempt(
                    client, hook, event, delivery, body, allow_private=allow_private
                )
                return Outcome(ok=True, attempts=attempts, status_code=status, error="")
    except RetryError as exc:
        last = exc.last_attempt.exception()
        code = last.status_code if isinstance(last, AttemptFailed) else None
        return Outcome(ok=False, attempts=attempts, status_code=code, error=str(last))
    raise AssertionError("unreachable")  # pragma: no cover
