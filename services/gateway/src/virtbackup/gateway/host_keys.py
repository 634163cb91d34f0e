"""SSH host keys pinned on first use, and secrets that stay with the host they were given for.

Every SSH endpoint of the configuration (a server with a ``host``, an SFTP destination)
has a ``hostKey``. When a configuration is saved, an endpoint without one gets the key its
server presents now: the gateway asks for it with a bare key exchange (no login, so no
secret is sent), and stores the OpenSSH public key line. Every later connection, by any
service, checks the server's key against it and refuses a different one, naming both
fingerprints; an endpoint whose key could not be fetched (the host was down) is refused
until the configuration is saved again while it answers, or ``hostKey`` is given.

When an endpoint's address changes (``host`` or ``port``) and the posted ``hostKey`` is
still the one pinned for the old address, the pin is dropped and the new address's key
is pinned instead. A masked secret (``********``) is only kept while everything that
says where it is sent is unchanged; see ``check_masked_secrets``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, Final

import asyncssh
import msgspec

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.config import (
    SECRET_KEYS,
    SECRET_MASK,
    AgentConfig,
    Destination,
    Server,
    SftpParams,
    destination_params,
)
from virtbackup.runtime.errors import BadRequest

log = logging.getLogger(__name__)

#: How long saving a configuration waits for the host keys of new endpoints (seconds).
PIN_TIMEOUT: Final = 5.0

#: What says where a section's secrets go, by wire name: a masked secret is refused when
#: any of these changed.
SERVER_WHERE: Final = ("host", "port", "username")
SFTP_WHERE: Final = ("host", "port", "username")
S3_WHERE: Final = ("endpoint", "secure")


class HostKeyUnavailable(Exception):
    """The server's host key could not be fetched (unreachable, no SSH, too slow)."""


async def fetch_host_key(host: str, port: int, timeout: float = PIN_TIMEOUT) -> str:
    """The host key ``host:port`` presents, as an OpenSSH public key line.

    Only the key exchange runs: no authentication is attempted, no secret is sent.
    Raises ``HostKeyUnavailable`` with the reason.
    """
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port, config=None), timeout)
    except TimeoutError:
        raise HostKeyUnavailable(f"no SSH answer from {host}:{port} in {timeout:g} s") from None
    except (OSError, asyncssh.Error, ValueError) as exc:
        raise HostKeyUnavailable(f"SSH to {host}:{port}: {exc}") from None
    if key is None:
        raise HostKeyUnavailable(f"{host}:{port} presented no host key")
    return str(key.export_public_key().decode().strip())


def _sftp_params(dest: Destination) -> SftpParams | None:
    params = destination_params(dest) if dest.driver_id == "sftp" else None
    return params if isinstance(params, SftpParams) else None


def _endpoints(cfg: AgentConfig) -> Iterator[tuple[str, str, int, str]]:
    """(where, host, port, hostKey) of every SSH endpoint, ``where`` a config path."""
    for i, server in enumerate(cfg.servers):
        if server.host:
            yield f"$.servers[{i}]", server.host, server.port, server.host_key
    for i, dest in enumerate(cfg.destinations):
        params = _sftp_params(dest)
        if params is not None:
            yield f"$.destinations[{i}].params", params.host, params.port, params.host_key


async def pin_host_keys(cfg: AgentConfig, *, timeout: float = PIN_TIMEOUT) -> AgentConfig:
    """``cfg`` with ``hostKey`` set on every SSH endpoint that had none and answered within
    ``timeout`` seconds (all are asked at once). The others stay unpinned (logged)."""
    wanted = {(host, port) for _, host, port, key in _endpoints(cfg) if not key}
    if not wanted:
        return cfg
    addresses = sorted(wanted)
    results = await asyncio.gather(
        *(fetch_host_key(host, port, timeout) for host, port in addresses),
        return_exceptions=True,
    )
    found: dict[tuple[str, int], str] = {}
    for address, result in zip(addresses, results, strict=True):
        if isinstance(result, str):
            found[address] = result
        elif isinstance(result, HostKeyUnavailable):
            log.warning("host key not pinned", extra={"address": address, "reason": str(result)})
        else:
            raise result
    if not found:
        return cfg
    servers = [
        msgspec.structs.replace(s, host_key=found[(s.host, s.port)])
        if s.host and not s.host_key and (s.host, s.port) in found
        else s
        for s in cfg.servers
    ]
    destinations = []
    for dest in cfg.destinations:
        params = _sftp_params(dest)
        if params is not None and not params.host_key and (params.host, params.port) in found:
            dest = msgspec.structs.replace(
                dest, params={**dest.params, "hostKey": found[(params.host, params.port)]}
            )
        destinations.append(dest)
    return msgspec.structs.replace(cfg, servers=servers, destinations=destinations)


