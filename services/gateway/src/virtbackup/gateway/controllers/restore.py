"""Agent API: restore entries and sanity checks (kept by the job-orchestrator)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, get, post
from litestar.params import Parameter

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.jobs import (
    Job,
    RestoreEntries,
    RestoreEntriesRequest,
    SanityRequest,
)
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts


class SanityBody(Body, kw_only=True):
    xml_path: str
    timestamp: str | None = None
    destination_id: str | None = None


class RestoreController(Controller):
    path = "/restore"

    @get("/entries", responses=responses(404))
    async def entries(
        self,
        gw: Gateway,
        destination_id: str | None = Parameter(query="destinationId", default=None),
        driver_id: str | None = Parameter(query="driverId", default=None),
    ) -> list[dict[str, Any]]:
        """Every restore point of a destination, newest first."""
        request = RestoreEntriesRequest(destination_id=destination_id, driver_id=driver_id)
        result = await gw.bus.request(
            JobCmd.RESTORE_ENTRIES, request, RestoreEntries, timeout=timeouts.JOB_COMMAND
        )
        out = msgspec.to_builtins(result.entries)
        assert isinstance(out, list)
        return out

    @post("/sanity", status_code=200, responses=responses(404, 409))
    async def sanity(self, gw: Gateway, data: SanityBody) -> dict[str, str]:
        """Start a job that re-reads a restore point and checks every chunk's hash."""
        request = SanityRequest(
            xml_path=data.xml_path, timestamp=data.timestamp, destination_id=data.destination_id
        )
        job = await gw.bus.request(JobCmd.SANITY, request, Job, timeout=timeouts.JOB_COMMAND)
        return {"jobId": job.id}
