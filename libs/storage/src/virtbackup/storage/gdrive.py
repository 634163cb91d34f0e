"""The Google Drive driver (Drive v3 REST API over httpx): objects are files in folders.

Drive has folders and file ids, not paths, so the driver maps a key onto a folder tree:
``chunks/ab/ab12`` is the file ``ab12`` in the folder ``ab`` of the folder ``chunks`` of
``<rootPath>/VirtBackup/`` (``rootPath`` ``/`` is the account's "My Drive").

- Folders are created on demand for writes, the root path included: with the usual
  ``drive.file`` scope the app sees only what it created itself, so a folder the user
  made by hand would be invisible anyway. Folder ids are cached. Drive allows two
  folders of the same name in one parent, so two clients creating one at the same time
  can both succeed: after creating a folder the driver lists its parent again and
  everyone uses the *oldest* folder (by ``createdTime``, then id); its own twin, if it
  lost and is still empty, is deleted. Reads only look folders up (a missing folder is
  a missing key, or an empty listing).
- Drive allows two files of the same name in one folder too. ``put`` uploads a new file
  (``files.create``: ``uploadType=multipart`` up to ``multipart_limit``, 5 MiB; above,
  ``uploadType=resumable`` in ``chunk_size`` pieces), which becomes visible whole when the
  upload completes, and then deletes the *older* files of that name. Readers use the
  newest file of a name, and look again if it is deleted under them (a newer put won).
  So ``put`` is idempotent and atomic in visibility, and concurrent puts of one key
  converge on one file. A failed or cancelled upload leaves no file (an abandoned
  resumable session expires on Google's side).
- ``get_range`` is ``files.get?alt=media`` with a ``Range`` header (native).
- ``list`` walks the folder tree: one ``files.list`` (``q='<id>' in parents and
  trashed = false``, 1000 per page) per folder below the prefix.
- ``delete`` lists the key's file(s) and deletes each (``files.delete``, not the trash).
  There is no batch delete. Folders stay; ``remove_empty_folder`` removes one that is
  empty (``protocol.FolderRemover``: a deleted restore point's folder).
- Tokens: see ``virtbackup.storage.google_auth``. A 401 refreshes the access token once
  and repeats the request; ``on_refresh`` is called with the new tokens.
- Errors: 404 ``NotFoundError``; 429, 5xx, 403 ``rateLimitExceeded``/``userRateLimitExceeded``
  and network errors ``TransientError`` (with ``retry_after`` from ``Retry-After``); a
  refused refresh token, missing permission, full Drive and other 4xx ``PermanentError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpx

from virtbackup.storage.base import DriverBase, check_range
from virtbackup.storage.errors import (
    InvalidKeyError,
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    StorageError,
    TransientError,
)
from virtbackup.storage.google_auth import (
    GoogleApi,
    GoogleTokens,
    OnRefresh,
    TokenSource,
    parse_retry_after,
)
from virtbackup.storage.keys import validate_key, validate_prefix
from virtbackup.storage.protocol import ObjectInfo

log = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
FOLDER_MIME: Final = "application/vnd.google-apps.folder"
MEDIA_MIME: Final = "application/octet-stream"
#: Drive's documented limit for ``uploadType=multipart``; larger files go resumable.
MULTIPART_LIMIT: Final = 5 * MIB
#: Resumable upload chunk: Drive wants multiples of 256 KiB.
CHUNK_SIZE: Final = 8 * MIB
CHUNK_UNIT: Final = 256 * 1024
PAGE_SIZE: Final = 1000
#: The folder of the repository inside the root path.
REPOSITORY_DIR: Final = "VirtBackup"
#: How often a read looks the key up again when the file it found was replaced meanwhile.
READ_ATTEMPTS: Final = 5

_FILE_FIELDS: Final = "id,name,mimeType,size,createdTime"
_LIST_FIELDS: Final = f"nextPageToken,files({_FILE_FIELDS})"
_RATE_REASONS: Final = frozenset(
    {"rateLimitExceeded", "userRateLimitExceeded", "sharingRateLimitExceeded", "backendError"}
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Entry:
    """One file or folder as ``files.list`` describes it."""

    id: str
    name: str
    folder: bool
    size: int
    created: datetime

    @property
    def order(self) -> tuple[datetime, str]:
        """Age order shared by every client: creation time, then id."""
        return (self.created, self.id)


def _entry(data: Any) -> _Entry:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise TransientError(f"Google Drive answered an unexpected file resource: {data!r:.200}")
    created = _EPOCH
    raw_created = data.get("createdTime")
    if isinstance(raw_created, str):
        with contextlib.suppress(ValueError):
            created = datetime.fromisoformat(raw_created).astimezone(UTC)
    size = data.get("size", 0)
    try:
        size = int(size)  # Drive sends int64 as a string
    except (TypeError, ValueError):
        size = 0
    return _Entry(
        id=data["id"],
        name=str(data.get("name", "")),
        folder=data.get("mimeType") == FOLDER_MIME,
        size=size,
        created=created,
    )


def quote(value: str) -> str:
    """``value`` as a string literal of a Drive query (``'...'`` with ``\\`` and ``'`` escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def root_segments(root_path: str) -> tuple[str, ...]:
    """The folders of ``rootPath`` below "My Drive" (``/`` or empty: none)."""
    path = root_path.strip().strip("/")
    if not path:
        return ()
    try:
        validate_key(path)
    except InvalidKeyError as exc:
        raise InvalidParamsError(f"gdrive: bad rootPath {root_path!r}: {exc}") from None
    return tuple(path.split("/"))


class GdriveDriver(DriverBase):
    """Files in a folder tree under ``<root_path>/VirtBackup/`` of one Google Drive."""

    driver_id = "gdrive"
    delete_concurrency = 8

    def __init__(
        self,
        *,
        tokens: GoogleTokens,
        root_path: str = "/",
        api: GoogleApi | None = None,
        on_refresh: OnRefresh | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_connections: int = 16,
        multipart_limit: int = MULTIPART_LIMIT,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if chunk_size < CHUNK_UNIT or chunk_size % CHUNK_UNIT:
            raise InvalidParamsError(f"gdrive: chunk_size must be a multiple of {CHUNK_UNIT}")
        if not tokens.access_token and not tokens.refresh_token:
            raise InvalidParamsError(
                "gdrive: no Google account is connected (no access or refresh token); "
                "sign in with Google first (POST /oauth/google)"
            )
        self.api = api if api is not None else GoogleApi.from_env()
        self.root_path = root_path
        self.root: tuple[str, ...] = (*root_segments(root_path), REPOSITORY_DIR)
        self.multipart_limit = multipart_limit
        self.chunk_size = chunk_size
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"User-Agent": "VirtBackup"},
            follow_redirects=False,
        )
        self._auth = TokenSource(tokens, api=self.api, http=self._http, on_refresh=on_refresh)
        #: Folder path (below My Drive) -> folder id. ``()`` is My Drive itself.
        self._folders: dict[tuple[str, ...], str] = {(): "root"}
        self._folder_locks: dict[tuple[str, ...], asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"GdriveDriver({'/'.join(('', *self.root))}/ via {self.api.api_base})"

    @property
    def tokens(self) -> GoogleTokens:
        """The current tokens (the access token changes when it is refreshed)."""
        return self._auth.tokens

    # -- HTTP plumbing -------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        url: str,
        *,
        what: str,
        key: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        json_body: Any = None,
        auth: bool = True,
    ) -> httpx.Response:
        """One request; a 401 refreshes the access token and repeats it once."""
        self._check_open()
        for attempt in (1, 2):
            request_headers = dict(headers or {})
            token = ""
            if auth:
                token = await self._auth.access_token()
                request_headers["Authorization"] = f"Bearer {token}"
            try:
                response = await self._http.request(
                    method,
                    url,
                    params=params,
                    headers=request_headers,
                    content=content,
                    json=json_body,
                )
            except httpx.TimeoutException as exc:
                raise TransientError(
                    f"Google Drive {what} {key!r} timed out ({type(exc).__name__})"
                ) from exc
            except httpx.HTTPError as exc:
                raise TransientError(
                    f"Google Drive unreachable during {what} {key!r}: {exc!r}"
                ) from exc
            if response.status_code == 401 and auth and attempt == 1:
                await self._auth.refresh(rejected=token)
                continue
            return response
        raise AssertionError("unreachable")

    def _error(self, response: httpx.Response, what: str, key: str) -> StorageError:
        """Translate a failed Drive answer into the storage hierarchy."""
        status = response.status_code
        message, reasons = _google_error(response)
        detail = f"Google Drive {what} {key!r}: HTTP {status} {message}".rstrip()
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 404:
            return NotFoundError(key, detail)
        if status == 401:
            return PermanentError(
                f"Google Drive rejected the access token even after a refresh ({message}); "
                "sign in with Google again (POST /oauth/google)"
            )
        if status == 403:
            if reasons & _RATE_REASONS:
                return TransientError(detail, retry_after=retry_after)
            if "storageQuotaExceeded" in reasons:
                return PermanentError(f"Google Drive is full (storage quota exceeded): {message}")
            return PermanentError(f"Google Drive denied {what} of {key!r}: {message}")
        if status in (408, 429) or status >= 500:
            return TransientError(detail, retry_after=retry_after)
        return PermanentError(detail)

    def _json(self, response: httpx.Response, what: str, key: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise TransientError(
                f"Google Drive {what} {key!r}: the answer is not JSON: {response.text[:200]!r}"
            ) from None

    # -- folders and names ----------------------------------------------------------------

    async def _children(
        self, parent: str, *, name: str | None, what: str, key: str
    ) -> list[_Entry]:
        """Every (untrashed) child of folder ``parent``, or only those called ``name``."""
        query = f"{quote(parent)} in parents and trashed = false"
        if name is not None:
            query = f"{quote(parent)} in parents and name = {quote(name)} and trashed = false"
        entries: list[_Entry] = []
        page_token = ""
        while True:
            params = {
                "q": query,
                "fields": _LIST_FIELDS,
                "pageSize": str(PAGE_SIZE),
                "spaces": "drive",
            }
            if page_token:
                params["pageToken"] = page_token
            response = await self._call(
                "GET", f"{self.api.api_base}/files", params=params, what=what, key=key
            )
            if response.status_code == 404:
                # A cached folder was deleted behind our back: forget the cache, try again.
                self._forget_folders()
                raise TransientError(f"Google Drive {what} {key!r}: a folder disappeared")
            if response.status_code != 200:
                raise self._error(response, what, key)
            body = self._json(response, what, key)
            files = body.get("files", []) if isinstance(body, dict) else None
            if not isinstance(files, list):
                raise TransientError(f"Google Drive {what} {key!r}: unexpected list answer")
            entries.extend(_entry(f) for f in files)
            page_token = body.get("nextPageToken") or ""
            if not page_token:
                # Exact names only: Drive's name comparison need not be case-sensitive.
                return [e for e in entries if name is None or e.name == name]

    def _forget_folders(self) -> None:
        self._folders = {(): "root"}

    async def _folder(self, path: tuple[str, ...], *, create: bool) -> str | None:
        """The id of the folder at ``path`` (below My Drive); None if missing and not ``create``."""
        cached = self._folders.get(path)
        if cached is not None:
            return cached
        parent = await self._folder(path[:-1], create=create)
        if parent is None:
            return None
        if not create:
            found = await self._find_folder(parent, path)
            if found is not None:
                self._folders[path] = found
            return found
        lock = self._folder_locks.setdefault(path, asyncio.Lock())
        async with lock:
            cached = self._folders.get(path)
            if cached is not None:
                return cached
            found = await self._find_folder(parent, path)
            if found is None:
                found = await self._create_folder(parent, path)
            self._folders[path] = found
            return found

    async def _find_folder(self, parent: str, path: tuple[str, ...]) -> str | None:
        where = "/".join(path)
        twins = [
            e
            for e in await self._children(parent, name=path[-1], what="find folder", key=where)
            if e.folder
        ]
        return min(twins, key=lambda e: e.order).id if twins else None

    async def _create_folder(self, parent: str, path: tuple[str, ...]) -> str:
        where = "/".join(path)
        response = await self._call(
            "POST",
            f"{self.api.api_base}/files",
            params={"fields": _FILE_FIELDS},
            json_body={"name": path[-1], "mimeType": FOLDER_MIME, "parents": [parent]},
            what="create folder",
            key=where,
        )
        if response.status_code != 200:
            if response.status_code == 404:
                self._forget_folders()
                raise TransientError(f"Google Drive create folder {where!r}: parent disappeared")
            raise self._error(response, "create folder", where)
        mine = _entry(self._json(response, "create folder", where))
        # Another client may have created the same folder meanwhile: everyone uses the
        # oldest one, so look again now that ours exists.
        twins = [
            e
            for e in await self._children(parent, name=path[-1], what="find folder", key=where)
            if e.folder
        ]
        if all(e.id != mine.id for e in twins):
            twins.append(mine)
        oldest = min(twins, key=lambda e: e.order)
        if oldest.id != mine.id:
            log.info("gdrive: folder %r was created concurrently; using the oldest", where)
            await self._discard_folder(mine.id, where)
        return oldest.id

    async def _discard_folder(self, folder_id: str, where: str) -> None:
        """Delete our losing twin folder if it is still empty (best effort)."""
        try:
            if await self._children(folder_id, name=None, what="check folder", key=where):
                return
            response = await self._call(
                "DELETE",
                f"{self.api.api_base}/files/{folder_id}",
                what="delete folder",
                key=where,
            )
            if response.status_code not in (200, 204, 404):
                raise self._error(response, "delete folder", where)
        except StorageError as exc:
            log.warning("gdrive: could not remove the duplicate folder %r: %s", where, exc)

    def _split(self, key: str) -> tuple[tuple[str, ...], str]:
        validate_key(key)
        *dirs, name = key.split("/")
        return (*self.root, *dirs), name

    async def _files(self, key: str, *, what: str) -> list[_Entry]:
        """Every file stored under ``key`` (usually one), newest first."""
        path, name = self._split(key)
        self._check_open()
        folder = await self._folder(path, create=False)
        if folder is None:
            return []
        entries = await self._children(folder, name=name, what=what, key=key)
        files = [e for e in entries if not e.folder]
        return sorted(files, key=lambda e: e.order, reverse=True)

    async def _newest(self, key: str, *, what: str) -> _Entry:
        files = await self._files(key, what=what)
        if not files:
            raise NotFoundError(key)
        return files[0]

    # -- uploads --------------------------------------------------------------------------

    async def _upload_multipart(self, parent: str, name: str, data: bytes, key: str) -> _Entry:
        boundary = f"vb-{secrets.token_hex(16)}"
        while boundary.encode() in data:
            boundary = f"vb-{secrets.token_hex(16)}"
        metadata = json.dumps({"name": name, "parents": [parent], "mimeType": MEDIA_MIME})
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                metadata.encode(),
                f"\r\n--{boundary}\r\nContent-Type: {MEDIA_MIME}\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        response = await self._call(
            "POST",
            f"{self.api.upload_base}/files",
            params={"uploadType": "multipart", "fields": _FILE_FIELDS},
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
            content=body,
            what="write",
            key=key,
        )
        if response.status_code != 200:
            raise self._error(response, "write", key)
        return _entry(self._json(response, "write", key))

    async def _upload_resumable(self, parent: str, name: str, data: bytes, key: str) -> _Entry:
        total = len(data)
        response = await self._call(
            "POST",
            f"{self.api.upload_base}/files",
            params={"uploadType": "resumable", "fields": _FILE_FIELDS},
            headers={
                "X-Upload-Content-Type": MEDIA_MIME,
                "X-Upload-Content-Length": str(total),
            },
            json_body={"name": name, "parents": [parent], "mimeType": MEDIA_MIME},
            what="start upload",
            key=key,
        )
        if response.status_code != 200:
            raise self._error(response, "start upload", key)
        location = response.headers.get("Location")
        if not location:
            raise TransientError(f"Google Drive start upload {key!r}: no session URI")
        session = str(httpx.URL(self.api.upload_base + "/").join(location))
        view = memoryview(data)
        offset = 0
        stalls = 0
        while True:
            end = min(offset + self.chunk_size, total)
            # The session URI is the credential: Google documents these PUTs without a token.
            response = await self._call(
                "PUT",
                session,
                headers={"Content-Range": f"bytes {offset}-{end - 1}/{total}"},
                content=bytes(view[offset:end]),
                what="write",
                key=key,
                auth=False,
            )
            status = response.status_code
            if status in (200, 201):
                return _entry(self._json(response, "write", key))
            if status == 308:  # Resume Incomplete: Range says how much Drive has
                received = _received(response.headers.get("Range"))
                stalls = stalls + 1 if received <= offset else 0
                if stalls > 2 or received > total:
                    raise TransientError(f"Google Drive write {key!r}: the upload does not advance")
                offset = received
                continue
            if status in (404, 410):
                raise TransientError(f"Google Drive write {key!r}: the upload session expired")
            raise self._error(response, "write", key)

    # -- operations -----------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> None:
        path, name = self._split(key)
        self._check_open()
        parent = await self._folder(path, create=True)
        assert parent is not None
        try:
            if len(data) <= self.multipart_limit or not data:
                mine = await self._upload_multipart(parent, name, data, key)
            else:
                mine = await self._upload_resumable(parent, name, data, key)
        except NotFoundError:
            self._forget_folders()  # the folder went away behind our back
            raise TransientError(f"Google Drive write {key!r}: its folder disappeared") from None
        # The new file is visible; files of the same name that are older than it (earlier
        # puts, or a concurrent put that completed first) go now.
        siblings = await self._children(parent, name=name, what="write", key=key)
        for entry in siblings:
            if not entry.folder and entry.id != mine.id and entry.order < mine.order:
                await self._delete_id(entry.id, key)

    async def _delete_id(self, file_id: str, key: str) -> None:
        response = await self._call(
            "DELETE", f"{self.api.api_base}/files/{file_id}", what="delete", key=key
        )
        if response.status_code not in (200, 204, 404):
            raise self._error(response, "delete", key)

    async def _read(self, key: str, offset: int | None, length: int) -> bytes:
        for _ in range(READ_ATTEMPTS):
            entry = await self._newest(key, what="read")
            headers: dict[str, str] = {}
            if offset is not None:
                if offset >= entry.size:
                    return b""
                last = min(offset + length, entry.size) - 1
                headers["Range"] = f"bytes={offset}-{last}"
            response = await self._call(
                "GET",
                f"{self.api.api_base}/files/{entry.id}",
                params={"alt": "media"},
                headers=headers,
                what="read",
                key=key,
            )
            status = response.status_code
            if status == 200:
                data = response.content
                if offset is not None:  # the server ignored the range
                    data = data[offset : offset + length]
                return data
            if status == 206:
                return response.content
            if status == 416:
                return b""
            if status == 404:
                continue  # replaced by a newer put meanwhile: look again
            raise self._error(response, "read", key)
        raise TransientError(f"Google Drive read {key!r}: the object kept being replaced")

    async def get(self, key: str) -> bytes:
        return await self._read(key, None, 0)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        validate_key(key)
        check_range(offset, length)
        return await self._read(key, offset, length)

    async def stat(self, key: str) -> int:
        return (await self._newest(key, what="stat")).size

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for info in self.list_info(prefix):
            yield info.key

    async def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Size and ``createdTime`` (Drive's clock) of the newest file of each key: a
        ``put`` uploads a new file, so that is when the key's content was stored."""
        validate_prefix(prefix)
        self._check_open()
        base, _, rest = prefix.rpartition("/")
        dirs = tuple(base.split("/")) if base else ()
        folder = await self._folder((*self.root, *dirs), create=False)
        if folder is None:
            return
        async for info in self._walk(folder, dirs, rest):
            yield info

    async def _walk(
        self, folder: str, dirs: tuple[str, ...], name_prefix: str
    ) -> AsyncIterator[ObjectInfo]:
        where = "/".join(dirs) or "/"
        entries = await self._children(folder, name=None, what="list", key=where)
        newest: dict[str, _Entry] = {}
        subfolders: dict[str, _Entry] = {}
        for entry in entries:
            if not entry.name.startswith(name_prefix):
                continue
            if not entry.folder:
                if entry.name not in newest or entry.order > newest[entry.name].order:
                    newest[entry.name] = entry
            elif entry.name not in subfolders or entry.order < subfolders[entry.name].order:
                subfolders[entry.name] = entry  # of twin folders, the oldest is the real one
        for name in sorted(newest):
            key = "/".join((*dirs, name))
            if _is_key(key):
                file = newest[name]
                yield ObjectInfo(key, file.size, file.created.timestamp())
        for name in sorted(subfolders):
            path = (*dirs, name)
            if not _is_key("/".join(path)):
                continue
            self._folders.setdefault((*self.root, *path), subfolders[name].id)
            async for info in self._walk(subfolders[name].id, path, ""):
                yield info

    async def delete(self, key: str) -> None:
        for entry in await self._files(key, what="delete"):
            await self._delete_id(entry.id, key)

    async def remove_empty_folder(self, prefix: str) -> bool:
        """See ``protocol.FolderRemover``: the folder of ``prefix`` (the oldest of twins)
        goes when it has no child; its id leaves the cache."""
        validate_prefix(prefix)
        if not prefix.endswith("/"):
            raise InvalidKeyError(f"not a folder prefix (no trailing '/'): {prefix!r}")
        self._check_open()
        path = (*self.root, *prefix.rstrip("/").split("/"))
        folder = await self._folder(path, create=False)
        if folder is None:
            return True
        if await self._children(folder, name=None, what="check folder", key=prefix):
            return False
        response = await self._call(
            "DELETE", f"{self.api.api_base}/files/{folder}", what="delete folder", key=prefix
        )
        if response.status_code not in (200, 204, 404):
            raise self._error(response, "delete folder", prefix)
        for cached in [p for p in self._folders if p[: len(path)] == path]:
            del self._folders[cached]
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._http.aclose()


def _received(range_header: str | None) -> int:
    """Bytes Drive has of a resumable upload, from the ``Range: bytes=0-N`` of a 308."""
    if not range_header:
        return 0
    try:
        return int(range_header.rsplit("-", 1)[1]) + 1
    except (IndexError, ValueError):
        return 0


def _google_error(response: httpx.Response) -> tuple[str, frozenset[str]]:
    """The message and the ``reason`` codes of a Drive error answer."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase, frozenset()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return str(error or response.reason_phrase), frozenset()
    reasons = frozenset(
        str(item.get("reason"))
        for item in error.get("errors", [])
        if isinstance(item, dict) and item.get("reason")
    )
    return str(error.get("message") or response.reason_phrase), reasons


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except StorageError:
        return False
    return True
