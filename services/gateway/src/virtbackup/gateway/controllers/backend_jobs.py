"""Native API (``/api/v1/jobs``): job control as backend-api.md describes it.

Jobs are those of the job-orchestrator (``VB_JOBS``), shown in the backend's vocabulary
(``backend_view``): ``status`` is ``queued``, ``running``, ``succeeded`` or ``failed``;
a cancelled job is ``failed`` with ``error: "cancelled by user"`` and the line
``[control] job cancelled by user`` in its output log (backend-api.md's terminal
mutation). The agent API (``/jobs``) and the HyperSDK API keep their own views of the
same records (``state: canceled``, ``status: cancelled``).

Lists are paginated by offset (``limit`` 1-1000, default 100; ``offset``); the answer
says ``total`` and the ``nextOffset`` (``null`` on the last page).

``POST /api/v1/jobs/{id}/artifacts`` and ``/tests`` are the reporting side (the
installation's token): a 409 naming the state once the job has ended, and for an
artifact name posted already. A job's ``status`` report is the remote agents' route
(``bak_`` keys, ``backend_agents.job_status``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.exceptions import PermissionDeniedException
from litestar.params import Parameter
from litestar.response import Stream

from virtbackup.contracts.subjects import JobCmd, JobCtlCmd
from virtbackup.contracts.v1.common import ServerId, VmName, shown
from virtbackup.contracts.v1.jobctl import (
    ARTIFACT_MAX_BYTES,
    ARTIFACT_NAME_PATTERN,
    CANCEL_ERROR,
    ArtifactGetRequest,
    ArtifactInfo,
    ArtifactList,
    ArtifactName,
    ArtifactPiece,
    ArtifactPutRequest,
    BackendStatus,
    CheckList,
    CheckOutcome,
    ChecksPutRequest,
    ClearedQueue,
    ClearQueueRequest,
    Flushed,
    FlushRequest,
    JobPage,
    JobQuery,
    JobRef,
    MediaType,
    Rerun,
)
from virtbackup.contracts.v1.jobs import (
    TERMINAL_STATES,
    Job,
    JobCancelRequest,
    JobGetRequest,
    JobState,
    JobType,
)
from virtbackup.gateway.agent_auth import AGENT_SCOPE_KEY
from virtbackup.gateway.bodies import Body, NoBody
from virtbackup.gateway.controllers.jobs import job_view
from virtbackup.gateway.errors import responses
from virtbackup.gateway.identity_auth import PERMISSIONS_KEY
from virtbackup.gateway.identity_perms import ADMIN, allows
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import BadRequest, NotFound

#: Seconds ``POST /api/v1/jobs/{id}/cancel`` waits for the job to end before it answers
#: 202 with the job still stopping.
CANCEL_WAIT_SECONDS = 20.0
#: Media types an artifact is served with as declared; any other is served as
#: ``application/octet-stream``.
INERT_MEDIA_TYPES = frozenset(
    {
        "text/plain",
        "text/plain; charset=utf-8",
        "application/json",
        "application/xml",
        "text/xml",
        "application/x-ndjson",
    }
)
OCTET_STREAM = "application/octet-stream"


def backend_view(job: Job) -> dict[str, Any]:
    """The agent API's job view plus backend-api.md's fields: ``status``, ``error``
    (``null`` unless failed), ``stage`` (an agent's reported stage, else the phase) and
    ``progress`` (0-100: an agent's report, else completed units of all)."""
    out = job_view(job)
    status: BackendStatus
    error: str | None = None
    if job.state == "canceled":
        status, error = "failed", CANCEL_ERROR
    elif job.state == "failure":
        status, error = "failed", job.message
    elif job.state == "success":
        status = "succeeded"
    else:
        status = job.state
    reported = job.result.get("agentStatus") if isinstance(job.result, dict) else None
    if not isinstance(reported, dict):  # a remote agent's last stage (agent_jobs)
        reported = job.result.get("agent") if isinstance(job.result, dict) else None
    reported = reported if isinstance(reported, dict) else {}
    progress = reported.get("progress")
    if progress is None:
        if job.state == "success":
            progress = 100.0
        elif job.total_units:
            progress = round(100.0 * job.completed_units / job.total_units, 1)
        else:
            progress = 0.0
    out.update(
        status=status, error=error, stage=reported.get("stage") or job.phase, progress=progress
    )
    return out


def parsed_when(value: str | None, name: str) -> str | None:
    """``value`` checked as an ISO-8601 date or time: 400 naming ``name`` otherwise."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"not an ISO-8601 date or time: {shown(value)} - at `{name}`") from None
    return value


#: What starting a job of each type takes (the rule table's permission of the route that
#: submits it); a rerun takes it too. A type not named here takes ``*`` (admins).
RERUN_PERMISSIONS: Final = {
    "backup": "backup:run",
    "restore": "restore:run",
    "sanity": "lifecycle:run",
    "copy": "lifecycle:run",
    "gc": "lifecycle:run",
    "verify": "lifecycle:run",
    "prune": "lifecycle:run",
}


def check_may_start(request: Request[Any, Any, Any], job_type: str) -> None:
    """``PermissionDeniedException`` (403) unless the caller may start a ``job_type`` job
    (``RERUN_PERMISSIONS``)."""
    held = request.scope.get(PERMISSIONS_KEY)
    if not isinstance(held, frozenset):
        held = frozenset()
    wanted = RERUN_PERMISSIONS.get(job_type, ADMIN)
    if not allows(held, wanted):
        raise PermissionDeniedException(
            f"forbidden: rerunning a {job_type} job starts one: it needs permission {wanted}"
        )


class FlushBody(Body, kw_only=True):
    """``olderThan`` (ISO-8601): only jobs that finished before it."""

    older_than: str | None = None


class ArtifactBody(Body, kw_only=True):
    """An artifact: ``name`` (letters, digits, ``._-``), ``mediaType``, and its bytes as
    ``content`` (text, stored as UTF-8) or ``contentBase64``: exactly one of them; at
    most 256 KiB."""

    name: ArtifactName
    media_type: MediaType = "application/octet-stream"
    content: str | None = None
    content_base64: str | None = None


class CheckBody(Body, kw_only=True):
    """One verification result: ``check`` (its name), ``status`` (``passed``,
    ``failed``, ``skipped``), optionally ``disk``, ``point``, ``detail`` and ``data``."""

    check: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    status: Literal["passed", "failed", "skipped"]
    disk: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    point: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    detail: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class ChecksBody(Body, kw_only=True):
    tests: Annotated[list[CheckBody], msgspec.Meta(min_length=1, max_length=100)]


JobIdParam = Annotated[str, Parameter(description="A job's id", min_length=1, max_length=128)]


class BackendJobsController(Controller):
    path = "/api/v1/jobs"

    @get()
    async def list_jobs(
        self,
        gw: Gateway,
        status: BackendStatus | None = Parameter(query="status", default=None),  # noqa: B008
        state_: JobState | None = Parameter(query="state", default=None),  # noqa: B008
        type_: JobType | None = Parameter(query="type", default=None),  # noqa: B008
        server_id: ServerId | None = Parameter(query="serverId", default=None),  # noqa: B008
        vm_name: VmName | None = Parameter(query="vmName", default=None),  # noqa: B008
        destination_id: str | None = Parameter(query="destinationId", default=None),
        since: str | None = Parameter(query="since", default=None),
        until: str | None = Parameter(query="until", default=None),
        limit: int = Parameter(query="limit", default=100, ge=1, le=1000),
        offset: int = Parameter(query="offset", default=0, ge=0),
    ) -> dict[str, Any]:
        """Jobs newest first, filtered, one page (``limit``/``offset``): ``{"jobs",
        "total", "limit", "offset", "nextOffset"}``; a malformed date is a 400 naming it."""
        query = JobQuery(
            status=status,
            state=state_,
            type=type_,
            server_id=server_id,
            vm_name=vm_name,
            destination_id=destination_id,
            since=parsed_when(since, "since"),
            until=parsed_when(until, "until"),
            limit=limit,
            offset=offset,
        )
        page = await gw.bus.request(JobCtlCmd.QUERY, query, JobPage)
        after = page.offset + len(page.jobs)
        return {
            "jobs": [backend_view(j) for j in page.jobs],
            "total": page.total,
            "limit": page.limit,
            "offset": page.offset,
            "nextOffset": after if after < page.total else None,
        }

    @post("/clear-queue", status_code=200)
    async def clear_queue(self, gw: Gateway, data: NoBody | None = None) -> dict[str, Any]:
        """Cancel every queued job (running ones go on): ``{"cancelled": [ids], "count"}``."""
        cleared = await gw.bus.request(JobCtlCmd.CLEAR_QUEUE, ClearQueueRequest(), ClearedQueue)
        return {"cancelled": cleared.cancelled, "count": len(cleared.cancelled)}

    @post("/flush-history", status_code=200)
    async def flush_history(self, gw: Gateway, data: FlushBody | None = None) -> dict[str, Any]:
        """Remove finished jobs (with their logs and artifacts), those that finished
        before ``olderThan`` when given: ``{"removed": n, "ids": [...]}``."""
        body = data or FlushBody()
        request = FlushRequest(older_than=parsed_when(body.older_than, "$.olderThan"))
        flushed = await gw.bus.request(
            JobCtlCmd.FLUSH, request, Flushed, timeout=timeouts.JOB_COMMAND
        )
        return {"removed": flushed.removed, "ids": flushed.ids}

    @get("/{job_id:str}", responses=responses(404))
    async def get_job(
        self, request: Request[Any, Any, Any], gw: Gateway, job_id: JobIdParam
    ) -> dict[str, Any]:
        """One job (404 for an unknown id; for a remote agent's key, for any job not
        leased to that agent)."""
        job = await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job)
        _refuse_other_agents(request, job)
        return backend_view(job)

    @delete("/{job_id:str}", status_code=200, responses=responses(404, 409))
    async def delete_job(self, gw: Gateway, job_id: JobIdParam) -> dict[str, Any]:
        """Delete a finished job with its log and artifacts (409 while it is active)."""
        job = await gw.bus.request(JobCtlCmd.DELETE, JobRef(id=job_id), Job)
        return {"deleted": job.id}

    @post("/{job_id:str}/cancel", status_code=200, responses=responses(404, 409))
    async def cancel_job(
        self, gw: Gateway, job_id: JobIdParam, data: NoBody | None = None
    ) -> Response[dict[str, Any]]:
        """Cancel a queued or running job and wait (up to 20 s) for it to end: 200 with
        ``status: failed``, ``error: "cancelled by user"``; 202 if it is still stopping.
        409 once it has finished or while it commits."""
        await gw.bus.request(JobCmd.CANCEL, JobCancelRequest(id=job_id), Job)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while True:
            job = await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job)
            if job.state in TERMINAL_STATES:
                return Response(backend_view(job), status_code=200)
            if time.monotonic() >= deadline:
                return Response(backend_view(job), status_code=202)
            await asyncio.sleep(0.2)

    @post("/{job_id:str}/rerun", status_code=202, responses=responses(404, 409))
    async def rerun_job(
        self,
        request: Request[Any, Any, Any],
        gw: Gateway,
        job_id: JobIdParam,
        data: NoBody | None = None,
    ) -> dict[str, Any]:
        """Start a new job from this job's definition (checked as a new request would be):
        ``{"jobId", "rerunOf", "job"}``. Besides ``jobs:control`` (the rule table), the
        caller must hold what starting such a job takes (``RERUN_PERMISSIONS``), else 403:
        a rerun must not let a role run a restore or a prune it could not ask for."""
        job = await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job)
        check_may_start(request, job.type)
        rerun = await gw.bus.request(
            JobCtlCmd.RERUN, JobRef(id=job_id), Rerun, timeout=timeouts.JOB_COMMAND
        )
        return {"jobId": rerun.job.id, "rerunOf": rerun.rerun_of, "job": backend_view(rerun.job)}

    @get("/{job_id:str}/artifacts", responses=responses(404))
    async def list_artifacts(
        self, request: Request[Any, Any, Any], gw: Gateway, job_id: JobIdParam
    ) -> dict[str, Any]:
        """What the job produced: ``{"artifacts": [{"name", "size", "mediaType",
        "source", "url"}]}`` (sizes in bytes). A remote agent's key reads only the job
        leased to it (404 otherwise)."""
        await _leased_to_caller(request, gw, job_id)
        listed = await gw.bus.request(
            JobCtlCmd.ARTIFACTS, JobRef(id=job_id), ArtifactList, timeout=timeouts.JOB_COMMAND
        )
        return {
            "artifacts": [
                {**_info(a), "url": f"/api/v1/jobs/{job_id}/artifacts/{a.name}"}
                for a in listed.artifacts
            ]
        }

    @post("/{job_id:str}/artifacts", status_code=201, responses=responses(404, 409))
    async def post_artifact(
        self, request: Request[Any, Any, Any], gw: Gateway, job_id: JobIdParam, data: ArtifactBody
    ) -> dict[str, Any]:
        """Keep an artifact an agent made (at most 256 KiB; VirtBackup's own names are
        409). A remote agent's ``bak_`` key may post only to the job leased to it (404
        otherwise)."""
        await _leased_to_caller(request, gw, job_id)
        if (data.content is None) == (data.content_base64 is None):
            raise BadRequest("give exactly one of content and contentBase64 - at `$.content`")
        if data.content is not None:
            raw = data.content.encode()
        else:
            try:
                raw = base64.b64decode(data.content_base64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("not base64 - at `$.contentBase64`") from None
        if len(raw) > ARTIFACT_MAX_BYTES:
            raise BadRequest(f"an artifact is at most {ARTIFACT_MAX_BYTES} bytes - at `$.content`")
        put = ArtifactPutRequest(id=job_id, name=data.name, media_type=data.media_type, data=raw)
        return _info(await gw.bus.request(JobCtlCmd.ARTIFACT_PUT, put, ArtifactInfo))

    @get("/{job_id:str}/artifacts/{name:str}", responses=responses(404))
    async def download_artifact(
        self,
        request: Request[Any, Any, Any],
        gw: Gateway,
        job_id: JobIdParam,
        name: Annotated[str, Parameter(pattern=ARTIFACT_NAME_PATTERN)],
    ) -> Stream:
        """The artifact's bytes, with its media type (404 naming an unknown one; for a
        remote agent's key, 404 for a job not leased to it)."""
        await _leased_to_caller(request, gw, job_id)
        first = await _piece(gw, job_id, name, 0)

        async def body() -> AsyncGenerator[bytes, None]:
            # Exactly ``first.size`` bytes: a log that grows meanwhile is cut where it was
            # when the download began (the pieces of an append-only file agree).
            piece, offset = first, 0
            while True:
                data = piece.data[: first.size - offset]
                yield data
                offset += len(data)
                if offset >= first.size or not data:
                    return
                piece = await _piece(gw, job_id, name, offset)

        # An agent declares its artifacts' types: only inert ones are served as declared,
        # anything else (text/html, image/svg+xml, ...) as bytes, and nothing served
        # here may run in a browser.
        media = first.media_type if first.media_type in INERT_MEDIA_TYPES else OCTET_STREAM
        return Stream(
            body(),
            media_type=media,
            headers={
                "content-length": str(first.size),
                "content-disposition": f'attachment; filename="{name}"',
                "x-content-type-options": "nosniff",
                "content-security-policy": "default-src 'none'; sandbox",
            },
        )

    @get("/{job_id:str}/tests", responses=responses(404))
    async def list_tests(self, gw: Gateway, job_id: JobIdParam) -> dict[str, Any]:
        """Verification results: sanity per disk, verify per restore point, then what
        agents posted: ``{"tests": [{"check", "status", "disk", "point", ...}]}``."""
        checks = await gw.bus.request(
            JobCtlCmd.CHECKS, JobRef(id=job_id), CheckList, timeout=timeouts.JOB_COMMAND
        )
        return {"tests": [_builtins(t) for t in checks.tests]}

    @post("/{job_id:str}/tests", status_code=201, responses=responses(404, 409))
    async def post_tests(
        self, request: Request[Any, Any, Any], gw: Gateway, job_id: JobIdParam, data: ChecksBody
    ) -> dict[str, Any]:
        """Add an agent's verification results (1-100 per post): answers them all. A
        remote agent's ``bak_`` key may post only to the job leased to it (404 otherwise)."""
        await _leased_to_caller(request, gw, job_id)
        tests = [
            CheckOutcome(
                check=t.check, status=t.status, disk=t.disk, point=t.point, detail=t.detail,
                data=t.data,
            )
            for t in data.tests
        ]  # fmt: skip
        checks = await gw.bus.request(
            JobCtlCmd.CHECKS_PUT, ChecksPutRequest(id=job_id, tests=tests), CheckList
        )
        return {"tests": [_builtins(t) for t in checks.tests]}


async def _leased_to_caller(request: Request[Any, Any, Any], gw: Gateway, job_id: str) -> None:
    """For a request authenticated by a remote agent's key (``agent_auth`` put its id in
    the scope): ``NotFound`` unless the job is that agent's (``params.agentId``, set when
    the job was queued for it), as its status reports are. The agent token passes."""
    agent_id = request.scope.get(AGENT_SCOPE_KEY)
    if not isinstance(agent_id, str) or not agent_id:
        return
    _refuse_other_agents(request, await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job))


def _refuse_other_agents(request: Request[Any, Any, Any], job: Job) -> None:
    """``NotFound`` when a remote agent's key asks for a job that is not its own."""
    agent_id = request.scope.get(AGENT_SCOPE_KEY)
    if isinstance(agent_id, str) and agent_id and job.params.get("agentId") != agent_id:
        raise NotFound(f"job {shown(job.id)} is not leased to this agent")


async def _piece(gw: Gateway, job_id: str, name: str, offset: int) -> ArtifactPiece:
    request = ArtifactGetRequest(id=job_id, name=name, offset=offset)
    return await gw.bus.request(
        JobCtlCmd.ARTIFACT_GET, request, ArtifactPiece, timeout=timeouts.JOB_COMMAND
    )


def _builtins(value: msgspec.Struct) -> dict[str, Any]:
    out = msgspec.to_builtins(value)
    assert isinstance(out, dict)
    return out


def _info(info: ArtifactInfo) -> dict[str, Any]:
    return _builtins(info)
