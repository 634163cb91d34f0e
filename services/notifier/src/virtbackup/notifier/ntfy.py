"""Notifications through ntfy's publish API, chosen by PBS-style matchers.

A notification is published as ntfy's "publish as JSON" documents it: ``POST <serverUrl>/``
with ``{"topic", "title", "message", "priority", "tags"}`` (``priority`` 4, high, for
``error``, 3 otherwise; JSON, so that titles may hold any character); with a token,
``Authorization: Bearer <token>`` (an ntfy access token, ``tk_...``). Any 2xx answer is
a delivery.
"""

from __future__ import annotations

import re

import httpx

from virtbackup.contracts.v1.config import NotificationMatcher, NtfySettings
from virtbackup.contracts.v1.webhooks import Notification


def _field_matches(spec: str, fields: dict[str, str]) -> bool:
    kind, _, rest = spec.partition(":")
    name, _, value = rest.partition("=")
    actual = fields.get(name, "")
    if kind == "exact":
        return actual in value.split(",")
    return re.search(value, actual) is not None


def matcher_matches(matcher: NotificationMatcher, note: Notification) -> bool:
    """Whether ``matcher`` matches ``note`` (PBS's semantics: ``mode`` combines the
    severity match and each field match; a matcher without matches matches all)."""
    results: list[bool] = []
    if matcher.match_severity:
        results.append(note.severity in matcher.match_severity)
    results += [_field_matches(spec, note.fields) for spec in matcher.match_field]
    if not results:
        matched = True
    elif matcher.mode == "all":
        matched = all(results)
    else:
        matched = any(results)
    return matched != matcher.invert_match


def should_notify(settings: NtfySettings, note: Notification) -> bool:
    """True when ntfy is configured (a topic) and a matcher matches ``note``; with no
    matchers, ``error`` notifications (failed jobs and schedule runs) are sent."""
    if not settings.topic:
        return False
    if not settings.matchers:
        return note.severity == "error"
    return any(matcher_matches(m, note) for m in settings.matchers)


class NtfyError(Exception):
    """ntfy did not take the notification; ``status_code`` is its answer (None: none)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


async def publish(
    client: httpx.AsyncClient,
    settings: NtfySettings,
    token: str,
    note: Notification,
    *,
    timeout: float = 10.0,
) -> int:
    """Publish ``note`` to ``settings``' server and topic; returns ntfy's status code.
    ``NtfyError`` for no topic, a non-2xx answer, or no answer within ``timeout``."""
    if not settings.topic:
        raise NtfyError("no ntfy topic is configured (ntfy.topic in the configuration)")
    url = f"{settings.server_url.rstrip('/')}/"
    body = {
        "topic": settings.topic,
        "title": note.title,
        "message": note.message,
        "priority": 4 if note.severity == "error" else 3,
        "tags": note.tags,
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = await client.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise NtfyError(f"ntfy at {settings.server_url} did not answer: {exc!r}") from None
    if not 200 <= resp.status_code < 300:
        raise NtfyError(
            f"ntfy answered {resp.status_code}: {resp.text[:200]}", status_code=resp.status_code
        )
    return resp.status_code
