"""Opening a driver from a destination's ``driverId`` and ``params`` (as configured).

``open_driver`` validates ``params`` strictly with the schema of
``virtbackup.contracts.v1.config.DRIVER_PARAMS`` (camelCase keys, exact types, no unknown
keys) and builds the driver. An SFTP destination needs its ``hostKey`` (pinned by the
gateway when the configuration is saved): without one it is refused, since its secret
would go to whichever server answers. It does no I/O: connections are opened on first use, so
use ``virtbackup.storage.probe.test_connection`` to check a destination.

Every destination keeps the repository in a ``VirtBackup`` folder of its base (the
filesystem ``path``, the SFTP ``basePath``, the S3 ``prefix``, the Google Drive
``rootPath``), so the driver's root, and every key, lives below ``<base>/VirtBackup/``.

Google Drive needs more than its params: the account's OAuth tokens (the config's
``backup.gdrive``, as a ``GdriveSettings`` or a ``GoogleTokens``), passed by keyword::

    open_driver("gdrive", {"rootPath": "/Backups"}, tokens=config.backup.gdrive,
                on_refresh=store_new_tokens)

``on_refresh(tokens)`` (sync or async) receives the ``GoogleTokens`` after every refresh of
the access token, to be stored (``tokens.apply_to(settings)``). ``google_api`` sets the
endpoints and OAuth client (default ``GoogleApi.from_env()``: Google's endpoints, client
id and secret from ``VIRTBACKUP_GOOGLE_CLIENT_ID``/``VIRTBACKUP_GOOGLE_CLIENT_SECRET``).
The other drivers ignore these keywords.

Adding a driver means: a module with the driver class, an opener registered in
``_OPENERS`` here and an entry in ``registry``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from virtbackup.contracts.v1.config import (
    DRIVER_PARAMS,
    Destination,
    DummyParams,
    FilesystemParams,
    GdriveParams,
    GdriveSettings,
    S3Params,
    SftpParams,
    Strict,
)
from virtbackup.storage.errors import InvalidKeyError, InvalidParamsError
from virtbackup.storage.keys import validate_prefix
from virtbackup.storage.protocol import Driver

if TYPE_CHECKING:
    from virtbackup.storage.google_auth import GoogleApi, GoogleTokens, OnRefresh

#: The folder inside every destination's base that holds the repository.
REPOSITORY_DIR: Final = "VirtBackup"


@dataclass(frozen=True)
class _Options:
    """The keyword arguments of ``open_driver`` besides ``params``."""

    tmp_writes: bool = False
    tokens: GoogleTokens | GdriveSettings | None = None
    on_refresh: OnRefresh | None = None
    google_api: GoogleApi | None = None


Opener = Callable[[Any, _Options], Driver]


def _open_filesystem(params: FilesystemParams, options: _Options) -> Driver:
    from virtbackup.storage.filesystem import FilesystemDriver

    return FilesystemDriver(os.path.join(os.path.abspath(params.path), REPOSITORY_DIR))


def _open_sftp(params: SftpParams, options: _Options) -> Driver:
    from virtbackup.storage.sftp import SftpDriver

    if not params.password and not params.private_key:
        raise InvalidParamsError("sftp: give a password or a privateKey")
    if not params.host_key:
        raise InvalidParamsError(
            f"sftp: the host key of {params.host}:{params.port} is not pinned (hostKey), so "
            "no secret is sent to it; save the configuration again while the server "
            "answers (it pins the key), or give hostKey"
        )
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


def _open_s3(params: S3Params, options: _Options) -> Driver:
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


def _open_gdrive(params: GdriveParams, options: _Options) -> Driver:
    from virtbackup.storage.gdrive import GdriveDriver, root_segments
    from virtbackup.storage.google_auth import GoogleTokens

    root_segments(params.root_path)  # InvalidParamsError for a bad rootPath, before tokens
    tokens = options.tokens
    if isinstance(tokens, GdriveSettings):
        tokens = GoogleTokens.from_settings(tokens)
    if tokens is None or not (tokens.access_token or tokens.refresh_token):
        raise InvalidParamsError(
            "gdrive: no Google account is connected (no access or refresh token); "
            "sign in with Google first (POST /oauth/google)"
        )
    return GdriveDriver(
        tokens=tokens,
        root_path=params.root_path,
        api=options.google_api,
        on_refresh=options.on_refresh,
    )


def _open_dummy(params: DummyParams, options: _Options) -> Driver:
    from virtbackup.storage.dummy import DummyDriver

    return DummyDriver(tmp_writes=options.tmp_writes)


_OPENERS: Final[dict[str, Opener]] = {
    "filesystem": _open_filesystem,
    "sftp": _open_sftp,
    "s3": _open_s3,
    "gdrive": _open_gdrive,
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


def open_driver(
    driver_id: str,
    params: Mapping[str, Any],
    *,
    tmp_writes: bool = False,
    tokens: GoogleTokens | GdriveSettings | None = None,
    on_refresh: OnRefresh | None = None,
    google_api: GoogleApi | None = None,
) -> Driver:
    """Validate ``params`` and build the driver (no I/O).

    ``tmp_writes`` affects ``dummy``; ``tokens``, ``on_refresh`` and ``google_api`` affect
    ``gdrive`` (see the module docstring), which needs ``tokens``.
    """
    typed = validate_params(driver_id, params)
    options = _Options(
        tmp_writes=tmp_writes, tokens=tokens, on_refresh=on_refresh, google_api=google_api
    )
    return _OPENERS[driver_id](typed, options)


def open_destination(
    destination: Destination,
    *,
    tmp_writes: bool = False,
    tokens: GoogleTokens | GdriveSettings | None = None,
    on_refresh: OnRefresh | None = None,
    google_api: GoogleApi | None = None,
) -> Driver:
    """``open_driver`` for a configured destination."""
    return open_driver(
        destination.driver_id,
        destination.params,
        tmp_writes=tmp_writes,
        tokens=tokens,
        on_refresh=on_refresh,
        google_api=google_api,
    )
