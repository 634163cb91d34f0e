"""The vault's encryption at rest, and how a service gets a connection's credentials.

At rest (bucket ``VB_VAULT``, owned by the gateway): the secret fields of a connection
(``contracts.v1.vault.SECRET_FIELDS``) are one JSON object sealed with AES-256-GCM under
the *vault key*, the connection's id as associated data (a sealed value copied onto
another connection's record does not open), as
``vbvault:v1:<key id>:<base64url(nonce || ciphertext || tag)>``.

The vault key is not the secret key of ``runtime.sealing``: that one is held by every
service (each opens the configuration's sealed fields); the vault key is held by the
gateway alone. It is ``VIRTBACKUP_VAULT_KEY`` (base64 of 32 bytes), else the file
``VIRTBACKUP_VAULT_KEY_FILE`` (a Kubernetes Secret mounted as a file; it must exist), else
``<data dir>/secrets/vault-key``, made at first use (0600 in a 0700 directory) by the same
code that makes the secret key file (``sealing.load_or_create_key_file``).

At use: a service that needs a connection's credentials asks the gateway
(``VaultCmd.OPEN_SSH`` or ``OPEN_DESTINATION``; the NATS permissions let the inventory
ask for SSH logins only and the job-orchestrator and transfer workers for destinations
only), which answers only for a connection the configuration refers to from a server
(or destination), with the secret fields sealed under the services' secret key: nothing
crosses the bus in clear. :func:`resolve_server` and :func:`resolve_destination` return
the configured item with its credentials filled in, for the moment of use; nothing keeps
them beyond the connection made with them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from virtbackup.contracts import subjects
from virtbackup.contracts.v1.config import Destination, Server
from virtbackup.contracts.v1.vault import VaultCredentials, VaultOpenRequest
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.errors import Unavailable
from virtbackup.runtime.sealing import (
    KEY_BYTES,
    SecretBox,
    SecretKeyError,
    load_or_create_key_file,
)
from virtbackup.runtime.settings import Settings

PREFIX: Final = "vbvault:v1:"
_AAD: Final = b"virtbackup vault v1\x00"


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise SecretKeyError(f"{where}: not base64") from None
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"{where}: {len(key)} bytes, expected {KEY_BYTES}")
    return key


class VaultCipher:
    """Seals and opens the secret fields of vault connections under the vault key (and
    opens what earlier keys sealed, during a rotation)."""

    def __init__(self, key: bytes, previous: Iterable[bytes] = ()) -> None:
        if len(key) != KEY_BYTES:
            raise SecretKeyError(f"the vault key has {len(key)} bytes, expected {KEY_BYTES}")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:8]
        self._keys = {hashlib.sha256(k).hexdigest()[:8]: AESGCM(k) for k in (*previous, key)}

    def is_current(self, value: str) -> bool:
        """Whether ``value`` is sealed under the current key (else it is to be sealed
        again: see ``gateway.vault_store.VaultStore.reseal``)."""
        return value.startswith(f"{PREFIX}{self.key_id}:")

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultCipher:
        """The cipher of ``VIRTBACKUP_VAULT_KEY``, else of ``VIRTBACKUP_VAULT_KEY_FILE``
        (which must exist), else of ``<data dir>/secrets/vault-key`` (made if missing).
        ``VIRTBACKUP_VAULT_KEY_PREVIOUS`` (comma-separated) still opens. ``SecretKeyError``
        for a malformed or missing key."""
        previous = []
        if settings.vault_key_previous is not None:
            for part in settings.vault_key_previous.get_secret_value().split(","):
                if part.strip():
                    previous.append(_decode(part, "VIRTBACKUP_VAULT_KEY_PREVIOUS"))
        if settings.vault_key is not None:
            key = _decode(settings.vault_key.get_secret_value(), "VIRTBACKUP_VAULT_KEY")
        elif settings.vault_key_file is not None:
            path = settings.vault_key_file
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise SecretKeyError(f"VIRTBACKUP_VAULT_KEY_FILE {path}: {exc}") from None
            key = _decode(text, str(path))
        else:
            key = load_or_create_key_file(settings.vault_key_path)
        return cls(key, previous)

    def seal(self, connection_id: str, fields: dict[str, str]) -> str:
        """``fields`` (the secret fields of connection ``connection_id``) sealed."""
        nonce = secrets.token_bytes(12)
        plain = msgspec.json.encode(fields)
        sealed = self._aead.encrypt(nonce, plain, _AAD + connection_id.encode())
        return f"{PREFIX}{self.key_id}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, connection_id: str, value: str) -> dict[str, str]:
        """The secret fields sealed in ``value`` for connection ``connection_id``.
        ``SecretKeyError`` when it was sealed under another key, for another connection,
        or was changed."""
        if not value.startswith(PREFIX):
            raise SecretKeyError(f"vault connection {connection_id!r}: not a sealed value")
        key_id, _, body = value[len(PREFIX) :].partition(":")
        aead = self._keys.get(key_id)
        if aead is None:
            raise SecretKeyError(
                f"vault connection {connection_id!r} is sealed under key {key_id}, which is "
                "not configured (VIRTBACKUP_VAULT_KEY / VIRTBACKUP_VAULT_KEY_PREVIOUS)"
            )
        try:
            raw = base64.urlsafe_b64decode(body)
            plain = aead.decrypt(raw[:12], raw[12:], _AAD + connection_id.encode())
            fields = msgspec.json.decode(plain, type=dict[str, str])
        except (ValueError, InvalidTag, msgspec.DecodeError):
            raise SecretKeyError(
                f"vault connection {connection_id!r}: its credentials do not open"
            ) from None
        return fields


def service_box(ctx: Any) -> SecretBox:
    """The secret box a service opens sealed values with (its configuration bucket's,
    else one made from its settings)."""
    from virtbackup.contracts.buckets import CONFIG

    bucket = getattr(ctx, "buckets", {}).get(CONFIG.name)
    box = getattr(bucket, "box", None)
    if isinstance(box, SecretBox):
        return box
    return SecretBox.from_settings(ctx.settings)


async def _credentials(bus: Bus, subject: str, connection_id: str) -> VaultCredentials:
    return await bus.request(
        subject,
        VaultOpenRequest(connection_id=connection_id),
        VaultCredentials,
    )


def _opened(box: SecretBox, creds: VaultCredentials) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in creds.fields.items():
        if isinstance(value, str) and SecretBox.is_sealed(value):
            try:
                out[key] = box.open(value)
            except SecretKeyError as exc:
                raise Unavailable(f"vault connection {creds.connection_id!r}: {exc}") from None
        else:
            out[key] = value
    return out


async def resolve_server(bus: Bus, box: SecretBox, server: Server) -> Server:
    """``server`` with the login of its vault connection (``username`` when it has none,
    ``password``, ``private_key``, ``host_key`` when none is pinned); ``server`` itself
    when it names none. ``Unavailable`` when the gateway does not answer or refuses."""
    if server.vault_connection_id is None:
        return server
    try:
        creds = await _credentials(bus, subjects.VaultCmd.OPEN_SSH, server.vault_connection_id)
    except Unavailable:
        raise
    except Exception as exc:  # NotFound, BadRequest: the vault refused
        raise Unavailable(
            f"server {server.id}: vault connection {server.vault_connection_id!r}: {exc}"
        ) from None
    fields = _opened(box, creds)
    return msgspec.structs.replace(
        server,
        username=server.username or str(fields.get("username", "")),
        password=str(fields.get("password", "")),
        private_key=str(fields.get("privateKey", "")),
        host_key=server.host_key or str(fields.get("hostKey", "")),
    )


#: The fields of a connection that fill a destination's params, by driver.
_DESTINATION_FIELDS: Final = {
    "sftp": ("username", "password", "privateKey", "hostKey"),
    "s3": ("accessKey", "secretKey"),
}


#: What a Google Drive destination's connection gives (wire names).
GOOGLE_FIELDS: Final = ("clientId", "clientSecret", "refreshToken")


async def resolve_destination(
    bus: Bus, box: SecretBox, dest: Destination
) -> tuple[Destination, dict[str, str]]:
    """``dest`` with the credentials of its vault connection in its params (SFTP, S3;
    only where the params leave them empty), and for Google Drive the OAuth client and
    refresh token (``clientId``, ``clientSecret``, ``refreshToken``; else ``{}``), for
    ``repository.destinations.open_repository(..., google=...)``. ``(dest, {})`` when it
    names no connection. ``Unavailable`` when the gateway does not answer or refuses."""
    if dest.vault_connection_id is None:
        return dest, {}
    try:
        creds = await _credentials(
            bus, subjects.VaultCmd.OPEN_DESTINATION, dest.vault_connection_id
        )
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(
            f"destination {dest.id}: vault connection {dest.vault_connection_id!r}: {exc}"
        ) from None
    return with_destination_fields(dest, _opened(box, creds))


def with_destination_fields(
    dest: Destination, fields: Mapping[str, object]
) -> tuple[Destination, dict[str, str]]:
    """``dest`` with a vault connection's opened ``fields`` merged into its params, as
    :func:`resolve_destination` answers (Google Drive: the OAuth fields apart)."""
    if dest.driver_id == "gdrive":
        return dest, {key: str(fields.get(key, "")) for key in GOOGLE_FIELDS}
    params = dict(dest.params)
    for key in _DESTINATION_FIELDS.get(dest.driver_id, ()):
        value = fields.get(key)
        if value and not params.get(key):
            params[key] = value
    return msgspec.structs.replace(dest, params=params), {}
