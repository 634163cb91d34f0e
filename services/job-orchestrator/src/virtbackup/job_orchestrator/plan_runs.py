"""Runs of plans and chains (``vb.cmd.plan.run|run-get``) and the loop that advances
them.

A run (run-selection, a chain run) is a ``PlanRun`` record (``run.<id>``): its steps in
order (``backup``, then ``prune`` when the plan has a retention policy; a chain's
``backup``, ``verify``, ``copy``), each with its jobs. The backup step's jobs are created
by the request; every replica's ``run_plan_runs`` loop advances runs: when a step's jobs
have all ended it marks the step (compare-and-swap on the record), and the replica whose
write claims the next step creates its jobs. A failed step fails the run and skips the
steps after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final, Literal

import msgspec
from nats.js.errors import KeyNotFoundError

from virtbackup.contracts.subjects import PlanCmd
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, BackupRequest, CopyRequest, Job
from virtbackup.contracts.v1.lifecycle_gc import VerifyRequest
from virtbackup.contracts.v1.plans import (
    BackupStep,
    CopyStep,
    PipelineSpec,
    PlanRun,
    PlanRunRef,
    PlanRunRequest,
    PlanRunResult,
    StepRun,
    VerifyStep,
)
from virtbackup.contracts.v1.points import PruneRequest
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.plan_preview import (
    age_seconds,
    check_agent,
    parent_for,
    plan_of,
    points_of,
    preview,
    resolve_targets,
)
from virtbackup.job_orchestrator.plan_store import (
    FULL_REF,
    RUN_PREFIX,
    encoder,
    find_chain,
    get_run,
    keys_under,
    plan_commands,
    plans_kv,
    update_run,
)
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import (
    Conflict,
    NotFound,
    ServiceError,
)

log = logging.getLogger(__name__)

#: How often each replica looks at the running plan runs, in seconds.
TICK_SECONDS: Final = 1.0
#: A step claimed this long ago whose jobs were never recorded (its replica died in
#: between) fails its run, in seconds.
STUCK_STEP_SECONDS: Final = 120.0
#: Seconds the record of an ended run is kept (``GET /api/v1/plan-runs/{id}``).
RUN_KEEP_SECONDS: Final = 14 * 86400.0
#: A chain's verify step skips points verified less than this many days ago (so it
#: reads the new points, not every point again).
VERIFY_OUTDATED_AFTER_DAYS: Final = 1

# -- runs ---------------------------------------------------------------------------------


async def _submit_backup(
    jc: JobContext,
    run: PlanRun,
    server: str,
    vm: str,
    destination_id: str,
    extra: list[str],
) -> Job:
    """A backup job of one VM of the run (``handlers.submit_backup``, with the plan's
    extra destinations ``extra`` as ``alsoDestinationIds``), its params naming the run
    (``planRunId``, ``pipelineDbId``/``chainDbId``, ``sourceRef``, ``pinnedAgentId``)."""
    from virtbackup.job_orchestrator.handlers import submit_backup

    params: dict[str, Any] = {"planRunId": run.id}
    if run.options.source_ref is not None:
        params["sourceRef"] = run.options.source_ref
    if run.options.agent_id is not None:
        # Pinned by the run (``agent_id``): a worker reads all its units
        # (``backup.pinned_worker``); not to be confused with ``agentId``, which makes a
        # backup a remote agent's job (agent_jobs).
        params["pinnedAgentId"] = run.options.agent_id
    if run.pipeline_db_id:
        params["pipelineDbId"] = run.pipeline_db_id
    if run.chain_db_id:
        params["chainDbId"] = run.chain_db_id
    req = BackupRequest(
        server_id=server, vm_name=vm, destination_id=destination_id, also_destination_ids=extra
    )
    return await submit_backup(jc, req, params)


async def _step_jobs(jc: JobContext, run: PlanRun, index: int) -> tuple[list[str], list[str]]:
    """Create the jobs of step ``index``: ``(job ids, one line per VM whose job could not
    be created)``."""
    _, dest, extra = await _run_plan(jc, run)
    chain_step = await _chain_step(jc, run, index)
    targets = [t.split("/", 1) for t in run.targets]
    job_ids: list[str] = []
    errors: list[str] = []
    step = run.steps[index]

    async def each(make: Callable[[str, str], Any]) -> None:
        for server, vm in targets:
            try:
                job = await make(server, vm)
                if job is not None:
                    job_ids.append(job.id)
            except ServiceError as exc:
                errors.append(f"{server}/{vm}: {exc.message}")

    if step.type == "backup":
        await each(lambda s, v: _submit_backup(jc, run, s, v, dest, extra))
    elif step.type == "verify":
        assert isinstance(chain_step, VerifyStep)
        # Every destination the backup step wrote, unless the step names one.
        verify_dests = [chain_step.destination] if chain_step.destination else [dest, *extra]

        def verify_in(verify_dest: str) -> Callable[[str, str], Any]:
            async def verify_one(server: str, vm: str) -> Job:
                from virtbackup.job_orchestrator.lifecycle_gc_commands import verify

                return await verify(
                    jc,
                    VerifyRequest(
                        destination_id=verify_dest,
                        mode=chain_step.mode,
                        sample_percent=chain_step.sample_percent,
                        outdated_after_days=VERIFY_OUTDATED_AFTER_DAYS,
                        server_id=server,
                        vm_name=vm,
                    ),
                )

            return verify_one

        for verify_dest in verify_dests:
            await each(verify_in(verify_dest))
    elif step.type == "copy":
        assert isinstance(chain_step, CopyStep)

        async def copy_one(server: str, vm: str) -> Job:
            from virtbackup.job_orchestrator.point_copy import submit_copy
            from virtbackup.job_orchestrator.runner import execute

            req = CopyRequest(
                destination_id=chain_step.destination,
                target_destination_id=chain_step.target,
                vm_name=vm,
                server_id=server,
            )
            return await submit_copy(jc, req, execute)

        await each(copy_one)
    return job_ids, errors


async def _run_plan(jc: JobContext, run: PlanRun) -> tuple[PipelineSpec, str, list[str]]:
    return await plan_of(
        jc, PlanRunRequest(pipeline_db_id=run.pipeline_db_id, chain_db_id=run.chain_db_id)
    )


async def _chain_step(jc: JobContext, run: PlanRun, index: int) -> Any:
    if run.chain_db_id is None:
        return None
    _, chain = await find_chain(jc, run.chain_db_id)
    return chain.steps[index] if index < len(chain.steps) else None


def step_type(step: BackupStep | VerifyStep | CopyStep) -> Literal["backup", "verify", "copy"]:
    """A chain step's ``type`` (its tag in the YAML)."""
    if isinstance(step, BackupStep):
        return "backup"
    return "verify" if isinstance(step, VerifyStep) else "copy"


