"""The HyperSDK API's jobs (``/jobs/*``) and schedules (``/schedules*``).

Jobs are the job-orchestrator's (the ones the agent API's ``/jobs`` shows), in the
document's shape: ``definition`` (``id``, ``vm_path``, ``source``, ``destination``),
``status`` (``pending``, ``running``, ``completed``, ``failed``, ``cancelled``: the
agent API's ``queued``, ``running``, ``success``, ``failure``, ``canceled``) and
``progress`` (``stage``: the job's phase, ``percent_complete``, ``current_bytes`` and
``total_bytes``: bytes of the VM's disks read so far and in all). A definition is
checked and its glob expanded by the orchestrator (``JobCmd.SUBMIT``); schedules are
kept and run by it (``ScheduleCmd``). Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from litestar import Controller, Request, delete, get, post, put

from virtbackup.contracts.subjects import JobCmd, ScheduleCmd
from virtbackup.contracts.v1.common import Empty, shown
from virtbackup.contracts.v1.hypersdk_jobs import STATUS, job_view
from virtbackup.contracts.v1.jobs import (
    ACTIVE_STATES,
    Job,
    JobCancelRequest,
    JobCounts,
    JobGetRequest,
    JobState,
)
from virtbackup.contracts.v1.schedules import (
    JobDefinition,
    JobSubmitRequest,
    JobSubmitResult,
    Schedule,
    ScheduleRef,
    ScheduleRun,
    ScheduleStats,
    ScheduleUpdate,
)
from virtbackup.gateway.bodies import NoBody, SnakeBody
from virtbackup.gateway.controllers.migrations import check_may_migrate
from virtbackup.gateway.errors import responses
from virtbackup.gateway.job_listing import all_schedules, matching_jobs
from virtbackup.gateway.schedule_bodies import ScheduleFieldChanges, ScheduleFields
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, Conflict

STATE_OF: Final[dict[str, JobState]] = {
    **{status: state for state, status in STATUS.items()},
    **{state: state for state in STATUS},  # the agent API's names are accepted too
}


def state_of(status: str, field: str = "status") -> JobState:
    """The orchestrator's state a status names; a 400 naming ``field`` otherwise."""
    try:
        return STATE_OF[status]
    except KeyError:
        raise BadRequest(
            f"{field}: {shown(status)} is not a job status ({', '.join(STATUS.values())})"
        ) from None


def _cancel_message(matched: int, cancelled: list[str], refused: list[dict[str, str]]) -> str:
    """What a cancel did, in words: "jobs cancelled successfully" only when it cancelled
    every job it matched (at least one)."""
    if not matched:
        return "no job matched: nothing cancelled"
    if not refused:
        return "jobs cancelled successfully"  # the document's words
    if not cancelled:
        return f"no job cancelled: {len(refused)} could not be (see not_cancelled)"
    return (
        f"{len(cancelled)} of {matched} jobs cancelled; {len(refused)} could not be"
        " (see not_cancelled)"
    )


class SubmitBody(SnakeBody, kw_only=True):
    """``POST /jobs/submit`` and a schedule's ``job_template`` (``JobDefinition``)."""

    vm_path: str = ""
    source: dict[str, Any] = msgspec.field(default_factory=dict)
    destination: dict[str, Any] = msgspec.field(default_factory=dict)
    options: dict[str, Any] = msgspec.field(default_factory=dict)

    def definition(self) -> JobDefinition:
        return JobDefinition(
            vm_path=self.vm_path,
            source=self.source,
            destination=self.destination,
            options=self.options,
        )


class QueryBody(SnakeBody, kw_only=True):
    """``POST /jobs/query``: ``job_ids`` and ``status`` filter (none: every job, as
    ``all``), newest first, at most ``limit`` (0: no limit)."""

    all: bool = False
    job_ids: list[str] = msgspec.field(default_factory=list)
    status: str | None = None
    limit: int = 0


class CancelBody(SnakeBody, kw_only=True):
    """``POST /jobs/cancel``: the jobs of ``job_ids``, those of ``status``, or those of
    ``job_ids`` in ``status`` when both are given; neither is a 400."""

    job_ids: list[str] = msgspec.field(default_factory=list)
    status: str | None = None


class ScheduleBody(ScheduleFields, kw_only=True):
    """``POST /schedules`` (snake_case)."""

    job_template: SubmitBody


