"""Commands of garbage collection, verification and statistics (``vb.cmd.job.gc``,
``vb.cmd.job.verify``, ``vb.cmd.job.stats``); the jobs themselves are in
``lifecycle_gc``."""

from __future__ import annotations

from typing import Any

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.lifecycle_gc import (
    DestinationStats,
    GcRequest,
    StatsRequest,
    VerifyRequest,
    VmStats,
)
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.lifecycle_gc import claimed
from virtbackup.job_orchestrator.point_lookup import destination_faults
from virtbackup.job_orchestrator.points import check_selection, destination, opened, unusable
from virtbackup.job_orchestrator.runner import execute
from virtbackup.repository.lifecycle_gc import dedup_factor, repository_stats
from virtbackup.repository.repository import NoRepositoryError, RepositoryError
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest

lifecycle_commands: Commands[JobContext] = Commands()


async def _destination(jc: JobContext, destination_id: str) -> str:
    """The configured destination's id (``NotFound`` naming ``destinationId``)."""
    return destination(await jc.config(), destination_id).id


async def _readable(jc: JobContext, destination_id: str) -> None:
    """503 naming the destination, before any job starts, when its repository cannot be
    read (as ``points.opened``); a destination without one yet is fine."""
    async with opened(jc, destination_id):
        pass


@lifecycle_commands.handler(JobCmd.GC, GcRequest)
async def gc(jc: JobContext, req: GcRequest) -> Job:
    """Start a ``gc`` job; ``Conflict`` (409) while a GC or prune of the destination runs,
    ``Unavailable`` (503) naming it when it cannot be read."""
    dest = await _destination(jc, req.destination_id)
    await _readable(jc, dest)
    params: dict[str, Any] = {"dryRun": req.dry_run}
    if req.grace_seconds is not None:
        params["graceSeconds"] = req.grace_seconds
    async with claimed(jc, dest, "gc") as job_id:
        return await jc.submit("gc", destination_id=dest, params=params, run=execute, job_id=job_id)


@lifecycle_commands.handler(JobCmd.VERIFY, VerifyRequest)
async def verify(jc: JobContext, req: VerifyRequest) -> Job:
    """Start a ``verify`` job. ``BadRequest`` naming ``samplePercent`` when it is missing
    for ``sample`` or given for ``full``; ``Unavailable`` (503) naming the destination when
    it cannot be read; ``NotFound`` (404) naming ``serverId``/``vmName`` for a server or VM
    without a point there (``points.check_selection``): nothing is created then."""
    if req.mode == "sample" and req.sample_percent is None:
        raise BadRequest("required with mode sample (1-100) - at `$.samplePercent`")
    if req.mode == "full" and req.sample_percent is not None:
        raise BadRequest("only with mode sample - at `$.samplePercent`")
    dest = await _destination(jc, req.destination_id)
    async with opened(jc, dest) as repo:  # 503 naming it when it cannot be read
        await check_selection(jc, repo, dest, req.server_id, req.vm_name)
    params: dict[str, Any] = {"mode": req.mode}
    for name, value in (
        ("samplePercent", req.sample_percent),
        ("outdatedAfterDays", req.outdated_after_days),
        ("serverId", req.server_id),
        ("vmName", req.vm_name),
    ):
        if value is not None:
            params[name] = value
    return await jc.submit(
        "verify",
        server_id=req.server_id,
        vm_name=req.vm_name,
        destination_id=dest,
        params=params,
        run=execute,
    )


@lifecycle_commands.handler(JobCmd.STATS, StatsRequest)
async def stats(jc: JobContext, req: StatsRequest) -> DestinationStats:
    """The repository's figures (all zero for a destination without a repository yet);
    503 naming the destination when it cannot be read (an unreadable ``repository.json``,
    a filesystem destination's missing directory)."""
    dest = await _destination(jc, req.destination_id)
    with destination_faults(dest):
        try:
            repo = await jc.repository(dest, create=False)
        except NoRepositoryError:
            return DestinationStats(
                destination_id=dest,
                points=0,
                logical_bytes=0,
                stored_bytes=0,
                chunk_count=0,
                dedup_factor=None,
                unreferenced_chunks=0,
                unreferenced_bytes=0,
            )
        except RepositoryError as exc:
            raise unusable(dest, exc) from None
        try:
            figures = await repository_stats(repo)
        finally:
            await repo.close()
    return DestinationStats(
        destination_id=dest,
        points=figures.points,
        logical_bytes=figures.logical_bytes,
        stored_bytes=figures.stored_bytes,
        chunk_count=figures.chunk_count,
        dedup_factor=dedup_factor(figures.logical_bytes, figures.stored_bytes),
        unreferenced_chunks=figures.unreferenced_chunks,
        unreferenced_bytes=figures.unreferenced_bytes,
        unreadable_points=figures.unreadable_points,
        vms=[
            VmStats(
                vm_name=vm.vm_name,
                points=vm.points,
                logical_bytes=vm.logical_bytes,
                stored_bytes=vm.stored_bytes,
                chunk_count=vm.chunk_count,
                dedup_factor=dedup_factor(vm.logical_bytes, vm.stored_bytes),
            )
            for vm in figures.vms
        ],
    )
