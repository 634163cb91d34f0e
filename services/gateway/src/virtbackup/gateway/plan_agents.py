"""What the gateway alone knows of the remote agents a plan may be pinned to.

The orchestrator answers ``eligible-agents`` from the configuration (which servers name
which agent) and ``VB_WORKERS``; the remote agents' records (``VB_AGENTS``: state,
version, last heartbeat) are the gateway's. Here they complete that answer, and a run
payload pinned (``agent_id``) to a deactivated agent is refused before anything is made:
backend-api.md's deactivated agent leases nothing, so its job would only wait for
``VIRTBACKUP_AGENT_LEASE_WAIT`` and fail.
"""

from __future__ import annotations

from typing import Any

import msgspec

from virtbackup.contracts.v1.plans import EligibleAgents, RunOptions
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest

#: The reason a deactivated remote agent is not eligible.
DEACTIVATED = "deactivated: it leases nothing until it is activated again"


async def eligible_view(gw: Gateway, found: EligibleAgents) -> dict[str, Any]:
    """``found`` as the API shows it: each remote agent with its ``version``,
    ``last_seen`` (its last heartbeat, ISO-8601 UTC, ``""`` before the first) and
    ``state`` (``active``/``deactivated``; ``unregistered`` for an id no agent has); a
    deactivated or unregistered one is ``eligible: false`` with the reason."""
    agents: list[dict[str, Any]] = []
    for each in found.agents:
        view = msgspec.to_builtins(each)
        assert isinstance(view, dict)
        if each.kind == "remote":
            record = await gw.agents.get(each.id) if gw.agents is not None else None
            if record is None:
                view.update(state="unregistered", eligible=False, reason="no such agent")
            else:
                view.update(
                    state=record.state,
                    version=record.version,
                    last_seen=record.last_heartbeat or "",
                )
                if record.state == "deactivated":
                    view.update(eligible=False, reason=DEACTIVATED)
        agents.append(view)
    return {"agents": agents}


async def refuse_deactivated(gw: Gateway, options: RunOptions) -> None:
    """``BadRequest`` naming ``$.agent_id`` when the run payload pins a remote agent that
    is deactivated (any other ``agent_id`` is the orchestrator's to check)."""
    if options.agent_id is None or gw.agents is None:
        return
    record = await gw.agents.get(options.agent_id)
    if record is not None and record.state == "deactivated":
        raise BadRequest(
            f"agent {options.agent_id!r} is not eligible for this plan: {DEACTIVATED}"
            " - at `$.agent_id`"
        )