class ScheduleChange(ScheduleFieldChanges, kw_only=True):
    """``PUT /schedules/{id}`` (snake_case)."""

    job_template: SubmitBody | None = None


def schedule_view(schedule: Schedule) -> dict[str, Any]:
    out = msgspec.to_builtins(schedule)
    assert isinstance(out, dict)
    return out


async def _job(gw: Gateway, job_id: str) -> Job:
    return await gw.bus.request(JobCmd.GET, JobGetRequest(id=job_id), Job)


class HyperSdkJobsController(Controller):
    @post("/jobs/submit", status_code=201, responses=responses(404, 409))
    async def submit(
        self, gw: Gateway, request: Request[Any, Any, Any], data: SubmitBody
    ) -> dict[str, Any]:
        """Create one backup job per VM ``vm_path`` names (a glob: one per match), or a
        migration (``destination.type`` ``kvm``; it also takes ``restore:run`` and
        ``vms:control``). ``job_id`` is the first job's id, ``job_ids`` all of them; for a
        glob, VMs whose job could not be created (e.g. a backup already running) are in
        ``errors``."""
        if data.destination.get("type") == "kvm":
            check_may_migrate(request, via="via_destination_id" in data.destination)
        result = await gw.bus.request(
            JobCmd.SUBMIT,
            JobSubmitRequest(definition=data.definition()),
            JobSubmitResult,
            timeout=timeouts.JOB_COMMAND,
        )
        count = len(result.job_ids)
        body: dict[str, Any] = {
            "job_id": result.job_ids[0],
            "job_ids": result.job_ids,
            "message": "job submitted successfully" if count == 1 else f"{count} jobs submitted",
        }
        if result.errors:
            body["errors"] = result.errors
        return body

    @post("/jobs/query", status_code=200)
    async def query(self, gw: Gateway, data: QueryBody) -> dict[str, Any]:
        """Jobs newest first, filtered by ``job_ids`` and ``status``, at most ``limit``
        of them; ``total`` is how many match, ``limit`` aside (counted by the
        job-orchestrator when no ids are given: no job is read for it)."""
        if data.limit < 0:
            raise BadRequest(f"limit: {data.limit} is negative (0 means no limit)")
        state = state_of(data.status) if data.status is not None else None
        if data.job_ids:
            jobs = [await _job(gw, i) for i in dict.fromkeys(data.job_ids)]
            jobs = [j for j in jobs if state is None or j.state == state]
            total = len(jobs)
        else:
            jobs = await matching_jobs(gw, state=state, limit=data.limit)
            total = len(jobs)
            if data.limit and total >= data.limit:
                counts = await gw.bus.request(JobCmd.COUNTS, Empty(), JobCounts)
                total = max(total, counts.total if state is None else getattr(counts, state))
        if data.limit:
            jobs = jobs[: data.limit]
        return {"jobs": [job_view(j) for j in jobs], "total": total}

    @get("/jobs/{job_id:str}", responses=responses(404))
    async def get_job(self, gw: Gateway, job_id: str) -> dict[str, Any]:
        """One job (404 for an unknown id)."""
        return job_view(await _job(gw, job_id))

    @post("/jobs/cancel", status_code=200, responses=responses(404))
    async def cancel(self, gw: Gateway, data: CancelBody) -> dict[str, Any]:
        """Cancel pending and running jobs; ``count`` says how many. An unknown id is a
        404 (nothing is cancelled then); a job that has finished or is committing is
        listed in ``not_cancelled`` with the reason."""
        if not data.job_ids and data.status is None:
            raise BadRequest("give job_ids, status, or both: which jobs to cancel")
        state = state_of(data.status) if data.status is not None else None
        if state is not None and state not in ACTIVE_STATES:
            raise BadRequest(
                f"status: {shown(data.status)}: only pending or running jobs can be cancelled"
            )
        if data.job_ids:
            jobs = [await _job(gw, i) for i in dict.fromkeys(data.job_ids)]
            jobs = [j for j in jobs if state is None or j.state == state]
        else:
            jobs = await matching_jobs(gw, state=state)
        cancelled: list[str] = []
        refused: list[dict[str, str]] = []
        for job in jobs:
            try:
                await gw.bus.request(JobCmd.CANCEL, JobCancelRequest(id=job.id), Job)
            except Conflict as exc:
                refused.append({"job_id": job.id, "reason": exc.message})
            else:
                cancelled.append(job.id)
        return {
            "message": _cancel_message(len(jobs), cancelled, refused),
            "count": len(cancelled),
            "job_ids": cancelled,
            "not_cancelled": refused,
        }

    # -- schedules ------------------------------------------------------------------

    @get("/schedules")
    async def list_schedules(self, gw: Gateway) -> dict[str, Any]:
        """Every schedule."""
        listed = await all_schedules(gw)
        return {
            "schedules": [schedule_view(s) for s in listed],
            "total": len(listed),
            "timestamp": utcnow_iso(),
        }

    @post("/schedules", status_code=201, responses=responses(404, 409))
    async def create_schedule(self, gw: Gateway, data: ScheduleBody) -> dict[str, Any]:
        """Create a schedule: cron expression, time zone and job template are checked
        first (400 or 404 naming what is wrong; nothing is created then)."""
        request = data.create_request(data.job_template.definition())
        created = await gw.bus.request(
            ScheduleCmd.CREATE, request, Schedule, timeout=timeouts.JOB_COMMAND
        )
        return {"message": "schedule created successfully", "schedule": schedule_view(created)}

    @get("/schedules/stats")
    async def stats(self, gw: Gateway) -> dict[str, int]:
        """Counts over every schedule and its runs."""
        stats = await gw.bus.request(ScheduleCmd.STATS, Empty(), ScheduleStats)
        out = msgspec.to_builtins(stats)
        assert isinstance(out, dict)
        return out

    @get("/schedules/{schedule_id:str}", responses=responses(404))
    async def get_schedule(self, gw: Gateway, schedule_id: str) -> dict[str, Any]:
        """One schedule."""
        found = await gw.bus.request(ScheduleCmd.GET, ScheduleRef(id=schedule_id), Schedule)
        return schedule_view(found)

    async def _update(self, gw: Gateway, request: ScheduleUpdate) -> Schedule:
        return await gw.bus.request(
            ScheduleCmd.UPDATE, request, Schedule, timeout=timeouts.JOB_COMMAND
        )

    @put("/schedules/{schedule_id:str}", responses=responses(404))
    async def update_schedule(
        self, gw: Gateway, schedule_id: str, data: ScheduleChange
    ) -> dict[str, Any]:
        """Change the fields given (checked as on create)."""
        template = data.job_template.definition() if data.job_template else None
        updated = await self._update(gw, data.update_request(schedule_id, template))
        return {"message": "schedule updated successfully", "schedule": schedule_view(updated)}

    @delete("/schedules/{schedule_id:str}", status_code=200, responses=responses(404))
    async def delete_schedule(self, gw: Gateway, schedule_id: str) -> dict[str, str]:
        """Delete a schedule (jobs it started go on)."""
        await gw.bus.request(ScheduleCmd.DELETE, ScheduleRef(id=schedule_id), Empty)
        return {"message": "schedule deleted successfully"}

    @post("/schedules/{schedule_id:str}/enable", status_code=200, responses=responses(404))
    async def enable(
        self, gw: Gateway, schedule_id: str, data: NoBody | None = None
    ) -> dict[str, str]:
        """Enable a schedule (its next run is planned from now)."""
        await self._update(gw, ScheduleUpdate(id=schedule_id, enabled=True))
        return {"message": "schedule enabled successfully"}

    @post("/schedules/{schedule_id:str}/disable", status_code=200, responses=responses(404))
    async def disable(
        self, gw: Gateway, schedule_id: str, data: NoBody | None = None
    ) -> dict[str, str]:
        """Disable a schedule (a run already going goes on)."""
        await self._update(gw, ScheduleUpdate(id=schedule_id, enabled=False))
        return {"message": "schedule disabled successfully"}

    @post("/schedules/{schedule_id:str}/trigger", status_code=200, responses=responses(404, 409))
    async def trigger(
        self, gw: Gateway, schedule_id: str, data: NoBody | None = None
    ) -> dict[str, Any]:
        """Run the schedule now (no body, or ``{}``; 409 while it is disabled); ``skipped:
        true`` when its previous run is still going (the skipped run is counted and
        reported as the scheduler's are)."""
        run = await gw.bus.request(
            ScheduleCmd.TRIGGER,
            ScheduleRef(id=schedule_id),
            ScheduleRun,
            timeout=timeouts.JOB_COMMAND,
        )
        message = run.message if run.skipped else "schedule triggered successfully"
        return {"message": message, "job_ids": run.job_ids, "skipped": run.skipped}
