"""Destination drivers behind one async protocol.

    from virtbackup.storage import open_driver, retry, test_connection

    driver = open_driver("sftp", {"host": "...", "username": "...", "password": "..."})
    async with driver:                       # the bundled drivers are async context managers
        print(await test_connection(driver))  # "SFTP connection successful (read/write OK)."
        await retry(lambda: driver.put("chunks/ab/ab12", data))

The contract is in ``protocol``; errors in ``errors``; key rules in ``keys``. The driver
classes live in ``filesystem``, ``sftp``, ``s3``, ``gdrive`` and ``dummy`` (``sftp``,
``s3`` and ``gdrive`` are imported on first use); Google OAuth tokens in ``google_auth``.
The test servers and the Google Drive stand-in live in the dev-only package
``virtbackup.testing``.
"""

from __future__ import annotations

from virtbackup.storage.errors import (
    InvalidKeyError,
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    StorageError,
    TransientError,
)
from virtbackup.storage.factory import (
    REPOSITORY_DIR,
    open_destination,
    open_driver,
    validate_params,
)
from virtbackup.storage.google_auth import (
    GoogleApi,
    GoogleTokens,
    format_expires_at,
    parse_expires_at,
)
from virtbackup.storage.keys import validate_key, validate_prefix
from virtbackup.storage.probe import test_connection
from virtbackup.storage.protocol import Driver, ObjectInfo
from virtbackup.storage.registry import available_drivers, driver_info
from virtbackup.storage.retry import DEFAULT_POLICY, RetryingDriver, RetryPolicy, retry

__all__ = [
    "DEFAULT_POLICY",
    "REPOSITORY_DIR",
    "Driver",
    "GoogleApi",
    "GoogleTokens",
    "InvalidKeyError",
    "InvalidParamsError",
    "NotFoundError",
    "ObjectInfo",
    "PermanentError",
    "RetryPolicy",
    "RetryingDriver",
    "StorageError",
    "TransientError",
    "available_drivers",
    "driver_info",
    "format_expires_at",
    "open_destination",
    "open_driver",
    "parse_expires_at",
    "retry",
    "test_connection",
    "validate_key",
    "validate_params",
    "validate_prefix",
]
