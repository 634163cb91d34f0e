"""backupagent-api.md's agent routes beyond registration, heartbeat and lease: config,
jobs/start, per-stage status, verification, logs, schema-snapshot (the VM's domain
definition) and anomaly; and ``GET /api/v1/anomalies`` for the installation.

Every agent route takes the agent's ``bak_`` key (``agent_auth.AGENT_ROUTES``) and acts
for that agent only: its servers (``agentId`` in the configuration), the VMs its last
heartbeat discovered, the destinations ``agentDestinationIds`` allow it, and the jobs
queued for it (``params.agentId``); anything else is a 404 (or 400 naming the field),
and nothing changes.

The configuration document and the hash a heartbeat's ``configHash`` is compared with
are ``agent_config_doc``'s.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.exceptions import HTTPException
from litestar.params import Parameter
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.streams import JOB_LOGS
from virtbackup.contracts.subjects import JobCmd, JobCtlCmd, ScheduleCmd, job_log
from virtbackup.contracts.v1.agents import ReportStage
from virtbackup.contracts.v1.anomalies import (
    Anomaly,
    AnomalyType,
    DefinitionDisk,
    DefinitionRecord,
    DomainDefinition,
    Severity,
)
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.config import AgentConfig, Server
from virtbackup.contracts.v1.jobctl import CheckList, CheckOutcome, ChecksPutRequest, LogLine
from virtbackup.contracts.v1.jobs import BackupRequest, Job, JobGetRequest
from virtbackup.contracts.v1.schedules import Schedule, ScheduleRef
from virtbackup.gateway.agent_config_doc import agent_config, agent_servers
from virtbackup.gateway.agent_reports import report_status
from virtbackup.gateway.agents_store import AgentRecord
from virtbackup.gateway.bodies import Body, LineText
from virtbackup.gateway.controllers.backend_agents import (
    JobStatusBody,
    OutputLine,
    Short,
    _store,
    calling_agent,
)
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import anomalies, joblog, timeouts
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, NotFound
from virtbackup.runtime.kv import keys, read_value

Name = LineText
Size = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
#: Most log lines of one batch (backupagent-api.md).
LOGS_MAX = 100


class StartBody(Body, kw_only=True):
    """``vmName`` (a VM of the agent's host), ``serverId`` (one of the agent's servers;
    needed only when it has several), ``targetId`` (a destination it may write to; the
    installation's backup destination when left out), ``scheduleId`` (optional)."""

    vm_name: Name
    server_id: Name | None = None
    target_id: Name | None = None
    schedule_id: Name | None = None


class AgentStatusBody(Body, kw_only=True):
    """backupagent-api.md's status report: VirtBackup's stages; sizes in bytes as
    ``readSize``/``storedSize`` (or the document's ``dumpSize``/``compressedSize``, or
    ``bytesRead``/``bytesWritten``); ``durationMs``: how long the stage being left took
    (the one reported before); ``uploadPath``; on failure
    ``errorMessage`` and ``errorCode``. Also the progress fields of
    ``POST /api/v1/jobs/{id}/status`` (``totalBytes``, ``chunksDone``, ``timestamp``...)."""

    status: ReportStage
    read_size: Size | None = None
    stored_size: Size | None = None
    dump_size: Size | None = None
    compressed_size: Size | None = None
    bytes_read: Size | None = None
    bytes_written: Size | None = None
    total_bytes: Size | None = None
    chunks_done: Size | None = None
    chunks_total: Size | None = None
    upload_path: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    duration_ms: Size | None = None
    message: Text = ""
    error_message: Text = ""
    error_code: Short = ""
    timestamp: Short | None = None
    checkpoint: Short | None = None
    parent_timestamp: Short | None = None
    output: Annotated[list[OutputLine], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )


class CheckResult(Body, kw_only=True):
    check_type: Literal["sanity", "verify", "checksum", "boot", "custom"]
    check_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    status: Literal["passed", "failed", "skipped"]
    expected_value: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    actual_value: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    delta_pct: float | None = None


class VerificationBody(Body, kw_only=True):
    """A restore verification: overall ``status``, ``restoreDurationMs``, its
    ``checks`` (at most 100), ``containerId`` (kept as given)."""

    status: Literal["passed", "failed", "error"]
    restore_duration_ms: Size | None = None
    container_id: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    checks: Annotated[list[CheckResult], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )


class LogEntry(Body, kw_only=True):
    level: Literal["info", "warn", "error"] = "info"
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    timestamp: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class LogsBody(Body, kw_only=True):
    logs: Annotated[list[LogEntry], msgspec.Meta(max_length=LOGS_MAX)]


class SnapshotDisk(Body, kw_only=True):
    target: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    size: Size = 0
    format: Annotated[str, msgspec.Meta(max_length=32)] = ""
    device: Annotated[str, msgspec.Meta(max_length=32)] = "disk"


class SnapshotSummary(Body, kw_only=True):
    """A parsed definition: disks, memory (KiB), vCPUs, firmware, NICs (MACs)."""

    disks: Annotated[list[SnapshotDisk], msgspec.Meta(max_length=256)] = msgspec.field(
        default_factory=list
    )
    memory_kib: Size = 0
    vcpus: Size = 0
    firmware: Annotated[str, msgspec.Meta(max_length=32)] = ""
    nics: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=64)
    ] = msgspec.field(default_factory=list)


