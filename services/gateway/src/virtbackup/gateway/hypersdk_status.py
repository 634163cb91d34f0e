"""``/status`` of the HyperSDK API from real state, shared by ``/ws`` and ``/metrics``.

Job counts come from the job-orchestrator's job store (``vb.cmd.job.counts``); the
workers from the transfer workers' heartbeats in ``VB_WORKERS`` (an entry expires 30 s
after its worker's last beat; a worker rewrites it within a second of a unit starting
or ending, so ``active_workers`` is at most about a second behind).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.common import Empty
from virtbackup.contracts.v1.hypersdk_jobs import STATUS
from virtbackup.contracts.v1.jobs import Job, JobCounts
from virtbackup.gateway.job_listing import matching_jobs
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import NotFound
from virtbackup.runtime.kv import keys, read_value

#: The HyperSDK document's job status for each VirtBackup job state.
STATUS_OF = STATUS


class _Beat(msgspec.Struct, rename="camel"):
    """What ``/status`` reads of a worker's heartbeat."""

    busy_units: int = 0


@dataclass(frozen=True)
class WorkerCounts:
    live: int
    busy: int


async def worker_counts(gw: Gateway) -> WorkerCounts:
    """Live transfer workers and those working on at least one unit (0, 0 when no worker
    has ever started). An entry that does not decode counts as live and idle."""
    try:
        kv = await gw.bus.key_value(buckets.WORKERS)
    except NotFound:
        return WorkerCounts(0, 0)
    live = busy = 0
    for key in await keys(kv):
        try:
            beat = await read_value(kv, key, _Beat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            beat = _Beat()
        if beat is None:  # expired since listed
            continue
        live += 1
        busy += beat.busy_units > 0
    return WorkerCounts(live, busy)


async def all_jobs(gw: Gateway) -> list[Job]:
    """Every job of the job store, newest first (read page by page)."""
    return await matching_jobs(gw)


async def job_counts(gw: Gateway) -> dict[str, int]:
    """The document's four job counts, over every job (``vb.cmd.job.counts``: counted
    by the job-orchestrator, no job is sent)."""
    counts = await gw.bus.request(JobCmd.COUNTS, Empty(), JobCounts)
    return {
        "total_jobs": counts.total,
        "running_jobs": counts.running,
        "completed_jobs": counts.success,
        "failed_jobs": counts.failure,
    }


async def current_status(gw: Gateway) -> dict[str, int]:
    """``/status``: ``total_jobs``, ``running_jobs``, ``completed_jobs``, ``failed_jobs``,
    ``worker_count`` (live transfer workers) and ``active_workers`` (those busy).
    ``Unavailable`` when the job-orchestrator does not answer."""
    counts = await job_counts(gw)
    workers = await worker_counts(gw)
    return {**counts, "worker_count": workers.live, "active_workers": workers.busy}
