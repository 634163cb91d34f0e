"""Native API (``/api/v1``): restore points as resources, and prune.

* ``GET /api/v1/restore-points`` (query ``destinationId``, ``serverId``, ``vmName``):
  every point, newest first (``contracts.v1.points.PointInfo``; the id's form is
  described there).
* ``GET``, ``PATCH`` (``protected``, ``notes``), ``DELETE /api/v1/restore-points/{id}``;
  a delete is 409 while the point is protected or a job uses it.
* ``POST /api/v1/destinations/{id}/prune`` (optional body): a dry run answers the plan at
  once; otherwise a ``prune`` job starts (``{"jobId": ...}``).

The commands are answered by the job-orchestrator (``vb.cmd.job.point*``,
``vb.cmd.job.prune*``).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.datastructures import ResponseHeader
from litestar.params import Parameter

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.common import ServerId, VmName
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.points import (
    NOTES_MAX_LENGTH,
    POINT_ID_MAX_LENGTH,
    PointDeleted,
    PointDeleteRequest,
    PointInfo,
    PointList,
    PointListRequest,
    PointRef,
    PointUpdateRequest,
    PrunePlan,
    PruneRequest,
)
from virtbackup.contracts.v1.retention import KeepRules
from virtbackup.gateway.bodies import Body, strict_body
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts

PointIdParam = Annotated[
    str,
    Parameter(
        description="A restore point's id (see GET /api/v1/restore-points)",
        min_length=1,
        max_length=POINT_ID_MAX_LENGTH,
    ),
]
DestinationParam = Annotated[
    str, Parameter(description="A configured destination's id", min_length=1, max_length=200)
]
#: The header naming the destinations a listing of all could not read.
UNREADABLE_HEADER = "X-Unreadable-Destinations"
#: Listing and pruning read every record of a destination: they may take a while.
LIST_TIMEOUT = timeouts.JOB_COMMAND + 60


class PointPatchBody(Body, kw_only=True):
    """What may change about a point: nothing else (an unknown field is a 400)."""

    protected: bool | None = None
    notes: Annotated[str, msgspec.Meta(max_length=NOTES_MAX_LENGTH)] | None = None


class PruneBody(KeepRules, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``vmName``: prune that VM's points only (else every VM's); the keep rules
    (``KeepRules``; else each VM's configured policy; a set that keeps nothing needs
    ``keepAll: false``); ``dryRun``: answer what would be kept and removed, change
    nothing."""

    vm_name: VmName | None = None
    server_id: ServerId | None = None
    dry_run: bool = False


class RestorePointsController(Controller):
    path = "/api/v1"

    @get(
        "/restore-points",
        responses=responses(404, 503),
        response_headers=[
            ResponseHeader(
                name=UNREADABLE_HEADER,
                required=False,
                documentation_only=True,
                description="Without destinationId: the ids of the enabled destinations "
                "that could not be read (comma-separated; their points are missing from "
                "the list). GET with destinationId=<id> says why (503).",
            )
        ],
    )
    async def list_points(
        self,
        gw: Gateway,
        destination_id: str | None = Parameter(query="destinationId", default=None),
        server_id: str | None = Parameter(query="serverId", default=None),
        vm_name: str | None = Parameter(query="vmName", default=None),
    ) -> Response[list[PointInfo]]:
        """Every restore point (of one destination, server or VM), newest first.

        With ``destinationId``: 404 if it is not configured, 503 naming it when it cannot
        be read (its ``repository.json`` unreadable, its directory missing, its storage
        unreachable). Without: the points of every enabled destination that could be
        read, and the header ``X-Unreadable-Destinations`` naming the others."""
        request = PointListRequest(
            destination_id=destination_id, server_id=server_id, vm_name=vm_name
        )
        found = await gw.bus.request(JobCmd.POINTS, request, PointList, timeout=LIST_TIMEOUT)
        headers = {}
        if found.unreadable_destinations:
            headers[UNREADABLE_HEADER] = ",".join(found.unreadable_destinations)
        return Response(found.points, headers=headers)

    @get("/restore-points/{point_id:str}", responses=responses(400, 404, 409, 503))
    async def get_point(self, gw: Gateway, point_id: PointIdParam) -> PointInfo:
        """One restore point."""
        return await gw.bus.request(
            JobCmd.POINT_GET, PointRef(id=point_id), PointInfo, timeout=timeouts.JOB_COMMAND
        )

    @patch("/restore-points/{point_id:str}", responses=responses(400, 404, 409))
    async def update_point(
        self, gw: Gateway, point_id: PointIdParam, request: Request[Any, Any, Any]
    ) -> PointInfo:
        """Protect or unprotect a point, or set its notes."""
        data = await strict_body(request, PointPatchBody, optional=False)
        command = PointUpdateRequest(id=point_id, protected=data.protected, notes=data.notes)
        return await gw.bus.request(
            JobCmd.POINT_UPDATE, command, PointInfo, timeout=timeouts.JOB_COMMAND
        )

    @delete(
        "/restore-points/{point_id:str}",
        status_code=200,
        responses=responses(400, 404, 409, 503),
    )
    async def delete_point(
        self,
        gw: Gateway,
        point_id: PointIdParam,
        force: bool = Parameter(
            query="force",
            default=False,
            description="Also delete a point whose record cannot be read (its folder;"
            " never its chunks, nor a protected or used point)",
        ),
    ) -> PointDeleted:
        """Delete a restore point (never its chunks: garbage collection frees those)."""
        command = PointDeleteRequest(id=point_id, force=force)
        return await gw.bus.request(
            JobCmd.POINT_DELETE, command, PointDeleted, timeout=LIST_TIMEOUT
        )

    @post(
        "/destinations/{destination_id:str}/prune",
        status_code=200,
        responses=responses(400, 404, 409, 503),
    )
    async def prune(
        self,
        gw: Gateway,
        destination_id: DestinationParam,
        request: Request[Any, Any, Any],
    ) -> dict[str, Any]:
        """Prune by retention: a dry run's plan, or ``{"jobId"}`` of a prune job."""
        body = await strict_body(request, PruneBody, optional=True)
        fields = msgspec.structs.asdict(body)
        command = PruneRequest(destination_id=destination_id, **fields)
        if body.dry_run:
            plan = await gw.bus.request(JobCmd.PRUNE_PLAN, command, PrunePlan, timeout=LIST_TIMEOUT)
            out = msgspec.to_builtins(plan)
            assert isinstance(out, dict)
            return out
        job = await gw.bus.request(JobCmd.PRUNE, command, Job, timeout=LIST_TIMEOUT)
        return {"jobId": job.id}


#: Bodies the handlers decode themselves (for the OpenAPI document: ``app.RAW_BODIES``).
POINT_BODIES: dict[tuple[str, str], type[Any]] = {
    ("PATCH", "/api/v1/restore-points/{point_id}"): PointPatchBody,
    ("POST", "/api/v1/destinations/{destination_id}/prune"): PruneBody,
}
