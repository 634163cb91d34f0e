"""The vault's connections in ``VB_VAULT`` (owned by the gateway, the only holder of the
vault key), their tests, the configuration's references to them, and the services'
requests for their credentials.

A record (key = connection id) is JSON: ``id``, ``name``, ``kind``, ``fields`` (the
non-secret fields: host, port, username, hostKey, endpoint, ...), ``secrets`` (the names
of its secret fields), ``sealed`` (the secret fields, sealed by
``runtime.vault.VaultCipher`` with the id as associated data), ``status`` (``ok`` or
``failing``), ``message`` (the last test's), ``testedAt`` and ``createdAt``. Nothing in
it is a secret in clear.

A connection says where its secrets may go (``host``/``port`` or ``endpoint``): a
server or destination may refer to it only at that address (a 400 otherwise), so a
secret is never sent to another host than the one it was given for (as
``host_keys.check_masked_secrets`` holds for secrets in the configuration).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, Final

import asyncssh
import httpx
import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.config import (
    SECRET_MASK,
    AgentConfig,
    S3Params,
    SftpParams,
    destination_params,
    host_key_fingerprint,
)
from virtbackup.contracts.v1.vault import (
    DESTINATION_KINDS,
    KIND_FIELDS,
    SECRET_FIELDS,
    VaultConnectionBody,
    VaultCredentials,
)
from virtbackup.gateway.host_keys import HostKeyUnavailable, fetch_host_key
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound
from virtbackup.runtime.kv import valid_key
from virtbackup.runtime.sealing import SecretBox, SecretKeyError
from virtbackup.runtime.vault import VaultCipher
from virtbackup.storage.errors import InvalidParamsError, StorageError
from virtbackup.storage.factory import open_driver
from virtbackup.storage.google_auth import GoogleApi
from virtbackup.storage.probe import test_connection
from virtbackup.storage.sftp import host_key_algorithms, host_key_matches

log = logging.getLogger(__name__)

#: Seconds a connection test may take.
TEST_TIMEOUT: Final = 15.0
_DEFAULT_PORTS: Final = {"ssh": 22, "sftp": 22}


class _Record(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str = ""
    kind: str
    fields: dict[str, Any] = msgspec.field(default_factory=dict)
    #: The names of the secret fields it holds (shown masked).
    secrets: list[str] = msgspec.field(default_factory=list)
    sealed: str = ""
    status: str = "ok"
    message: str = ""
    tested_at: str = ""
    created_at: str = ""


def _where(field: str) -> str:
    return f" - at `$.{field}`"


def _split(body: VaultConnectionBody) -> tuple[dict[str, Any], dict[str, str]]:
    """The non-secret and the secret fields of ``body`` (wire names), checked for its
    kind: a field of another kind or a missing required one is a 400 naming it."""
    wire = msgspec.to_builtins(body)
    assert isinstance(wire, dict)
    allowed = KIND_FIELDS[body.kind]
    public: dict[str, Any] = {}
    secret: dict[str, str] = {}
    for key, value in wire.items():
        if key in ("id", "name", "kind", "saveOnFailure"):
            continue
        if key not in allowed:
            raise BadRequest(f"a {body.kind} connection has no {key}{_where(key)}")
        if key in SECRET_FIELDS:
            if value == SECRET_MASK:
                raise BadRequest(f"{key} must be the secret itself, not the mask{_where(key)}")
            if value:
                secret[key] = value
        else:
            public[key] = value
    if body.kind in ("ssh", "sftp"):
        for key in ("host", "username"):
            if not public.get(key):
                raise BadRequest(f"a {body.kind} connection needs {key}{_where(key)}")
        if not secret.get("password") and not secret.get("privateKey"):
            raise BadRequest(f"give a password or a privateKey{_where('password')}")
        public.setdefault("port", _DEFAULT_PORTS[body.kind])
        if secret.get("privateKey"):
            try:
                asyncssh.import_private_key(secret["privateKey"])
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise BadRequest(
                    f"privateKey cannot be read: {exc}{_where('privateKey')}"
                ) from None
        if public.get("hostKey"):
            try:
                host_key_fingerprint(public["hostKey"])
            except ValueError as exc:
                raise BadRequest(f"{exc}{_where('hostKey')}") from None
    elif body.kind == "s3":
        for key in ("endpoint", "bucket", "accessKey"):
            if not public.get(key):
                raise BadRequest(f"an s3 connection needs {key}{_where(key)}")
        if not secret.get("secretKey"):
            raise BadRequest(f"an s3 connection needs secretKey{_where('secretKey')}")
    else:
        for key in ("clientId",):
            if not public.get(key):
                raise BadRequest(f"a gdrive connection needs {key}{_where(key)}")
        for key in ("clientSecret", "refreshToken"):
            if not secret.get(key):
                raise BadRequest(f"a gdrive connection needs {key}{_where(key)}")
    return public, secret


def references(cfg: AgentConfig) -> dict[str, list[str]]:
    """Connection id -> the servers and destinations of ``cfg`` that refer to it
    (``server <id>``, ``destination <id>``)."""
    out: dict[str, list[str]] = {}
    for server in cfg.servers:
        if server.vault_connection_id:
            out.setdefault(server.vault_connection_id, []).append(f"server {server.id}")
    for dest in cfg.destinations:
        if dest.vault_connection_id:
            out.setdefault(dest.vault_connection_id, []).append(f"destination {dest.id}")
    return out


class VaultStore:
    """The vault's connections: create, list, test, delete, and their credentials."""

    def __init__(self, kv: KeyValue, cipher: VaultCipher, box: SecretBox | None) -> None:
        self.kv = kv
        self.cipher = cipher
        #: Seals the secrets sent to a service (``runtime.sealing``).
        self.box = box

    # -- records -------------------------------------------------------------------

    async def _get(self, connection_id: str) -> tuple[_Record, int]:
        if not valid_key(connection_id):
            raise NotFound(f"vault connection {connection_id[:200]!r} not found")
        try:
            entry = await self.kv.get(connection_id)
        except KeyNotFoundError:
            raise NotFound(f"vault connection {connection_id!r} not found") from None
        if entry.value is None:
            raise NotFound(f"vault connection {connection_id!r} not found")
        return msgspec.json.decode(entry.value, type=_Record), entry.revision or 0

    async def records(self) -> list[_Record]:
        try:
            keys = await self.kv.keys()
        except Exception as exc:  # nats.js.errors.NoKeysError: an empty bucket
            if type(exc).__name__ == "NoKeysError":
                return []
            raise
        out = []
        for key in sorted(keys):
            try:
                out.append((await self._get(key))[0])
            except NotFound:
                continue
        return out

    @staticmethod
    def shown(record: _Record, used_by: list[str]) -> dict[str, Any]:
        """The record as the API shows it: secrets masked, never in clear."""
        body: dict[str, Any] = {"id": record.id, "name": record.name, "kind": record.kind}
        body.update(record.fields)
        for key in record.secrets:
            body[key] = SECRET_MASK
        body.update(
            {
                "status": record.status,
                "message": record.message,
                "testedAt": record.tested_at,
                "createdAt": record.created_at,
                "usedBy": used_by,
            }
        )
        return body

    def credentials(self, record: _Record) -> dict[str, Any]:
        """Every field of ``record``, secrets opened (for a test or a service)."""
        try:
            secret = self.cipher.open(record.id, record.sealed)
        except SecretKeyError as exc:
            raise Conflict(str(exc)) from None
        return {**record.fields, **secret}

    # -- create, test, delete ---------------------------------------------------------

    async def create(self, body: VaultConnectionBody) -> tuple[_Record, bool]:
        """Check, pin the host key (ssh, sftp), test, and store a new connection.

        A failing test stores nothing and raises ``BadRequest`` with the reason, unless
        ``saveOnFailure``: then it is stored with ``status: failing``. Returns the record
        and whether the test passed. ``Conflict`` when the id is taken."""
        public, secret = _split(body)
        connection_id = body.id or f"vc-{secrets.token_hex(6)}"
        if not valid_key(connection_id):
            raise BadRequest(
                f"id: {connection_id[:200]!r} cannot name a vault connection (letters, "
                "digits, '_', '-', '/', '=' and inner '.' only)"
            )
        try:
            await self.kv.get(connection_id)
        except KeyNotFoundError:
            pass
        else:
            raise Conflict(f"vault connection {connection_id!r} exists; delete it first")
        if body.kind in ("ssh", "sftp") and not public.get("hostKey"):
            try:
                public["hostKey"] = await fetch_host_key(public["host"], public["port"])
            except HostKeyUnavailable as exc:
                if not body.save_on_failure:
                    raise BadRequest(f"connection test failed: {exc}") from None
        record = _Record(
            id=connection_id,
            name=body.name,
            kind=body.kind,
            fields=public,
            secrets=sorted(secret),
            sealed=self.cipher.seal(connection_id, secret),
            created_at=utcnow_iso(),
        )
        ok, message = await run_test(body.kind, {**public, **secret})
        if not ok and not body.save_on_failure:
            raise BadRequest(f"connection test failed: {message}")
        record.status, record.message, record.tested_at = (
            "ok" if ok else "failing",
            message,
            utcnow_iso(),
        )
        try:
            await self.kv.create(connection_id, msgspec.json.encode(record))
        except KeyWrongLastSequenceError:
            raise Conflict(f"vault connection {connection_id!r} exists; delete it first") from None
        return record, ok

    async def test(self, connection_id: str) -> tuple[_Record, bool]:
        """Test a stored connection and record the outcome (``status``); an SSH or SFTP
        connection saved while its host did not answer gets its host key pinned now."""
        for _ in range(5):
            record, revision = await self._get(connection_id)
            if record.kind in ("ssh", "sftp") and not record.fields.get("hostKey"):
                try:
                    host, port = record.fields["host"], record.fields["port"]
                    record.fields["hostKey"] = await fetch_host_key(host, port)
                except HostKeyUnavailable:
                    pass
                except Exception:  # an address the resolver or socket refuses
                    log.warning("host key of vault connection %s not fetched", record.id)
            ok, message = await run_test(record.kind, self.credentials(record))
            record.status, record.message, record.tested_at = (
                "ok" if ok else "failing",
                message,
                utcnow_iso(),
            )
            try:
                await self.kv.update(connection_id, msgspec.json.encode(record), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return record, ok
        raise Conflict(f"vault connection {connection_id!r} is being changed; try again")

    async def reseal(self) -> int:
        """Seal every connection sealed under an earlier vault key again under the
        current one (compare-and-swap per record; run at the gateway's start, so that a
        rotated-out key can be dropped once it ran). Returns how many were sealed again;
        a record that does not open is logged and left as it is."""
        count = 0
        for record in await self.records():
            if self.cipher.is_current(record.sealed):
                continue
            for _ in range(5):
                current, revision = await self._get(record.id)
                if self.cipher.is_current(current.sealed):
                    break
                try:
                    opened = self.cipher.open(current.id, current.sealed)
                except SecretKeyError as exc:
                    log.error("vault connection not sealed again: %s", exc)
                    break
                current.sealed = self.cipher.seal(current.id, opened)
                try:
                    await self.kv.update(current.id, msgspec.json.encode(current), last=revision)
                except KeyWrongLastSequenceError:
                    continue
                count += 1
                break
        return count

    async def delete(self, connection_id: str, cfg: AgentConfig) -> None:
        """Remove a connection; ``Conflict`` naming the servers and destinations that
        refer to it, ``NotFound`` when there is none."""
        await self._get(connection_id)
        users = references(cfg).get(connection_id)
        if users:
            raise Conflict(
                f"vault connection {connection_id!r} is used by {', '.join(users)}: change "
                "them first"
            )
        await self.kv.purge(connection_id)

    # -- the configuration's references ---------------------------------------------

    async def check_config(self, cfg: AgentConfig) -> AgentConfig:
        """``cfg`` with the host key of each connection that a server or SFTP destination
        without a ``hostKey`` refers to (the key pinned and tested when the connection was
        saved, rather than one fetched now). ``BadRequest`` naming the field for a
        reference to a connection that does not exist, is of another kind, or is for
        another address, user or scheme."""
        servers = []
        for i, server in enumerate(cfg.servers):
            servers.append(server)
            if server.vault_connection_id is None:
                continue
            where = f"$.servers[{i}].vaultConnectionId"
            record = await self._referred(server.vault_connection_id, where)
            if record.kind != "ssh":
                raise BadRequest(
                    f"vault connection {record.id!r} is a {record.kind} connection; a "
                    f"server needs an ssh one - at `{where}`"
                )
            self._same_address(
                record, server.host, server.port, server.username, f"server {server.id}", where
            )
            if not server.host_key and record.fields.get("hostKey"):
                servers[-1] = msgspec.structs.replace(server, host_key=record.fields["hostKey"])
        destinations = []
        for i, dest in enumerate(cfg.destinations):
            destinations.append(dest)
            if dest.vault_connection_id is None:
                continue
            where = f"$.destinations[{i}].vaultConnectionId"
            record = await self._referred(dest.vault_connection_id, where)
            wanted = DESTINATION_KINDS.get(dest.driver_id)
            if record.kind != wanted:
                raise BadRequest(
                    f"vault connection {record.id!r} is a {record.kind} connection; a "
                    f"{dest.driver_id} destination needs a {wanted} one - at `{where}`"
                )
            params = destination_params(dest)
            if isinstance(params, SftpParams):
                self._same_address(
                    record,
                    params.host,
                    params.port,
                    params.username,
                    f"destination {dest.id}",
                    where,
                )
                if not params.host_key and record.fields.get("hostKey"):
                    pinned = {**dest.params, "hostKey": record.fields["hostKey"]}
                    destinations[-1] = msgspec.structs.replace(dest, params=pinned)
            elif isinstance(params, S3Params):
                endpoint = record.fields.get("endpoint", "")
                if params.endpoint.rstrip("/").lower() != str(endpoint).rstrip("/").lower():
                    raise BadRequest(
                        f"vault connection {record.id!r} is for endpoint {endpoint!r}, not "
                        f"{params.endpoint!r}: its secrets go only there - at `{where}`"
                    )
                # Tested as the connection says (S3's default: TLS): never sent in clear
                # to where it was tested with TLS.
                if params.secure != record.fields.get("secure", True):
                    raise BadRequest(
                        f"vault connection {record.id!r} has secure "
                        f"{record.fields.get('secure', True)}, this destination {params.secure}"
                        f" - at `{where}`"
                    )
        return msgspec.structs.replace(cfg, servers=servers, destinations=destinations)

    async def _referred(self, connection_id: str, where: str) -> _Record:
        try:
            return (await self._get(connection_id))[0]
        except NotFound:
            raise BadRequest(
                f"vault connection {connection_id!r} does not exist - at `{where}`"
            ) from None

    @staticmethod
    def _same_address(
        record: _Record, host: str, port: int, username: str, what: str, where: str
    ) -> None:
        fields = record.fields
        if (fields.get("host"), fields.get("port")) != (host, port):
            raise BadRequest(
                f"vault connection {record.id!r} is for {fields.get('host')}:"
                f"{fields.get('port')}, not {host}:{port} ({what}): its secrets go only "
                f"there - at `{where}`"
            )
        if username and username != fields.get("username"):
            raise BadRequest(
                f"vault connection {record.id!r} logs in as {fields.get('username')!r}, "
                f"not {username!r} ({what}) - at `{where}`"
            )

    # -- the services' requests ------------------------------------------------------

    async def destination_fields(self, connection_id: str, cfg: AgentConfig) -> dict[str, Any]:
        """The opened fields of a destination's connection, for a remote agent's lease
        (the gateway hands them over HTTPS to the agent the job is leased to); only for
        a connection a destination of ``cfg`` refers to (``NotFound`` otherwise)."""
        if not any(d.vault_connection_id == connection_id for d in cfg.destinations):
            raise NotFound(
                f"no destination of the configuration uses vault connection {connection_id!r}"
            )
        record, _ = await self._get(connection_id)
        if record.kind == "ssh":
            raise NotFound(f"vault connection {connection_id!r} is no destination connection")
        return self.credentials(record)

    async def sealed_credentials(
        self, connection_id: str, cfg: AgentConfig, *, servers: bool
    ) -> VaultCredentials:
        """A connection's credentials for a service, secrets sealed under the services'
        key: only for a connection a server (``servers``) or a destination (else) of
        ``cfg`` refers to (``NotFound`` otherwise)."""
        if servers:
            refers = any(s.vault_connection_id == connection_id for s in cfg.servers)
        else:
            refers = any(d.vault_connection_id == connection_id for d in cfg.destinations)
        what = "server" if servers else "destination"
        if not refers:
            raise NotFound(
                f"no {what} of the configuration uses vault connection {connection_id!r}"
            )
        record, _ = await self._get(connection_id)
        if servers != (record.kind == "ssh"):
            raise NotFound(f"vault connection {connection_id!r} is no {what} connection")
        fields: dict[str, str | int | bool] = {}
        for key, value in self.credentials(record).items():
            if key in SECRET_FIELDS and self.box is not None:
                fields[key] = self.box.seal(str(value))
            elif isinstance(value, str | int | bool):
                fields[key] = value
        return VaultCredentials(connection_id=record.id, kind=record.kind, fields=fields)


# -- connection tests -------------------------------------------------------------------


class _Pinned(asyncssh.SSHClient):
    def __init__(self, host_key: str) -> None:
        self.host_key = host_key
        self.presented = ""

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = str(key.get_fingerprint("sha256"))
        return host_key_matches(key, self.host_key)


async def _test_ssh(kind: str, c: dict[str, Any]) -> tuple[bool, str]:
    host_key = str(c.get("hostKey", ""))
    if not host_key:
        return False, "the host key could not be pinned (the host did not answer)"
    client = _Pinned(host_key)
    options: dict[str, Any] = {
        "host": c["host"],
        "port": c["port"],
        "username": c["username"],
        "known_hosts": ([], [], []),
        "server_host_key_algs": host_key_algorithms(host_key) or (),
        "config": None,
        "agent_path": None,
        "connect_timeout": TEST_TIMEOUT,
        "login_timeout": TEST_TIMEOUT,
        "client_keys": [asyncssh.import_private_key(c["privateKey"])]
        if c.get("privateKey")
        else None,
    }
    if c.get("password"):
        options["password"] = c["password"]
    where = f"{c['host']}:{c['port']}"
    try:
        conn = await asyncssh.connect(client_factory=lambda: client, **options)
    except asyncssh.HostKeyNotVerifiable:
        return False, (
            f"the SSH host key of {where} does not match the pinned hostKey (presented "
            f"{client.presented or '?'})"
        )
    except asyncssh.PermissionDenied:
        return False, f"SSH authentication failed for {c['username']} at {where}"
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        return False, f"SSH to {where}: {exc or type(exc).__name__}"
    try:
        if kind == "sftp":
            async with conn.start_sftp_client() as sftp:
                await sftp.stat(c.get("basePath") or ".")
            return True, "SFTP login successful"
        return True, "SSH login successful"
    except (OSError, asyncssh.Error) as exc:
        return False, f"SFTP at {where}: {exc}"
    finally:
        conn.close()


async def _test_s3(c: dict[str, Any]) -> tuple[bool, str]:
    params: dict[str, Any] = {
        key: c[key]
        for key in ("endpoint", "bucket", "region", "secure", "accessKey", "secretKey")
        if key in c
    }
    try:
        driver = open_driver("s3", params)
    except InvalidParamsError as exc:
        return False, str(exc)
    try:
        return True, await test_connection(driver)
    except StorageError as exc:
        return False, f"S3: {exc}"
    finally:
        await driver.close()


async def _test_gdrive(c: dict[str, Any]) -> tuple[bool, str]:
    api = GoogleApi.from_env()
    form = {
        "grant_type": "refresh_token",
        "refresh_token": c["refreshToken"],
        "client_id": c["clientId"],
        "client_secret": c["clientSecret"],
    }
    try:
        async with httpx.AsyncClient(timeout=TEST_TIMEOUT) as client:
            resp = await client.post(api.token_url, data=form)
    except httpx.HTTPError as exc:
        return False, f"Google token endpoint: {exc}"
    if resp.status_code != 200:
        return False, f"Google refused the refresh token (HTTP {resp.status_code})"
    return True, "Google token refresh successful"


async def run_test(kind: str, credentials: dict[str, Any]) -> tuple[bool, str]:
    """Whether the credentials work, and what was seen (never a secret)."""
    try:
        if kind in ("ssh", "sftp"):
            return await asyncio.wait_for(_test_ssh(kind, credentials), TEST_TIMEOUT * 2)
        if kind == "s3":
            return await asyncio.wait_for(_test_s3(credentials), TEST_TIMEOUT * 2)
        return await asyncio.wait_for(_test_gdrive(credentials), TEST_TIMEOUT * 2)
    except TimeoutError:
        return False, f"no answer within {TEST_TIMEOUT * 2:g} s"
    except Exception as exc:
        # Whatever the client library raised (its text may quote what was sent: logged
        # here without it, answered by its kind only).
        log.warning("vault connection test (%s) failed: %s", kind, type(exc).__name__)
        return False, f"the test could not run ({type(exc).__name__})"
