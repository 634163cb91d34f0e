"""The web console under ``/ui`` (ASGI, in front of authentication) and its cookie session.

The console is static HTML, CSS and small JavaScript modules (``console_files/``, no
build step): its pages call the public API from the browser, as any client would. This
module adds only what a browser needs to do that safely:

* ``POST /ui/session`` ``{"username", "password"}`` (logged in through the identity API's
  own route ``POST /api/v1/admin/auth/login``, called through the whole application) or
  ``{"token"}`` (the agent token or an API token): 200 ``{"actor", "kind",
  "permissions"}`` and three cookies, all ``Secure; SameSite=Strict``:
  ``vb_session`` (the credential, ``HttpOnly``, path ``/``), ``vb_refresh`` (a user's
  refresh token, ``HttpOnly``, path ``/ui/session``) and ``vb_csrf`` (random, readable by
  the page). 400 ``{"error", "field"}`` for a body that is not one of those shapes, 401
  ``{"error", "field"}`` for a wrong credential, 429 (with ``Retry-After``) while locked
  out. Nothing is set on a refusal. A wrong token is in the login log like a wrong
  password (user name empty, reason ``wrong token``, the client's address and user
  agent; never the token), stored before the 401 (503 when it cannot be). The body
  must be declared ``application/json`` (else 415): a form of another site can post
  ``text/plain`` without a CORS preflight, and would log the victim's browser in as the
  sender's own account (login CSRF).
* ``GET /ui/session``: who the cookie is, 401 without a valid one.
* ``POST /ui/session/refresh``: a new pair from ``vb_refresh`` (the identity API's
  ``/token/refresh``), 401 when it is refused.
* ``DELETE /ui/session``: ends a user's session (the identity API's ``/logout``) and
  clears the cookies; 200 ``{"success": true}``.
* Any other request that carries no ``Authorization`` or ``x-agent-token`` header but a
  ``vb_session`` cookie is passed on with that credential as ``Authorization: Bearer``,
  so the same authentication, permissions and operation log apply. A method other than
  ``GET``, ``HEAD`` or ``OPTIONS`` sent that way (and ``POST``/``DELETE`` of
  ``/ui/session...``) must carry the header ``x-csrf-token`` equal to the ``vb_csrf``
  cookie (double submit), else 403 ``{"error"}``: a form of another site can neither
  read that cookie nor, with ``SameSite=Strict``, send ours.
* ``GET /ui/login`` and ``/ui/static/<file>`` are served to anyone (code, no data);
  the pages (``/ui/``, ``/ui/vm``, ``/ui/jobs``, ``/ui/destinations``, ``/ui/servers``,
  ``/ui/schedules``, ``/ui/webhooks``, ``/ui/agents``, ``/ui/users``, ``/ui/audit``) only
  with a valid session, else a redirect (303) to ``/ui/login``.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, Final

from virtbackup.gateway.auth import ASGIApp, Message, Receive, Scope, Send, presented_credential
from virtbackup.gateway.identity_auth import IdentityAuth
from virtbackup.gateway.login_log import LoginLog
from virtbackup.runtime.errors import Unavailable

FILES: Final = Path(__file__).with_name("console_files")
SESSION_COOKIE: Final = "vb_session"
REFRESH_COOKIE: Final = "vb_refresh"
CSRF_COOKIE: Final = "vb_csrf"
CSRF_HEADER: Final = b"x-csrf-token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: The pages (path below ``/ui``) that need a session; each is the same shell.
PAGES: Final = frozenset(
    {"/ui/", "/ui/vm", "/ui/jobs", "/ui/destinations"}
    | {f"/ui/{name}" for name in ("servers", "schedules", "webhooks", "agents", "users", "audit")}
)
MAX_BODY: Final = 16 * 1024
_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
}
#: Static files by name, read once: nothing outside ``console_files/static`` is served.
STATIC: Final = {
    p.name: p for p in (FILES / "static").iterdir() if p.is_file() and p.suffix in _TYPES
}
_SECURITY_HEADERS: Final = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none';"
        b" base-uri 'none'; form-action 'self'",
    ),
]


def cookies_of(scope: Scope) -> dict[str, str]:
    """The request's cookies by name (an unreadable ``Cookie`` header counts as none)."""
    jar: SimpleCookie = SimpleCookie()
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:
                return {}
    return {key: morsel.value for key, morsel in jar.items()}