class SchemaSnapshotBody(Body, kw_only=True):
    """``snapshot``: the domain XML (a string, at most 1 MiB) or a
    :class:`SnapshotSummary`; disk sizes of the XML come from the last heartbeat."""

    vm_name: Name
    server_id: Name | None = None
    snapshot: Annotated[str, msgspec.Meta(max_length=anomalies.XML_MAX)] | SnapshotSummary


class AnomalyBody(Body, kw_only=True):
    type: AnomalyType
    severity: Severity
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    description: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    vm_name: Name | None = None
    job_id: Name | None = None


def _bad(field: str, reason: str) -> HTTPException:
    return HTTPException(status_code=400, detail=f"{field}: {reason}")


async def _agent(gw: Gateway, agent_id: str) -> AgentRecord:
    agent = await _store(gw).get(agent_id)
    if agent is None:
        raise HTTPException(status_code=401, detail="unauthorized")
    return agent


async def _server_of(
    gw: Gateway, agent_id: str, server_id: str | None
) -> tuple[AgentConfig, Server]:
    """The agent's server ``server_id`` (or its only one); 404/400 naming ``serverId``,
    409 while no server of the configuration names the agent."""
    cfg, _ = await gw.config.load()
    mine = agent_servers(cfg, agent_id)
    if not mine:
        raise Conflict(
            "this agent backs up no server yet: name it as a server's agentId in the configuration"
        )
    if server_id is not None:
        server = next((s for s in mine if s.id == server_id), None)
        if server is None:
            raise NotFound(f"serverId: no server {shown(server_id)} is backed up by this agent")
        return cfg, server
    if len(mine) != 1:
        names = ", ".join(s.id for s in mine) or "none"
        raise _bad("serverId", f"required: this agent backs up servers {names}")
    return cfg, mine[0]


def _on_host(agent: AgentRecord, vm_name: str) -> None:
    if not any(d.name == vm_name for d in agent.discovered_domains):
        raise NotFound(
            f"vmName: no VM {shown(vm_name)} on this agent's host (as its last heartbeat "
            "discovered them)"
        )


async def _job_of(gw: Gateway, agent_id: str, job_id: str) -> Job:
    """The job, if it was queued for this agent; else 404 (as for an unknown job)."""
    try:
        job = await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job)
    except NotFound:
        raise NotFound(f"job {shown(job_id)} not found") from None
    if job.params.get("agentId") != agent_id:
        raise NotFound(f"job {shown(job_id)} not found")
    return job


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


async def _anomalies_kv(gw: Gateway) -> KeyValue:
    return await gw.bus.key_value(buckets.ANOMALIES)


