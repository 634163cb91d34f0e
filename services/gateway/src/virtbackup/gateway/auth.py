"""Token authentication for every route, before anything else runs."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNAUTHORIZED = b'{"error":"unauthorized"}'


#: A WebSocket client that cannot set headers (a browser) offers its token as the
#: subprotocol ``virtbackup.bearer.<token>`` (the server never selects it, so the token
#: is not echoed); see ``hypersdk_ws``.
TOKEN_SUBPROTOCOL = "virtbackup.bearer."  # noqa: S105 (a prefix, not a secret)


def _presented_token(scope: Scope) -> str | None:
    bearer: str | None = None
    agent: str | None = None
    protocol: str | None = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                bearer = text[7:].strip()
        elif name == b"x-agent-token":
            agent = value.decode("latin-1").strip()
        elif name == b"sec-websocket-protocol" and scope["type"] == "websocket":
            for offered in value.decode("latin-1").split(","):
                offered = offered.strip()
                if offered.startswith(TOKEN_SUBPROTOCOL):
                    protocol = offered[len(TOKEN_SUBPROTOCOL) :]
    return bearer or agent or protocol


#: Query parameters that carry a credential: a WebSocket URL with one is refused.
_URL_CREDENTIALS = frozenset({"token", "access_token", "api_key", "apikey", "key", "bearer"})


def _credential_in_url(scope: Scope) -> bool:
    query = scope.get("query_string", b"")
    if not query:
        return False
    names = {n.lower() for n, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)}
    return bool(names & _URL_CREDENTIALS)


class TokenAuth:
    """ASGI middleware: ``Authorization: Bearer <token>`` or ``x-agent-token: <token>``
    (and, on a WebSocket upgrade, the subprotocol ``virtbackup.bearer.<token>``).

    Anything else gets 401 ``{"error":"unauthorized"}``; a WebSocket upgrade is refused
    before it is accepted (the server answers the upgrade with 403).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        presented = _presented_token(scope)
        if scope["type"] == "websocket" and _credential_in_url(scope):
            presented = None  # a token in a URL ends up in logs: refused even beside a good one
        if presented is not None and hmac.compare_digest(presented.encode(), self.token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401, "reason": "unauthorized"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(UNAUTHORIZED)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": UNAUTHORIZED})
