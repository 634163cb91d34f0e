"""Which destination drivers exist, and what they can do (``GET /drivers``).

Each driver's ``params`` are derived from its schema in ``virtbackup.contracts.v1.config``
(names as on the wire, required flags and defaults), so they cannot drift from what
``open_driver`` accepts. Capabilities describe what the driver in this package really
does; the conformance suite checks the range-read flag against the driver's behaviour.
"""

from __future__ import annotations

from typing import Final

import msgspec
import msgspec.inspect

from virtbackup.contracts.v1.config import DRIVER_PARAMS, SECRET_KEYS, Strict
from virtbackup.contracts.v1.drivers import Capabilities, DriverInfo, DriverParam

#: Descriptions of the parameters, by wire name.
_DESCRIPTIONS: Final = {
    "path": "Directory on this machine; the repository lives in its VirtBackup folder",
    "host": "SFTP server host name or address",
    "port": "SSH port",
    "username": "SSH user name",
    "password": "SSH password (or use privateKey)",
    "privateKey": "SSH private key, PEM or OpenSSH text",
    "basePath": "Existing directory on the server; the repository lives in its VirtBackup folder",
    "hostKey": "Expected server host key (OpenSSH public key line or SHA256: fingerprint); "
    "when empty, the key the server presents when the configuration is saved is pinned",
    "endpoint": "S3 endpoint host:port (no scheme; see secure)",
    "bucket": "Existing bucket",
    "region": "Region (empty: ask the server)",
    "accessKey": "Access key id",
    "secretKey": "Secret access key",
    "secure": "Use HTTPS",
    "prefix": "Key prefix inside the bucket; the repository lives under <prefix>/VirtBackup/",
    "rootPath": "Folder in Google Drive (created if missing); the repository lives in its "
    "VirtBackup folder. The account is the one signed in with POST /oauth/google",
}


def _type_name(t: msgspec.inspect.Type) -> str:
    if isinstance(t, msgspec.inspect.BoolType):
        return "boolean"
    if isinstance(t, msgspec.inspect.IntType):
        return "integer"
    if isinstance(t, msgspec.inspect.FloatType):
        return "number"
    return "string"


def params_of(schema: type[Strict]) -> list[DriverParam]:
    """The ``DriverParam`` list of a destination params schema."""
    info = msgspec.inspect.type_info(schema)
    assert isinstance(info, msgspec.inspect.StructType)
    out: list[DriverParam] = []
    for field in info.fields:
        default = field.default
        if default is msgspec.NODEFAULT or not isinstance(default, str | int | bool):
            default = None
        out.append(
            DriverParam(
                name=field.encode_name,
                type=_type_name(field.type),
                required=field.required,
                secret=field.encode_name in SECRET_KEYS,
                default=default,
                description=_DESCRIPTIONS.get(field.encode_name, ""),
            )
        )
    return out


def _capabilities(
    driver_id: str,
    *,
    range_read: bool,
    batch_delete: bool,
    multipart: bool,
    max_concurrent_writes: int,
) -> Capabilities:
    return Capabilities(
        supports_range_read=range_read,
        supports_batch_delete=batch_delete,
        supports_multipart_upload=multipart,
        supports_server_side_copy=False,
        supports_conditional_write=False,
        supports_versioning=False,
        max_concurrent_writes=max_concurrent_writes,
        params=params_of(DRIVER_PARAMS[driver_id]),
    )


FILESYSTEM: Final = DriverInfo(
    id="filesystem",
    label="Filesystem",
    uses_path=True,
    # pread is a native range read; delete_many unlinks a batch in one thread hop.
    capabilities=_capabilities(
        "filesystem", range_read=True, batch_delete=True, multipart=False, max_concurrent_writes=16
    ),
)

SFTP: Final = DriverInfo(
    id="sftp",
    label="SFTP",
    uses_path=True,
    # SFTP reads at an offset natively; deletes are one request per file.
    capabilities=_capabilities(
        "sftp", range_read=True, batch_delete=False, multipart=False, max_concurrent_writes=8
    ),
)

S3: Final = DriverInfo(
    id="s3",
    label="S3",
    uses_path=False,
    # GET with Range; DeleteObjects (1000 per request); objects over 64 MiB go multipart.
    capabilities=_capabilities(
        "s3", range_read=True, batch_delete=True, multipart=True, max_concurrent_writes=16
    ),
)

GDRIVE: Final = DriverInfo(
    id="gdrive",
    label="Google Drive",
    uses_path=True,
    # files.get with a Range header; one files.delete per file (no batch); files over
    # 5 MiB go as resumable uploads in 8 MiB chunks. Drive throttles writes per user.
    capabilities=_capabilities(
        "gdrive", range_read=True, batch_delete=False, multipart=True, max_concurrent_writes=4
    ),
)

DUMMY: Final = DriverInfo(
    id="dummy",
    label="Dummy",
    uses_path=False,
    # No data to read a range of (or, with tmp writes, an emulated one).
    capabilities=_capabilities(
        "dummy", range_read=False, batch_delete=True, multipart=False, max_concurrent_writes=64
    ),
)

_DRIVERS: Final = (FILESYSTEM, SFTP, S3, GDRIVE, DUMMY)


def available_drivers() -> list[DriverInfo]:
    """Every driver this build can write to, with truthful capabilities."""
    return list(_DRIVERS)


def driver_info(driver_id: str) -> DriverInfo | None:
    """The description of one driver, or None if this build has no such driver."""
    for info in _DRIVERS:
        if info.id == driver_id:
            return info
    return None
