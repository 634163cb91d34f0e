"""A stand-in OAuth2 / OpenID provider for tests: GitHub's and Google's login endpoints.

**This is neither GitHub nor Google.** Neither can be reached from where the tests run,
so the gateway's OAuth2 login is tested against this small HTTP server on loopback. It
serves the requests the gateway makes, under the same paths as the real providers:

- ``GET /login/oauth/authorize`` (GitHub) and ``GET /o/oauth2/v2/auth`` (Google) with
  ``client_id``, ``redirect_uri``, ``response_type=code`` (Google), ``scope`` and
  ``state``: the signed-in account (:attr:`FakeOAuthProvider.account`) consents at once,
  and the answer is a 302 to ``redirect_uri`` with a one-time ``code`` and the ``state``;
  a wrong client id is a 400.
- ``POST /login/oauth/access_token`` (GitHub; ``Accept: application/json``) and
  ``POST /token`` (Google), form-encoded ``code``, ``client_id``, ``client_secret``,
  ``redirect_uri``, ``grant_type=authorization_code``: ``{"access_token", ...}``; a
  code used twice, another ``redirect_uri`` or a wrong secret is a 400 / 401.
- ``GET /user``, ``GET /user/emails`` (GitHub) and ``GET /v1/userinfo`` (Google) with
  ``Authorization: Bearer``: the account (GitHub ``{"login", "id"}`` and
  ``[{"email", "primary", "verified"}]``; Google ``{"sub", "email", "email_verified"}``).

    with fake_oauth_provider(client_id="id", client_secret="secret") as provider:
        provider.account = {"email": "alice@example.com", "verified": True, "login": "alice"}
        # VIRTBACKUP_OAUTH2_GITHUB_BASE_URL=provider.base_url
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit


class FakeOAuthProvider:
    """The stand-in (see module); ``account`` is who signs in next."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.account: dict[str, Any] = {
            "email": "someone@example.com",
            "verified": True,
            "login": "someone",
        }
        self.codes: dict[str, tuple[str, dict[str, Any]]] = {}  # code -> (redirect, account)
        self.tokens: dict[str, dict[str, Any]] = {}
        self.exchanges = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        provider = self

        class Handler(_Handler):
            owner = provider

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOAuthProvider

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        owner = self.owner
        if url.path in ("/login/oauth/authorize", "/o/oauth2/v2/auth"):
            if query.get("client_id") != owner.client_id or not query.get("redirect_uri"):
                self._send(400, {"error": "invalid_request"})
                return
            code = secrets.token_urlsafe(16)
            owner.codes[code] = (query["redirect_uri"], dict(owner.account))
            target = (
                query["redirect_uri"]
                + "?"
                + urlencode({"code": code, "state": query.get("state", "")})
            )
            self._send(302, {}, {"location": target})
            return
        auth = self.headers.get("authorization", "")
        account = owner.tokens.get(auth.removeprefix("Bearer ").removeprefix("token "))
        if account is None:
            self._send(401, {"message": "Bad credentials"})
            return
        if url.path == "/user":
            self._send(200, {"login": account["login"], "id": 1000})
        elif url.path == "/user/emails":
            emails = [{"email": account["email"], "primary": True,
                       "verified": account["verified"]}]  # fmt: skip
            self._send(200, emails)
        elif url.path == "/v1/userinfo":
            info = {"sub": "1000", "email": account["email"],
                    "email_verified": account["verified"]}  # fmt: skip
            self._send(200, info)
        else:
            self._send(404, {"error": "not_found"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("content-length", "0"))
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        owner = self.owner
        if url.path not in ("/login/oauth/access_token", "/token"):
            self._send(404, {"error": "not_found"})
            return
        if form.get("client_id") != owner.client_id or not secrets.compare_digest(
            form.get("client_secret", ""), owner.client_secret
        ):
            self._send(401, {"error": "invalid_client"})
            return
        found = owner.codes.pop(form.get("code", ""), None)
        if found is None or found[0] != form.get("redirect_uri"):
            self._send(400, {"error": "invalid_grant"})
            return
        owner.exchanges += 1
        token = secrets.token_urlsafe(24)
        owner.tokens[token] = found[1]
        self._send(200, {"access_token": token, "token_type": "bearer", "expires_in": 3600})


@contextlib.contextmanager
def fake_oauth_provider(client_id: str, client_secret: str) -> Iterator[FakeOAuthProvider]:
    """A started stand-in provider (see module), closed on exit."""
    provider = FakeOAuthProvider(client_id, client_secret)
    provider.start()
    try:
        yield provider
    finally:
        provider.close()