JobId = Annotated[str, Parameter(min_length=1, max_length=128)]


class BackupAgentController(Controller):
    path = "/api/v1"

    @get("/agent/config", responses=responses(401, 403))
    async def config(self, gw: Gateway, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The agent's schedules, targets and alert channels, with ``configHash``."""
        agent_id = calling_agent(request)
        await _agent(gw, agent_id)
        return await agent_config(gw, agent_id)

    @post("/agent/jobs/start", status_code=201, responses=responses(400, 401, 403, 404, 409))
    async def start(
        self, gw: Gateway, request: Request[Any, Any, Any], data: StartBody
    ) -> dict[str, Any]:
        """A backup of a VM of the agent's host, queued for this agent (it takes it with
        ``POST /api/v1/agent/lease``); ``{"jobId"}``."""
        agent_id = calling_agent(request)
        agent = await _agent(gw, agent_id)
        if agent.state == "deactivated":
            raise HTTPException(status_code=409, detail="agent is deactivated")
        cfg, server = await _server_of(gw, agent_id, data.server_id)
        _on_host(agent, data.vm_name)
        target = data.target_id or cfg.backup_destination_id
        if target is None:
            raise _bad("targetId", "required (the installation has no backup destination)")
        if not any(d.id == target for d in cfg.destinations):
            raise NotFound(f"targetId: no destination {shown(target)}")
        if target not in server.agent_destination_ids:
            raise _bad("targetId", f"destination {shown(target)} is not allowed for this agent")
        if data.schedule_id is not None:
            try:
                await gw.bus.request(ScheduleCmd.GET, ScheduleRef(id=data.schedule_id), Schedule)
            except NotFound:
                raise NotFound(f"scheduleId: no schedule {shown(data.schedule_id)}") from None
        job = await gw.bus.request(
            JobCmd.BACKUP,
            BackupRequest(server_id=server.id, vm_name=data.vm_name, destination_id=target),
            Job,
            timeout=timeouts.JOB_COMMAND,
        )
        why = f" for schedule {data.schedule_id}" if data.schedule_id else ""
        await joblog.try_append(gw.bus, job.id, f"[agent {agent_id}] started by the agent{why}")
        return {"jobId": job.id}

    @post(
        "/agent/jobs/{job_id:str}/status",
        status_code=200,
        responses=responses(400, 401, 403, 404, 409),
    )
    async def status(
        self, gw: Gateway, request: Request[Any, Any, Any], job_id: JobId, data: AgentStatusBody
    ) -> dict[str, Any]:
        """A stage of the job leased to this agent; ``{"success": true}`` and whether
        to stop (``cancel``) or, to ``committing``, whether to commit (409 once the job
        has ended, 404 for a job not leased to this agent)."""
        agent_id = calling_agent(request)
        line = f"stage {data.status}"
        if data.duration_ms is not None:
            line += f" (previous stage took {data.duration_ms} ms)"
        if data.upload_path:
            line += f"; upload path {data.upload_path}"
        body = JobStatusBody(
            status=data.status,
            message=data.message,
            error_message=data.error_message,
            error_code=data.error_code,
            bytes_read=_first(data.read_size, data.dump_size, data.bytes_read),
            bytes_written=_first(data.stored_size, data.compressed_size, data.bytes_written),
            total_bytes=data.total_bytes,
            chunks_done=data.chunks_done,
            chunks_total=data.chunks_total,
            duration_ms=data.duration_ms,
            upload_path=data.upload_path,
            timestamp=data.timestamp,
            checkpoint=data.checkpoint,
            parent_timestamp=data.parent_timestamp,
            output=[OutputLine(line=line), *data.output],
        )
        return await report_status(gw, agent_id, job_id, body)

    @post(
        "/agent/jobs/{job_id:str}/verification",
        status_code=201,
        responses=responses(400, 401, 403, 404),
    )
    async def verification(
        self, gw: Gateway, request: Request[Any, Any, Any], job_id: JobId, data: VerificationBody
    ) -> dict[str, str]:
        """Restore verification results of the agent's job; they join the job's
        ``tests`` (``GET /api/v1/jobs/{id}/tests``); ``{"verificationId"}``."""
        agent_id = calling_agent(request)
        await _job_of(gw, agent_id, job_id)
        verification_id = str(uuid.uuid4())
        common = {
            "verificationId": verification_id,
            "verificationStatus": data.status,
            "restoreDurationMs": data.restore_duration_ms,
            "containerId": data.container_id,
            "agentId": agent_id,
        }
        overall: Literal["passed", "failed"] = "passed" if data.status == "passed" else "failed"
        tests = [
            CheckOutcome(
                check="verification",
                status=overall,
                detail=f"restore verification {data.status}"
                + (
                    f" in {data.restore_duration_ms} ms"
                    if data.restore_duration_ms is not None
                    else ""
                ),
                data=common,
            )
        ]
        for c in data.checks:
            detail = c.check_name
            if c.expected_value is not None or c.actual_value is not None:
                detail += f": expected {c.expected_value}, actual {c.actual_value}"
            tests.append(
                CheckOutcome(
                    check=c.check_type,
                    status=c.status,
                    detail=detail,
                    data={
                        **common,
                        "checkType": c.check_type,
                        "checkName": c.check_name,
                        "expectedValue": c.expected_value,
                        "actualValue": c.actual_value,
                        "deltaPct": c.delta_pct,
                    },
                )
            )
        await gw.bus.request(
            JobCtlCmd.CHECKS_PUT,
            ChecksPutRequest(id=job_id, tests=tests, verification=True),
            CheckList,
        )
        return {"verificationId": verification_id}

    @post("/agent/jobs/{job_id:str}/logs", status_code=201, responses=responses(400, 401, 403, 404))
    async def logs(
        self, gw: Gateway, request: Request[Any, Any, Any], job_id: JobId, data: LogsBody
    ) -> dict[str, int]:
        """Up to 100 lines into the job's output log (``vb.log.job.<id>``, streamed on
        ``/events`` as ``job.log``); ``{"inserted": n}``."""
        agent_id = calling_agent(request)
        await _job_of(gw, agent_id, job_id)
        for entry in data.logs:
            line = LogLine(
                ts=entry.timestamp or utcnow_iso(),
                level=entry.level,
                line=joblog.clip(f"[agent {agent_id}] {entry.message}"),
            )
            await gw.bus.publish_stored(
                job_log(job_id),
                msgspec.json.encode(line),
                stream=JOB_LOGS,
                msg_id=uuid.uuid4().hex,
            )
        return {"inserted": len(data.logs)}

    @post("/agent/schema-snapshot", status_code=201, responses=responses(400, 401, 403, 404))
    async def schema_snapshot(
        self, gw: Gateway, request: Request[Any, Any, Any], data: SchemaSnapshotBody
    ) -> dict[str, Any]:
        """A VM's domain definition, compared with the one of its last backup: a change
        raises a ``schema_drift`` anomaly and a ``vm.definition_drift`` event;
        ``{"snapshotId", "drift", "changes"}``."""
        agent_id = calling_agent(request)
        agent = await _agent(gw, agent_id)
        _, server = await _server_of(gw, agent_id, data.server_id)
        _on_host(agent, data.vm_name)
        if isinstance(data.snapshot, str):
            try:
                definition = anomalies.summarize(data.snapshot)
            except ValueError as exc:
                raise _bad("snapshot", str(exc)) from None
            seen = next(d for d in agent.discovered_domains if d.name == data.vm_name)
            definition = anomalies.with_sizes(definition, {d.target: d.size for d in seen.disks})
        else:
            s = data.snapshot
            definition = DomainDefinition(
                disks=sorted(
                    (
                        DefinitionDisk(
                            target=d.target, size=d.size, format=d.format, device=d.device
                        )
                        for d in s.disks
                    ),
                    key=lambda d: d.target,
                ),
                memory_kib=s.memory_kib,
                vcpus=s.vcpus,
                firmware=s.firmware,
                nics=sorted(s.nics),
            )
        kv = await _anomalies_kv(gw)
        last = await read_value(
            kv, anomalies.definition_key(server.id, data.vm_name), DefinitionRecord
        )
        changes = anomalies.drift(last.definition, definition) if last is not None else []
        snapshot_id = str(uuid.uuid4())
        record = {
            "id": snapshot_id,
            "agentId": agent_id,
            "serverId": server.id,
            "vmName": data.vm_name,
            "definition": msgspec.to_builtins(definition),
            "comparedWith": last.timestamp if last is not None else None,
            "changes": changes,
            "createdAt": utcnow_iso(),
        }
        await kv.put(f"snap.{snapshot_id}", msgspec.json.encode(record))
        anomaly_id = None
        if changes:
            raised = await anomalies.record(
                gw.bus,
                kv,
                Anomaly(
                    id="",
                    type="schema_drift",
                    severity="warning",
                    title=f"Definition of {data.vm_name} changed since its last backup",
                    description="; ".join(changes),
                    source="agent",
                    agent_id=agent_id,
                    server_id=server.id,
                    vm_name=data.vm_name,
                    changes=changes,
                    details={
                        "snapshotId": snapshot_id,
                        "lastBackup": last.timestamp if last else None,
                    },
                ),
            )
            anomaly_id = raised.id
        return {
            "snapshotId": snapshot_id,
            "drift": bool(changes),
            "changes": changes,
            "anomalyId": anomaly_id,
        }

    @post("/agent/anomaly", status_code=201, responses=responses(400, 401, 403, 404))
    async def anomaly(
        self, gw: Gateway, request: Request[Any, Any, Any], data: AnomalyBody
    ) -> dict[str, str]:
        """Record an anomaly the agent detected (stored, ``anomaly.raised`` event);
        ``{"anomalyId"}``. ``jobId``, when given, must be one of its jobs (404);
        ``vmName`` that job's VM (400), or without a job a VM its last heartbeat
        discovered (404): an agent raises anomalies of its own VMs only."""
        agent_id = calling_agent(request)
        agent = await _agent(gw, agent_id)
        job = await _job_of(gw, agent_id, data.job_id) if data.job_id else None
        if data.vm_name is not None:
            if job is None:
                _on_host(agent, data.vm_name)
            elif data.vm_name != job.vm_name:
                raise _bad("vmName", f"job {job.id} is of VM {shown(job.vm_name)}")
        raised = await anomalies.record(
            gw.bus,
            await _anomalies_kv(gw),
            Anomaly(
                id="",
                type=data.type,
                severity=data.severity,
                title=data.title,
                description=data.description,
                source="agent",
                agent_id=agent_id,
                vm_name=data.vm_name or (job.vm_name if job else None),
                server_id=job.server_id if job else None,
                job_id=data.job_id,
                destination_id=job.destination_id if job else None,
            ),
        )
        return {"anomalyId": raised.id}

    @get("/anomalies", responses=responses(400))
    async def list_anomalies(
        self,
        gw: Gateway,
        type: Annotated[AnomalyType | None, Parameter(query="type")] = None,
        vm_name: Annotated[str | None, Parameter(query="vmName", max_length=253)] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Recorded anomalies, newest first (``type``, ``vmName`` filter; at most
        ``limit``): ``{"anomalies": [...]}``."""
        kv = await _anomalies_kv(gw)
        found = []
        for key in await keys(kv, "anomaly."):
            item = await read_value(kv, key, Anomaly)
            if item is None:
                continue
            if type is not None and item.type != type:
                continue
            if vm_name is not None and item.vm_name != vm_name:
                continue
            found.append(item)
        found.sort(key=lambda a: a.created_at, reverse=True)
        return {"anomalies": [msgspec.to_builtins(a) for a in found[:limit]]}
