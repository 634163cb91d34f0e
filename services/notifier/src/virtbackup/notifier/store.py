"""Webhooks in ``VB_WEBHOOKS``: the list under one key (compare-and-swap), sealed secrets.

A webhook's ``secret`` and its credential-like header values are stored sealed with the
configuration's key (``runtime.sealing``: AES-256-GCM, ``vbsec:v1:...``), as the secrets
of the agent configuration are, so a reader of the bucket sees no secret.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.webhooks import (
    MAX_HEADERS,
    MAX_WEBHOOKS,
    NTFY_KEY,
    RESERVED_HEADERS,
    WEBHOOKS_KEY,
    DeliveryStatus,
    NtfyProjection,
    Webhook,
    WebhookAdd,
    is_credential_header,
)
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound
from virtbackup.runtime.kv import read_value
from virtbackup.runtime.sealing import SecretBox


def check_url(url: str, field: str = "url") -> str:
    """``url`` if it is an absolute http(s) URL with a host and no user or password in
    it; else ``BadRequest`` naming ``field``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise BadRequest(f"{field}: {shown(url)} is not a URL: {exc}") from None
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise BadRequest(f"{field}: {shown(url)} must be an http:// or https:// URL with a host")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise BadRequest(f"{field}: must not contain spaces or control characters")
    if parts.username is not None or parts.password is not None:
        # A URL is listed and logged as it is: a credential in it would be shown to anyone
        # who lists the webhooks. Headers and the secret are masked and sealed instead.
        raise BadRequest(
            f"{field}: must not carry a user or password (user:password@host): put a "
            "credential in headers (e.g. Authorization), which are masked and sealed"
        )
    return url


def check_add(add: Webhook | WebhookAdd) -> None:
    """``BadRequest`` naming the field for what the schema cannot say."""
    check_url(add.url)
    if len(add.headers) > MAX_HEADERS:
        raise BadRequest(f"headers: at most {MAX_HEADERS} headers")
    for name in add.headers:
        if name.lower() in RESERVED_HEADERS:
            raise BadRequest(f"headers: {name!r} is set by VirtBackup itself")
    if len(set(add.events)) != len(add.events):
        raise BadRequest("events: an event is named twice")


#: The most the stored list of webhooks may take (bytes of JSON): it is one value of
#: ``VB_WEBHOOKS`` and, as views, one reply of ``webhooks-list``, and a NATS message holds
#: at most 1 MiB by default. Without the bound an add past it failed as a 500
#: (``MaxPayloadError``).
MAX_WEBHOOKS_BYTES = 768 * 1024


