"""Native API (``/api/v1``): garbage collection, verification and statistics of a
destination's repository (jobs kept by the job-orchestrator)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, get, post
from litestar.params import Parameter

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.common import ServerId, VmName
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.lifecycle_gc import (
    Days,
    DestinationStats,
    GcRequest,
    GraceSeconds,
    SamplePercent,
    StatsRequest,
    VerifyRequest,
)
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.controllers.jobs import job_view
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts

DestinationParam = Annotated[
    str, Parameter(description="A configured destination's id", min_length=1, max_length=200)
]
#: Reading every manifest of a large repository takes a while.
STATS_TIMEOUT = timeouts.JOB_COMMAND * 3


class GcBody(Body, kw_only=True):
    """``graceSeconds`` (integer >= 0, default 86700: 24 h + 5 min): unreferenced chunks
    younger than this (by the destination's clock) are kept. ``dryRun``: count only."""

    grace_seconds: GraceSeconds | None = None
    dry_run: bool = False


class VerifyBody(Body, kw_only=True):
    """``mode``: ``full`` (every chunk, the default) or ``sample`` (``samplePercent`` of each
    point's chunks, 1-100, chosen at random). ``outdatedAfterDays``: skip points verified
    more recently. ``serverId``, ``vmName``: only that source server's / VM's points."""

    mode: Literal["full", "sample"] = "full"
    sample_percent: SamplePercent | None = None
    outdated_after_days: Days | None = None
    server_id: ServerId | None = None
    vm_name: VmName | None = None


class LifecycleGcController(Controller):
    path = "/api/v1/destinations"

    @post("/{destination_id:str}/gc", status_code=202, responses=responses(404, 409))
    async def gc(
        self, gw: Gateway, destination_id: DestinationParam, data: GcBody | None = None
    ) -> dict[str, Any]:
        """Start a garbage collection (a ``gc`` job; 409 while a GC or prune runs)."""
        body = data or GcBody()
        request = GcRequest(
            destination_id=destination_id,
            grace_seconds=body.grace_seconds,
            dry_run=body.dry_run,
        )
        job = await gw.bus.request(JobCmd.GC, request, Job, timeout=timeouts.JOB_COMMAND)
        return job_view(job)

    @post("/{destination_id:str}/verify", status_code=202, responses=responses(404))
    async def verify(
        self, gw: Gateway, destination_id: DestinationParam, data: VerifyBody | None = None
    ) -> dict[str, Any]:
        """Start a verification of restore points (a ``verify`` job)."""
        body = data or VerifyBody()
        request = VerifyRequest(
            destination_id=destination_id,
            mode=body.mode,
            sample_percent=body.sample_percent,
            outdated_after_days=body.outdated_after_days,
            server_id=body.server_id,
            vm_name=body.vm_name,
        )
        job = await gw.bus.request(JobCmd.VERIFY, request, Job, timeout=timeouts.JOB_COMMAND)
        return job_view(job)

    @get("/{destination_id:str}/stats", responses=responses(404, 503))
    async def stats(self, gw: Gateway, destination_id: DestinationParam) -> DestinationStats:
        """Logical and stored bytes, chunks and deduplication factor, in all and per VM."""
        return await gw.bus.request(
            JobCmd.STATS,
            StatsRequest(destination_id=destination_id),
            DestinationStats,
            timeout=STATS_TIMEOUT,
        )
