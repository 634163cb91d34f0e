"""Where a request's credential is (both listeners); who it is and what it may do is
``identity_auth``'s."""

from __future__ import annotations

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
#: The WebSocket subprotocol the server selects (offered with the token's).
WS_SUBPROTOCOL = "virtbackup.v1"


def presented_credential(scope: Scope) -> str | None:
    """``Authorization: Bearer <credential>``, else ``x-agent-token``, else (a WebSocket
    upgrade) the subprotocol ``virtbackup.bearer.<credential>``; None without one."""
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
            protocol = _subprotocol_credential(value.decode("latin-1"))
    return bearer or agent or protocol


def _subprotocol_credential(header: str) -> str | None:
    """The token of ``virtbackup.bearer.<token>`` in a ``Sec-WebSocket-Protocol``
    header, offered beside ``virtbackup.v1`` (the protocol the server selects: a browser
    drops a connection whose server selected none of its offers); None for none, for
    one offered alone, and for two or more (which one would be meant?)."""
    offered = [p.strip() for p in header.split(",") if p.strip()]
    tokens = [p[len(TOKEN_SUBPROTOCOL) :] for p in offered if p.startswith(TOKEN_SUBPROTOCOL)]
    if len(tokens) != 1 or WS_SUBPROTOCOL not in offered:
        return None
    return tokens[0]


#: Query parameters that carry a credential: a WebSocket URL with one is refused.
_URL_CREDENTIALS = frozenset({"token", "access_token", "api_key", "apikey", "key", "bearer"})


def credential_in_url(scope: Scope) -> bool:
    """Whether the query string names a credential (refused on a WebSocket URL)."""
    query = scope.get("query_string", b"")
    if not query:
        return False
    names = {n.lower() for n, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)}
    return bool(names & _URL_CREDENTIALS)
