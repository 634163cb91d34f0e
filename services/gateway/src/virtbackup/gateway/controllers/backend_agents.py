"""Native API (backend-api.md, backupagent-api.md): remote agents.

An admin (the installation's token) makes one-time registration tokens; an agent trades
one for its id and a ``bak_`` key (``POST /api/v1/agent/register``), then heartbeats,
leases backups and reports on them with that key only (``agent_auth``). The listing
shows both kinds of agent: the transfer workers (from their heartbeats in
``VB_WORKERS``) and the remote agents (``VB_AGENTS``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.exceptions import HTTPException

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.agents import AgentLease, AgentLeaseRequest, AgentStage
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.jobs import Job, JobCancelRequest
from virtbackup.gateway.agent_auth import AGENT_SCOPE_KEY
from virtbackup.gateway.agent_config_doc import agent_config
from virtbackup.gateway.agent_refs import refuse_if_named
from virtbackup.gateway.agent_reports import lease_answer, report_status
from virtbackup.gateway.agents_store import (
    AgentRecord,
    AgentStore,
    DiscoveredDomain,
    agent_view,
)
from virtbackup.gateway.audit_log import UNRECORDED_KEY
from virtbackup.gateway.bodies import Body, LineText
from virtbackup.gateway.errors import responses
from virtbackup.gateway.job_listing import matching_jobs
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, NotFound, ServiceError
from virtbackup.runtime.kv import keys, read_value

Text = LineText
Short = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
#: How long a registration token lives by default, and at most (seconds).
TOKEN_TTL_DEFAULT = 3600
TOKEN_TTL_MAX = 30 * 24 * 3600


class RegistrationTokenBody(Body, kw_only=True):
    """``expiresInSeconds``: how long the token may be used (1 s to 30 days)."""

    expires_in_seconds: Annotated[int, msgspec.Meta(ge=1, le=TOKEN_TTL_MAX)] = TOKEN_TTL_DEFAULT


class RegisterBody(Body, kw_only=True):
    registration_token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    hostname: Text
    os: Text
    arch: Text
    agent_version: Text


class HeartbeatBody(Body, kw_only=True):
    """Both documents' heartbeat: backupagent-api's (``status``, ``agentVersion``,
    ``configHash``, discovered VMs in place of databases) plus ``load`` (1, 5 and 15
    minute load averages)."""

    status: Short = "online"
    agent_version: Short = ""
    config_hash: Short = ""
    load: Annotated[list[float], msgspec.Meta(max_length=3)] = msgspec.field(default_factory=list)
    discovered_domains: Annotated[list[DiscoveredDomain], msgspec.Meta(max_length=4096)] = (
        msgspec.field(default_factory=list)
    )


class LeaseBody(Body, kw_only=True):
    """A lease request carries nothing today (``{}`` or no body)."""


class ActionBody(Body, kw_only=True):
    action: Literal["activate", "deactivate"]


class OutputLine(Body, kw_only=True):
    """One line of the job's output log (``vb.log.job.<id>``)."""

    line: Annotated[str, msgspec.Meta(max_length=4096)]
    level: Literal["info", "warn", "error"] = "info"
    ts: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class JobStatusBody(Body, kw_only=True):
    """What an agent reports about a job leased to it (sizes in bytes)."""

    status: AgentStage
    message: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    error_message: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    error_code: Short = ""
    bytes_read: Annotated[int, msgspec.Meta(ge=0)] | None = None
    bytes_written: Annotated[int, msgspec.Meta(ge=0)] | None = None
    total_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    chunks_done: Annotated[int, msgspec.Meta(ge=0)] | None = None
    chunks_total: Annotated[int, msgspec.Meta(ge=0)] | None = None
    duration_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    upload_path: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    timestamp: Short | None = None
    checkpoint: Short | None = None
    parent_timestamp: Short | None = None
    output: Annotated[list[OutputLine], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )


class _Beat(msgspec.Struct, rename="camel"):
    instance: str = ""
    pid: int = 0
    version: str = ""
    started_at: str = ""
    seen_at: str = ""
    busy_units: int = 0


WORKER_PREFIX = "worker:"


def _store(gw: Gateway) -> AgentStore:
    if gw.agents is None:
        raise HTTPException(status_code=503, detail="remote agents are not available here")
    return gw.agents


def calling_agent(request: Request[Any, Any, Any]) -> str:
    """The id of the agent whose ``bak_`` key authenticated ``request``; 403 for any
    other caller (the agent routes act on behalf of an agent)."""
    agent_id = request.scope.get(AGENT_SCOPE_KEY)
    if not isinstance(agent_id, str):
        raise HTTPException(status_code=403, detail="this route takes an agent's bak_ key")
    return agent_id


