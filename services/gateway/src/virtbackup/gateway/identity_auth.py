"""Authentication and authorisation of every request of every listener (ASGI).

Credentials (``Authorization: Bearer``, ``x-agent-token``, or on a WebSocket upgrade
the subprotocol ``virtbackup.bearer.<credential>``; see ``auth``):

* the installation's agent token: the built-in administrator, actor ``token``;
* a user's access token (a JWT from ``POST /api/v1/admin/auth/login``, HS256 with the
  installation's key, ``typ`` ``access``, its session not revoked, its user enabled):
  actor the user name, the permissions of the user's roles;
* an API token (``vbt_...``): actor ``token:<name>@<user>``, the token's permissions
  that its user still has;
* a remote agent's ``bak_`` key is ``agent_auth.AgentKeyAuth``'s (in front of this),
  which opens the agent routes only; anywhere else it is refused here like any other
  unknown credential.

Then the route's permission (``identity_perms.required_permission``: a rule table,
admin-only for any route it does not name) decides: 401 ``{"error":"unauthorized"}``
without a valid credential (``{"detail", "code"}`` under ``/api/v1/admin`` and
``/api/v1/task``), 403 naming the permission wanted for a known identity without it.
A WebSocket is closed before it is accepted (4401, 4403). ``POST`` of
``/api/v1/admin/auth/login`` and ``/token/refresh`` take no header: their body is the
credential (checked by the handlers, which log every attempt); nor do ``GET`` of
``/api/v1/admin/oauth2/<provider>/authorize`` and ``/callback`` (a browser's redirects).

What passes on carries the identity in the ASGI scope: :data:`ACTOR_KEY` (str),
:data:`PERMISSIONS_KEY` (frozenset of permission names) and :data:`IDENTITY_KEY`
(:class:`Identity`), for the handlers and the operation log.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import jwt

from virtbackup.gateway.auth import (
    UNAUTHORIZED,
    ASGIApp,
    Receive,
    Scope,
    Send,
    credential_in_url,
    presented_credential,
)
from virtbackup.gateway.errors import detail_code_family, error_body
from virtbackup.gateway.identity_perms import (
    ALL_PERMISSIONS,
    Listener,
    allows,
    required_permission,
)
from virtbackup.gateway.identity_store import (
    API_TOKEN_PREFIX,
    IdentityStore,
    UserRecord,
)

log = logging.getLogger(__name__)

ACTOR_KEY: Final = "virtbackup.actor"
PERMISSIONS_KEY: Final = "virtbackup.permissions"
IDENTITY_KEY: Final = "virtbackup.identity"
#: Routes whose credential is their body (login, refresh): no header needed.
PUBLIC: Final = frozenset(
    {("POST", "/api/v1/admin/auth/login"), ("POST", "/api/v1/admin/auth/token/refresh")}
)
#: OAuth2 login: the browser comes without a credential (``oauth2_login``).
PUBLIC_GET: Final = re.compile(r"^/api/v1/admin/oauth2/[^/]+/(authorize|callback)$")
#: Where a refusal of a known identity (403) is put for :func:`answer_refusal`:
#: ``(status, message)``.
REFUSAL_KEY: Final = "virtbackup.refusal"
#: An async callable in the scope of an allowed request: whether its credential still
#: proves an identity allowed the route (:func:`still_allowed`).
RECHECK_KEY: Final = "virtbackup.recheck"
#: How often a stream (``/events``, ``/ws``) asks :func:`still_allowed`, in seconds.
RECHECK_SECONDS: Final = 5.0
ISSUER: Final = "virtbackup"
ALGORITHM: Final = "HS256"


@dataclass(frozen=True)
class Identity:
    """Who a request comes from.

    ``kind``: ``installation`` (the agent token), ``user`` (an access token), ``token``
    (an API token) or ``anonymous`` (login, refresh)."""

    actor: str
    permissions: frozenset[str]
    kind: str
    user_id: int | None = None
    username: str = ""
    session_id: str = ""
    token_id: str = ""


INSTALLATION: Final = Identity(actor="token", permissions=ALL_PERMISSIONS, kind="installation")
ANONYMOUS: Final = Identity(actor="anonymous", permissions=frozenset(), kind="anonymous")


class InvalidToken(Exception):
    """A JWT that is not one of ours, expired, of the wrong type, or unreadable."""


def issue(key: bytes, *, typ: str, sub: int, sid: str, lifetime: float, jti: str = "") -> str:
    """A JWT (HS256) with ``iss``, ``sub`` (the user id), ``sid`` (the session), ``jti``,
    ``typ`` (``access`` or ``refresh``), ``iat`` and ``exp`` (``lifetime`` seconds)."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": str(sub),
        "sid": sid,
        "jti": jti or uuid.uuid4().hex,
        "typ": typ,
        "iat": now,
        "exp": now + int(lifetime),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def decode(key: bytes, token: str, typ: str) -> dict[str, Any]:
    """The claims of ``token`` when it is a JWT signed with ``key`` by HS256 (``alg:
    none`` and any other algorithm refused), not expired, issued here, of type ``typ``.
    ``InvalidToken`` otherwise."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "jti", "typ", "sid", "iss"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from None
    if claims.get("typ") != typ:
        raise InvalidToken(f"not an {typ} token")
    if not str(claims.get("sub", "")).isdigit() or not isinstance(claims.get("sid"), str):
        raise InvalidToken("malformed claims")
    return claims


async def _answer(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _json(value: dict[str, str]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class IdentityAuth:
    """ASGI middleware: who the request comes from, and whether it may (see module)."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        store: IdentityStore | None,
        listener: Listener,
        *,
        refused: ASGIApp | None = None,
    ) -> None:
        """``refused``: the ASGI app that answers an HTTP request of a known identity
        without the permission (:func:`answer_refusal` by default); the listeners pass
        it through their operation log, so that such attempts are recorded."""
        self.app = app
        self.token = token.encode()
        self.store = store
        self.listener = listener
        self.refused: ASGIApp = refused or answer_refusal

    async def identify(self, presented: str | None) -> Identity | None:
        """The identity ``presented`` proves, or None."""
        if not presented:
            return None
        if hmac.compare_digest(presented.encode(), self.token):
            return INSTALLATION
        if self.store is None:
            return None
        if presented.startswith(API_TOKEN_PREFIX):
            record = await self.store.authenticate_token(presented)
            if record is None:
                return None
            user = await self.store.get_user(record.user_id)
            if user is None or not user.enabled:
                return None
            perms = frozenset(record.permissions) & await self.store.permissions_of(user)
            return Identity(
                actor=f"token:{record.name}@{user.username}",
                permissions=perms,
                kind="token",
                user_id=user.id,
                username=user.username,
                token_id=record.id,
            )
        if presented.count(".") != 2:
            return None
        return await self.user_identity(presented)

    async def user_identity(self, access_token: str) -> Identity | None:
        """The identity of a valid access token (its session live, its user enabled)."""
        assert self.store is not None
        try:
            claims = decode(await self.store.jwt_key(), access_token, "access")
        except InvalidToken:
            return None
        session = await self.store.get_session(claims["sid"])
        if session is None or session.revoked or session.user_id != int(claims["sub"]):
            return None
        user: UserRecord | None = await self.store.get_user(session.user_id)
        if user is None or not user.enabled:
            return None
        return Identity(
            actor=user.username,
            permissions=await self.store.permissions_of(user),
            kind="user",
            user_id=user.id,
            username=user.username,
            session_id=session.id,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        if scope["type"] == "http" and (
            (method, path) in PUBLIC or (method == "GET" and PUBLIC_GET.match(path))
        ):
            self._carry(scope, ANONYMOUS)
            await self.app(scope, receive, send)
            return
        presented = presented_credential(scope)
        if scope["type"] == "websocket" and credential_in_url(scope):
            presented = None  # a token in a URL ends up in logs: refused even beside a good one
        try:
            identity = await self.identify(presented)
        except Exception as exc:  # the bucket cannot be read (the bus is away)
            log.warning("could not authenticate a request: %r", exc)
            await self._refuse(
                scope, send, 503, "authentication is unavailable (the bus); try again"
            )
            return
        if identity is None:
            await self._refuse(scope, send, 401, "unauthorized")
            return
        wanted = required_permission(self.listener, method, path)
        if not allows(identity.permissions, wanted):
            what = "administrators only" if wanted == "*" else f"permission {wanted}"
            message = f"forbidden: {method} {path[:200]} needs {what}"
            if scope["type"] == "http":  # an attempt of a known identity: recorded
                self._carry(scope, identity)
                scope[REFUSAL_KEY] = (403, message)
                await self.refused(scope, receive, send)
                return
            await self._refuse(scope, send, 403, message)
            return
        self._carry(scope, identity)

        async def recheck() -> bool:
            try:
                again = await self.identify(presented)
            except Exception:  # the bus is away: no new answer, the one at opening holds
                return True
            return again is not None and allows(again.permissions, wanted)

        scope[RECHECK_KEY] = recheck
        await self.app(scope, receive, send)

    @staticmethod
    def _carry(scope: Scope, identity: Identity) -> None:
        scope[ACTOR_KEY] = identity.actor
        scope[PERMISSIONS_KEY] = identity.permissions
        scope[IDENTITY_KEY] = identity

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
        if scope["type"] == "websocket":
            close = {401: 4401, 403: 4403}.get(status, 1013)  # 1013: try again later
            await send({"type": "websocket.close", "code": close, "reason": message[:120]})
            return
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        if detail_code_family(scope.get("path", "")):
            body = _json(error_body(scope.get("path", ""), status, message))
        else:
            body = UNAUTHORIZED if status == 401 else _json({"error": message})
        await _answer(send, status, body, extra)


async def still_allowed(scope: Any) -> bool:
    """Whether the credential that opened this request still proves an identity allowed
    its route: False once its session is logged out, its user disabled or removed, its
    API token revoked or expired, or the permission taken away. Streams (``/events``,
    ``/ws``) ask every :data:`RECHECK_SECONDS` and end on False. True for a request that
    came without this middleware's check (a remote agent's ``bak_`` key)."""
    check = scope.get(RECHECK_KEY)
    if check is None:
        return True
    allowed: bool = await check()
    return allowed


async def answer_refusal(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI app: the refusal :class:`IdentityAuth` put in the scope (:data:`REFUSAL_KEY`),
    in the path's error format."""
    status, message = scope[REFUSAL_KEY]
    await IdentityAuth._refuse(scope, send, status, message)


def identity_of(scope: Any) -> Identity:
    """The identity the middleware found for this request (``ANONYMOUS`` if none)."""
    found = scope.get(IDENTITY_KEY)
    return found if isinstance(found, Identity) else ANONYMOUS
