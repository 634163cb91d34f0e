"""The configuration document of a remote agent (``GET /api/v1/agent/config``) and its
hash, which the heartbeat compares with the agent's ``configHash``.

The hash is ``sha256(canonical JSON)``: the JSON of the document without
``configHash``, keys sorted, no whitespace (``separators=(",", ":")``), non-ASCII kept
as UTF-8, as a hex digest (:func:`config_hash`); an agent computes the same over the
document it received. Volatile fields (a schedule's next run, a webhook's last
delivery) are left out, so the hash changes only when what the agent is given does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from typing import Any

from virtbackup.contracts.subjects import NotifyCmd
from virtbackup.contracts.v1.common import Empty
from virtbackup.contracts.v1.config import AgentConfig, Server
from virtbackup.contracts.v1.webhooks import WebhookList
from virtbackup.gateway.job_listing import all_schedules
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import ServiceError


def agent_servers(cfg: AgentConfig, agent_id: str) -> list[Server]:
    return [s for s in cfg.servers if s.agent_id == agent_id]


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes :func:`config_hash` hashes (see the module)."""
    body = {k: v for k, v in doc.items() if k != "configHash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_hash(doc: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the configuration document."""
    return hashlib.sha256(canonical(doc)).hexdigest()


def _schedule_server(vm_path: str, source: dict[str, Any]) -> tuple[str, str]:
    if "/" in vm_path:
        server, vm = vm_path.split("/", 1)
        return server, vm
    return str(source.get("server_id") or ""), vm_path


async def agent_config(gw: Gateway, agent_id: str) -> dict[str, Any]:
    """The agent's configuration: the schedules of its servers' VMs (from
    ``VB_SCHEDULES``, run by the orchestrator), the destinations it may write to (ids,
    kinds, names, vault references: no parameters, no secrets), its servers, and the
    alert channels (webhooks by id and host, ntfy by server host: no URL path, topic,
    header or token). Sorted, so that equal configurations hash equal."""
    cfg, _ = await gw.config.load()
    mine = agent_servers(cfg, agent_id)
    server_ids = {s.id for s in mine}
    allowed = sorted({d for s in mine for d in s.agent_destination_ids})
    schedules = []
    for sch in await all_schedules(gw):
        tpl = sch.job_template
        server_glob, vm = _schedule_server(tpl.vm_path, tpl.source)
        matched = sorted(s for s in server_ids if fnmatch.fnmatchcase(s, server_glob))
        if not matched:
            continue
        target = tpl.destination.get("destination_id") or cfg.backup_destination_id
        schedules.append(
            {
                "id": sch.id,
                "name": sch.name,
                "schedule": sch.schedule,
                "timezone": sch.timezone,
                "enabled": sch.enabled,
                "serverIds": matched,
                "vmName": vm,
                "targetId": target,
            }
        )
    dests = {d.id: d for d in cfg.destinations}
    targets = [
        {
            "id": d,
            "kind": dests[d].driver_id,
            "name": dests[d].name or d,
            "enabled": dests[d].enabled,
            "encrypted": dests[d].encryption is not None,
            "vaultConnectionId": dests[d].vault_connection_id,
        }
        for d in allowed
        if d in dests
    ]
    channels: list[dict[str, Any]] = []
    try:
        hooks = await gw.bus.request(NotifyCmd.WEBHOOKS_LIST, Empty(), WebhookList)
    except ServiceError:
        hooks = WebhookList(webhooks=[])
    for hook in hooks.webhooks:
        host = hook.url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        channels.append(
            {
                "id": hook.id,
                "kind": "webhook",
                "name": host,
                "enabled": hook.enabled,
                "events": sorted(hook.events),
            }
        )
    if cfg.ntfy.topic:
        host = cfg.ntfy.server_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        channels.append({"id": "ntfy", "kind": "ntfy", "name": host, "enabled": True})
    doc: dict[str, Any] = {
        "agentId": agent_id,
        "servers": [
            {"id": s.id, "name": s.name or s.id, "targetIds": sorted(s.agent_destination_ids)}
            for s in sorted(mine, key=lambda s: s.id)
        ],
        "schedules": sorted(schedules, key=lambda s: s["id"]),
        "targets": targets,
        "alertChannels": sorted(channels, key=lambda c: (c["kind"], c["id"])),
    }
    doc["configHash"] = config_hash(doc)
    return doc
