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

from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.params import Parameter

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.common import ServerId, VmName
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.points import (
    NOTES_MAX_LENGTH,
    PointDeleted,
    PointInfo,
    PointList,
    PointListRequest,
    PointRef,
    PointUpdateRequest,
    PrunePlan,
    PruneRequest,
)
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.errors import readable, responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import BadRequest

PointIdParam = Annotated[
    str, Parameter(description="A restore point's id (see GET /api/v1/restore-points)")
]
Keep = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
#: Listing and pruning read every record of a destination: they may take a while.
LIST_TIMEOUT = timeouts.JOB_COMMAND + 60


class PointPatchBody(Body, kw_only=True):
    """What may change about a point: nothing else (an unknown field is a 400)."""

    protected: bool | None = None
    notes: Annotated[str, msgspec.Meta(max_length=NOTES_MAX_LENGTH)] | None = None


class PruneBody(Body, kw_only=True):
    """``vmName``: prune that VM's points only (else every VM's); the keep rules (else
    each VM's configured policy; a set that keeps nothing needs ``keepAll: false``);
    ``dryRun``: answer what would be kept and removed, change nothing."""

    vm_name: VmName | None = None
    server_id: ServerId | None = None
    keep_last: Keep | None = None
    keep_hourly: Keep | None = None
    keep_daily: Keep | None = None
    keep_weekly: Keep | None = None
    keep_monthly: Keep | None = None
    keep_yearly: Keep | None = None
    keep_all: bool | None = None
    dry_run: bool = False


B = TypeVar("B", bound=Body)


async def strict_body(request: Request[Any, Any, Any], kind: type[B], *, optional: bool) -> B:
    """The JSON body decoded strictly as ``kind`` (``"2"`` is no integer, ``"yes"`` no
    boolean): ``BadRequest`` naming the field otherwise. An absent body is ``kind()``
    when ``optional``."""
    raw = await request.body()
    if not raw.strip():
        if optional:
            return kind()
        raise BadRequest("request body must be a JSON object")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(readable(f"invalid request: {exc}")) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


class RestorePointsController(Controller):
    path = "/api/v1"

    @get("/restore-points", responses=responses(404))
    async def list_points(
        self,
        gw: Gateway,
        destination_id: str | None = Parameter(query="destinationId", default=None),
        server_id: str | None = Parameter(query="serverId", default=None),
        vm_name: str | None = Parameter(query="vmName", default=None),
    ) -> list[PointInfo]:
        """Every restore point (of one destination, server or VM), newest first."""
        request = PointListRequest(
            destination_id=destination_id, server_id=server_id, vm_name=vm_name
        )
        found = await gw.bus.request(JobCmd.POINTS, request, PointList, timeout=LIST_TIMEOUT)
        return found.points

    @get("/restore-points/{point_id:str}", responses=responses(400, 404, 409))
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

    @delete("/restore-points/{point_id:str}", status_code=200, responses=responses(400, 404, 409))
    async def delete_point(self, gw: Gateway, point_id: PointIdParam) -> PointDeleted:
        """Delete a restore point (never its chunks: garbage collection frees those)."""
        return await gw.bus.request(
            JobCmd.POINT_DELETE, PointRef(id=point_id), PointDeleted, timeout=LIST_TIMEOUT
        )

    @post(
        "/destinations/{destination_id:str}/prune",
        status_code=200,
        responses=responses(400, 404, 409),
    )
    async def prune(
        self,
        gw: Gateway,
        destination_id: Annotated[str, Parameter(description="A destination's id")],
        request: Request[Any, Any, Any],
    ) -> dict[str, Any]:
        """Prune by retention: a dry run's plan, or ``{"jobId"}`` of a prune job."""
        body = await strict_body(request, PruneBody, optional=True)
        fields = msgspec.structs.asdict(body)
        if len(destination_id) > 200:
            raise BadRequest("destinationId: longer than 200 characters")
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
