"""The job-orchestrator service: its commands, its job index, its leases and the sweep
that ends the jobs of instances that died, and the instant-access exports' commands
(``exports``), and the scheduler (``schedules``). Runs as any number of replicas."""

from __future__ import annotations

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.job_orchestrator.agent_jobs import agent_commands
from virtbackup.job_orchestrator.definitions import definition_commands
from virtbackup.job_orchestrator.exports import close_exports, export_commands, open_exports
from virtbackup.job_orchestrator.handlers import commands
from virtbackup.job_orchestrator.jobctl import jobctl_commands
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.lifecycle_gc_commands import lifecycle_commands

# Importing plan_runs registers every plan command (it imports plan_preview, which
# imports plan_projects) on plan_commands.
from virtbackup.job_orchestrator.plan_runs import run_plan_runs
from virtbackup.job_orchestrator.plan_store import plan_commands
from virtbackup.job_orchestrator.points import point_commands
from virtbackup.job_orchestrator.runner import sweep
from virtbackup.job_orchestrator.schedules import run_scheduler, schedule_commands
from virtbackup.runtime.service import ServiceContext, ServiceSpec

_contexts: dict[int, JobContext] = {}


def job_context(ctx: ServiceContext) -> JobContext:
    """The ``JobContext`` of a running orchestrator instance (tests drive it directly)."""
    return _contexts[id(ctx)]


async def register(ctx: ServiceContext) -> None:
    jc = JobContext(ctx)
    _contexts[id(ctx)] = jc
    commands.attach(ctx.bus, jc)
    export_commands.attach(ctx.bus, jc)
    point_commands.attach(ctx.bus, jc)
    lifecycle_commands.attach(ctx.bus, jc)
    schedule_commands.attach(ctx.bus, jc)
    definition_commands.attach(ctx.bus, jc)
    plan_commands.attach(ctx.bus, jc)
    agent_commands.attach(ctx.bus, jc)
    jobctl_commands.attach(ctx.bus, jc)


async def start(ctx: ServiceContext) -> None:
    jc = job_context(ctx)
    await jc.open()
    await open_exports(jc)
    ctx.spawn(jc.leases.keep_alive(ctx.stopping, jc.on_lease_lost), "job-leases")
    ctx.spawn(sweep(jc), "job-sweep")
    ctx.spawn(run_scheduler(jc), "scheduler")
    ctx.spawn(run_plan_runs(jc), "plan-runs")


async def stop(ctx: ServiceContext) -> None:
    """Stop running jobs here without ending them: their leases expire and another
    replica (or this one, restarted) ends them cleanly."""
    jc = _contexts.pop(id(ctx))
    await close_exports(jc)
    await jc.close()


SPEC = ServiceSpec(
    name=subjects.JOB_ORCHESTRATOR,
    streams=(streams.EVENTS, streams.WORK, streams.JOB_LOGS),
    buckets=(
        buckets.JOBS,
        buckets.SCHEDULES,
        buckets.CONFIG,
        buckets.LOCKS,
        buckets.LEASES,
        buckets.EXPORTS,
        buckets.PLANS,
        buckets.JOB_FILES,
        buckets.ANOMALIES,
    ),
    register=register,
    start=start,
    stop=stop,
)
