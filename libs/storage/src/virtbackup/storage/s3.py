"""The S3 driver (the minio client): objects are objects under a prefix of a bucket.

- The minio client is blocking; every request runs in the driver's own thread pool
  (``threads`` workers, and as many pooled HTTP connections).
- ``put`` is one PUT for objects up to ``part_size`` (64 MiB), a multipart upload above:
  either way the object becomes visible whole, when the request completes.
- ``get_range`` is a GET with a Range header (native).
- ``delete_many`` uses DeleteObjects, up to 1000 keys per request.
- The bucket must exist: it is checked on first use (HEAD bucket; skipped if the
  credentials may not do that), and a missing bucket is a ``PermanentError`` saying so.
  The driver never creates buckets.
- HTTP requests are bounded by ``connect_timeout`` and ``read_timeout`` and retried by
  urllib3 at most twice on connection errors; 5xx, throttling and network errors are
  ``TransientError``, authentication and permission errors ``PermanentError``.
"""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Object
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from virtbackup.storage.base import DriverBase, check_range
from virtbackup.storage.errors import (
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    StorageError,
    TransientError,
)
from virtbackup.storage.keys import validate_key, validate_prefix
from virtbackup.storage.protocol import ObjectInfo

T = TypeVar("T")

#: Keys DeleteObjects could not delete: (name, code, message).
_Failures = list[tuple[str, str, str]]
_Names = list[str]

MIB: Final = 1024 * 1024
#: Objects up to this size are sent in one PUT; larger ones as multipart uploads.
PART_SIZE: Final = 64 * MIB
#: DeleteObjects accepts at most this many keys per request.
DELETE_BATCH: Final = 1000
LIST_BATCH: Final = 1000

_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchVersion"})
_TRANSIENT_CODES: Final = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "OperationAborted",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)
_AUTH_CODES: Final = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)


