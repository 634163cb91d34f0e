"""Backup plans' records in ``VB_PLANS``: projects (``project.<id>``) and runs
(``run.<id>``), read and changed with compare-and-swap, and the plan commands' registry.
See ``plan_projects`` (import, checks), ``plan_preview`` (what a run would do) and
``plan_runs`` (runs and the loop that advances them)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.plans import (
    PLAN_ID_PATTERN,
    PipelineSpec,
    PlanRun,
    Project,
)
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import (
    NotFound,
    Unavailable,
)
from virtbackup.runtime.kv import keys

plan_commands: Commands[JobContext] = Commands()

PROJECT_PREFIX: Final = "project."
RUN_PREFIX: Final = "run."
MAX_CAS_ATTEMPTS: Final = 50
#: ``source_ref`` that forces a full read.
FULL_REF: Final = "full"

PLAN_ID = re.compile(PLAN_ID_PATTERN)
_project = msgspec.json.Decoder(Project)
_run = msgspec.json.Decoder(PlanRun)
encoder = msgspec.json.Encoder()


def plans_kv(jc: JobContext) -> KeyValue:
    return jc.ctx.bucket(buckets.PLANS)


# -- the bucket ---------------------------------------------------------------------------


async def get_project(jc: JobContext, project_id: str) -> tuple[Project, int]:
    """The project and its revision; ``NotFound`` for an unknown or malformed id."""
    if not PLAN_ID.match(project_id):
        raise NotFound(f"project {shown(project_id)} not found")
    try:
        entry = await plans_kv(jc).get(PROJECT_PREFIX + project_id)
    except (KeyNotFoundError, ValueError):
        entry = None
    if entry is None or entry.value is None:
        raise NotFound(f"project {shown(project_id)} not found")
    return _project.decode(entry.value), entry.revision or 0


async def get_run(jc: JobContext, run_id: str) -> tuple[PlanRun, int]:
    """The run and its revision; ``NotFound`` for an unknown or malformed id."""
    if not PLAN_ID.match(run_id):
        raise NotFound(f"plan run {shown(run_id)} not found")
    try:
        entry = await plans_kv(jc).get(RUN_PREFIX + run_id)
    except (KeyNotFoundError, ValueError):
        entry = None
    if entry is None or entry.value is None:
        raise NotFound(f"plan run {shown(run_id)} not found")
    return _run.decode(entry.value), entry.revision or 0


async def update_run(jc: JobContext, run_id: str, change: Callable[[PlanRun], PlanRun]) -> PlanRun:
    """Apply ``change`` with compare-and-swap (``change`` returning its argument: no write)."""
    for _ in range(MAX_CAS_ATTEMPTS):
        run, revision = await get_run(jc, run_id)
        updated = change(run)
        if updated is run:
            return run
        try:
            await plans_kv(jc).update(RUN_PREFIX + run_id, encoder.encode(updated), last=revision)
        except KeyWrongLastSequenceError:
            continue
        return updated
    raise Unavailable(f"plan run {run_id}: too many concurrent updates; try again")


async def keys_under(jc: JobContext, prefix: str) -> list[str]:
    return sorted(k[len(prefix) :] for k in await keys(plans_kv(jc)) if k.startswith(prefix))


def split_db_id(db_id: str, what: str) -> tuple[str, str]:
    """``(project id, plan or chain id)`` of a ``pipelineDbId`` / ``chainDbId``."""
    project, sep, item = db_id.partition(".")
    if not sep or not project or not item:
        raise NotFound(f"{what} {shown(db_id)} not found (ids are <projectId>.<id>)")
    return project, item


async def find_pipeline(jc: JobContext, db_id: str) -> tuple[Project, PipelineSpec]:
    project_id, plan_id = split_db_id(db_id, "pipeline")
    project, _ = await get_project(jc, project_id)
    for plan in project.spec.pipelines:
        if plan.id == plan_id:
            return project, plan
    raise NotFound(f"pipeline {shown(db_id)} not found")


async def find_chain(jc: JobContext, db_id: str) -> tuple[Project, Any]:
    project_id, chain_id = split_db_id(db_id, "pipeline chain")
    project, _ = await get_project(jc, project_id)
    for chain in project.spec.chains:
        if chain.id == chain_id:
            return project, chain
    raise NotFound(f"pipeline chain {shown(db_id)} not found")
