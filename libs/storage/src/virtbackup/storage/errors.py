"""The storage error hierarchy: every driver raises these, and only these.

Each class says whether a retry can help (``retryable``):

- ``NotFoundError``: the key does not exist. Retrying does not help.
- ``PermanentError``: the request cannot succeed as configured (authentication failed,
  bucket or base path missing, permission denied, bad key, bad parameters). Retrying
  does not help; a person has to change something.
- ``TransientError``: the request may succeed if repeated (timeout, dropped connection,
  server unavailable, 5xx). ``virtbackup.storage.retry`` retries exactly these.

Driver-specific exceptions (``OSError``, asyncssh's, minio's, urllib3's, httpx's) never
leak out of a driver; the original is chained as ``__cause__``.
"""

from __future__ import annotations

from typing import ClassVar


class StorageError(Exception):
    """Base of every storage error. ``retryable`` tells whether a retry can help."""

    retryable: ClassVar[bool] = False


class NotFoundError(StorageError):
    """The key (object) does not exist."""

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(message or f"not found: {key!r}")
        self.key = key


class PermanentError(StorageError):
    """The operation cannot succeed without a change of configuration or permissions."""


class InvalidKeyError(PermanentError, ValueError):
    """A key or prefix breaks the key rules of ``virtbackup.storage.keys``."""


class InvalidParamsError(PermanentError, ValueError):
    """Driver parameters failed validation (unknown driver, missing or bad field)."""


class TransientError(StorageError):
    """The operation failed for a reason that may go away: retrying can help.

    ``retry_after`` is how many seconds the server asked us to wait (an HTTP
    ``Retry-After``), or None; ``virtbackup.storage.retry`` waits at least that long.
    """

    retryable: ClassVar[bool] = True

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after