def split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` for minio; an ``http://``/``https://`` scheme, if given, sets ``secure``."""
    endpoint = endpoint.strip()
    for scheme, is_secure in (("https://", True), ("http://", False)):
        if endpoint.lower().startswith(scheme):
            endpoint, secure = endpoint[len(scheme) :], is_secure
    endpoint = endpoint.rstrip("/")
    if not endpoint or "/" in endpoint:
        raise InvalidParamsError(f"s3: endpoint must be host[:port], not {endpoint!r}")
    return endpoint, secure


class S3Driver(DriverBase):
    """Objects under ``root`` (a key prefix ending in ``/``) of ``bucket``."""

    driver_id = "s3"
    delete_concurrency = 16

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        root: str = "",
        region: str = "",
        access_key: str = "",
        secret_key: str = "",
        secure: bool = True,
        threads: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        part_size: int = PART_SIZE,
    ) -> None:
        super().__init__()
        host, secure = split_endpoint(endpoint, secure)
        if root and not root.endswith("/"):
            root += "/"
        validate_prefix(root)
        self.endpoint = host
        self.secure = secure
        self.bucket = bucket
        self.root = root
        self.part_size = part_size
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=threads,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            retries=urllib3.Retry(total=2, connect=2, read=0, status=0, backoff_factor=0.1),
        )
        try:
            self._client = Minio(
                host,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=secure,
                region=region or None,
                http_client=self._http,
            )
        except ValueError as exc:
            raise InvalidParamsError(f"s3: {exc}") from None
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vb-s3")
        self._bucket_checked = False
        self._bucket_lock = asyncio.Lock()

    def __repr__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"S3Driver({scheme}://{self.endpoint}/{self.bucket}/{self.root})"

    # -- plumbing ------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.root + validate_key(key)

    def _error(self, exc: Exception, what: str, key: str) -> StorageError:
        """Translate a minio/urllib3 exception into the storage hierarchy."""
        where = f"{self.endpoint}/{self.bucket}"
        if isinstance(exc, S3Error):
            code = exc.code or ""
            status = exc.response.status if exc.response is not None else 0
            detail = f"S3 {what} {key!r} on {where}: {code} ({exc.message})"
            if code in _NOT_FOUND_CODES:
                return NotFoundError(key)
            if code == "NoSuchBucket":
                return PermanentError(
                    f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}"
                )
            if code in _AUTH_CODES:
                return PermanentError(f"S3 access denied on {where}: {code} ({exc.message})")
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return TransientError(detail)
            return PermanentError(detail)
        if isinstance(exc, ServerError):
            if exc.status_code >= 500 or exc.status_code in (408, 429):
                return TransientError(f"S3 {what} {key!r} on {where}: {exc}")
            return PermanentError(f"S3 {what} {key!r} on {where}: {exc}")
        if isinstance(exc, InvalidResponseError):
            return TransientError(f"S3 {what} {key!r} on {where}: {exc}")
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and isinstance(
            exc.reason, urllib3.exceptions.SSLError
        ):
            return PermanentError(f"S3 TLS error with {self.endpoint}: {exc.reason}")
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
            reason = getattr(exc, "reason", None) or exc
            return TransientError(
                f"S3 endpoint {self.endpoint} unreachable during {what}: {reason}"
            )
        if isinstance(exc, MinioException):
            return TransientError(f"S3 {what} {key!r} on {where}: {exc}")
        if isinstance(exc, ValueError):
            return PermanentError(f"S3 {what} {key!r} on {where}: {exc}")
        return TransientError(f"S3 {what} {key!r} on {where}: {exc!r}")

    async def _blocking(self, func: Callable[[], T], what: str, key: str) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, func)
        except StorageError:
            raise
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._error(exc, what, key) from exc

    async def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        async with self._bucket_lock:
            if self._bucket_checked:
                return
            try:
                exists = await self._blocking(
                    lambda: self._client.bucket_exists(self.bucket), "check bucket", self.bucket
                )
            except PermanentError as exc:
                cause = exc.__cause__
                if isinstance(cause, S3Error) and cause.code in _AUTH_CODES:
                    # Credentials limited to objects may not see the bucket itself: let the
                    # requests speak for themselves (a bad secret still fails on each one).
                    self._bucket_checked = True
                    return
                raise
            if not exists:
                raise PermanentError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}")
            self._bucket_checked = True

    async def _request(self, func: Callable[[], T], what: str, key: str) -> T:
        await self._ensure_bucket()
        return await self._blocking(func, what, key)

    # -- operations ----------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        await self._request(
            lambda: self._client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), part_size=self.part_size
            ),
            "write",
            key,
        )

    def _read(self, name: str, offset: int, length: int) -> bytes:
        response = self._client.get_object(self.bucket, name, offset=offset, length=length)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    async def get(self, key: str) -> bytes:
        name = self._name(key)
        return await self._request(lambda: self._read(name, 0, 0), "read", key)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        name = self._name(key)
        try:
            return await self._request(lambda: self._read(name, offset, length), "read", key)
        except PermanentError as exc:
            cause = exc.__cause__
            if isinstance(cause, S3Error) and cause.code == "InvalidRange":
                await self.stat(key)  # NotFoundError if the object is gone
                return b""
            raise

    async def stat(self, key: str) -> int:
        name = self._name(key)
        info: Object = await self._request(
            lambda: self._client.stat_object(self.bucket, name), "stat", key
        )
        return int(info.size or 0)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for info in self.list_info(prefix):
            yield info.key

    async def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Sizes and ``Last-Modified`` (whole seconds, the server's clock) from the
        ``ListObjectsV2`` pages themselves."""
        validate_prefix(prefix)
        await self._ensure_bucket()
        objects: Iterator[Object] = iter(
            self._client.list_objects(self.bucket, prefix=self.root + prefix, recursive=True)
        )

        def batch() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            for obj in objects:
                name = obj.object_name or ""
                if not obj.is_dir and name.startswith(self.root):
                    modified = obj.last_modified.timestamp() if obj.last_modified else 0.0
                    out.append(ObjectInfo(name[len(self.root) :], obj.size or 0, modified))
                if len(out) >= LIST_BATCH:
                    break
            return out

        while True:
            infos = await self._blocking(batch, "list", prefix or "/")
            if not infos:
                return
            for info in infos:
                if _is_key(info.key):
                    yield info

    async def delete(self, key: str) -> None:
        name = self._name(key)
        await self._request(lambda: self._client.remove_object(self.bucket, name), "delete", key)

    def _delete_batch(self, names: Sequence[str]) -> _Failures:
        errors = self._client.remove_objects(self.bucket, [DeleteObject(n) for n in names])
        return [(e.name or "", e.code, e.message or "") for e in errors if e.code != "NoSuchKey"]

    async def delete_many(self, keys: Iterable[str]) -> None:
        names = [self._name(k) for k in keys]
        for start in range(0, len(names), DELETE_BATCH):
            chunk = names[start : start + DELETE_BATCH]
            failed = await self._request(
                functools.partial(self._delete_batch, chunk), "delete", chunk[0]
            )
            if failed:
                name, code, message = failed[0]
                error = PermanentError if code in _AUTH_CODES else TransientError
                raise error(
                    f"S3 delete of {len(failed)} object(s) failed on {self.endpoint}/"
                    f"{self.bucket}, first {name!r}: {code} ({message})"
                )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._http.clear()


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except StorageError:
        return False
    return True