class WebhookStore:
    """The webhooks, in order, and their last delivery status."""

    def __init__(self, bucket: Callable[[], KeyValue], box: SecretBox) -> None:
        """``bucket`` returns ``VB_WEBHOOKS`` (called on use: the notifier declares its
        commands before the bucket is provisioned)."""
        self._bucket = bucket
        self.box = box

    @property
    def kv(self) -> KeyValue:
        return self._bucket()

    def _seal(self, hook: Webhook) -> Webhook:
        return msgspec.structs.replace(
            hook,
            secret=self._sealed(hook.secret),
            headers={
                k: self._sealed(v) if is_credential_header(k) else v
                for k, v in hook.headers.items()
            },
        )

    def _sealed(self, value: str) -> str:
        if not value or self.box.is_sealed(value):
            return value
        return self.box.seal(value)

    def _open(self, hook: Webhook) -> Webhook:
        box = self.box
        return msgspec.structs.replace(
            hook,
            secret=box.open(hook.secret),
            headers={k: box.open(v) for k, v in hook.headers.items()},
        )

    async def _load(self) -> tuple[list[Webhook], int]:
        try:
            entry = await self.kv.get(WEBHOOKS_KEY)
        except KeyNotFoundError:
            return [], 0
        if entry.value is None:
            return [], entry.revision or 0
        return msgspec.json.decode(entry.value, type=list[Webhook]), entry.revision or 0

    async def all(self) -> list[Webhook]:
        """Every webhook, in order, secrets opened."""
        hooks, _ = await self._load()
        return [self._open(h) for h in hooks]

    async def _change(self, fn: Callable[[list[Webhook]], list[Webhook]]) -> None:
        for _ in range(10):
            hooks, revision = await self._load()
            changed = fn(hooks)
            new = msgspec.json.encode(changed)
            if len(new) > MAX_WEBHOOKS_BYTES and len(changed) > len(hooks):
                raise BadRequest(
                    f"headers: the webhooks would take {len(new)} bytes together, more than"
                    f" {MAX_WEBHOOKS_BYTES}: give this one fewer or shorter headers, or"
                    " delete some webhooks"
                )
            try:
                if revision:
                    await self.kv.update(WEBHOOKS_KEY, new, last=revision)
                else:
                    await self.kv.create(WEBHOOKS_KEY, new)
            except KeyWrongLastSequenceError:
                continue
            except Exception as exc:  # create raced with another create
                if type(exc).__name__ != "KeyWrongLastSequenceError":
                    raise
                continue
            return
        raise Conflict("the webhooks are being changed concurrently; try again")

    async def add(self, add: Webhook) -> Webhook:
        """Validate and append a webhook (its ``secret`` and header values sealed or in
        clear) under a new id; returns it (secrets opened). ``BadRequest``
        naming the field (also when the list would outgrow :data:`MAX_WEBHOOKS_BYTES`);
        nothing is stored unless it is valid."""
        check_add(add)
        if not add.events:
            raise BadRequest("events: name at least one event")
        hook = self._open(
            msgspec.structs.replace(add, id=uuid.uuid4().hex, created_at=utcnow_iso())
        )

        def append(hooks: list[Webhook]) -> list[Webhook]:
            if len(hooks) >= MAX_WEBHOOKS:
                raise BadRequest(f"at most {MAX_WEBHOOKS} webhooks")
            return [*hooks, self._seal(hook)]

        await self._change(append)
        return hook

    async def delete(self, index: int = -1, *, webhook_id: str = "") -> Webhook:
        """Remove the webhook whose id is ``webhook_id`` when that is given, else the one
        at ``index`` (0-based), in one change of the list (a concurrent change makes it
        look again); returns it (secrets opened). ``NotFound`` naming the id or index
        when there is none."""
        removed: list[Webhook] = []

        def drop(hooks: list[Webhook]) -> list[Webhook]:
            removed.clear()
            if webhook_id:
                at = next((i for i, h in enumerate(hooks) if h.id == webhook_id), -1)
                if at < 0:
                    raise NotFound(f"there is no webhook with the id {webhook_id}")
            elif 0 <= index < len(hooks):
                at = index
            else:
                raise NotFound(f"webhook index {index} out of range (there are {len(hooks)})")
            removed.append(hooks[at])
            return hooks[:at] + hooks[at + 1 :]

        await self._change(drop)
        await self.kv.delete(f"status.{removed[0].id}")
        return self._open(removed[0])

    async def ntfy(self) -> NtfyProjection:
        """The ntfy settings the gateway keeps here (defaults: none), token opened."""
        try:
            entry = await self.kv.get(NTFY_KEY)
        except KeyNotFoundError:
            return NtfyProjection()
        if entry.value is None:
            return NtfyProjection()
        return msgspec.json.decode(self.box.open_json(entry.value), type=NtfyProjection)

    async def status(self, webhook_id: str) -> DeliveryStatus | None:
        return await read_value(self.kv, f"status.{webhook_id}", DeliveryStatus)

    async def set_status(self, webhook_id: str, status: DeliveryStatus) -> None:
        await self.kv.put(f"status.{webhook_id}", msgspec.json.encode(status))
