"""Opening a driver from a destination's ``driverId`` and ``params`` (as configured).

``open_driver`` validates ``params`` strictly with the schema of
``virtbackup.contracts.v1.config.DRIVER_PARAMS`` (camelCase keys, exact types, no unknown
keys) and builds the driver. It does no I/O: connections are opened on first use, so
use ``virtbackup.storage.probe.test_connection`` to check a destination.

Every destination keeps the repository in a ``VirtBackup`` folder of its base (the
filesystem ``path``, the SFTP ``basePath``, the S3 ``prefix``), so the driver's root, and
every key, lives below ``<base>/VirtBackup/``.

Adding a driver (Google Drive, say) means: a module with the driver class, an opener
registered in ``_OPENERS`` here and an entry in ``registry``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from virtbackup.contracts.v1.config import (
    DRIVER_PARAMS,
    Destination,
    DummyParams,
    FilesystemParams,
    S3Params,
    SftpParams,
    Strict,
)
from virtbackup.storage.errors import InvalidKeyError, InvalidParamsError
from virtbackup.storage.keys import validate_prefix
from virtbackup.storage.protocol import Driver

#: The folder inside every destination's base that holds the repository.
REPOSITORY_DIR: Final = "VirtBackup"

Opener = Callable[[Any, bool], Driver]


def _open_filesystem(params: FilesystemParams, tmp_writes: bool) -> Driver:
    from virtbackup.storage.filesystem import FilesystemDriver

    return FilesystemDriver(os.path.join(os.path.abspath(params.path), REPOSITORY_DIR))


def _open_sftp(params: SftpParams, tmp_writes: bool) -> Driver:
    from virtbackup.storage.sftp import SftpDriver

    if not params.password and not params.private_key:
        raise InvalidParamsError("sftp: give a password or a privateKey")
    base = posixpath.normpath(params.base_path or "/")
    return SftpDriver(
        host=params.host,
        port=params.port,
        username=params.username,
        password=params.password,
        private_key=params.private_key,
        host_key=params.host_key,
        root=posixpath.join(base, REPOSITORY_DIR),
    )


def _open_s3(params: S3Params, tmp_writes: bool) -> Driver:
    from virtbackup.storage.s3 import S3Driver

    prefix = params.prefix.strip("/")
    try:
        validate_prefix(prefix)
    except InvalidKeyError as exc:
        raise InvalidParamsError(f"s3: bad prefix: {exc}") from None
    root = f"{prefix}/{REPOSITORY_DIR}/" if prefix else f"{REPOSITORY_DIR}/"
    return S3Driver(
        endpoint=params.endpoint,
        bucket=params.bucket,
        region=params.region,
        access_key=params.access_key,
        secret_key=params.secret_key,
        secure=params.secure,
        root=root,
    )


def _open_dummy(params: DummyParams, tmp_writes: bool) -> Driver:
    from virtbackup.storage.dummy import DummyDriver

    return DummyDriver(tmp_writes=tmp_writes)


_OPENERS: Final[dict[str, Opener]] = {
    "filesystem": _open_filesystem,
    "sftp": _open_sftp,
    "s3": _open_s3,
    "dummy": _open_dummy,
}


def validate_params(driver_id: str, params: Mapping[str, Any]) -> Strict:
    """The typed params of ``driver_id``; ``InvalidParamsError`` naming the bad field."""
    schema = DRIVER_PARAMS.get(driver_id)
    if schema is None or driver_id not in _OPENERS:
        known = ", ".join(sorted(_OPENERS))
        raise InvalidParamsError(f"unknown or unavailable driver {driver_id!r} (known: {known})")
    try:
        return msgspec.convert(dict(params), type=schema, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(f"invalid {driver_id} params: {exc}") from None


def open_driver(driver_id: str, params: Mapping[str, Any], *, tmp_writes: bool = False) -> Driver:
    """Validate ``params`` and build the driver (no I/O). ``tmp_writes`` affects ``dummy``."""
    typed = validate_params(driver_id, params)
    return _OPENERS[driver_id](typed, tmp_writes)


def open_destination(destination: Destination, *, tmp_writes: bool = False) -> Driver:
    """``open_driver`` for a configured destination."""
    return open_driver(destination.driver_id, destination.params, tmp_writes=tmp_writes)
