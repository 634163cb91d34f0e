"""Reading the agent configuration (bucket ``VB_CONFIG``, key ``agent``) from any service."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import CONFIG_KEY
from virtbackup.contracts.v1.config import AgentConfig, Destination, Server, decode_config
from virtbackup.runtime.errors import NotFound


async def read_agent_config(kv: KeyValue) -> tuple[AgentConfig, int]:
    """The configuration and its revision (defaults and 0 when none is stored yet)."""
    try:
        entry = await kv.get(CONFIG_KEY)
    except KeyNotFoundError:
        return AgentConfig(), 0
    if entry.value is None:
        return AgentConfig(), 0
    return decode_config(entry.value), entry.revision or 0


def find_destination(cfg: AgentConfig, destination_id: str | None) -> Destination:
    """The destination ``destination_id``, or the default backup destination when None."""
    wanted = destination_id or cfg.backup_destination_id
    if not wanted:
        raise NotFound("no destinationId given and no backupDestinationId configured")
    for dest in cfg.destinations:
        if dest.id == wanted:
            return dest
    raise NotFound(f"destination {wanted!r} not found")


def find_server(cfg: AgentConfig, server_id: str) -> Server:
    for server in cfg.servers:
        if server.id == server_id:
            return server
    raise NotFound(f"server {server_id!r} not found")