def _steps(plan: PipelineSpec, chain: Any) -> list[StepRun]:
    if chain is None:
        steps = [StepRun(type="backup")]
    else:
        steps = [StepRun(type=step_type(s)) for s in chain.steps]
    if plan.retention is not None and plan.retention.keep_all is not True and chain is None:
        steps.append(StepRun(type="prune"))
    return steps


def _set_step(run: PlanRun, index: int, **changes: Any) -> PlanRun:
    steps = list(run.steps)
    steps[index] = msgspec.structs.replace(steps[index], **changes)
    return msgspec.structs.replace(run, steps=steps, updated_at=utcnow_iso())


@plan_commands.handler(PlanCmd.RUN, PlanRunRequest)
async def run_plan(jc: JobContext, req: PlanRunRequest) -> PlanRunResult:
    """Run a plan (run-selection) or a chain: its first step's jobs now, the rest by the
    replicas' run loop. ``dry_run``: the preview, nothing created. 400 for a
    ``source_ref`` that is no point of a VM, an ``agent_id`` not eligible, an
    ``offline_cached`` run on an old cache; 409 when every VM has a job running."""
    options = req.options
    if options.dry_run:
        return PlanRunResult(dry_run=True, preview=await preview(jc, req))
    plan, dest, _ = await plan_of(jc, req)
    chain = None
    if req.chain_db_id is not None:
        _, chain = await find_chain(jc, req.chain_db_id)
    await check_agent(jc, options.agent_id, plan)
    targets = await resolve_targets(jc, plan, options)
    if options.source_ref is not None and options.source_ref != FULL_REF:
        for server, vm in targets:
            parent_for(await points_of(jc, dest, vm, server), options.source_ref, server, vm)
    now = utcnow_iso()
    run = PlanRun(
        id=new_id(),
        pipeline_db_id=req.pipeline_db_id,
        chain_db_id=req.chain_db_id,
        targets=[f"{s}/{v}" for s, v in targets],
        steps=_steps(plan, chain),
        options=options,
        created_at=now,
        updated_at=now,
        claimed_at=now,
    )
    run = _set_step(run, 0, state="running")
    job_ids, errors = await _step_jobs(jc, run, 0)
    if not job_ids:
        raise Conflict("; ".join(errors) or "no job could be created")
    run = _set_step(run, 0, job_ids=job_ids, message="; ".join(errors))
    await plans_kv(jc).create(RUN_PREFIX + run.id, encoder.encode(run))
    return PlanRunResult(run_id=run.id, job_ids=job_ids, run=run)


