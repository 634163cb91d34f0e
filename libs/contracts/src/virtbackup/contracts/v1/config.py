"""The agent configuration (``GET/POST /config``, ``agent.yaml``), validated strictly.

Unknown fields and wrong types are errors. Field names on the wire are exactly those of
the agent API (camelCase, and ``base_path`` where the API writes it so).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import posixpath
import re
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import msgspec

from virtbackup.contracts.v1.common import VmName, shown
from virtbackup.contracts.v1.readable import described
from virtbackup.contracts.v1.retention import KeepRules

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
_ID: Final = described(r"^[A-Za-z0-9_.:-]+$", "an id (letters, digits, '_', '.', ':' and '-')")
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_ID)]

#: No NUL or other control character (a line of text).
_PRINTABLE: Final = described(r"^[^\x00-\x1f\x7f]*$", "one line of text (no control character)")
#: A host name, IPv4 or IPv6 address (optionally bracketed); empty allowed; no leading '-'
#: (an option to a program), no spaces, no control characters.
#: A host name or address (never starting with ``-``: it would read as an option).
HOST_PATTERN: Final = described(
    r"^(?!-)[A-Za-z0-9_.:%\[\]-]*$",
    "a host name or IP address (letters, digits, '.', '-', ':', '[', ']'; not starting with '-')",
)
_HOST: Final = HOST_PATTERN
#: A display name: one printable line.
Name = Annotated[str, msgspec.Meta(max_length=200, pattern=_PRINTABLE)]
#: Where a server or SFTP destination is (empty: none).
Host = Annotated[str, msgspec.Meta(max_length=253, pattern=_HOST)]
#: An SSH or S3 user name: one printable line.
UserName = Annotated[str, msgspec.Meta(max_length=256, pattern=_PRINTABLE)]
#: A path: one printable line (no NUL).
PathText = Annotated[str, msgspec.Meta(max_length=4096, pattern=_PRINTABLE)]
#: A host key: an OpenSSH public key line or a ``SHA256:`` fingerprint (empty: not pinned).
HostKey = Annotated[str, msgspec.Meta(max_length=16384, pattern=_PRINTABLE)]
#: A Unix timestamp in seconds or milliseconds (up to the year 9999 in milliseconds).
_MAX_TIMESTAMP: Final = 253_402_300_799_999
Timestamp = (
    Annotated[int, msgspec.Meta(ge=0, le=_MAX_TIMESTAMP)]
    | Annotated[float, msgspec.Meta(ge=0, le=_MAX_TIMESTAMP)]
    | Annotated[str, msgspec.Meta(max_length=64, pattern=_PRINTABLE)]
    | None
)

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
    """An absolute directory on this machine, outside the system's own directories."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_PRINTABLE)]


class SftpParams(Strict, kw_only=True):
    """An SFTP server: a password or a private key is required; ``host_key`` pins the
    server's host key (set on first use by the gateway when empty)."""

    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=_HOST)]
    port: Port = 22
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=_PRINTABLE)]
    password: str = ""
    private_key: str = ""
    base_path: PathText = "/"
    host_key: HostKey = ""


class S3Params(Strict, kw_only=True):
    """An S3 bucket; ``endpoint`` is ``host[:port]`` (an ``http://`` or ``https://`` in
    front overrides ``secure``); ``prefix`` is a
    relative key path without ``.`` or ``..`` segments."""

    endpoint: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=270,
            pattern=described(
                r"^(?:[Hh][Tt][Tt][Pp][Ss]?://)?(?!-)[A-Za-z0-9_.:%\[\]-]+/?$",
                "a host[:port], optionally after http:// or https://, without a path",
            ),
        ),
    ]
    bucket: Annotated[
        str,
        msgspec.Meta(
            min_length=3,
            max_length=63,
            pattern=described(
                r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                "a bucket name (letters, digits, '.', '_', '-'; first a letter or digit)",
            ),
        ),
    ]
    region: Annotated[str, msgspec.Meta(max_length=64, pattern=_WORD)] = ""
    access_key: Annotated[str, msgspec.Meta(max_length=256, pattern=_PRINTABLE)] = ""
    secret_key: str = ""
    secure: bool = True
    prefix: PathText = ""


class GdriveParams(Strict, kw_only=True):
    root_path: PathText = "/"


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


