"""Every job that matches, however many: the job-orchestrator answers a listing one page
at a time (``JobListRequest.limit``, so that a reply fits in one bus message), and the
routes that act on or count every matching job (``/status``, ``/metrics``, ``/ws``,
HyperSDK ``/jobs/query`` and ``/jobs/cancel`` by status, the agent API's ``/jobs``, an
agent's deactivation) read page after page here; so do the schedule listings.
"""

from __future__ import annotations

from virtbackup.contracts.subjects import JobCmd, ScheduleCmd
from virtbackup.contracts.v1.jobs import Job, JobList, JobListRequest, JobState, JobType
from virtbackup.contracts.v1.schedules import (
    SCHEDULE_LIST_PAGE,
    Schedule,
    ScheduleList,
    ScheduleListRequest,
)
from virtbackup.gateway.state import Gateway


async def matching_jobs(
    gw: Gateway,
    *,
    state: JobState | None = None,
    type: JobType | None = None,
    limit: int = 0,
) -> list[Job]:
    """Jobs newest first, filtered by ``state`` and ``type``: every one (``limit`` 0) or
    the newest ``limit``. Asks ``Settings.job_list_page`` jobs a request; a job created
    while the pages are read may be missing (it is newer than the first page), none that
    existed before is. ``Unavailable`` when the job-orchestrator does not answer."""
    page = gw.settings.job_list_page
    out: list[Job] = []
    before: str | None = None
    while True:
        want = page if not limit else min(page, limit - len(out))
        request = JobListRequest(state=state, type=type, limit=want, before=before)
        got = (await gw.bus.request(JobCmd.LIST, request, JobList)).jobs
        if before is not None:  # an orchestrator that knows no ``before`` repeats pages
            got = [job for job in got if job.id < before]
        out.extend(got)
        if len(got) < want or (limit and len(out) >= limit):
            return out
        before = got[-1].id


async def all_schedules(gw: Gateway) -> list[Schedule]:
    """Every schedule, by id, read ``SCHEDULE_LIST_PAGE`` at a time (fewer when
    ``Settings.job_list_page`` is smaller) so that no reply outgrows a bus message however
    many there are. ``Unavailable`` when the job-orchestrator does not answer."""
    out: list[Schedule] = []
    after = ""
    page = min(SCHEDULE_LIST_PAGE, gw.settings.job_list_page)
    while True:
        request = ScheduleListRequest(after=after, limit=page)
        listed = await gw.bus.request(ScheduleCmd.LIST, request, ScheduleList)
        out.extend(s for s in listed.schedules if s.id > after)
        if not listed.more or not listed.schedules:
            return out
        after = listed.schedules[-1].id