async def _workers(gw: Gateway) -> list[dict[str, Any]]:
    """The live transfer workers as agents of kind ``worker``."""
    try:
        kv = await gw.bus.key_value(buckets.WORKERS)
    except NotFound:
        return []
    out = []
    for key in await keys(kv):
        try:
            beat = await read_value(kv, key, _Beat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            beat = _Beat()
        if beat is None:
            continue
        out.append(
            {
                "id": WORKER_PREFIX + key,
                "kind": "worker",
                "hostname": beat.instance,
                "version": beat.version,
                "state": "active",
                "status": "online",
                "lastHeartbeat": beat.seen_at or None,
                "load": {"busyUnits": beat.busy_units},
                "registeredAt": beat.started_at or None,
            }
        )
    return out


def _remote_view(agent: AgentRecord) -> dict[str, Any]:
    view = agent_view(agent)
    view["load"] = {"loadAverage": agent.load}
    return view


class BackendAgentsController(Controller):
    path = "/api/v1"

    @post("/agent/registration-tokens", status_code=201, responses=responses(400))
    async def create_token(
        self, gw: Gateway, data: RegistrationTokenBody | None = None
    ) -> dict[str, str]:
        """A one-time registration token (shown once) and its expiry (ISO-8601 UTC)."""
        body = data or RegistrationTokenBody()
        token, expires_at = await _store(gw).create_token(body.expires_in_seconds)
        return {"token": token, "expiresAt": expires_at}

    @post("/agent/register", status_code=201, responses=responses(400, 401))
    async def register(self, gw: Gateway, data: RegisterBody) -> dict[str, str]:
        """Trade a one-time registration token for an agent id and its ``bak_`` key
        (shown once, stored only as SHA-256); 401 for a token unknown, used or expired."""
        try:
            agent_id, api_key = await _store(gw).register(
                data.registration_token,
                hostname=data.hostname,
                os=data.os,
                arch=data.arch,
                version=data.agent_version,
            )
        except PermissionError as exc:
            raise HTTPException(status_code=401, detail=str(exc)) from None
        return {"agentId": agent_id, "apiKey": api_key}

    @post("/heartbeat", status_code=200, responses=responses(400, 401, 403))
    async def heartbeat(
        self, gw: Gateway, request: Request[Any, Any, Any], data: HeartbeatBody | None = None
    ) -> dict[str, Any]:
        """An agent's heartbeat (backend-api.md); answers ``configChanged`` and ``state``.
        Telemetry every few seconds, not an operation: the operation log records it only
        when it is refused."""
        request.scope[UNRECORDED_KEY] = True  # type: ignore[literal-required]
        return await _beat(gw, calling_agent(request), data or HeartbeatBody())

    @post("/agent/heartbeat", status_code=200, responses=responses(400, 401, 403))
    async def agent_heartbeat(
        self, gw: Gateway, request: Request[Any, Any, Any], data: HeartbeatBody | None = None
    ) -> dict[str, Any]:
        """The same heartbeat in backupagent-api.md's place."""
        request.scope[UNRECORDED_KEY] = True  # type: ignore[literal-required]
        return await _beat(gw, calling_agent(request), data or HeartbeatBody())

    @post("/agent/lease", status_code=200, responses=responses(400, 401, 403))
    async def lease(
        self, gw: Gateway, request: Request[Any, Any, Any], data: LeaseBody | None = None
    ) -> dict[str, Any]:
        """``assigned: true`` with one backup's work and its one destination, or
        ``assigned: false`` with a message (``agent is deactivated`` while it is). An
        ``assigned: false`` changed nothing: not in the operation log (an agent polls
        every few seconds)."""
        agent_id = calling_agent(request)
        agent = await _store(gw).get(agent_id)
        if agent is None:
            raise HTTPException(status_code=401, detail="unauthorized")
        if agent.state == "deactivated":
            request.scope[UNRECORDED_KEY] = True  # type: ignore[literal-required]
            return {"assigned": False, "message": "agent is deactivated"}
        lease = await gw.bus.request(
            JobCmd.AGENT_LEASE, AgentLeaseRequest(agent_id=agent_id), AgentLease
        )
        answer = await lease_answer(gw, agent_id, lease)
        if answer.get("assigned") is not True:
            request.scope[UNRECORDED_KEY] = True  # type: ignore[literal-required]
        return answer

    @post(
        "/jobs/{job_id:str}/status", status_code=200, responses=responses(400, 401, 403, 404, 409)
    )
    async def job_status(
        self, gw: Gateway, request: Request[Any, Any, Any], job_id: str, data: JobStatusBody
    ) -> dict[str, Any]:
        """An agent reports a job's stage, progress and output lines; the answer says
        whether to stop (``cancel``) or, to ``committing``, whether to commit."""
        return await report_status(gw, calling_agent(request), job_id, data)

    @get("/agents")
    async def list_agents(self, gw: Gateway) -> list[dict[str, Any]]:
        """The live transfer workers and the remote agents."""
        remote = [_remote_view(a) for a in await _store(gw).list()]
        return [*await _workers(gw), *remote]

    @get("/agents/{agent_id:str}", responses=responses(404))
    async def get_agent(self, gw: Gateway, agent_id: str) -> dict[str, Any]:
        """One agent of either kind (404 for an unknown id)."""
        if agent_id.startswith(WORKER_PREFIX):
            for worker in await _workers(gw):
                if worker["id"] == agent_id:
                    return worker
            raise NotFound(f"agent {shown(agent_id)} not found")
        agent = await _store(gw).get(agent_id)
        if agent is None:
            raise NotFound(f"agent {shown(agent_id)} not found")
        return _remote_view(agent)

    @post("/agents/{agent_id:str}/actions", status_code=200, responses=responses(400, 404))
    async def action(self, gw: Gateway, agent_id: str, data: ActionBody) -> dict[str, Any]:
        """``activate`` (leasing allowed) or ``deactivate`` (leasing blocked; a job it has
        leased is cancelled as ``POST /api/v1/jobs/{id}/cancel`` would)."""
        if agent_id.startswith(WORKER_PREFIX):
            raise Conflict("a transfer worker is not activated or deactivated: scale it instead")
        state: Literal["active", "deactivated"] = (
            "active" if data.action == "activate" else "deactivated"
        )

        def change(agent: AgentRecord) -> AgentRecord:
            return msgspec.structs.replace(agent, state=state)

        agent = await _store(gw).update(agent_id, change)
        cancelled = await _cancel_leased(gw, agent_id) if state == "deactivated" else []
        return {**_remote_view(agent), "cancelledJobIds": cancelled}

    @delete("/agents/{agent_id:str}", status_code=200, responses=responses(404, 409))
    async def remove_agent(self, gw: Gateway, agent_id: str) -> dict[str, bool]:
        """Forget a remote agent and revoke its key (401 for it from then on); 409 naming
        the servers whose ``agentId`` it still is."""
        if agent_id.startswith(WORKER_PREFIX):
            raise Conflict("a transfer worker is not removed here: scale it instead")
        cfg, _ = await gw.config.load()
        refuse_if_named(cfg, agent_id)
        await _cancel_leased(gw, agent_id)
        await _store(gw).remove(agent_id)
        return {"success": True}


async def _beat(gw: Gateway, agent_id: str, body: HeartbeatBody) -> dict[str, Any]:
    def change(agent: AgentRecord) -> AgentRecord:
        return msgspec.structs.replace(
            agent,
            status=body.status,
            version=body.agent_version or agent.version,
            last_heartbeat=utcnow_iso(),
            load=body.load,
            config_hash=body.config_hash,
            discovered_domains=body.discovered_domains,
        )

    agent = await _store(gw).update(agent_id, change)
    # The hash of GET /api/v1/agent/config's document (its module says how to compute it).
    try:
        expected = (await agent_config(gw, agent_id))["configHash"]
    except ServiceError:  # the schedules or webhooks cannot be read now: ask again later
        expected = body.config_hash
    return {"configChanged": body.config_hash != expected, "state": agent.state}


async def _cancel_leased(gw: Gateway, agent_id: str) -> list[str]:
    """Cancel (the orchestrator's cancel request) each active job of the agent: leased
    or running, and queued for it but not leased yet (else it would run once the agent is
    activated again); the ids of those cancelled. A job already committing cannot be and
    is left to end."""
    active: list[Job] = []
    for state in ("queued", "running"):
        active.extend(await matching_jobs(gw, state=state, type="backup"))
    cancelled = []
    for job in active:
        if job.params.get("agentId") != agent_id:
            continue
        try:
            await gw.bus.request(JobCmd.CANCEL, JobCancelRequest(id=job.id), Job)
        except ServiceError:
            continue  # finished or committing meanwhile
        cancelled.append(job.id)
    return cancelled