def _moved(new: dict[str, Any], old: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if new.get(key) != old.get(key):
            return key
    return None


def forget_moved_pins(cfg: AgentConfig, stored: AgentConfig) -> AgentConfig:
    """``cfg`` without the host keys that were pinned for an address it no longer has.

    A server or SFTP destination (matched by id) whose ``host`` or ``port`` differs from
    the stored one, but whose ``hostKey`` is still the stored one, loses it (to be pinned
    again for the new address); a ``hostKey`` given anew is kept.
    """
    old_servers = {s.id: s for s in stored.servers}
    servers: list[Server] = []
    for server in cfg.servers:
        old = old_servers.get(server.id)
        if (
            old is not None
            and server.host_key
            and server.host_key == old.host_key
            and (server.host, server.port) != (old.host, old.port)
        ):
            server = msgspec.structs.replace(server, host_key="")
        servers.append(server)
    old_dests = {d.id: d for d in stored.destinations}
    destinations: list[Destination] = []
    for dest in cfg.destinations:
        params = _sftp_params(dest)
        old_dest = old_dests.get(dest.id)
        old_params = _sftp_params(old_dest) if old_dest is not None else None
        if (
            params is not None
            and old_params is not None
            and params.host_key
            and params.host_key == old_params.host_key
            and (params.host, params.port) != (old_params.host, old_params.port)
        ):
            dest = msgspec.structs.replace(dest, params={**dest.params, "hostKey": ""})
        destinations.append(dest)
    return msgspec.structs.replace(cfg, servers=servers, destinations=destinations)


def check_masked_secrets(posted: AgentConfig, stored: AgentConfig) -> None:
    """Refuse (``BadRequest`` naming the field) a masked secret whose destination moved.

    ``********`` stands for the stored secret only while everything that says where it is
    sent is unchanged: a server's ``host``/``port``/``username``, an SFTP destination's
    ``host``/``port``/``username``, an S3 destination's ``endpoint``/``secure``, a
    destination's ``driverId``, ``backup.sftp``'s ``host``/``port``/``username``, and for
    ``ntfymeToken`` the ntfy ``serverUrl``.
    Otherwise the stored secret would go to another machine than the one it was given for.
    """
    old_servers = {s.id: s for s in stored.servers}
    for i, server in enumerate(posted.servers):
        old = old_servers.get(server.id)
        if old is not None:
            _refuse_moved(_wire(server), _wire(old), SERVER_WHERE, f"$.servers[{i}]")
    old_dests = {d.id: d for d in stored.destinations}
    for i, dest in enumerate(posted.destinations):
        where = f"$.destinations[{i}]"
        old_dest = old_dests.get(dest.id)
        if old_dest is None:
            continue
        new_params = _wire(destination_params(dest))
        masked = _masked(new_params)
        if masked and dest.driver_id != old_dest.driver_id:
            raise BadRequest(
                f"give the {masked} again: the destination's driverId changed "
                f"({old_dest.driver_id!r} -> {dest.driver_id!r}) - at `{where}.params.{masked}`"
            )
        keys = {"sftp": SFTP_WHERE, "s3": S3_WHERE}.get(dest.driver_id, ())
        old_params = _wire(destination_params(old_dest))
        _refuse_moved(new_params, old_params, keys, f"{where}.params")
    _refuse_moved(_wire(posted.backup.sftp), _wire(stored.backup.sftp), SFTP_WHERE, "$.backup.sftp")
    _refuse_moved(
        {"ntfymeToken": posted.ntfyme_token, "serverUrl": posted.ntfy.server_url},
        {"ntfymeToken": stored.ntfyme_token, "serverUrl": stored.ntfy.server_url},
        ("serverUrl",),
        "$",
    )


def _wire(value: msgspec.Struct) -> dict[str, Any]:
    out = msgspec.to_builtins(value)
    assert isinstance(out, dict)
    return out


def _masked(section: dict[str, Any]) -> str | None:
    return next((k for k in sorted(SECRET_KEYS) if section.get(k) == SECRET_MASK), None)


def _refuse_moved(
    new: dict[str, Any], old: dict[str, Any], keys: tuple[str, ...], where: str
) -> None:
    masked = _masked(new)
    if masked is None:
        return
    changed = _moved(new, old, keys)
    if changed is not None:
        raise BadRequest(
            f"give the {masked} again: the {changed} changed ({shown(old.get(changed))} -> "
            f"{shown(new.get(changed))}), and a masked secret is only kept for the same "
            f"{'/'.join(keys)} - at `{where}.{masked}`"
        )
