"""An HTTPS client of one context's gateway: certificate pinning, authentication (a
token, or a user's access token renewed with the refresh token) and the API's errors as
``ApiError`` (one readable line).

Only public routes are used: the agent and native API (``/servers``, ``/jobs``,
``/api/v1/...``), ``/events`` (SSE) and the identity API's ``/api/v1/admin/auth/*``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from virtbackup.cli.client.contexts import Contexts

#: Seconds before its expiry at which an access token is renewed.
RENEW_MARGIN = 60.0
_REFRESH_LOCK = threading.Lock()
LOGIN_PATH = "/api/v1/admin/auth/login"
REFRESH_PATH = "/api/v1/admin/auth/token/refresh"


class ApiError(Exception):
    """A request that failed: ``status`` (0 when no HTTP answer came) and the API's own
    message (``{"error": ...}``, ``{"detail": ...}`` or the body's text)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status else self.message


def host_port(url: str) -> tuple[str, int]:
    """The host and port of an ``https://`` URL (443 by default).

    Raises ``ApiError`` for another scheme or no host."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when it is no number in 0-65535
    except ValueError as exc:
        raise ApiError(0, f"the URL must be https://HOST[:PORT], not {url!r}: {exc}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ApiError(0, f"the URL must be https://HOST[:PORT], not {url!r}")
    return parts.hostname, port or 443


def fingerprint_of(pem: str) -> str:
    """SHA-256 of a PEM certificate's DER bytes, as ``AB:CD:...`` (95 characters)."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def server_certificate(url: str, timeout: float = 10.0) -> str:
    """The PEM certificate the server at ``url`` presents (not verified: for pinning).

    Raises ``ApiError`` when nothing answers TLS there."""
    host, port = host_port(url)
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise ApiError(0, f"cannot connect to {url}: {exc}") from exc


def error_message(resp: httpx.Response) -> str:
    """The API's message of a failed response, in one line."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip() or resp.reason_phrase
        return " ".join(text.split())[:500]
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("detail") or json.dumps(value)
            if isinstance(value, str) and value:
                return " ".join(value.split())
    return json.dumps(body)[:500]


def tls_context(ctx: dict[str, Any]) -> ssl.SSLContext:
    """The TLS settings of a context: its pinned certificate as the only trust anchor
    (host name not checked: the certificate itself is pinned), or its ``--cacert`` CA
    with the host name checked."""
    pem = ctx.get("cacert")
    if not isinstance(pem, str) or not pem:
        raise ApiError(0, "the context has no certificate: run `virtbackup login URL` again")
    context = ssl.create_default_context(cadata=pem)
    if ctx.get("fingerprint"):
        context.check_hostname = False
        # A self-signed leaf is its own trust anchor; accept it without CA bits.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def check_pin(url: str, ctx: dict[str, Any], name: str) -> None:
    """Refuse (``ApiError``) a server whose certificate is not the pinned one, naming
    both fingerprints."""
    pinned = ctx.get("fingerprint")
    if not pinned:
        return
    seen = fingerprint_of(server_certificate(url))
    if seen != pinned:
        raise ApiError(
            0,
            f"the certificate of {url} changed: it is now SHA-256 {seen}, but context "
            f"{name!r} pinned {pinned}; refusing to connect (if the change is expected, "
            f"run `virtbackup login {url} --name {name} --trust-new-cert`)",
        )


#: The HyperSDK listener's port by default (``VIRTBACKUP_HYPERSDK_PORT``).
HYPERSDK_PORT = 8080


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_hypersdk_url(url: str) -> str:
    """``url`` (without a final ``/``) if it can carry a credential: ``https://``, or
    ``http://`` to this machine only (the listener speaks plain HTTP and binds to
    loopback by default; a token sent in clear over a network could be read there).

    Raises ``ApiError`` naming ``--hypersdk-url`` otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - ValueError when it is no number in 0-65535
    except ValueError as exc:
        where = f"--hypersdk-url must be http(s)://HOST[:PORT], not {url!r}"
        raise ApiError(0, f"{where}: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ApiError(0, f"--hypersdk-url must be http(s)://HOST[:PORT], not {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        raise ApiError(0, f"--hypersdk-url is the listener's base URL only, not {url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ApiError(
            0,
            f"--hypersdk-url {url}: plain http to another host would send the token in "
            "clear; use https:// (a TLS proxy in front of the listener) or a tunnel "
            f"(ssh -L {HYPERSDK_PORT}:127.0.0.1:{HYPERSDK_PORT} HOST, then "
            f"http://127.0.0.1:{HYPERSDK_PORT})",
        )
    return url.rstrip("/")