@plan_commands.handler(PlanCmd.RUN_GET, PlanRunRef)
async def plan_run(jc: JobContext, req: PlanRunRef) -> PlanRun:
    return (await get_run(jc, req.id))[0]


# -- the run loop -------------------------------------------------------------------------


async def _job_states(jc: JobContext, job_ids: list[str]) -> list[str]:
    states: list[str] = []
    for job_id in job_ids:
        try:
            states.append((await jc.store.get(job_id))[0].state)
        except NotFound:
            states.append("failure")
    return states


async def advance(jc: JobContext, run_id: str) -> None:
    """One look at a run: end its running step when its jobs have ended, claim and start
    its next step. Every change is a compare-and-swap: of two replicas one wins."""
    run, _ = await get_run(jc, run_id)
    if run.state != "running":
        return
    index = next((i for i, s in enumerate(run.steps) if s.state in {"pending", "running"}), None)
    if index is None:
        failed = any(s.state == "failure" for s in run.steps)

        def finish(r: PlanRun) -> PlanRun:
            if r.state != "running":
                return r
            state = "failure" if failed else "success"
            return msgspec.structs.replace(r, state=state, updated_at=utcnow_iso())

        await update_run(jc, run_id, finish)
        return
    step = run.steps[index]
    if step.type == "prune":
        await _advance_prune(jc, run, index)
        return
    if step.state == "running":
        if not step.job_ids:
            age = age_seconds(run.claimed_at or run.updated_at) or 0.0
            if age > STUCK_STEP_SECONDS:
                await update_run(jc, run_id, lambda r: _fail_from(r, index, "no job was recorded"))
            return
        states = await _job_states(jc, step.job_ids)
        if not all(s in TERMINAL_STATES for s in states):
            return
        ok = all(s == "success" for s in states) and not step.message
        if ok:
            await update_run(
                jc,
                run_id,
                lambda r: (
                    _set_step(r, index, state="success") if r.steps[index].state == "running" else r
                ),
            )
        else:
            why = step.message or "a job of the step did not succeed"
            await update_run(jc, run_id, lambda r: _fail_from(r, index, why))
        return
    # pending: claim it, then create its jobs
    token = f"{jc.holder}/{new_id()}"

    def claim(r: PlanRun) -> PlanRun:
        if r.steps[index].state != "pending":
            return r
        return msgspec.structs.replace(
            _set_step(r, index, state="running"), claimed_at=utcnow_iso(), claimed_by=token
        )

    after = await update_run(jc, run_id, claim)
    if after.claimed_by != token:
        return  # another replica claimed it
    try:
        job_ids, errors = await _step_jobs(jc, after, index)
    except ServiceError as exc:
        job_ids, errors = [], [exc.message]
    if not job_ids:
        await update_run(jc, run_id, lambda r: _fail_from(r, index, "; ".join(errors) or "no job"))
        return
    await update_run(
        jc, run_id, lambda r: _set_step(r, index, job_ids=job_ids, message="; ".join(errors))
    )


async def _prune(jc: JobContext, plan: PipelineSpec, dest: str, server: str, vm: str) -> Job:
    """A prune job of the VM's points from ``server`` by the plan's keep rules."""
    from virtbackup.job_orchestrator.points import prune

    keep = plan.retention
    assert keep is not None
    return await prune(
        jc,
        PruneRequest(
            destination_id=dest,
            vm_name=vm,
            server_id=server,
            **msgspec.structs.asdict(keep.rules()),  # every keep rule (KeepRules)
        ),
    )


