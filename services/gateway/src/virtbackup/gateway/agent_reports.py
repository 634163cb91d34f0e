"""The gateway's side of a remote agent's lease and reports (see ``agent_jobs`` in the
job-orchestrator for the job's side).

A lease answer carries the one destination the job writes to (or, for a restore, reads
from; with the restore's choices and the server's ``restoreDirectories``), with its parameters and
encryption passphrase in clear: the agent writes the repository itself. It is added
here, from the configuration, only to the authenticated HTTPS answer of the agent the
job is leased to, and only when the server's ``agentDestinationIds`` allow that
destination; it is never on the bus and never logged.

A report's output lines go to the job's output log, ``vb.log.job.<job id>``
(``{"ts", "level", "line"}``, prefixed ``[agent <id>]``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.agents import (
    AgentLease,
    AgentStatusReply,
    AgentStatusRequest,
)
from virtbackup.contracts.v1.common import shown
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import joblog
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound
from virtbackup.runtime.vault import with_destination_fields

if TYPE_CHECKING:
    from virtbackup.gateway.controllers.backend_agents import JobStatusBody

#: The subject root of the jobs' output logs (shared decision of issue 16).
JOB_LOG_ROOT = "vb.log.job"


async def lease_answer(gw: Gateway, agent_id: str, lease: AgentLease) -> dict[str, Any]:
    """What ``POST /api/v1/agent/lease`` answers for the orchestrator's ``lease``."""
    if not lease.assigned or lease.job_id is None:
        return {"assigned": False, "message": lease.message or "no job waits for this agent"}
    cfg, _ = await gw.config.load()
    server = next((s for s in cfg.servers if s.id == lease.server_id), None)
    dest = next((d for d in cfg.destinations if d.id == lease.destination_id), None)
    if (
        server is None
        or dest is None
        or server.agent_id != agent_id
        or dest.id not in server.agent_destination_ids
    ):
        # The configuration changed since the job was queued: the job fails, and the
        # destination's credentials stay here.
        await gw.bus.request(
            JobCmd.AGENT_STATUS,
            AgentStatusRequest(
                agent_id=agent_id,
                job_id=lease.job_id,
                stage="failed",
                error=f"destination {lease.destination_id} is no longer allowed for this agent",
            ),
            AgentStatusReply,
        )
        return {"assigned": False, "message": "the leased job's destination is not allowed"}
    if dest.vault_connection_id is not None:
        # The destination's credentials live in the vault: opened here, for this lease's
        # answer to this agent only (as the configuration's own secrets are).
        refusal = ""
        if dest.driver_id == "gdrive":
            refusal = "a remote agent cannot write to a Google Drive destination"
        elif gw.vault is None:
            refusal = "this gateway has no vault"
        else:
            try:
                fields = await gw.vault.destination_fields(dest.vault_connection_id, cfg)
            except (NotFound, Conflict) as exc:
                refusal = str(exc)
            else:
                dest, _ = with_destination_fields(dest, fields)
        if refusal:
            await gw.bus.request(
                JobCmd.AGENT_STATUS,
                AgentStatusRequest(
                    agent_id=agent_id,
                    job_id=lease.job_id,
                    stage="failed",
                    error=f"destination {dest.id}: {refusal}",
                ),
                AgentStatusReply,
            )
            return {"assigned": False, "message": f"destination {dest.id}: {refusal}"}
    job: dict[str, Any] = {
        "id": lease.job_id,
        "type": lease.job_type,
        "serverId": lease.server_id,
        "vmName": lease.vm_name,
        "destinationId": lease.destination_id,
        "fresh": lease.fresh,
    }
    if lease.job_type == "restore":
        # The restore's choices, and where the server lets restores write (the agent
        # checks its placement against them on its host).
        job["params"] = lease.params
        job["restoreDirectories"] = server.restore_directories
    return {
        "assigned": True,
        "message": f"{lease.job_type or 'backup'} of {lease.vm_name} leased",
        "job": job,
        "destination": msgspec.to_builtins(dest),
    }


async def report_status(
    gw: Gateway, agent_id: str, job_id: str, body: JobStatusBody
) -> dict[str, Any]:
    """Pass an agent's report on (``JobCmd.AGENT_STATUS``: 404 for a job not leased to
    it) and its output lines to the job's log; the answer has ``cancel``/``commit``.

    Each line is stored as the system's own are (``joblog.clip``: a line break or other
    control character becomes a space, so an agent writes one line of the log per
    line and cannot forge others); a ``ts`` that is not ISO-8601 is a ``BadRequest``
    naming it, before anything is passed on."""
    stamps = [_stamp(line.ts, index) for index, line in enumerate(body.output)]
    reply = await gw.bus.request(
        JobCmd.AGENT_STATUS,
        AgentStatusRequest(
            agent_id=agent_id,
            job_id=job_id,
            stage=body.status,
            message=body.message,
            error=body.error_message + (f" ({body.error_code})" if body.error_code else ""),
            bytes_read=body.bytes_read,
            bytes_written=body.bytes_written,
            total_bytes=body.total_bytes,
            chunks_done=body.chunks_done,
            chunks_total=body.chunks_total,
            timestamp=body.timestamp,
            checkpoint=body.checkpoint,
            parent_timestamp=body.parent_timestamp,
            duration_ms=body.duration_ms,
            upload_path=body.upload_path,
        ),
        AgentStatusReply,
    )
    for line, stamp in zip(body.output, stamps, strict=True):
        record = {
            "ts": stamp,
            "level": line.level,
            "line": joblog.clip(f"[agent {agent_id}] {line.line}"),
        }
        await gw.bus.publish_core(f"{JOB_LOG_ROOT}.{job_id}", msgspec.json.encode(record))
    return {"success": True, "cancel": reply.cancel, "commit": reply.commit, "state": reply.state}


def _stamp(ts: str | None, index: int) -> str:
    """An output line's time: the agent's (ISO-8601), else now."""
    if ts is None:
        return utcnow_iso()
    try:
        datetime.fromisoformat(ts)
    except ValueError:
        raise BadRequest(f"not an ISO-8601 time: {shown(ts)} - at `$.output[{index}].ts`") from None
    return ts
