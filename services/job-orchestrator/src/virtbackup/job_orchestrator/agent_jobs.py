"""Backups run by a remote agent (``virtbackup agent``) instead of the bus.

A server whose configuration names an ``agentId`` has its VMs backed up by that agent,
which reaches only the gateway over HTTPS. Its backup job is submitted and held as any
other (its lease in ``VB_LEASES``, the sweep, the VM's lock, cancel), but its runner,
:func:`run_agent_backup`, reads and writes nothing itself: it waits for the agent's
reports and ends the job in what they say.

What the job's record holds, in ``result["agent"]`` (every change a compare-and-swap):

| key | set by | meaning |
|---|---|---|
| ``agentId`` | runner, at start | the agent the job waits for (also ``params["agentId"]``) |
| ``leasedAt`` | ``AGENT_LEASE`` | the agent took the job (once: a job is leased once) |
| ``reportedAt`` | ``AGENT_STATUS`` | the agent's last report |
| ``stage`` | ``AGENT_STATUS`` | its last stage |
| ``outcome``, ``error`` | ``AGENT_STATUS`` | ``completed`` (with ``message``) or ``failed`` |
| ``stages`` | ``AGENT_STATUS`` | each stage entered: ``{"stage", "startedAt", "durationMs"}`` |
| ``uploadPath`` | ``AGENT_STATUS`` | where the agent says the point went |

``committing`` is entered by the agent's report in the same compare-and-swap that checks
for a cancel, so exactly one of "cancelled" and "committed" wins, as for every backup.
A stage's ``durationMs`` is set when the next stage begins: the agent's ``durationMs`` if
its report gave one, else the time between the two reports.

A job whose agent has leased it and then says nothing for :data:`SILENCE_SECONDS` fails
naming the agent; one never leased fails after ``VIRTBACKUP_AGENT_LEASE_WAIT`` seconds
(default 900), naming the agent, so a stopped agent does not hold the VM's lock forever.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from virtbackup.contracts.subjects import EventType, JobCmd
from virtbackup.contracts.v1.agents import (
    FINAL_STAGES,
    AgentLease,
    AgentLeaseRequest,
    AgentStatusReply,
    AgentStatusRequest,
)
from virtbackup.contracts.v1.config import AgentConfig
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, Job
from virtbackup.job_orchestrator.agent_restore import leased_params
from virtbackup.job_orchestrator.errors import JobCanceled, JobFailed
from virtbackup.job_orchestrator.jobctx import JobContext, job_payload
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import Conflict, NotFound

agent_commands: Commands[JobContext] = Commands()

#: Seconds a leased job waits for a report of its agent before it fails.
SILENCE_SECONDS: Final = 60.0
#: Seconds between two looks of the runner at its job's record.
POLL_SECONDS: Final = 0.25


def agent_of(cfg: AgentConfig, server_id: str | None) -> str | None:
    """The agent that backs up ``server_id``'s VMs, or ``None`` (the bus does)."""
    server = next((s for s in cfg.servers if s.id == server_id), None)
    return server.agent_id if server is not None else None


def _agent(job: Job) -> dict[str, Any]:
    value = job.result.get("agent")
    return dict(value) if isinstance(value, dict) else {}


def waiting_for_lease(job: Job) -> bool:
    """Whether ``job`` is a remote agent's job that its agent has not leased yet: queued
    in all but name (its state says ``running``, its phase ``preparing``), so
    ``clear-queue`` cancels it as it does a queued job."""
    return (
        bool(job.params.get("agentId"))
        and job.state not in TERMINAL_STATES
        and not _agent(job).get("leasedAt")
    )


