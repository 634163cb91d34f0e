"""Command handlers of the job-orchestrator."""

from __future__ import annotations

import msgspec

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.subjects import EventType, JobCmd
from virtbackup.contracts.v1.jobs import (
    TERMINAL_STATES,
    Job,
    JobCancelRequest,
    JobGetRequest,
    JobList,
    JobListRequest,
    JobSubmitRequest,
)
from virtbackup.job_orchestrator.store import JobStore
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict
from virtbackup.runtime.service import ServiceContext, ServiceSpec


def job_event_payload(job: Job) -> dict[str, object]:
    out = msgspec.to_builtins(job)
    assert isinstance(out, dict)
    return out


async def register(ctx: ServiceContext) -> None:
    def store() -> JobStore:
        return JobStore(ctx.bucket(buckets.JOBS))

    @ctx.bus.handle(JobCmd.LIST, JobListRequest)
    async def list_jobs(req: JobListRequest) -> JobList:
        jobs = [
            j
            for j in await store().list()
            if (req.state is None or j.state == req.state)
            and (req.type is None or j.type == req.type)
        ]
        return JobList(jobs=jobs[: max(req.limit, 0)])

    @ctx.bus.handle(JobCmd.GET, JobGetRequest)
    async def get_job(req: JobGetRequest) -> Job:
        return (await store().get(req.id))[0]

    @ctx.bus.handle(JobCmd.SUBMIT, JobSubmitRequest)
    async def submit_job(req: JobSubmitRequest) -> Job:
        now = utcnow_iso()
        job = Job(
            id=new_id(),
            type=req.type,
            state="queued",
            server_id=req.server_id,
            vm_name=req.vm_name,
            destination_id=req.destination_id,
            params=req.params,
            created_at=now,
            updated_at=now,
        )
        await store().create(job)
        await ctx.bus.publish_event(EventType.JOB_CREATED, job_event_payload(job), key=job.id)
        return job

    @ctx.bus.handle(JobCmd.CANCEL, JobCancelRequest)
    async def cancel_job(req: JobCancelRequest) -> Job:
        def cancel(job: Job) -> Job:
            if job.state in TERMINAL_STATES:
                raise Conflict(f"job {job.id} has already finished ({job.state})")
            now = utcnow_iso()
            return msgspec.structs.replace(
                job, state="canceled", message=req.reason, updated_at=now, finished_at=now
            )

        job = await store().update(req.id, cancel)
        await ctx.bus.publish_event(EventType.JOB_CANCELED, job_event_payload(job), key=job.id)
        return job


SPEC = ServiceSpec(
    name=subjects.JOB_ORCHESTRATOR,
    streams=(streams.EVENTS, streams.WORK),
    buckets=(buckets.JOBS, buckets.SCHEDULES),
    register=register,
)