class RetentionPolicy(KeepRules, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which restore points a prune keeps, in the sense of Proxmox Backup Server's prune
    (``virtbackup.repository.retention`` has the rules; the fields are
    ``contracts.v1.retention.KeepRules``'): each ``keep*`` is a count (an integer >= 0;
    absent: the rule is not used).

    A policy must keep something: at least one rule above 0. A policy that keeps nothing
    (every unprotected point is removed) is accepted only with ``keepAll: false``, an
    explicit acknowledgement. ``keepAll: true`` (without rules) keeps every point: a
    per-VM override that exempts a VM from its destination's policy.
    """


def check_retention(policy: KeepRules, where: str) -> None:
    """``ConfigError`` naming the field (``where`` is the policy's location, e.g.
    ``$.destinations[0].retention``) for a policy that keeps nothing without
    ``keepAll: false``, or that sets ``keepAll: true`` together with keep rules."""
    problem = policy.problem()
    if problem is not None:
        message, field = problem
        raise ConfigError(f"{message} - at `{where}{'.' + field if field else ''}`")


class Destination(Strict, kw_only=True):
    """A destination. ``retention``: the retention policy of its VMs' restore points
    (none: points are kept until deleted); ``vmRetention``: per-VM policies that replace
    it for the VMs named (a VM's name, as libvirt has it)."""

    id: Id
    name: Name = ""
    driver_id: str
    enabled: bool = True
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    encryption: DestinationEncryption | None = None
    retention: RetentionPolicy | None = None
    #: A vault connection holding this destination's credentials (its params then hold
    #: no secret); see ``contracts.v1.vault``.
    vault_connection_id: Id | None = None
    vm_retention: dict[VmName, RetentionPolicy] = msgspec.field(default_factory=dict)

    def retention_for(self, vm_name: str) -> RetentionPolicy | None:
        """The policy for ``vm_name``'s points: its override, else the destination's."""
        return self.vm_retention.get(vm_name, self.retention)


class GdriveSettings(Strict, kw_only=True):
    scope: str = "https://www.googleapis.com/auth/drive.file"
    root_path: PathText = "/"
    access_token: str = ""
    refresh_token: str = ""
    account_email: Annotated[str, msgspec.Meta(max_length=320, pattern=_PRINTABLE)] = ""
    expires_at: Timestamp = None


class SftpSettings(Strict, kw_only=True):
    host: Host = ""
    port: Port = 22
    username: UserName = ""
    password: str = ""
    private_key: str = ""
    base_path: PathText = "/"


class BackupSettings(Strict, kw_only=True):
    driver_id: str = "filesystem"
    base_path: PathText = msgspec.field(default="", name="base_path")
    gdrive: GdriveSettings = msgspec.field(default_factory=GdriveSettings)
    sftp: SftpSettings = msgspec.field(default_factory=SftpSettings)


class Server(Strict, kw_only=True):
    """A hypervisor server. Empty ``host`` means the local libvirt (``qemu:///system``).

    A server with a ``host`` is reached over SSH (``password`` or ``private_key``), whose
    host key ``host_key`` pins (set on first use by the gateway when empty); libvirt is
    tunnelled through that connection unless ``uri`` is a ``qemu+tls://`` URI: to the
    system daemon (``uri`` empty or ``qemu:///system``) or, with ``qemu:///session``, to
    the login user's own session daemon (another user's VMs, no root needed). ``uri``
    may only name the transports ``check_libvirt_uri`` accepts.

    ``restore_directories``: the directories (absolute, and their subdirectories) a
    restore may write disks into when it names a ``targetDirectory``; ``None`` (the
    default) means the target paths of the server's libvirt storage pools plus
    ``/var/lib/libvirt/images`` (:data:`DEFAULT_RESTORE_DIRECTORY`).
    """

    id: Id
    name: Name = ""
    host: Host = ""
    port: Port = 22
    username: UserName = ""
    password: str = ""
    private_key: str = ""
    uri: Annotated[str, msgspec.Meta(max_length=2048, pattern=_PRINTABLE)] = ""
    host_key: HostKey = ""
    restore_directories: list[PathText] | None = None
    #: A remote agent (``virtbackup agent``) on this server's host backs up its VMs: a
    #: backup of one is queued for that agent's lease instead of the bus.
    agent_id: Id | None = None
    #: The destinations whose parameters (credentials included) that agent may receive
    #: in a lease; a backup of this server to any other destination fails.
    agent_destination_ids: list[Id] = msgspec.field(default_factory=list)
    #: A vault connection (kind ``ssh``, same host and port) holding the login instead
    #: of ``password``/``private_key``; see ``contracts.v1.vault``.
    vault_connection_id: Id | None = None


class MetricsSettings(Strict, kw_only=True):
    """``metrics`` of the HyperSDK document: whether the gateway serves ``GET /metrics``
    (when false it answers 503 ``{"error": ...}``) and on which port: unset, or the
    HyperSDK listener's own port, serves it on that listener; another port serves it on a
    listener of its own (same host, same token) from the gateway's next start, and the
    HyperSDK listener's ``/metrics`` then answers 404 naming that port. Each service's
    own metrics endpoint is set by ``VIRTBACKUP_METRICS_PORT`` instead."""

    enabled: bool = True
    port: Port | None = None


#: Severities of notifications, lowest first (PBS's: info, notice, warning, error).
SEVERITIES: Final = ("info", "notice", "warning", "error")
#: The fields a matcher's ``matchField`` may name (every notification carries them;
#: empty when they do not apply): ``event`` (``job.failed``, ``schedule.failed``, ...),
#: ``type`` (the job type, or ``schedule``), ``server_id``, ``vm_name``,
#: ``destination_id``, ``schedule`` (the schedule's name).
MATCH_FIELDS: Final = ("event", "type", "server_id", "vm_name", "destination_id", "schedule")
#: ``exact:<field>=<value>[,<value>...]`` or ``regex:<field>=<python regex>``.
_MATCH_FIELD: Final = described(
    r"^(exact|regex):[a-z_]+=[^\x00-\x1f\x7f]*$",
    "a field match: exact:<field>=<value>[,<value>...] or regex:<field>=<regex>",
)
_HTTP_URL: Final = described(r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s]+$", "an http:// or https:// URL")
#: Letters, digits, '_' and '-' (empty allowed).
_WORD: Final = described(r"^[A-Za-z0-9_-]*$", "letters, digits, '_' and '-' only")


class NotificationMatcher(Strict, kw_only=True):
    """Which notifications are sent, in the manner of a Proxmox Backup Server matcher.

    ``matchSeverity``: the severities it matches (any of them; empty: every severity);
    ``matchField``: field matches (``exact:type=backup,restore``, ``regex:vm_name=^web-``);
    ``mode``: ``all`` (every given match must hold, the default) or ``any`` (one is
    enough); ``invertMatch`` negates the result. A notification is sent when any
    matcher matches; with no matcher, every ``error`` notification (a failed job, a
    failed schedule run) is sent.
    """

    name: Id
    mode: Literal["all", "any"] = "all"
    match_severity: list[Literal["info", "notice", "warning", "error"]] = msgspec.field(
        default_factory=list
    )
    match_field: list[Annotated[str, msgspec.Meta(max_length=1024, pattern=_MATCH_FIELD)]] = (
        msgspec.field(default_factory=list)
    )
    invert_match: bool = False


class NtfySettings(Strict, kw_only=True):
    """Notifications through ntfy's publish API: ``POST <serverUrl>/<topic>`` with
    ``ntfymeToken`` (top level of the configuration) as the bearer access token when
    set. An empty ``topic`` turns notifications off."""

    server_url: Annotated[
        str,
        msgspec.Meta(
            max_length=2048,
            pattern=described(r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s]+$", "an http:// or https:// URL"),
        ),
    ] = "https://ntfy.sh"
    topic: Annotated[str, msgspec.Meta(max_length=64, pattern=_WORD)] = ""
    matchers: list[NotificationMatcher] = msgspec.field(default_factory=list)


#: ntfy's access token as the configuration and ``POST /ntfyme/test`` take it (sealed
#: ``vbsec:v1:...`` or masked at rest and on the bus): printable characters without a
#: space, since it goes into an ``Authorization`` header; a control character (a final
#: newline) would make every notification fail at the HTTP client.
NtfyToken = Annotated[
    str,
    msgspec.Meta(
        max_length=4096,
        pattern=described(r"^[!-~]*(?![\s\S])", "a token (printable characters, no space)"),
    ),
]


class AgentConfig(Strict, kw_only=True):
    """The whole agent configuration."""

    destinations: list[Destination] = msgspec.field(default_factory=list)
    backup_destination_id: str | None = None
    restore_destination_id: str | None = None
    backup: BackupSettings = msgspec.field(default_factory=BackupSettings)
    hashblocks_limit_buffer_mb: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 1024
    dummy_driver_tmp_writes: bool = False
    ntfyme_token: NtfyToken = ""
    ntfy: NtfySettings = msgspec.field(default_factory=NtfySettings)
    connection_verified: bool = False
    selected_server_id: str | None = None
    listen_all: bool = False
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
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


def decode_stored_config(data: bytes) -> tuple[AgentConfig, str | None]:
    """Decode a configuration that was stored earlier: its shape is checked, and a rule
    it breaks (one added since it was saved) is returned as a message instead of raised,
    so that a stricter release never stops the services over a config they ran with.
    Every use of a field the rules guard checks it again where it is used."""
    cfg = msgspec.json.decode(data, type=AgentConfig)
    try:
        validate_config(cfg)
    except ConfigError as exc:
        return cfg, str(exc)
    return cfg, None


def validate_config(cfg: AgentConfig) -> None:
    """Cross-field checks: unique ids, known drivers, valid driver params, references,
    destinations that can only hurt (a system directory, a relative path, an S3 prefix
    with ``..``, an SFTP login without a secret), libvirt URIs that run programs, and
    host keys that cannot be read, one-line fields ending with a line break. Raises
    ``ConfigError`` naming the field."""
    check_single_lines(cfg)
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
            params = msgspec.convert(dest.params, type=schema, strict=True)
        except msgspec.ValidationError as exc:
            raise ConfigError(_rebase(str(exc), f"{where}.params")) from None
        broken = _line_breaks(params, _type_info(schema), f"{where}.params")
        if broken is not None:
            raise ConfigError(f"must be one line: it ends with a line break - at `{broken}`")
        if dest.vault_connection_id is not None:
            _check_vault_params(dest, f"{where}.params")
        else:
            _check_params(params, f"{where}.params")
        if dest.retention is not None:
            check_retention(dest.retention, f"{where}.retention")
        for vm_name, policy in dest.vm_retention.items():
            check_retention(policy, f"{where}.vmRetention[{vm_name!r}]")
    for field, value in (
        ("backupDestinationId", cfg.backup_destination_id),
        ("restoreDestinationId", cfg.restore_destination_id),
    ):
        if value is not None and value not in seen:
            raise ConfigError(f"{field} {value!r} names no destination - at `$.{field}`")
    server_ids: set[str] = set()
    for i, server in enumerate(cfg.servers):
        where = f"$.servers[{i}]"
        if server.id in server_ids:
            raise ConfigError(f"duplicate server id {server.id!r} - at `{where}.id`")
        server_ids.add(server.id)
        _check_server(server, where)
        for j, dest_id in enumerate(server.agent_destination_ids):
            if dest_id not in seen:
                raise ConfigError(
                    f"agentDestinationIds names no destination {dest_id!r} - at "
                    f"`{where}.agentDestinationIds[{j}]`"
                )
    _check_ntfy(cfg.ntfy)


def _check_ntfy(ntfy: NtfySettings) -> None:
    """``ConfigError`` for a ``serverUrl`` with a user or password in it (the URL is
    shown by ``GET /config``: the access token goes in ``ntfymeToken``, which is masked
    and sealed) or without a host, a duplicate matcher name, an unknown field or a regex
    that does not compile in a ``matchField``."""
    try:
        url = urlsplit(ntfy.server_url)
        hostname = url.hostname
    except ValueError as exc:
        raise ConfigError(f"not a URL: {exc} - at `$.ntfy.serverUrl`") from None
    if url.username is not None or url.password is not None:
        raise ConfigError(
            "must not carry a user or password (user:password@host): put ntfy's access"
            " token in ntfymeToken, which is masked and sealed - at `$.ntfy.serverUrl`"
        )
    if not hostname:
        raise ConfigError("an http:// or https:// URL needs a host - at `$.ntfy.serverUrl`")
    names: set[str] = set()
    for i, matcher in enumerate(ntfy.matchers):
        where = f"$.ntfy.matchers[{i}]"
        if matcher.name in names:
            raise ConfigError(f"duplicate matcher name {matcher.name!r} - at `{where}.name`")
        names.add(matcher.name)
        for j, text in enumerate(matcher.match_field):
            kind, _, rest = text.partition(":")
            field, _, value = rest.partition("=")
            at = f"{where}.matchField[{j}]"
            if field not in MATCH_FIELDS:
                known = ", ".join(MATCH_FIELDS)
                raise ConfigError(f"unknown field {field!r} (known: {known}) - at `{at}`")
            if kind == "regex":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ConfigError(f"invalid regex {value!r}: {exc} - at `{at}`") from None


#: The params of each driver that a vault connection holds instead (wire names).
VAULT_PARAM_SECRETS: Final[dict[str, tuple[str, ...]]] = {
    "sftp": ("password", "privateKey"),
    "s3": ("secretKey",),
    "gdrive": (),
}


def _check_vault_params(dest: Destination, where: str) -> None:
    """A destination with ``vaultConnectionId``: a driver whose secrets the vault can
    hold, and no secret in its params (the connection holds them)."""
    secrets = VAULT_PARAM_SECRETS.get(dest.driver_id)
    if secrets is None:
        raise ConfigError(
            f"driver {dest.driver_id!r} takes no vault connection (sftp, s3 and gdrive do) - at "
            f"`{where[: -len('.params')]}.vaultConnectionId`"
        )
    for key in secrets:
        if dest.params.get(key):
            raise ConfigError(
                f"{key} is held by the vault connection {dest.vault_connection_id!r}: leave "
                f"it empty here - at `{where}.{key}`"
            )
    params = destination_params(dest)
    if isinstance(params, SftpParams):
        _check_host_key(params.host_key, f"{where}.hostKey")
    else:
        _check_params(params, where)


#: Directories of the operating system: a destination there (or ``/`` itself) could only
#: damage the system or expose backups through it.
SYSTEM_DIRECTORIES: Final = frozenset(
    {
        "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
        "/run", "/sbin", "/sys", "/usr",
    }
)  # fmt: skip


def _check_params(params: Strict, where: str) -> None:
    if isinstance(params, FilesystemParams):
        path = params.path
        if not path.startswith("/"):
            raise ConfigError(
                f"path {path!r} must be absolute (a relative path depends on the directory "
                f"a service runs in) - at `{where}.path`"
            )
        normal = posixpath.normpath(path)
        normal = "/" + normal.lstrip("/")
        top = "/" + normal.split("/")[1] if normal != "/" else "/"
        if normal == "/" or top in SYSTEM_DIRECTORIES:
            raise ConfigError(
                f"path {path!r} is a system directory; choose a directory for backups "
                f"(e.g. /var/backups/virtbackup) - at `{where}.path`"
            )
    elif isinstance(params, SftpParams):
        if not params.password and not params.private_key:
            raise ConfigError(f"give a password or a privateKey - at `{where}.password`")
        _check_host_key(params.host_key, f"{where}.hostKey")
    elif isinstance(params, S3Params):
        for segment in params.prefix.strip("/").split("/"):
            if segment in (".", "..") or (params.prefix.strip("/") and not segment):
                raise ConfigError(
                    f"prefix {params.prefix!r} must be a path inside the bucket, without "
                    f"empty, '.' or '..' segments - at `{where}.prefix`"
                )
        if "\\" in params.prefix:
            raise ConfigError(f"prefix must not contain a backslash - at `{where}.prefix`")
    elif isinstance(params, GdriveParams) and ".." in params.root_path.split("/"):
        raise ConfigError(f"rootPath must not contain '..' - at `{where}.rootPath`")


#: Where restores may write disks on a server without ``restoreDirectories`` (besides
#: its storage pools): libvirt's default image directory.
DEFAULT_RESTORE_DIRECTORY: Final = "/var/lib/libvirt/images"


def _check_restore_directories(server: Server, where: str) -> None:
    for i, path in enumerate(server.restore_directories or []):
        at = f"{where}.restoreDirectories[{i}]"
        if not path.startswith("/"):
            raise ConfigError(f"restore directory {path!r} must be absolute - at `{at}`")
        normal = posixpath.normpath(path)
        top = "/" + normal.lstrip("/").split("/")[0]
        if ".." in path.split("/") or normal == "/" or top in SYSTEM_DIRECTORIES:
            raise ConfigError(
                f"restore directory {path!r} is a system directory or leaves one with '..'; "
                f"name a directory for disk images (e.g. {DEFAULT_RESTORE_DIRECTORY}) - at "
                f"`{at}`"
            )


def _check_server(server: Server, where: str) -> None:
    _check_restore_directories(server, where)
    problem = check_libvirt_uri(server.uri)
    if problem is not None:
        raise ConfigError(f"{problem} - at `{where}.uri`")
    if is_simulated_uri(server.uri) and server.host:
        raise ConfigError(
            "a simulated server (test:/// uri) runs in the inventory's own process: leave "
            f"host empty - at `{where}.host`"
        )
    # With a host, libvirt is reached over SSH: the login user's system daemon (no uri,
    # or qemu:///system) or that user's own session daemon (qemu:///session); or over
    # TLS with a qemu+tls:// uri (check_libvirt_uri allows nothing else).
    over_ssh = bool(server.host) and (not server.uri or server.uri in LOCAL_URIS)
    if server.vault_connection_id is not None:
        if not over_ssh:
            raise ConfigError(
                "a vault connection is an SSH login: only a server reached over SSH (a "
                "host, and no uri or qemu:///system or qemu:///session) takes one - at "
                f"`{where}.vaultConnectionId`"
            )
        for key, value in (("password", server.password), ("privateKey", server.private_key)):
            if value:
                raise ConfigError(
                    f"{key} is held by the vault connection {server.vault_connection_id!r}: "
                    f"leave it empty here - at `{where}.{key}`"
                )
    elif over_ssh and not server.password and not server.private_key:
        raise ConfigError(f"give a password or a privateKey - at `{where}.password`")
    _check_host_key(server.host_key, f"{where}.hostKey")


#: The local libvirt URIs a server may name.
LOCAL_URIS: Final = frozenset({"qemu:///system", "qemu:///session"})

#: The scheme of a simulated server: libvirt's test driver, in the inventory's process.
SIMULATED_SCHEME: Final = "test"


def is_simulated_uri(uri: str) -> bool:
    """Whether ``uri`` names a simulated server (libvirt's ``test:///`` driver): VMs that
    can be listed, started and stopped, but with no QEMU behind them, so nothing that
    reads or writes a disk (backups, restores, migrations, cleanups) can run on it."""
    return uri.lower().startswith(f"{SIMULATED_SCHEME}:")


def _check_simulated_uri(uri: str) -> str | None:
    parts = urlsplit(uri)
    if parts.netloc:
        return f"uri {uri!r}: a simulated server is local (test:///default or test:///path.xml)"
    path = parts.path
    if path == "/default":
        return None
    if not path.endswith(".xml") or ".." in path.split("/") or len(path) < 6:
        return (
            f"uri {uri!r}: a simulated server is test:///default or test:/// followed by the "
            "absolute path of a libvirt test driver XML file (…/name.xml, no '..')"
        )
    return None


def check_libvirt_uri(uri: str) -> str | None:
    """Why ``uri`` may not be a server's libvirt URI, or None if it may (or is empty).

    Accepted: this machine's ``qemu:///system`` or ``qemu:///session``,
    ``qemu+tls://host[:port]/system`` (or ``/session``) without parameters, and a
    simulated server: libvirt's test driver, ``test:///default`` or ``test:///`` and the
    absolute path of a test driver XML file ending in ``.xml`` (:func:`is_simulated_uri`;
    fleet simulations, no QEMU behind it). Everything
    else is refused: other transports (``qemu+ext`` runs a program, ``qemu+ssh`` runs
    ``ssh``, ``qemu+tcp`` is unauthenticated, ``qemu+unix`` names a socket; a remote host
    is reached over VirtBackup's own SSH tunnel: leave ``uri`` empty and set ``host``) and
    every URI parameter (``command``, ``socket``, ``netcat``, ``keyfile``, ``pkipath``,
    ``proxy``, ... name programs, sockets or files, ``no_verify`` turns checks off).
    """
    if not uri:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return "uri must not contain control characters"
    try:
        parts = urlsplit(uri)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"uri {uri!r} cannot be parsed: {exc}"
    if parts.query or parts.fragment:
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        named = ", ".join(repr(n) for n in names) or repr(parts.query or parts.fragment)
        return (
            f"uri {uri!r}: libvirt URI parameters are not accepted ({named}); they can "
            "name programs, sockets or files"
        )
    scheme = parts.scheme.lower()
    if scheme == SIMULATED_SCHEME:
        return _check_simulated_uri(uri)
    if scheme == "qemu":
        if uri in LOCAL_URIS:
            return None
        return f"uri {uri!r}: this machine's libvirt is qemu:///system or qemu:///session"
    if scheme == "qemu+tls":
        if not hostname or parts.username or parts.password:
            return f"uri {uri!r}: qemu+tls needs a host and no user (qemu+tls://host/system)"
        if parts.path not in ("/system", "/session"):
            return f"uri {uri!r}: the path must be /system or /session"
        return None
    return (
        f"uri {uri!r}: transport {parts.scheme!r} is not supported; use qemu:///system, "
        "qemu+tls://host/system, or leave uri empty and set host to reach libvirt over SSH "
        "(test:///default or test:///path.xml for a simulated server)"
    )


def _check_host_key(value: str, where: str) -> None:
    if not value:
        return
    try:
        host_key_fingerprint(value)
    except ValueError as exc:
        raise ConfigError(f"{exc} - at `{where}`") from None


def host_key_fingerprint(value: str) -> str:
    """The ``SHA256:<base64>`` fingerprint of a host key given as an OpenSSH public key
    line (``ssh-ed25519 AAAA... [comment]``, optionally preceded by host names as in
    known_hosts) or as a fingerprint (returned as is). ValueError if it is neither."""
    text = value.strip()
    if text.upper().startswith("SHA256:"):
        body = text[7:]
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"host key fingerprint {shown(text)} is not a SHA256 fingerprint")
        return "SHA256:" + body.rstrip("=")
    return "SHA256:" + base64.b64encode(hashlib.sha256(_key_blob(text)).digest()).decode().rstrip(
        "="
    )


def _key_blob(text: str) -> bytes:
    words = text.split()
    for start in range(min(2, len(words))):
        if len(words) < start + 2:
            break
        algorithm, data = words[start], words[start + 1]
        try:
            blob = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            continue
        length = int.from_bytes(blob[:4], "big")
        if blob[4 : 4 + length] == algorithm.encode():
            return blob
    raise ValueError(
        "host key is neither an OpenSSH public key line (ssh-ed25519 AAAA...) nor a "
        "SHA256: fingerprint"
    )


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


@functools.cache
def _type_info(cls: type) -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(cls)


def _line_breaks(value: object, info: msgspec.inspect.Type, where: str) -> str | None:
    """The path of the first text in ``value`` that must be one line (its type has a
    ``pattern``) but ends with a line break, which a pattern's ``$`` lets through
    (Python's ``re`` matches ``$`` before a final newline); None when there is none.
    ``info`` is ``value``'s type as ``msgspec.inspect`` describes it."""
    if isinstance(info, msgspec.inspect.StrType):
        if info.pattern and isinstance(value, str) and value.endswith(("\n", "\r")):
            return where
        return None
    if isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            if (found := _line_breaks(value, member, where)) is not None:
                return found
        return None
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, msgspec.Struct):
        for field in info.fields:
            found = _line_breaks(
                getattr(value, field.name), field.type, f"{where}.{field.encode_name}"
            )
            if found is not None:
                return found
        return None
    if isinstance(info, msgspec.inspect.ListType | msgspec.inspect.SetType) and isinstance(
        value, list | set | frozenset
    ):
        for i, item in enumerate(value):
            if (found := _line_breaks(item, info.item_type, f"{where}[{i}]")) is not None:
                return found
        return None
    if isinstance(info, msgspec.inspect.DictType) and isinstance(value, dict):
        for key, item in value.items():
            at = f"{where}[{json.dumps(key, ensure_ascii=False)}]"
            if (found := _line_breaks(key, info.key_type, at)) is not None:
                return found
            if (found := _line_breaks(item, info.value_type, at)) is not None:
                return found
    return None


def check_single_lines(cfg: AgentConfig) -> None:
    """``ConfigError`` naming the first one-line field (a host, an id, a URL, a topic...)
    whose text ends with a line break: it would be refused by the program or server it
    goes to, at every use, long after the configuration was accepted."""
    where = _line_breaks(cfg, _type_info(AgentConfig), "$")
    if where is not None:
        raise ConfigError(f"must be one line: it ends with a line break - at `{where}`")