async def run_agent_backup(jc: JobContext, job: Job) -> str:
    """Wait for the agent to lease, run and report the backup; returns its success
    message. Raises ``JobFailed`` (a destination the agent may not write to, the
    agent's error, its silence, no lease within ``settings.agent_lease_wait``) or
    ``JobCanceled``."""
    assert job.server_id and job.destination_id
    cfg = await jc.config()
    server = next(s for s in cfg.servers if s.id == job.server_id)
    agent_id = server.agent_id or ""
    if job.destination_id not in server.agent_destination_ids:
        raise JobFailed(
            f"destination {job.destination_id} is not allowed for agent {agent_id} (add it "
            f"to agentDestinationIds of server {server.id})"
        )

    def start(current: Job) -> Job:
        if current.state in TERMINAL_STATES:
            return current
        result = {**current.result, "agent": {"agentId": agent_id}}
        message = f"waiting for agent {agent_id} to lease the job"
        return msgspec.structs.replace(
            current, result=result, message=message, updated_at=utcnow_iso()
        )

    await _publish(jc, await jc.store.update(job.id, start))
    waiting_since = time.monotonic()
    lease_wait = jc.settings.agent_lease_wait
    while True:
        jc.check_canceled(job.id)
        current = jc.jobs.jobs.get(job.id) or (await jc.store.get(job.id))[0]
        if current.cancel_requested and current.phase != "committing":
            raise JobCanceled(job.id)
        agent = _agent(current)
        if agent.get("outcome") == "completed":
            return str(agent.get("message") or "backup committed by agent")
        if agent.get("outcome") == "failed":
            raise JobFailed(f"agent {agent_id}: {agent.get('error') or 'failed'}")
        if not agent.get("leasedAt") and time.monotonic() - waiting_since > lease_wait:
            raise JobFailed(
                f"agent {agent_id} did not lease the job within {lease_wait:.0f} s (is it"
                " running, active and able to reach the gateway?)"
            )
        reported = agent.get("reportedEpoch")
        silent = isinstance(reported, float) and time.time() - reported > SILENCE_SECONDS
        if agent.get("leasedAt") and silent:
            raise JobFailed(
                f"agent {agent_id} stopped reporting for {SILENCE_SECONDS:.0f} s "
                f"while {agent.get('stage', 'leased')}"
            )
        await asyncio.sleep(POLL_SECONDS)


async def _publish(jc: JobContext, job: Job) -> None:
    await jc.bus.publish_event(EventType.JOB_UPDATED, job_payload(job), key=job.id)


@agent_commands.handler(JobCmd.AGENT_LEASE, AgentLeaseRequest)
async def agent_lease(jc: JobContext, req: AgentLeaseRequest) -> AgentLease:
    """Lease the oldest backup or restore waiting for ``req.agent_id`` (a job is leased once);
    ``assigned: false`` when none waits."""
    waiting = sorted(
        (
            j
            for j in jc.jobs.active()
            if j.params.get("agentId") == req.agent_id
            and _agent(j).get("agentId") == req.agent_id
            and not _agent(j).get("leasedAt")
            and not j.cancel_requested
        ),
        key=lambda j: j.id,
    )
    for candidate in waiting:
        taken = False

        def lease(current: Job) -> Job:
            nonlocal taken
            agent = _agent(current)
            if current.state in TERMINAL_STATES or current.cancel_requested:
                return current
            if agent.get("leasedAt"):
                return current
            taken = True
            now = utcnow_iso()
            agent.update(leasedAt=now, reportedAt=now, reportedEpoch=time.time(), stage="leased")
            agent["stages"] = [{"stage": "leased", "startedAt": now, "epoch": time.time()}]
            return msgspec.structs.replace(
                current,
                result={**current.result, "agent": agent},
                message=f"leased by agent {req.agent_id}",
                updated_at=now,
            )

        job = await jc.store.update(candidate.id, lease)
        if not taken:
            continue
        await _publish(jc, job)
        return AgentLease(
            assigned=True,
            job_id=job.id,
            job_type=job.type,
            server_id=job.server_id,
            vm_name=job.vm_name,
            destination_id=job.destination_id,
            fresh=bool(job.params.get("fresh")),
            params=leased_params(job.type, job.params),
        )
    return AgentLease(assigned=False, message="no job waits for this agent")