def hypersdk_endpoint(ctx: dict[str, Any]) -> dict[str, Any]:
    """Where a context's HyperSDK listener is, as ``Api(endpoint=...)`` takes it: the
    ``hypersdkUrl`` given at login (its certificate pinned in ``hypersdkFingerprint``,
    or the ``--cacert`` CA).

    There is no default: a guessed ``http://HOST:8080`` is not authenticated, and on
    this machine any process may listen there (another system's listener, or anyone's
    program), so the context's token would be sent in clear to whoever that is.

    Raises ``ApiError`` when the context has none."""
    url = ctx.get("hypersdkUrl")
    if not url:
        raise ApiError(
            0,
            "this context has no HyperSDK URL: run `virtbackup login ... --hypersdk-url URL` again",
        )
    out: dict[str, Any] = {"url": check_hypersdk_url(str(url))}
    for key, field in (("fingerprint", "hypersdkFingerprint"), ("cacert", "hypersdkCacert")):
        if ctx.get(field):
            out[key] = ctx[field]
    return out


class Api:
    """Requests to the gateway of one stored context; renews a user's access token
    (and saves the new tokens) when it is about to expire or a request gets a 401."""

    def __init__(
        self,
        store: Contexts,
        name: str,
        ctx: dict[str, Any],
        timeout: float = 60.0,
        *,
        pin_checked: bool = False,
        endpoint: dict[str, Any] | None = None,
        via: Api | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.ctx = ctx
        #: Where requests go, and the certificate trusted there (``url``, ``cacert``,
        #: ``fingerprint``): the context's own, or another listener's (``hypersdk``).
        where = endpoint if endpoint is not None else ctx
        self.url = str(where["url"]).rstrip("/")
        #: The client of the main listener, which renews this one's access token.
        self._via = via
        if not pin_checked:
            check_pin(self.url, where, name)
        verify: ssl.SSLContext | bool = True
        if self.url.startswith("https://"):
            verify = tls_context(where)
        self.client = httpx.Client(base_url=self.url, verify=verify, timeout=timeout)
        #: The socket of the open ``events()`` stream, for ``interrupt()``.
        self._stream_socket: socket.socket | None = None

    def clone(self) -> Api:
        """Another client of the same context (its own connections: for a thread)."""
        return Api(self.store, self.name, self.ctx, pin_checked=True)

    def hypersdk(self) -> Api:
        """A client of the context's HyperSDK listener (``hypersdk_endpoint``), with the
        same credentials; its access token is renewed through this client.

        Raises ``ApiError`` when the context has no HyperSDK URL, or its certificate
        is not the pinned one."""
        return Api(self.store, self.name, self.ctx, endpoint=hypersdk_endpoint(self.ctx), via=self)

    def close(self) -> None:
        self.client.close()

    def interrupt(self) -> None:
        """End the open ``events()`` stream from another thread: its socket is shut down
        (the reading thread then gets an end of stream), never closed here. Closing frees
        the descriptor, which the next connection of this process may get while the
        reader still reads it: its bytes would be taken from that other TLS connection."""
        sock = self._stream_socket
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, not TLS's

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- authentication ---------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self.ctx.get("token")
        if isinstance(token, str) and token:
            return {"Authorization": f"Bearer {token}"}
        if float(self.ctx.get("expiresAt") or 0) - RENEW_MARGIN < time.time():
            self.refresh()
        return {"Authorization": f"Bearer {self.ctx.get('accessToken', '')}"}

    def refresh(self) -> None:
        """New access and refresh tokens from the stored refresh token (one use each),
        saved at once. Raises ``ApiError`` when the session ended (log in again)."""
        if self._via is not None:  # the refresh route is the main listener's
            self._via.refresh()
            return
        used = self.ctx.get("refreshToken")
        with _REFRESH_LOCK:  # one use per refresh token: one thread renews, the rest reuse
            if self.ctx.get("refreshToken") == used:
                self._refresh()

    def _refresh(self) -> None:
        refresh = self.ctx.get("refreshToken")
        if not refresh:
            raise ApiError(401, f"context {self.name!r} has no login: run `virtbackup login`")
        try:
            resp = self.client.post(REFRESH_PATH, json={"refresh_token": refresh})
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.url}: {exc}") from exc
        if resp.status_code != 200:
            raise ApiError(
                resp.status_code,
                f"the session expired ({error_message(resp)}): run `virtbackup login "
                f"{self.url} --user {self.ctx.get('user', 'NAME')} --name {self.name}`",
            )
        store_tokens(self.ctx, resp.json())
        self.store.contexts[self.name] = self.ctx
        self.store.save()

    # -- requests ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        raw: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer (the text with ``raw``) of a 2xx response.

        Raises ``ApiError`` with the API's message for any other status, and for a
        server that cannot be reached."""
        return self._decoded(self.send(method, path, json_body, params, headers), raw)

    def send(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """The 2xx response to a request (``headers`` sent besides the credential).

        Raises ``ApiError`` with the API's message for any other status, and for a
        server that cannot be reached."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in (1, 2):
            try:
                resp = self.client.request(
                    method,
                    path,
                    json=json_body,
                    params=query,
                    headers={**(headers or {}), **self._headers()},
                )
            except httpx.TransportError as exc:
                # A kept-alive connection the server dropped: a read is safe to send again.
                if method == "GET" and attempt == 1:
                    continue
                raise ApiError(0, f"cannot reach {self.url}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise ApiError(0, f"cannot reach {self.url}: {exc}") from exc
            if resp.status_code == 401 and attempt == 1 and not self.ctx.get("token"):
                self.refresh()
                continue
            break
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, error_message(resp))
        return resp

    @staticmethod
    def _decoded(resp: httpx.Response, raw: bool = False) -> Any:
        if raw:
            return resp.text
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json_body=body)

    def events(self, read_timeout: float = 30.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event, data)`` of each message of ``/events`` (SSE) as it arrives; data that
        is not JSON comes as ``{"text": ...}``. Ends when the server closes the stream;
        ``httpx.ReadTimeout`` after ``read_timeout`` s without a byte (keep-alives count)."""
        timeout = httpx.Timeout(10.0, read=read_timeout)
        with self.client.stream("GET", "/events", headers=self._headers(), timeout=timeout) as resp:
            if resp.status_code != 200:
                resp.read()
                raise ApiError(resp.status_code, error_message(resp))
            stream = resp.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            self._stream_socket = sock if isinstance(sock, socket.socket) else None
            event, data = "message", list[str]()
            for line in resp.iter_lines():
                if not line:
                    if data:
                        text = "\n".join(data)
                        try:
                            decoded = json.loads(text)
                        except ValueError:
                            decoded = {"text": text}
                        yield event, decoded if isinstance(decoded, dict) else {"value": decoded}
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())


def store_tokens(ctx: dict[str, Any], answer: dict[str, Any]) -> None:
    """Put a login's or refresh's tokens into ``ctx`` (``expiresAt`` from ``expires_in``)."""
    ctx["accessToken"] = answer["access_token"]
    ctx["refreshToken"] = answer["refresh_token"]
    ctx["expiresAt"] = time.time() + float(answer.get("expires_in") or 900)
    ctx.pop("token", None)
