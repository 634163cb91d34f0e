"""The agent configuration (``GET/POST /config``, ``agent.yaml``), validated strictly.

Unknown fields and wrong types are errors. Field names on the wire are exactly those of
the agent API (camelCase, and ``base_path`` where the API writes it so).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]

#: Keys whose values are secrets: never returned in clear by the API.
SECRET_KEYS: Final = frozenset(
    {
        "password",
        "privateKey",
        "accessToken",
        "refreshToken",
        "ntfymeToken",
        "secretKey",
        "passphrase",
        "clientSecret",
    }
)
#: What a non-empty secret reads as. Posting it back keeps the stored secret.
SECRET_MASK: Final = "********"  # noqa: S105


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    """Base of the config structs: unknown fields are errors."""


class FilesystemParams(Strict, kw_only=True):
    path: Annotated[str, msgspec.Meta(min_length=1)]


class SftpParams(Strict, kw_only=True):
    host: Annotated[str, msgspec.Meta(min_length=1)]
    port: Port = 22
    username: Annotated[str, msgspec.Meta(min_length=1)]
    password: str = ""
    private_key: str = ""
    base_path: str = "/"
    host_key: str = ""


class S3Params(Strict, kw_only=True):
    endpoint: Annotated[str, msgspec.Meta(min_length=1)]
    bucket: Annotated[str, msgspec.Meta(min_length=3, max_length=63)]
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    secure: bool = True
    prefix: str = ""


class GdriveParams(Strict, kw_only=True):
    root_path: str = "/"


class DummyParams(Strict, kw_only=True):
    pass


#: The parameter schema of each destination driver id.
DRIVER_PARAMS: Final[dict[str, type[Strict]]] = {
    "filesystem": FilesystemParams,
    "sftp": SftpParams,
    "s3": S3Params,
    "gdrive": GdriveParams,
    "dummy": DummyParams,
}


class DestinationEncryption(Strict, kw_only=True):
    """Encryption at rest, chosen when the destination's repository is created: a random
    data key wrapped by a key derived (scrypt) from ``passphrase``."""

    cipher: Literal["aes-256-gcm", "chacha20-poly1305"] = "aes-256-gcm"
    passphrase: Annotated[str, msgspec.Meta(min_length=8)]


class Destination(Strict, kw_only=True):
    id: Id
    name: str = ""
    driver_id: str
    enabled: bool = True
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    encryption: DestinationEncryption | None = None


class GdriveSettings(Strict, kw_only=True):
    scope: str = "https://www.googleapis.com/auth/drive.file"
    root_path: str = "/"
    access_token: str = ""
    refresh_token: str = ""
    account_email: str = ""
    expires_at: str | int | float | None = None


class SftpSettings(Strict, kw_only=True):
    host: str = ""
    port: Port = 22
    username: str = ""
    password: str = ""
    private_key: str = ""
    base_path: str = "/"


class BackupSettings(Strict, kw_only=True):
    driver_id: str = "filesystem"
    base_path: str = msgspec.field(default="", name="base_path")
    gdrive: GdriveSettings = msgspec.field(default_factory=GdriveSettings)
    sftp: SftpSettings = msgspec.field(default_factory=SftpSettings)


class Server(Strict, kw_only=True):
    """A hypervisor server. Empty ``host`` means the local libvirt (``qemu:///system``)."""

    id: Id
    name: str = ""
    host: str = ""
    port: Port = 22
    username: str = ""
    password: str = ""
    private_key: str = ""
    uri: str = ""


class AgentConfig(Strict, kw_only=True):
    """The whole agent configuration."""

    destinations: list[Destination] = msgspec.field(default_factory=list)
    backup_destination_id: str | None = None
    restore_destination_id: str | None = None
    backup: BackupSettings = msgspec.field(default_factory=BackupSettings)
    hashblocks_limit_buffer_mb: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 1024
    dummy_driver_tmp_writes: bool = False
    ntfyme_token: str = ""
    connection_verified: bool = False
    selected_server_id: str | None = None
    listen_all: bool = False
    servers: list[Server] = msgspec.field(default_factory=list)


class ConfigError(ValueError):
    """The configuration is well-formed but inconsistent; the message names the field."""


def decode_config(data: bytes | dict[str, Any]) -> AgentConfig:
    """Decode and fully validate a configuration (JSON bytes or a mapping from YAML).

    Raises ``msgspec.ValidationError``/``msgspec.DecodeError`` for shape errors and
    ``ConfigError`` for cross-field errors; both messages name the offending field.
    """
    if isinstance(data, bytes | bytearray):
        cfg = msgspec.json.decode(data, type=AgentConfig)
    else:
        cfg = msgspec.convert(data, type=AgentConfig, strict=True)
    validate_config(cfg)
    return cfg


def validate_config(cfg: AgentConfig) -> None:
    """Cross-field checks: unique ids, known drivers, valid driver params, references."""
    seen: set[str] = set()
    for i, dest in enumerate(cfg.destinations):
        where = f"$.destinations[{i}]"
        if dest.id in seen:
            raise ConfigError(f"duplicate destination id {dest.id!r} - at `{where}.id`")
        seen.add(dest.id)
        schema = DRIVER_PARAMS.get(dest.driver_id)
        if schema is None:
            known = ", ".join(sorted(DRIVER_PARAMS))
            raise ConfigError(
                f"unknown driverId {dest.driver_id!r} (known: {known}) - at `{where}.driverId`"
            )
        try:
            msgspec.convert(dest.params, type=schema, strict=True)
        except msgspec.ValidationError as exc:
            raise ConfigError(_rebase(str(exc), f"{where}.params")) from None
    for field, value in (
        ("backupDestinationId", cfg.backup_destination_id),
        ("restoreDestinationId", cfg.restore_destination_id),
    ):
        if value is not None and value not in seen:
            raise ConfigError(f"{field} {value!r} names no destination - at `$.{field}`")
    server_ids: set[str] = set()
    for i, server in enumerate(cfg.servers):
        if server.id in server_ids:
            raise ConfigError(f"duplicate server id {server.id!r} - at `$.servers[{i}].id`")
        server_ids.add(server.id)


def destination_params(dest: Destination) -> Strict:
    """The typed parameters of a destination (already validated by ``validate_config``)."""
    return msgspec.convert(dest.params, type=DRIVER_PARAMS[dest.driver_id], strict=True)


def _rebase(message: str, prefix: str) -> str:
    """Rewrite msgspec's ``- at `$...` `` suffix so that it points into the whole config."""
    if "- at `$" in message:
        return message.replace("- at `$", f"- at `{prefix}", 1)
    return f"{message} - at `{prefix}`"


def encode_config(cfg: AgentConfig) -> bytes:
    return msgspec.json.encode(cfg)


def config_to_builtins(cfg: AgentConfig) -> dict[str, Any]:
    out = msgspec.to_builtins(cfg)
    assert isinstance(out, dict)
    return out
