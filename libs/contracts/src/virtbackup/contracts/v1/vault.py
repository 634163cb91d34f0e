"""The vault: credentials of servers (SSH) and destinations (SFTP, S3, Google Drive).

A vault connection holds the credentials of one endpoint: where they may be sent
(``host``/``port`` or ``endpoint``) and what is sent (user, password, private key, keys,
tokens). Servers and destinations of the configuration name one (``vaultConnectionId``)
instead of holding a secret. The secret fields (:data:`SECRET_FIELDS`) are stored sealed
with AEAD under the vault key (``runtime.vault``) and never leave the gateway in clear:
the API masks them, and the services that use them get them sealed for themselves
(:class:`VaultOpenRequest` on ``VaultCmd``).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message
from virtbackup.contracts.v1.config import (
    HOST_PATTERN,
    HostKey,
    Id,
    Name,
    Port,
    UserName,
)
from virtbackup.contracts.v1.readable import described

#: What a connection is for: a server's SSH login, or a destination's driver.
VaultKind = Literal["ssh", "sftp", "s3", "gdrive"]
KINDS: Final = ("ssh", "sftp", "s3", "gdrive")
#: The kinds a destination's driver takes (``driverId`` -> kind).
DESTINATION_KINDS: Final = {"sftp": "sftp", "s3": "s3", "gdrive": "gdrive"}

#: The fields of a connection that are secrets (wire names): sealed at rest, masked on
#: the way out, sent to a service only sealed.
SECRET_FIELDS: Final = ("password", "privateKey", "secretKey", "clientSecret", "refreshToken")

#: The fields each kind may carry (wire names; besides ``id``, ``name``, ``kind``).
KIND_FIELDS: Final[dict[str, frozenset[str]]] = {
    "ssh": frozenset({"host", "port", "username", "password", "privateKey", "hostKey"}),
    "sftp": frozenset(
        {"host", "port", "username", "password", "privateKey", "hostKey", "basePath"}
    ),
    "s3": frozenset({"endpoint", "bucket", "region", "secure", "accessKey", "secretKey"}),
    "gdrive": frozenset({"clientId", "clientSecret", "refreshToken"}),
}

_PRINTABLE: Final = r"^[^\x00-\x1f\x7f]*$"
Secret = Annotated[str, msgspec.Meta(max_length=16384)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096, pattern=_PRINTABLE)]


class VaultConnectionBody(
    msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True, omit_defaults=True
):
    """``POST /api/v1/vault/connections``: a connection and its credentials.

    ``id``: chosen by the client (letters, digits, ``_.:-``) or made by the gateway.
    ``ssh`` and ``sftp``: ``host``, ``username`` and a ``password`` or ``privateKey``;
    ``hostKey`` pins the host key (pinned on save when empty). ``s3``: ``endpoint``,
    ``bucket`` (what the test probes), ``accessKey`` and ``secretKey``. ``gdrive``:
    ``clientId``, ``clientSecret``, ``refreshToken``. A field of another kind is a 400.
    ``saveOnFailure``: keep the connection (marked ``failing``) when its test fails;
    without it, a failing test is a 400 and nothing is saved.
    """

    id: Id | None = None
    name: Name = ""
    kind: VaultKind
    host: Annotated[str, msgspec.Meta(max_length=253, pattern=HOST_PATTERN)] = ""
    port: Port | None = None
    username: UserName = ""
    password: Secret = ""
    private_key: Secret = ""
    host_key: HostKey = ""
    base_path: ShortText = ""
    endpoint: Annotated[
        str,
        msgspec.Meta(
            max_length=270,
            pattern=described(
                r"^((?:[Hh][Tt][Tt][Pp][Ss]?://)?(?!-)[A-Za-z0-9_.:%\[\]-]+/?)?$",
                "a host[:port], optionally after http:// or https://, without a path (or empty)",
            ),
        ),
    ] = ""
    bucket: Annotated[
        str,
        msgspec.Meta(
            max_length=63,
            pattern=described(
                r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$",
                "a bucket name (letters, digits, '.', '_', '-', starting with a letter or digit;"
                " or empty)",
            ),
        ),
    ] = ""
    region: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] = ""
    secure: bool | None = None
    access_key: Annotated[str, msgspec.Meta(max_length=256, pattern=_PRINTABLE)] = ""
    secret_key: Secret = ""
    client_id: Annotated[str, msgspec.Meta(max_length=1024, pattern=_PRINTABLE)] = ""
    client_secret: Secret = ""
    refresh_token: Secret = ""
    save_on_failure: bool = False


class VaultOpenRequest(Message, frozen=True, kw_only=True):
    """Ask the vault's owner (the gateway) for a connection's credentials, sealed for
    the asking service (``VaultCmd.OPEN_SSH`` for a server the configuration names,
    ``VaultCmd.OPEN_DESTINATION`` for a destination). ``not_found`` when no server (or
    destination) of the configuration refers to ``connection_id`` or the kind differs."""

    connection_id: str


class VaultCredentials(Message, frozen=True, kw_only=True):
    """A connection's credentials: ``fields`` by wire name (``host``, ``username``,
    ``password``, ...); every secret field (:data:`SECRET_FIELDS`) is sealed under the
    services' secret key (``runtime.sealing``: ``vbsec:v1:...``), never in clear."""

    connection_id: str
    kind: str
    fields: dict[str, str | int | bool] = msgspec.field(default_factory=dict)
