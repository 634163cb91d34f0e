"""A stand-in for Google Drive v3 and Google's OAuth token endpoint, on loopback, for tests.

**This is not Google.** No real Google service is reachable from where these tests run,
so the Drive driver is tested against this small HTTP server instead. It follows the
documented Drive v3 requests the driver makes, and nothing more:

- ``POST /upload/drive/v3/files?uploadType=multipart`` (``multipart/related``: JSON
  metadata, then the media) and ``uploadType=resumable`` (a session started with the
  metadata and ``X-Upload-Content-Length``, answered with a ``Location``; then ``PUT``
  chunks with ``Content-Range: bytes a-b/total``, answered ``308`` with ``Range:
  bytes=0-n`` until the last one, which creates the file). A file exists only once its
  upload is complete; a dropped connection discards the request.
- ``POST /drive/v3/files`` (metadata only: folders), ``GET /drive/v3/files`` (``files.list``
  with ``q`` made of ``'<id>' in parents``, ``name = '...'``, ``mimeType = / != '...'`` and
  ``trashed = false`` joined by ``and``; ``fields``, ``pageSize``, ``pageToken``,
  ``spaces=drive``), ``GET /drive/v3/files/<id>`` (metadata, or ``alt=media`` with an
  optional ``Range``: 206 / 416), ``DELETE /drive/v3/files/<id>`` (204; folders with
  their contents). ``root`` is the alias of My Drive. ``fields`` selects what is answered
  (defaults as Drive's: ``id``, ``name``, ``mimeType``, ``kind``), ``size`` is a string,
  ``createdTime`` is RFC 3339 with milliseconds and strictly increasing. An unsupported
  query is a 400, so the driver cannot drift into queries this server does not check.
- ``POST /token`` with ``grant_type=refresh_token``: a new access token, or 400
  ``invalid_grant`` for an unknown or revoked refresh token, 401 ``invalid_client`` for a
  wrong client id or secret.
- Every Drive request needs ``Authorization: Bearer <token>`` with a live token issued
  here (``issue_tokens``), else 401 as Drive answers it; resumable session URIs need none.

Switches for the failure paths: ``expire_access_tokens`` (the next request gets 401),
``revoke_refresh_tokens`` (refresh gets ``invalid_grant``), ``fail_next(status, ...)``
(inject 429 with ``Retry-After``, 500, 403 rate limits... on requests matching a
substring), ``race_folders`` (every folder creation also creates an older twin, as if
another client had created the same folder at the same moment) and ``race_uploads``
(every upload also creates an older file of the same name, as a concurrent put that
completed just before). Everything lives in memory; ``close`` drops it.

    with fake_google_drive() as google:
        driver = google_driver(google, root_path="/t1")   # open_driver("gdrive", ...) signed in
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from virtbackup.storage.factory import open_driver
from virtbackup.storage.google_auth import GoogleApi, GoogleTokens, OnRefresh
from virtbackup.storage.protocol import Driver

FOLDER_MIME: Final = "application/vnd.google-apps.folder"
TEST_CLIENT_ID: Final = "virtbackup-test.apps.googleusercontent.com"
TEST_CLIENT_SECRET: Final = "virtbackup-test-secret"  # noqa: S105
TEST_SCOPE: Final = "https://www.googleapis.com/auth/drive.file"
LOOPBACK: Final = "127.0.0.1"

_QUOTED: Final = r"'((?:[^'\\]|\\.)*)'"
_IN_PARENTS: Final = re.compile(rf"^{_QUOTED} in parents$")
_COMPARE: Final = re.compile(rf"^(name|mimeType) (=|!=) {_QUOTED}$")
_TRASHED: Final = re.compile(r"^trashed = (true|false)$")
_DEFAULT_FILE_FIELDS: Final = "kind,id,name,mimeType"
_DEFAULT_LIST_FIELDS: Final = "kind,incompleteSearch,nextPageToken,files(kind,id,name,mimeType)"


@dataclass
class FakeFile:
    id: str
    name: str
    mime_type: str
    parent: str
    created_ms: int
    data: bytes = b""

    @property
    def folder(self) -> bool:
        return self.mime_type == FOLDER_MIME

    def resource(self) -> dict[str, Any]:
        created = _rfc3339(self.created_ms)
        out: dict[str, Any] = {
            "kind": "drive#file",
            "id": self.id,
            "name": self.name,
            "mimeType": self.mime_type,
            "parents": [self.parent],
            "createdTime": created,
            "modifiedTime": created,
            "trashed": False,
        }
        if not self.folder:
            out["size"] = str(len(self.data))
        return out


@dataclass
class _Session:
    name: str
    mime_type: str
    parent: str
    total: int | None
    fields: str | None
    received: bytearray = field(default_factory=bytearray)


@dataclass
class _Failure:
    status: int
    match: str
    remaining: int
    retry_after: str | None
    reason: str


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received (for assertions)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class _QueryError(ValueError):
    pass


def _rfc3339(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _split_and(query: str) -> list[str]:
    """Split a Drive query on `` and `` outside string literals."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    quoted = False
    while i < len(query):
        char = query[i]
        if quoted:
            current.append(char)
            if char == "\\" and i + 1 < len(query):
                current.append(query[i + 1])
                i += 1
            elif char == "'":
                quoted = False
        elif char == "'":
            quoted = True
            current.append(char)
        elif query.startswith(" and ", i):
            parts.append("".join(current).strip())
            current = []
            i += 5
            continue
        else:
            current.append(char)
        i += 1
    if quoted:
        raise _QueryError("unterminated string literal")
    parts.append("".join(current).strip())
    return parts