@agent_commands.handler(JobCmd.AGENT_STATUS, AgentStatusRequest)
async def agent_status(jc: JobContext, req: AgentStatusRequest) -> AgentStatusReply:
    """Record what the agent reports about a job leased to it; ``NotFound`` for a job
    that is not (unknown, another agent's, or never leased), ``Conflict`` naming the
    state for one that has ended, and for ``completed`` before the job is committing
    (the agent commits only once told ``commit``). The answer says whether to
    stop (``cancel``) and, to a ``committing`` report, whether to commit."""
    commit = False

    def report(current: Job) -> Job:
        nonlocal commit
        agent = _agent(current)
        if current.params.get("agentId") != req.agent_id or not agent.get("leasedAt"):
            raise NotFound(f"job {req.job_id} not found")
        if current.state in TERMINAL_STATES:
            raise Conflict(
                f"job {req.job_id} has ended ({current.state}): it takes no more reports"
            )
        if current.cancel_requested and current.phase != "committing":
            return current
        if agent.get("outcome"):
            return current
        now = utcnow_iso()
        _record_stage(agent, req, now)
        agent.update(reportedAt=now, reportedEpoch=time.time(), stage=req.stage)
        if req.upload_path is not None:
            agent["uploadPath"] = req.upload_path
        changes: dict[str, Any] = {"updated_at": now}
        result = dict(current.result)
        for key, text in (
            ("timestamp", req.timestamp),
            ("checkpoint", req.checkpoint),
            ("parentTimestamp", req.parent_timestamp),
        ):
            if text is not None:
                result[key] = text or None  # "": none (a full read has no parent)
        if "parentTimestamp" not in result:
            result["parentTimestamp"] = None
        if req.stage == "committing":
            commit = True
            changes["phase"] = "committing"
        elif req.stage == "completed" and current.phase != "committing":
            # Committed without the commit answer: a cancel could have won meanwhile.
            raise Conflict(
                f"job {req.job_id} is {current.phase}: it completes only once its "
                "committing report was answered commit"
            )
        elif req.stage in FINAL_STAGES:
            agent["outcome"] = req.stage
            agent["message"] = req.message
            agent["error"] = req.error
        elif current.phase == "preparing" and req.stage != "snapshotting":
            changes["phase"] = "transferring"
        if req.message and req.stage not in FINAL_STAGES:
            changes["message"] = req.message
        for field, value in (
            ("bytes_transferred", req.bytes_read),
            ("physical_bytes", req.bytes_written),
            ("total_bytes", req.total_bytes),
            ("completed_units", req.chunks_done),
            ("total_units", req.chunks_total),
        ):
            if value is not None:
                changes[field] = value
        started = current.started_at or current.created_at
        elapsed = max(_seconds_since(started), 1e-3)
        if req.bytes_read is not None:
            changes["speed_bytes_per_sec"] = round(req.bytes_read / elapsed, 1)
        if req.bytes_written is not None:
            changes["physical_speed_bytes_per_sec"] = round(req.bytes_written / elapsed, 1)
        result["agent"] = agent
        changes["result"] = result
        return msgspec.structs.replace(current, **changes)

    job = await jc.store.update(req.job_id, report)
    await _publish(jc, job)
    stop = job.state in TERMINAL_STATES or (job.cancel_requested and job.phase != "committing")
    if stop:
        commit = False
    return AgentStatusReply(cancel=stop, commit=commit, state=job.state)


def _record_stage(agent: dict[str, Any], req: AgentStatusRequest, now: str) -> None:
    """Add ``req.stage`` to ``agent["stages"]`` when it is a new stage, ending the
    previous one (its ``durationMs``); a report of the same stage changes nothing."""
    raw = agent.get("stages")
    stages: list[dict[str, Any]] = [dict(s) for s in raw] if isinstance(raw, list) else []
    if stages and stages[-1].get("stage") == req.stage:
        if req.duration_ms is not None:
            stages[-1]["durationMs"] = req.duration_ms
        agent["stages"] = stages
        return
    if stages:
        last = stages[-1]
        if req.duration_ms is not None:
            last["durationMs"] = req.duration_ms
        else:
            last["durationMs"] = max(
                0, round(1000 * (time.time() - last.get("epoch", time.time())))
            )
    stages.append({"stage": req.stage, "startedAt": now, "epoch": time.time()})
    if req.stage in FINAL_STAGES:
        stages[-1]["durationMs"] = 0
    agent["stages"] = stages


def _seconds_since(iso: str) -> float:
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - then).total_seconds()
