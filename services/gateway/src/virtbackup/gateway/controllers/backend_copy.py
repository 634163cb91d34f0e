"""Native API (``/api/v1``): copying a restore point from one destination to another
(a ``copy`` job of the job-orchestrator, ``subjects.JOB_COPY``)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, post

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.common import ServerId, VmName
from virtbackup.contracts.v1.jobs import CopyRequest, Job, PointTimestamp
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.controllers.jobs import job_view
from virtbackup.gateway.controllers.lifecycle_gc import DestinationParam
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts


class CopyBody(Body, kw_only=True):
    """``targetDestinationId``: where the point goes (another configured destination).
    ``vmName``: whose point; ``serverId``: only points backed up from that server;
    ``timestamp`` (``YYYY-MM-DDTHH-MM-SS``): that point, else the newest one."""

    target_destination_id: str
    vm_name: VmName
    server_id: ServerId | None = None
    timestamp: PointTimestamp | None = None


class CopyController(Controller):
    path = "/api/v1/destinations"

    @post("/{destination_id:str}/copy", status_code=202, responses=responses(404, 409))
    async def copy(
        self, gw: Gateway, destination_id: DestinationParam, data: CopyBody
    ) -> dict[str, Any]:
        """Copy a restore point to another destination (a ``copy`` job; 409 while the
        VM's folder there is being written)."""
        request = CopyRequest(
            destination_id=destination_id,
            target_destination_id=data.target_destination_id,
            vm_name=data.vm_name,
            server_id=data.server_id,
            timestamp=data.timestamp,
        )
        job = await gw.bus.request(JobCmd.COPY, request, Job, timeout=timeouts.JOB_COMMAND)
        return job_view(job)