def _parse_fields(spec: str) -> dict[str, Any]:
    """``a,b(c,d)`` -> ``{"a": {}, "b": {"c": {}, "d": {}}}`` (``*`` selects everything)."""

    def parse(text: str, i: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        name = ""
        while i < len(text):
            char = text[i]
            if char == "(":
                sub, i = parse(text, i + 1)
                out[name.strip()] = sub
                name = ""
            elif char == ")":
                if name.strip():
                    out[name.strip()] = {}
                return out, i + 1
            elif char == ",":
                if name.strip():
                    out[name.strip()] = {}
                name = ""
                i += 1
            else:
                name += char
                i += 1
        if name.strip():
            out[name.strip()] = {}
        return out, i

    return parse(spec.replace(" ", ""), 0)[0]


def _select(value: Any, selection: dict[str, Any]) -> Any:
    if not selection or "*" in selection:
        return value
    if isinstance(value, list):
        return [_select(item, selection) for item in value]
    if isinstance(value, dict):
        return {k: _select(value[k], sub) for k, sub in selection.items() if k in value}
    return value


class FakeGoogleDrive:
    """The stand-in server (see the module docstring). Thread-safe; start/close or ``with``."""

    def __init__(
        self,
        *,
        client_id: str = TEST_CLIENT_ID,
        client_secret: str = TEST_CLIENT_SECRET,
        max_page_size: int = 1000,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        #: Largest page ``files.list`` returns (lower it to test paging).
        self.max_page_size = max_page_size
        self.race_folders = False
        self.race_uploads = False
        self.root_id = "0A" + secrets.token_hex(10)
        self.files: dict[str, FakeFile] = {}
        self.requests: list[RecordedRequest] = []
        self.refreshes = 0
        self._sessions: dict[str, _Session] = {}
        self._access_tokens: dict[str, float] = {}  # token -> expiry (time.time())
        self._refresh_tokens: set[str] = set()
        self._failures: list[_Failure] = []
        self._last_ms = 0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            return
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = _Server((LOOPBACK, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self.files.clear()
            self._sessions.clear()

    def __enter__(self) -> FakeGoogleDrive:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a test uses -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def api(self, *, client_id: str | None = None, client_secret: str | None = None) -> GoogleApi:
        """Endpoints and OAuth client pointing at this server."""
        return GoogleApi(
            api_base=f"{self.base_url}/drive/v3",
            upload_base=f"{self.base_url}/upload/drive/v3",
            token_url=f"{self.base_url}/token",
            client_id=self.client_id if client_id is None else client_id,
            client_secret=self.client_secret if client_secret is None else client_secret,
        )

    def issue_tokens(self, *, expires_in: float = 3600.0) -> GoogleTokens:
        """A fresh refresh token and access token, as after a Google sign-in."""
        access, refresh = "ya29." + secrets.token_urlsafe(24), "1//" + secrets.token_urlsafe(24)
        with self._lock:
            self._access_tokens[access] = time.time() + expires_in
            self._refresh_tokens.add(refresh)
        return GoogleTokens(
            access_token=access,
            refresh_token=refresh,
            expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
            scope=TEST_SCOPE,
            account_email="backup@example.com",
        )

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working (401), whatever it claims."""
        with self._lock:
            self._access_tokens.clear()

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far is refused (``invalid_grant``)."""
        with self._lock:
            self._refresh_tokens.clear()

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        match: str = "",
        retry_after: float | str | None = None,
        reason: str = "",
    ) -> None:
        """Answer the next ``count`` requests whose ``METHOD /path?query`` contains ``match``
        with ``status`` (and ``Retry-After``, and a Drive error ``reason``)."""
        default_reason = {429: "rateLimitExceeded", 403: "userRateLimitExceeded"}.get(
            status, "backendError"
        )
        with self._lock:
            self._failures.append(
                _Failure(
                    status=status,
                    match=match,
                    remaining=count,
                    retry_after=None if retry_after is None else str(retry_after),
                    reason=reason or default_reason,
                )
            )

    def add_file(self, parent: str, name: str, data: bytes = b"", *, folder: bool = False) -> str:
        """Store a file (or folder) directly, as another client would; returns its id."""
        with self._lock:
            return self._create(
                name, FOLDER_MIME if folder else "application/octet-stream", parent, data
            ).id

    def children(self, parent: str) -> list[FakeFile]:
        """The files and folders in ``parent`` (``root`` for My Drive), oldest first."""
        with self._lock:
            parent = self._real_id(parent)
            found = [f for f in self.files.values() if f.parent == parent]
        return sorted(found, key=lambda f: (f.created_ms, f.id))

    def folder_id(self, path: str) -> str | None:
        """The id of the folder at ``a/b/c`` below My Drive (the oldest of twins), or None."""
        current = self.root_id
        for name in [p for p in path.split("/") if p]:
            twins = [f for f in self.children(current) if f.folder and f.name == name]
            if not twins:
                return None
            current = twins[0].id
        return current

    # -- the store (call with the lock held) ---------------------------------------------

    def _now_ms(self) -> int:
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        return self._last_ms

    def _real_id(self, file_id: str) -> str:
        return self.root_id if file_id == "root" else file_id

    def _create(self, name: str, mime_type: str, parent: str, data: bytes) -> FakeFile:
        file = FakeFile(
            id="1" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y"),
            name=name,
            mime_type=mime_type,
            parent=self._real_id(parent),
            created_ms=self._now_ms(),
            data=data,
        )
        self.files[file.id] = file
        return file

    def _parent_exists(self, parent: str) -> bool:
        parent = self._real_id(parent)
        return parent == self.root_id or (parent in self.files and self.files[parent].folder)

    def _delete(self, file_id: str) -> None:
        self.files.pop(file_id, None)
        for child in [f.id for f in self.files.values() if f.parent == file_id]:
            self._delete(child)

    def _take_failure(self, line: str) -> _Failure | None:
        for failure in self._failures:
            if failure.match in line and failure.remaining > 0:
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _token_ok(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        expiry = self._access_tokens.get(header[7:])
        return expiry is not None and expiry > time.time()

    def _matcher(self, query: str) -> list[tuple[str, str, str]]:
        """Parse a Drive query into (field, op, value) clauses; ``_QueryError`` if unsupported."""
        clauses: list[tuple[str, str, str]] = []
        for part in _split_and(query.strip()):
            if m := _IN_PARENTS.match(part):
                clauses.append(("parents", "in", self._real_id(_unescape(m.group(1)))))
            elif m := _COMPARE.match(part):
                clauses.append((m.group(1), m.group(2), _unescape(m.group(3))))
            elif m := _TRASHED.match(part):
                clauses.append(("trashed", "=", m.group(1)))
            else:
                raise _QueryError(f"unsupported query term: {part!r}")
        return clauses

    @staticmethod
    def _matches(file: FakeFile, clauses: list[tuple[str, str, str]]) -> bool:
        for name, op, value in clauses:
            if name == "parents":
                ok = file.parent == value
            elif name == "trashed":
                ok = value == "false"
            else:
                actual = file.name if name == "name" else file.mime_type
                ok = (actual == value) if op == "=" else (actual != value)
            if not ok:
                return False
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: The default backlog of 5 drops the SYNs of a burst of new connections: 1 s stalls.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return  # a client that went away mid-request (a cancelled upload): expected
        super().handle_error(request, client_address)


def _error_body(status: int, message: str, reason: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls
    server_fake: FakeGoogleDrive

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- responses ------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json; charset=UTF-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 204:
            if body:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any, *, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers=headers)

    def _drive_error(
        self, status: int, message: str, reason: str, *, headers: dict[str, str] | None = None
    ) -> None:
        self._json(status, _error_body(status, message, reason), headers=headers)

    # -- dispatch -------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(411, b"chunked request bodies are not supported here")
            return None
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:  # the client went away mid-request: nothing happened
            self.close_connection = True
            return None
        return body

    def _handle(self) -> None:
        fake = self.server_fake
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            body = self._read_body()
        except OSError:
            self.close_connection = True
            return
        if body is None:
            return
        line = f"{self.command} {url.path}?{url.query}"
        with fake._lock:
            fake.requests.append(
                RecordedRequest(
                    self.command, url.path, query, {k: v for k, v in self.headers.items()}
                )
            )
            failure = fake._take_failure(line)
        if failure is not None:
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            if url.path == "/token":
                self._json(failure.status, {"error": "internal_failure"}, headers=headers)
            else:
                self._drive_error(
                    failure.status,
                    f"injected failure {failure.status}",
                    failure.reason,
                    headers=headers,
                )
            return
        path = url.path
        if path == "/token" and self.command == "POST":
            self._token(body)
            return
        if path == "/upload/drive/v3/files" and self.command == "PUT":
            self._upload_chunk(query, body)  # the session URI is the credential
            return
        with fake._lock:
            authorized = fake._token_ok(self.headers.get("Authorization"))
        if not authorized:
            self._drive_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                "authError",
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                    'error="invalid_token"'
                },
            )
            return
        if path == "/drive/v3/files" and self.command == "GET":
            self._list(query)
        elif path == "/drive/v3/files" and self.command == "POST":
            self._create_metadata(query, body)
        elif path == "/upload/drive/v3/files" and self.command == "POST":
            if query.get("uploadType") == "multipart":
                self._upload_multipart(query, body)
            elif query.get("uploadType") == "resumable":
                self._upload_start(query, body)
            else:
                self._drive_error(400, "Unsupported uploadType", "invalid")
        elif path.startswith("/drive/v3/files/") and self.command == "GET":
            self._get(path.rsplit("/", 1)[1], query)
        elif path.startswith("/drive/v3/files/") and self.command == "DELETE":
            self._delete(path.rsplit("/", 1)[1])
        else:
            self._drive_error(404, f"Not found: {self.command} {path}", "notFound")

    # -- OAuth ----------------------------------------------------------------------------

    def _token(self, body: bytes) -> None:
        fake = self.server_fake
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "refresh_token":
            self._json(
                400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}
            )
            return
        if form.get("client_id") != fake.client_id or (
            fake.client_secret and form.get("client_secret") != fake.client_secret
        ):
            self._json(
                401,
                {"error": "invalid_client", "error_description": "The OAuth client was not found."},
            )
            return
        with fake._lock:
            known = form.get("refresh_token") in fake._refresh_tokens
            if known:
                access = "ya29." + secrets.token_urlsafe(24)
                fake._access_tokens[access] = time.time() + 3599
                fake.refreshes += 1
        if not known:
            self._json(
                400,
                {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                },
            )
            return
        self._json(
            200,
            {
                "access_token": access,
                "expires_in": 3599,
                "scope": TEST_SCOPE,
                "token_type": "Bearer",
            },
        )

    # -- files ----------------------------------------------------------------------------

    def _resource(self, file: FakeFile, fields: str | None) -> Any:
        return _select(file.resource(), _parse_fields(fields or _DEFAULT_FILE_FIELDS))

    def _list(self, query: dict[str, str]) -> None:
        fake = self.server_fake
        try:
            clauses = fake._matcher(query.get("q", ""))
        except _QueryError as exc:
            self._drive_error(400, f"Invalid Value: {exc}", "invalid")
            return
        if query.get("spaces", "drive") != "drive":
            self._drive_error(400, "Only spaces=drive is supported here", "invalid")
            return
        try:
            size = int(query.get("pageSize") or 100)
            start = int(query.get("pageToken", "p0").lstrip("p") or 0)
        except ValueError:
            self._drive_error(400, "Invalid pageSize or pageToken", "invalid")
            return
        size = max(1, min(size, 1000, fake.max_page_size))
        with fake._lock:
            found = sorted(
                (f for f in fake.files.values() if fake._matches(f, clauses)), key=lambda f: f.id
            )
            page = [f.resource() for f in found[start : start + size]]
        result: dict[str, Any] = {
            "kind": "drive#fileList",
            "incompleteSearch": False,
            "files": page,
        }
        if start + size < len(found):
            result["nextPageToken"] = f"p{start + size}"
        self._json(200, _select(result, _parse_fields(query.get("fields") or _DEFAULT_LIST_FIELDS)))

    def _metadata(self, body: bytes) -> tuple[str, str, str] | str:
        """(name, mimeType, parent) from JSON metadata, or an error message."""
        try:
            meta = json.loads(body or b"{}")
        except ValueError:
            return "metadata is not JSON"
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            return "metadata needs a name"
        parents = meta.get("parents") or ["root"]
        if not isinstance(parents, list) or len(parents) != 1:
            return "exactly one parent is supported here"
        return meta["name"], str(meta.get("mimeType") or "application/octet-stream"), parents[0]

    def _store(self, name: str, mime_type: str, parent: str, data: bytes) -> FakeFile | None:
        """Create the file (with the race twins if switched on); None if no such parent."""
        fake = self.server_fake
        with fake._lock:
            if not fake._parent_exists(parent):
                return None
            folder = mime_type == FOLDER_MIME
            if folder and fake.race_folders:
                fake._create(name, mime_type, parent, b"")
            if not folder and fake.race_uploads:
                fake._create(name, mime_type, parent, b"an older concurrent upload")
            return fake._create(name, mime_type, parent, data)

    def _created(self, file: FakeFile | None, parent: str, fields: str | None) -> None:
        if file is None:
            self._drive_error(404, f"File not found: {parent}.", "notFound")
        else:
            self._json(200, self._resource(file, fields))

    def _create_metadata(self, query: dict[str, str], body: bytes) -> None:
        meta = self._metadata(body)
        if isinstance(meta, str):
            self._drive_error(400, meta, "invalid")
            return
        name, mime_type, parent = meta
        self._created(self._store(name, mime_type, parent, b""), parent, query.get("fields"))

    def _upload_multipart(self, query: dict[str, str], body: bytes) -> None:
        match = re.search(r'boundary="?([^";]+)"?', self.headers.get("Content-Type", ""))
        if not self.headers.get("Content-Type", "").startswith("multipart/related") or not match:
            self._drive_error(400, "multipart/related with a boundary expected", "badContent")
            return
        delimiter = b"--" + match.group(1).encode()
        second = body.find(b"\r\n" + delimiter + b"\r\n")
        closing = body.rfind(b"\r\n" + delimiter + b"--")
        if not body.startswith(delimiter + b"\r\n") or second < 0 or closing < second:
            self._drive_error(400, "malformed multipart body", "badContent")
            return
        parts = [body[len(delimiter) + 2 : second], body[second + len(delimiter) + 4 : closing]]
        split = [part.split(b"\r\n\r\n", 1) for part in parts]
        if any(len(s) != 2 for s in split):
            self._drive_error(400, "malformed multipart part", "badContent")
            return
        meta = self._metadata(split[0][1])
        if isinstance(meta, str):
            self._drive_error(400, meta, "invalid")
            return
        name, mime_type, parent = meta
        self._created(
            self._store(name, mime_type, parent, split[1][1]), parent, query.get("fields")
        )

    def _upload_start(self, query: dict[str, str], body: bytes) -> None:
        fake = self.server_fake
        meta = self._metadata(body)
        if isinstance(meta, str):
            self._drive_error(400, meta, "invalid")
            return
        name, mime_type, parent = meta
        total_header = self.headers.get("X-Upload-Content-Length")
        session_id = secrets.token_urlsafe(16)
        with fake._lock:
            if not fake._parent_exists(parent):
                self._drive_error(404, f"File not found: {parent}.", "notFound")
                return
            fake._sessions[session_id] = _Session(
                name,
                mime_type,
                parent,
                int(total_header) if total_header else None,
                query.get("fields"),
            )
        location = (
            f"{fake.base_url}/upload/drive/v3/files?uploadType=resumable&upload_id={session_id}"
        )
        self._send(200, headers={"Location": location})

    def _upload_chunk(self, query: dict[str, str], body: bytes) -> None:
        fake = self.server_fake
        match = re.fullmatch(
            r"bytes (\d+)-(\d+)/(\d+|\*)|bytes \*/(\d+|\*)", self.headers.get("Content-Range", "")
        )
        with fake._lock:
            session = fake._sessions.get(query.get("upload_id", ""))
            if session is None:
                self._drive_error(404, "No such upload session", "notFound")
                return
            if match is None:
                self._drive_error(400, "Content-Range required", "badContent")
                return
            total_text = match.group(3) or match.group(4)
            if total_text != "*":
                session.total = int(total_text)
            if match.group(1) is not None:
                start, end = int(match.group(1)), int(match.group(2))
                if end - start + 1 != len(body) or start > len(session.received):
                    self._drive_error(400, "Content-Range does not match", "badContent")
                    return
                del session.received[start:]
                session.received += body
            done = session.total is not None and len(session.received) >= session.total
            if not done:
                received = len(session.received)
                headers = {"Range": f"bytes=0-{received - 1}"} if received else {}
                self._send(308, headers=headers)
                return
            del fake._sessions[query["upload_id"]]
        file = self._store(session.name, session.mime_type, session.parent, bytes(session.received))
        self._created(file, session.parent, session.fields)

    def _get(self, file_id: str, query: dict[str, str]) -> None:
        fake = self.server_fake
        with fake._lock:
            file = fake.files.get(fake._real_id(file_id))
        if file is None:
            self._drive_error(404, f"File not found: {file_id}.", "notFound")
            return
        if query.get("alt") != "media":
            self._json(200, self._resource(file, query.get("fields")))
            return
        if file.folder:
            self._drive_error(
                403, "Only files with binary content can be downloaded", "fileNotDownloadable"
            )
            return
        data = file.data
        header = self.headers.get("Range")
        if header is None:
            self._send(200, data, content_type="application/octet-stream")
            return
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if match is None or not (match.group(1) or match.group(2)):
            self._send(200, data, content_type="application/octet-stream")  # ignored, as HTTP
            return
        if match.group(1):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
        else:
            start, end = max(len(data) - int(match.group(2)), 0), len(data) - 1
        if start >= len(data) or end < start:
            self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
            return
        end = min(end, len(data) - 1)
        self._send(
            206,
            data[start : end + 1],
            content_type="application/octet-stream",
            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"},
        )

    def _delete(self, file_id: str) -> None:
        fake = self.server_fake
        with fake._lock:
            real = fake._real_id(file_id)
            if real not in fake.files:
                self._drive_error(404, f"File not found: {file_id}.", "notFound")
                return
            fake._delete(real)
        self._send(204)


@contextlib.contextmanager
def fake_google_drive(**kwargs: Any) -> Iterator[FakeGoogleDrive]:
    """A started ``FakeGoogleDrive``, closed on exit."""
    server = FakeGoogleDrive(**kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


def google_driver(
    google: FakeGoogleDrive,
    *,
    root_path: str = "/",
    on_refresh: OnRefresh | None = None,
    **params: Any,
) -> Driver:
    """A ``gdrive`` driver (through ``open_driver``) signed in to ``google`` with fresh
    tokens, rooted at ``<root_path>/VirtBackup``; ``params`` are more destination params."""
    return open_driver(
        "gdrive",
        {"rootPath": root_path, **params},
        tokens=google.issue_tokens(),
        on_refresh=on_refresh,
        google_api=google.api(),
    )
