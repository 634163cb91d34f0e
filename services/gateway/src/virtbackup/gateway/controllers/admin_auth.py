"""Sessions (agents-backend-api.md, ``/api/v1/admin/auth``).

* ``POST /login`` ``{"username", "password"}`` (the document's ``captcha_id`` and
  ``captcha_code`` are accepted and ignored: logins are rate-limited instead, and
  ``GET /captcha`` is not served): 200 ``{"access_token", "token_type": "Bearer",
  "expires_in", "refresh_token", "user": {"id", "username", "nickname"}}``. The access
  token is a JWT (HS256) living ``VIRTBACKUP_ACCESS_TOKEN_SECONDS``; the refresh token
  (a JWT of ``typ`` ``refresh``) lives ``VIRTBACKUP_REFRESH_TOKEN_SECONDS`` and is good
  for one use. 401 for a wrong name or password; 429 with ``Retry-After`` (seconds)
  while the user name or the client address is locked out
  (``VIRTBACKUP_LOGIN_MAX_FAILURES`` / ``..._ADDRESS_MAX_FAILURES`` failures within
  ``VIRTBACKUP_LOGIN_FAILURE_WINDOW`` seconds), even with the right password. Every
  attempt is in the login log.
* ``POST /token/refresh`` ``{"refresh_token"}``: the same answer with a new pair; the
  refresh token used is spent. Presenting a spent one again revokes its session (the
  whole family, and the access tokens of that session): 401, logged.
* ``POST /logout`` (with the access token): revokes its session, so that its access
  token and refresh token are refused from then on. 400 for a credential that is no
  session (the agent token, an API token).
Errors are ``{"detail", "code"}``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post

from virtbackup.gateway.bodies import NoBody, SnakeBody
from virtbackup.gateway.errors import problem
from virtbackup.gateway.identity_auth import InvalidToken, decode, identity_of, issue
from virtbackup.gateway.identity_store import IdentityStore, SessionRecord, UserRecord
from virtbackup.gateway.login_log import LoginLog
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest, Unavailable

Text = Annotated[str, msgspec.Meta(max_length=1024)]


class LoginBody(SnakeBody, kw_only=True):
    username: Annotated[str, msgspec.Meta(max_length=128)]
    password: Annotated[str, msgspec.Meta(max_length=1024)]
    captcha_id: Text = ""
    captcha_code: Text = ""


class RefreshBody(SnakeBody, kw_only=True):
    refresh_token: Annotated[str, msgspec.Meta(max_length=4096)]


def stores(gw: Gateway) -> tuple[IdentityStore, LoginLog]:
    if gw.identity is None or gw.login_log is None:
        raise Unavailable("users and sessions are not available on this gateway")
    return gw.identity, gw.login_log


def client(request: Request[Any, Any, Any]) -> tuple[str, str]:
    """The client's address and user agent, as the login log records them."""
    address = request.client.host if request.client else ""
    return address, request.headers.get("user-agent", "")


async def session_answer(
    gw: Gateway, store: IdentityStore, user: UserRecord, session: SessionRecord
) -> dict[str, Any]:
    key = await store.jwt_key()
    lifetime = gw.settings.access_token_seconds
    access = issue(key, typ="access", sub=user.id, sid=session.id, lifetime=lifetime)
    refresh = issue(
        key,
        typ="refresh",
        sub=user.id,
        sid=session.id,
        lifetime=max(1.0, session.expires_at - time.time()),
        jti=session.refresh_jti,
    )
    return {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": lifetime,
        "refresh_token": refresh,
        "user": {"id": user.id, "username": user.username, "nickname": user.nickname},
    }


