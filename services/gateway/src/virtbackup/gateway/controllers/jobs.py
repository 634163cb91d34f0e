"""Agent API: jobs, kept by the job-orchestrator."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, get, post

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.jobs import (
    Job,
    JobCancelRequest,
    JobGetRequest,
)
from virtbackup.gateway.bodies import NoBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.job_listing import matching_jobs
from virtbackup.gateway.state import Gateway


def job_view(job: Job) -> dict[str, Any]:
    out = msgspec.to_builtins(job)
    assert isinstance(out, dict)
    return out


class JobsController(Controller):
    path = "/jobs"

    @get()
    async def list_jobs(self, gw: Gateway) -> list[dict[str, Any]]:
        """Every job, newest first."""
        return [job_view(j) for j in await matching_jobs(gw)]

    @get("/{job_id:str}", responses=responses(404))
    async def get_job(self, gw: Gateway, job_id: str) -> dict[str, Any]:
        """One job with its progress (404 for an unknown id)."""
        return job_view(await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job))

    @post("/{job_id:str}/cancel", status_code=200, responses=responses(404, 409))
    async def cancel_job(
        self, gw: Gateway, job_id: str, data: NoBody | None = None
    ) -> dict[str, bool]:
        """Cancel a queued or running job (409 if it has finished; no body, or ``{}``)."""
        await gw.bus.request(JobCmd.CANCEL, JobCancelRequest(id=job_id), Job)
        return {"success": True}
