"""What the gateway knows of a remote agent's host: the VMs its last heartbeat reported.

The inventory does not reach an agent's host, so a restore onto it is checked by the
job-orchestrator with these (``RestoreRequest.host_domains``): a running VM is not
overwritten, an existing one is replaced only by ``overwrite`` (409s, as on the bus
path). The agent checks again on its host when the restore runs.
"""

from __future__ import annotations

from virtbackup.gateway.state import Gateway


async def agent_host_domains(gw: Gateway, server_id: str) -> dict[str, str] | None:
    """``name -> power state`` of the VMs the last heartbeat of the agent of server
    ``server_id`` reported; ``None`` for a server without an agent (or an unknown one:
    the orchestrator answers it)."""
    cfg, _ = await gw.config.load()
    server = next((s for s in cfg.servers if s.id == server_id), None)
    if server is None or not server.agent_id:
        return None
    record = await gw.agents.get(server.agent_id) if gw.agents is not None else None
    if record is None:
        return {}
    return {d.name: d.state for d in record.discovered_domains}