class AdminAuthController(Controller):
    path = "/api/v1/admin/auth"

    @post("/login", status_code=200)
    async def login(
        self, gw: Gateway, data: LoginBody, request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]]:
        """Log in with a user name and password (see module)."""
        store, book = stores(gw)
        settings = gw.settings
        address, agent = client(request)
        window = settings.login_failure_window
        name_key = data.username.lower()

        async def refuse(status: int, reason: str, detail: str, **headers: str) -> Response[Any]:
            await book.record(
                username=data.username,
                address=address,
                status="failure",
                reason=reason,
                user_agent=agent,
            )
            return problem(status, detail, headers=headers or None)

        # Each attempt counts as a failure before its password is checked (and is taken
        # back if it was right): attempts sent at once cannot all slip under the limit.
        claimed: list[tuple[str, str, float]] = []
        for kind, subject, limit in (
            ("user", name_key, settings.login_max_failures),
            ("addr", address, settings.login_address_max_failures),
        ):
            stamp, failures = await store.claim_attempt(kind, subject, window, limit)
            if stamp is None:
                for taken in claimed:
                    await store.release_attempt(*taken)
                who = "this user name" if kind == "user" else "this address"
                if len(failures) < limit:  # others changed the record on every try
                    return await refuse(
                        429,
                        f"too many concurrent logins of {who}",
                        f"too many concurrent logins of {who}; try again in 1 s",
                        **{"Retry-After": "1"},
                    )
                retry = max(1, int(min(failures) + window - time.time()) + 1)
                return await refuse(
                    429,
                    f"locked out: {len(failures)} failed logins of {who}",
                    f"too many failed logins of {who}; try again in {retry} s",
                    **{"Retry-After": str(retry)},
                )
            claimed.append((kind, subject, stamp))
        user = await store.verify(data.username, data.password)
        if user is None:  # the attempts claimed above stay as the failures
            return await refuse(401, "wrong user name or password", "wrong user name or password")
        for taken in claimed:
            await store.release_attempt(*taken)
        if not user.enabled:
            return await refuse(401, "user disabled", "this user is disabled")
        await store.clear_failures("user", name_key)
        session = await store.create_session(user.id, settings.refresh_token_seconds)
        answer = await session_answer(gw, store, user, session)
        await book.record(
            username=user.username,
            address=address,
            status="success",
            reason="password",
            user_agent=agent,
        )
        return Response(answer, headers={"cache-control": "no-store"})

    @post("/token/refresh", status_code=200)
    async def refresh(
        self, gw: Gateway, data: RefreshBody, request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]]:
        """Trade a refresh token for a new access and refresh token (see module)."""
        store, book = stores(gw)
        address, agent = client(request)

        async def refuse(username: str, reason: str) -> Response[Any]:
            await book.record(
                username=username,
                address=address,
                status="failure",
                reason=reason,
                user_agent=agent,
                kind="refresh",
            )
            return problem(401, f"refresh refused: {reason}")

        try:
            claims = decode(await store.jwt_key(), data.refresh_token, "refresh")
        except InvalidToken as exc:
            return await refuse("", f"invalid refresh token ({exc})")
        user = await store.get_user(int(claims["sub"]))
        username = user.username if user is not None else ""
        session, why = await store.rotate(claims["sid"], claims["jti"])
        if session is None:
            return await refuse(username, why)
        if user is None or not user.enabled or session.user_id != user.id:
            await store.revoke_session(session.id, "user removed or disabled")
            return await refuse(username, "user removed or disabled")
        answer = await session_answer(gw, store, user, session)
        return Response(answer, headers={"cache-control": "no-store"})

    @post("/logout", status_code=200)
    async def logout(
        self, gw: Gateway, request: Request[Any, Any, Any], data: NoBody | None = None
    ) -> dict[str, bool]:
        """End the session of the access token presented (its refresh family too)."""
        store, _ = stores(gw)
        identity = identity_of(request.scope)
        if identity.kind != "user":
            raise BadRequest(
                "logout ends a user's session: this credential is none (the agent token"
                " and API tokens are not sessions; delete an API token instead)"
            )
        await store.revoke_session(identity.session_id, "logged out")
        return {"success": True}
