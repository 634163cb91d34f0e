"""The configuration's references to remote agents (``servers[i].agentId``), kept
consistent with ``VB_AGENTS`` by the gateway, which owns both.

A server naming an agent that does not exist would queue backups that no one ever
leases (and that hold the VM's lock meanwhile): a posted configuration naming an
unknown agent is a 400 naming ``$.servers[i].agentId``, and an agent that a server
names cannot be removed (409 naming the servers), as a vault connection cannot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from virtbackup.contracts.v1.config import AgentConfig
from virtbackup.gateway.agents_store import AgentStore
from virtbackup.runtime.errors import BadRequest, Conflict

#: How many characters of a client's value an error quotes.
_SHOWN = 80


def servers_naming(cfg: AgentConfig, agent_id: str) -> list[str]:
    """The ids of the servers whose ``agentId`` is ``agent_id``."""
    return [s.id for s in cfg.servers if s.agent_id == agent_id]


async def check_agent_refs(store: AgentStore | None, cfg: AgentConfig) -> None:
    """``BadRequest`` naming ``$.servers[i].agentId`` for a server naming an agent that
    is not registered (never was, or was removed)."""
    for i, server in enumerate(cfg.servers):
        if not server.agent_id:
            continue
        if store is None or await store.get(server.agent_id) is None:
            raise BadRequest(
                f"server {server.id}: no agent {server.agent_id[:_SHOWN]!r} is registered"
                f" - at `$.servers[{i}].agentId`"
            )


def refuse_if_named(cfg: AgentConfig, agent_id: str) -> None:
    """``Conflict`` naming the servers whose ``agentId`` is ``agent_id``."""
    named = servers_naming(cfg, agent_id)
    if named:
        raise Conflict(
            f"agent {agent_id} backs up server(s) {', '.join(named)}: change their agentId"
            " in the configuration first"
        )


def with_agent_check(
    check: Callable[[AgentConfig], Awaitable[AgentConfig]] | None,
    store: Callable[[], AgentStore | None],
) -> Callable[[AgentConfig], Awaitable[AgentConfig]]:
    """``check`` (the vault's), then :func:`check_agent_refs` against ``store()``."""

    async def checked(cfg: AgentConfig) -> AgentConfig:
        if check is not None:
            cfg = await check(cfg)
        await check_agent_refs(store(), cfg)
        return cfg

    return checked