async def _advance_prune(jc: JobContext, run: PlanRun, index: int) -> None:
    """The prune step: one VM at a time (two prunes of one destination exclude each
    other), each claimed by compare-and-swap on ``done``. A prune refused because the
    destination is busy (a GC) is noted and skipped: the next run prunes. The step fails
    when a prune job fails."""
    step = run.steps[index]
    if step.job_ids and (await _job_states(jc, step.job_ids[-1:]))[0] not in TERMINAL_STATES:
        return
    if step.done >= len(run.targets):
        states = await _job_states(jc, step.job_ids)
        if all(s == "success" for s in states):
            await update_run(
                jc,
                run.id,
                lambda r: (
                    _set_step(r, index, state="success") if r.steps[index].done == step.done else r
                ),
            )
        else:
            await update_run(jc, run.id, lambda r: _fail_from(r, index, "a prune job failed"))
        return
    token = f"{jc.holder}/{new_id()}"

    def claim(r: PlanRun) -> PlanRun:
        if r.steps[index].done != step.done or r.steps[index].state not in {"pending", "running"}:
            return r
        changed = _set_step(r, index, state="running", done=step.done + 1)
        return msgspec.structs.replace(changed, claimed_at=utcnow_iso(), claimed_by=token)

    after = await update_run(jc, run.id, claim)
    if after.claimed_by != token:
        return
    server, vm = run.targets[step.done].split("/", 1)
    try:
        plan, dest, _ = await _run_plan(jc, run)
    except NotFound as exc:  # the project was deleted or no longer has the plan
        why = exc.message
        await update_run(jc, run.id, lambda r: _fail_from(r, index, why))
        return
    try:
        job = await _prune(jc, plan, dest, server, vm)
    except ServiceError as exc:
        note = f"{server}/{vm}: prune skipped: {exc.message}"

        def noted(r: PlanRun) -> PlanRun:
            old = r.steps[index].message
            return _set_step(r, index, message=f"{old}; {note}" if old else note)

        await update_run(jc, run.id, noted)
        return
    await update_run(
        jc, run.id, lambda r: _set_step(r, index, job_ids=[*r.steps[index].job_ids, job.id])
    )


def _fail_from(run: PlanRun, index: int, why: str) -> PlanRun:
    if run.state != "running":
        return run
    steps = list(run.steps)
    steps[index] = msgspec.structs.replace(steps[index], state="failure", message=why)
    for i in range(index + 1, len(steps)):
        steps[i] = msgspec.structs.replace(steps[i], state="skipped")
    return msgspec.structs.replace(
        run,
        steps=steps,
        state="failure",
        message=f"step {index + 1} ({steps[index].type}) failed: {why}",
        updated_at=utcnow_iso(),
    )


async def forget_old_run(jc: JobContext, run: PlanRun) -> None:
    """Delete the record of a run that ended more than ``RUN_KEEP_SECONDS`` ago."""
    age = age_seconds(run.updated_at)
    if age is not None and age > RUN_KEEP_SECONDS:
        with contextlib.suppress(KeyNotFoundError):
            await plans_kv(jc).delete(RUN_PREFIX + run.id)


async def run_plan_runs(jc: JobContext) -> None:
    """Every replica: advance every running plan run once a second. A run that has ended
    never changes again, so each replica remembers it (only to read it no more) and
    deletes its record once it is ``RUN_KEEP_SECONDS`` old."""
    stopping = jc.ctx.stopping
    ended: dict[str, PlanRun] = {}
    while not stopping.is_set():
        try:
            for run_id in await keys_under(jc, RUN_PREFIX):
                try:
                    if run_id in ended:
                        await forget_old_run(jc, ended[run_id])
                        continue
                    await advance(jc, run_id)
                    run, _ = await get_run(jc, run_id)
                    if run.state != "running":
                        ended[run_id] = run
                except (ServiceError, msgspec.DecodeError) as exc:
                    log.warning("plan run %s: %s", run_id, exc)
        except Exception:
            log.exception("plan runs: a round failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), TICK_SECONDS)