def declared_json(scope: Scope) -> bool:
    """Whether the request's ``Content-Type`` is JSON (``application/json``, parameters
    such as ``; charset=utf-8`` allowed): a type a cross-site form cannot send."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            kind: str = value.decode("latin-1").split(";", 1)[0].strip().lower()
            return kind == "application/json"
    return False


def set_cookie(name: str, value: str, *, path: str = "/", http_only: bool = True) -> bytes:
    """A ``Set-Cookie`` value: ``Secure; SameSite=Strict``, a browser session's life;
    an empty ``value`` clears the cookie."""
    parts = [f"{name}={value}", f"Path={path}", "Secure", "SameSite=Strict"]
    if http_only:
        parts.append("HttpOnly")
    if not value:
        parts.append("Max-Age=0")
    return "; ".join(parts).encode()


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *_SECURITY_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def read_body(receive: Receive, limit: int = MAX_BODY) -> bytes | None:
    """The request body, or None past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def call(
    app: ASGIApp,
    like: Scope,
    method: str,
    path: str,
    body: Any = None,
    bearer: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """Send one request through ``app`` (the whole API: authentication, permissions,
    operation log) as the client of ``like`` did; its status, headers and JSON body."""
    raw = b"" if body is None else _json(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    headers += [(n, v) for n, v in like.get("headers", ()) if n in (b"user-agent", b"host")]
    if bearer:
        headers.append((b"authorization", f"Bearer {bearer}".encode("latin-1")))
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": like.get("scheme", "https"),
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": like.get("client"),
        "server": like.get("server"),
        "state": dict(like.get("state") or {}),
    }
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    status = 500
    answer_headers: dict[str, str] = {}
    parts: list[bytes] = []

    async def collect(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            for name, value in message.get("headers", ()):
                answer_headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, collect)
    try:
        decoded = json.loads(b"".join(parts) or b"null")
    except ValueError:
        decoded = None
    return status, answer_headers, decoded


def _message(answer: Any) -> str:
    if isinstance(answer, dict):
        for key in ("error", "detail", "msg"):
            if isinstance(answer.get(key), str):
                return str(answer[key])
    return "refused"


class Console:
    """ASGI: the console's pages and session in front of ``app`` (see module)."""

    def __init__(
        self,
        app: ASGIApp,
        auth: IdentityAuth,
        login_log: Callable[[], LoginLog | None] = lambda: None,
    ) -> None:
        """``app``: the whole API (authentication included); ``auth``: who a credential
        is, for the pages and ``GET /ui/session``; ``login_log``: the login log once the
        gateway has one (None before: a wrong token is then refused unrecorded)."""
        self.app = app
        self.auth = auth
        self.login_log = login_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        console = scope["type"] == "http" and (path == "/ui" or path.startswith("/ui/"))
        if console and await self.ui(scope, receive, send, path):
            return
        cookies = cookies_of(scope)
        credential = cookies.get(SESSION_COOKIE)
        if credential and presented_credential(scope) is None:
            method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
            if method not in SAFE_METHODS and not self.csrf_ok(scope, cookies):
                await self.refuse_csrf(scope, send)
                return
            scope = dict(scope)
            scope["headers"] = [
                *scope.get("headers", ()),
                (b"authorization", f"Bearer {credential}".encode("latin-1")),
            ]
        await self.app(scope, receive, send)

    @staticmethod
    def csrf_ok(scope: Scope, cookies: dict[str, str]) -> bool:
        expected = cookies.get(CSRF_COOKIE, "")
        for name, value in scope.get("headers", ()):
            if name == CSRF_HEADER and expected:
                return hmac.compare_digest(value.decode("latin-1").encode(), expected.encode())
        return False

    @staticmethod
    async def refuse_csrf(scope: Scope, send: Send) -> None:
        message = "forbidden: a cookie session's change needs the x-csrf-token header"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4403, "reason": message})
            return
        await respond(send, 403, _json({"error": message}))

    async def identity(self, scope: Scope) -> Any:
        credential = cookies_of(scope).get(SESSION_COOKIE)
        try:
            return await self.auth.identify(credential)
        except Exception:  # the bus is away: no session can be proven now
            return None

    async def ui(self, scope: Scope, receive: Receive, send: Send, path: str) -> bool:
        """Answer a console request; False for any other path (then the API's
        authentication answers it: 401 without a credential, 404 with one)."""
        method = scope.get("method", "GET")
        if path == "/ui":
            await respond(send, 303, b"", b"text/plain", [(b"location", b"/ui/")])
        elif path.startswith("/ui/static/") and method == "GET":
            file = STATIC.get(path[len("/ui/static/") :])
            if file is None:
                return False
            await respond(send, 200, file.read_bytes(), _TYPES[file.suffix])
        elif path == "/ui/login" and method == "GET":
            await self.page(send, "login.html")
        elif path in PAGES and method == "GET":
            if await self.identity(scope) is None:
                await respond(send, 303, b"", b"text/plain", [(b"location", b"/ui/login")])
                return True
            await self.page(send, "app.html")
        elif path == "/ui/session":
            await self.session(scope, receive, send, method)
        elif path == "/ui/session/refresh" and method == "POST":
            await self.refresh(scope, send)
        else:
            return False
        return True

    @staticmethod
    async def page(send: Send, name: str) -> None:
        await respond(send, 200, (FILES / name).read_bytes(), _TYPES[".html"])

    async def session(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        if method == "GET":
            found = await self.identity(scope)
            if found is None:
                await respond(send, 401, _json({"error": "unauthorized"}))
                return
            await respond(send, 200, _json(self.describe(found)))
        elif method == "POST":
            await self.login(scope, receive, send)
        elif method == "DELETE":
            await self.logout(scope, send)
        else:
            await respond(send, 405, _json({"error": f"method not allowed: {method}"}))

    @staticmethod
    def describe(identity: Any) -> dict[str, Any]:
        return {
            "actor": identity.actor,
            "kind": identity.kind,
            "permissions": sorted(identity.permissions),
        }

    async def login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not declared_json(scope):
            refusal = "the body must be sent as content-type application/json"
            await respond(send, 415, _json({"error": refusal, "field": "body"}))
            return
        raw = await read_body(receive)
        if raw is None:
            await respond(send, 413, _json({"error": f"body over {MAX_BODY} bytes"}))
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict) or not (set(body) <= {"username", "password", "token"}):
            await self.bad(send, "a JSON object of username and password, or token", "body")
            return
        for key, value in body.items():
            if not isinstance(value, str):
                await self.bad(send, f"{key} must be a string", key)
                return
        if "token" in body:
            if set(body) != {"token"}:
                await self.bad(send, "give a token, or a user name and password", "token")
                return
            if not body["token"]:
                await self.bad(send, "token is empty", "token")
                return
            found = await self.auth.identify(body["token"])
            if found is None:
                if not await self.record_failure(scope, send, "wrong token"):
                    return
                await respond(send, 401, _json({"error": "unauthorized", "field": "token"}))
                return
            await self.start(send, found, body["token"], "")
            return
        for key in ("username", "password"):
            if not body.get(key):
                await self.bad(send, f"{key} is required", key)
                return
        status, headers, answer = await call(
            self.app,
            scope,
            "POST",
            "/api/v1/admin/auth/login",
            {"username": body["username"], "password": body["password"]},
        )
        if status != 200 or not isinstance(answer, dict):
            field = "username" if status == 429 else "password"
            extra = [(b"retry-after", headers["retry-after"].encode())] if status == 429 else []
            error = {"error": _message(answer), "field": field}
            await respond(send, status, _json(error), extra=extra)
            return
        found = await self.auth.identify(answer["access_token"])
        if found is None:
            await respond(send, 503, _json({"error": "the new session could not be read"}))
            return
        await self.start(send, found, answer["access_token"], answer["refresh_token"])

    async def record_failure(self, scope: Scope, send: Send, reason: str) -> bool:
        """Store a refused login of no known actor in the login log (``reason``, the
        client's address and user agent: never the credential); False, with a 503 sent,
        when it cannot be stored."""
        book = self.login_log()
        if book is None:
            return True
        client = scope.get("client")
        agent = next((v for k, v in scope.get("headers", ()) if k == b"user-agent"), b"")
        try:
            await book.record(
                username="",
                address=str(client[0]) if client else "",
                status="failure",
                reason=reason,
                user_agent=agent.decode("latin-1"),
            )
        except Unavailable as exc:
            await respond(send, 503, _json({"error": str(exc)}))
            return False
        return True

    @staticmethod
    async def bad(send: Send, message: str, field: str) -> None:
        await respond(send, 400, _json({"error": message, "field": field}))

    async def start(self, send: Send, identity: Any, credential: str, refresh: str) -> None:
        cookies = [
            (b"set-cookie", set_cookie(SESSION_COOKIE, credential)),
            (b"set-cookie", set_cookie(CSRF_COOKIE, secrets.token_urlsafe(32), http_only=False)),
        ]
        if refresh:
            cookies.append((b"set-cookie", set_cookie(REFRESH_COOKIE, refresh, path="/ui/session")))
        await respond(send, 200, _json(self.describe(identity)), extra=cookies)

    async def refresh(self, scope: Scope, send: Send) -> None:
        cookies = cookies_of(scope)
        if not self.csrf_ok(scope, cookies):
            await self.refuse_csrf(scope, send)
            return
        token = cookies.get(REFRESH_COOKIE, "")
        if not token:
            await respond(send, 401, _json({"error": "no refresh token: log in again"}))
            return
        status, _, answer = await call(
            self.app, scope, "POST", "/api/v1/admin/auth/token/refresh", {"refresh_token": token}
        )
        found = None
        if status == 200 and isinstance(answer, dict):
            found = await self.auth.identify(answer["access_token"])
        if found is None:
            await respond(send, 401, _json({"error": _message(answer)}))
            return
        await self.start(send, found, answer["access_token"], answer["refresh_token"])

    async def logout(self, scope: Scope, send: Send) -> None:
        cookies = cookies_of(scope)
        if not self.csrf_ok(scope, cookies):
            await self.refuse_csrf(scope, send)
            return
        credential = cookies.get(SESSION_COOKIE, "")
        found = await self.identity(scope)
        if found is not None and found.kind == "user":
            await call(self.app, scope, "POST", "/api/v1/admin/auth/logout", None, credential)
        cleared = [
            (b"set-cookie", set_cookie(SESSION_COOKIE, "")),
            (b"set-cookie", set_cookie(CSRF_COOKIE, "", http_only=False)),
            (b"set-cookie", set_cookie(REFRESH_COOKIE, "", path="/ui/session")),
        ]
        await respond(send, 200, _json({"success": True}), extra=cleared)
