"""Reading the agent configuration (bucket ``VB_CONFIG``, key ``agent``) from any service."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import CONFIG_KEY
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.config import (
    AgentConfig,
    Destination,
    GdriveSettings,
    Server,
    decode_stored_config,
    encode_config,
    validate_config,
)
from virtbackup.runtime.errors import Conflict, NotFound

log = logging.getLogger(__name__)


async def read_agent_config(kv: KeyValue) -> tuple[AgentConfig, int]:
    """The configuration and its revision (defaults and 0 when none is stored yet)."""
    try:
        entry = await kv.get(CONFIG_KEY)
    except KeyNotFoundError:
        return AgentConfig(), 0
    if entry.value is None:
        return AgentConfig(), 0
    cfg, problem = decode_stored_config(entry.value)
    if problem:
        log.warning(
            "the stored configuration breaks a rule (fix it with POST /config): %s", problem
        )
    return cfg, entry.revision or 0


def find_destination(cfg: AgentConfig, destination_id: str | None) -> Destination:
    """The destination ``destination_id``, or the default backup destination when None."""
    wanted = destination_id or cfg.backup_destination_id
    if not wanted:
        raise NotFound("no destinationId given and no backupDestinationId configured")
    for dest in cfg.destinations:
        if dest.id == wanted:
            return dest
    raise NotFound(f"destination {shown(wanted)} not found")


def find_server(cfg: AgentConfig, server_id: str) -> Server:
    for server in cfg.servers:
        if server.id == server_id:
            return server
    raise NotFound(f"server {shown(server_id)} not found")


async def update_agent_config(
    kv: KeyValue, change: Callable[[AgentConfig], AgentConfig], *, attempts: int = 10
) -> AgentConfig:
    """Apply ``change`` to the stored configuration with compare-and-swap (retried)."""
    for _ in range(attempts):
        cfg, revision = await read_agent_config(kv)
        updated = change(cfg)
        validate_config(updated)
        try:
            if revision:
                await kv.update(CONFIG_KEY, encode_config(updated), last=revision)
            else:
                await kv.create(CONFIG_KEY, encode_config(updated))
        except KeyWrongLastSequenceError:
            continue
        return updated
    raise Conflict("the configuration is being changed concurrently; try again")


async def update_gdrive_settings(
    kv: KeyValue, change: Callable[[GdriveSettings], GdriveSettings]
) -> AgentConfig:
    """Change the stored Google Drive settings (e.g. keep a refreshed access token)."""

    def apply(cfg: AgentConfig) -> AgentConfig:
        backup = msgspec.structs.replace(cfg.backup, gdrive=change(cfg.backup.gdrive))
        return msgspec.structs.replace(cfg, backup=backup)

    return await update_agent_config(kv, apply)
