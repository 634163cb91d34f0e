"""Backup plans and plan chains (``vb.cmd.plan.*``; backend-api.md's projects, pipelines
and pipeline chains).

A project (``v1.plans.ProjectSpec``, parsed strictly by the gateway) is checked here
against the configuration and the inventory before anything is stored: every server and
destination must exist, every VM selector must match a VM, cron expressions, time zones
and retention policies must be valid, chain steps must name the project's plans. A
refusal is a 400 naming the YAML line (``ProjectImportRequest.lines``). Only then is the
project written to ``VB_PLANS`` (key ``project.<id>``) and each scheduled plan's VM
selectors become schedules of ``VB_SCHEDULES`` (the scheduler of ``schedules`` runs
them, exactly once per due time across replicas).

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
import base64
import contextlib
import fnmatch
import hashlib
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets, subjects
from virtbackup.contracts.subjects import InventoryCmd, PlanCmd
from virtbackup.contracts.v1 import jobs as v1jobs
from virtbackup.contracts.v1.common import Empty, shown
from virtbackup.contracts.v1.config import AgentConfig, ConfigError, check_retention
from virtbackup.contracts.v1.inventory import (
    CheckpointList,
    ServerRef,
    ServerVms,
    VmInfo,
    VmRef,
)
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, BackupRequest, Job
from virtbackup.contracts.v1.lifecycle_gc import VerifyRequest
from virtbackup.contracts.v1.plans import (
    PLAN_ID_PATTERN,
    BackupStep,
    CheckpointSize,
    CheckpointSizeRequest,
    CopyStep,
    EligibleAgent,
    EligibleAgents,
    PipelineSpec,
    PlanRun,
    PlanRunRef,
    PlanRunRequest,
    PlanRunResult,
    PlanTargets,
    PointRefInfo,
    Preview,
    PreviewDisk,
    PreviewVm,
    Project,
    ProjectImportRequest,
    ProjectList,
    ProjectRef,
    ProjectSpec,
    RunOptions,
    SourceRefs,
    StepRun,
    VerifyStep,
    VmSourceRefs,
)
from virtbackup.contracts.v1.points import PruneRequest
from virtbackup.contracts.v1.schedules import JobDefinition, ScheduleCreate, ScheduleRef
from virtbackup.job_orchestrator.definitions import is_glob
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import NoRepositoryError, RepositoryError
from virtbackup.runtime import timeouts
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import (
    BadRequest,
    Conflict,
    NotFound,
    ServiceError,
    Unavailable,
)
from virtbackup.runtime.kv import keys

log = logging.getLogger(__name__)
plan_commands: Commands[JobContext] = Commands()

PROJECT_PREFIX: Final = "project."
RUN_PREFIX: Final = "run."
#: How often each replica looks at the running plan runs, in seconds.
TICK_SECONDS: Final = 1.0
#: A step claimed this long ago whose jobs were never recorded (its replica died in
#: between) fails its run, in seconds.
STUCK_STEP_SECONDS: Final = 120.0
MAX_CAS_ATTEMPTS: Final = 50
#: Seconds the record of an ended run is kept (``GET /api/v1/plan-runs/{id}``).
RUN_KEEP_SECONDS: Final = 14 * 86400.0
#: ``source_ref`` that forces a full read.
FULL_REF: Final = "full"
#: A chain's verify step skips points verified less than this many days ago (so it
#: reads the new points, not every point again).
VERIFY_OUTDATED_AFTER_DAYS: Final = 1

_ID = re.compile(PLAN_ID_PATTERN)
_project = msgspec.json.Decoder(Project)
_run = msgspec.json.Decoder(PlanRun)
_enc = msgspec.json.Encoder()


def _kv(jc: JobContext) -> KeyValue:
    return jc.ctx.bucket(buckets.PLANS)


# -- the bucket ---------------------------------------------------------------------------


async def get_project(jc: JobContext, project_id: str) -> tuple[Project, int]:
    """The project and its revision; ``NotFound`` for an unknown or malformed id."""
    if not _ID.match(project_id):
        raise NotFound(f"project {shown(project_id)} not found")
    try:
        entry = await _kv(jc).get(PROJECT_PREFIX + project_id)
    except (KeyNotFoundError, ValueError):
        entry = None
    if entry is None or entry.value is None:
        raise NotFound(f"project {shown(project_id)} not found")
    return _project.decode(entry.value), entry.revision or 0


async def get_run(jc: JobContext, run_id: str) -> tuple[PlanRun, int]:
    """The run and its revision; ``NotFound`` for an unknown or malformed id."""
    if not _ID.match(run_id):
        raise NotFound(f"plan run {shown(run_id)} not found")
    try:
        entry = await _kv(jc).get(RUN_PREFIX + run_id)
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
            await _kv(jc).update(RUN_PREFIX + run_id, _enc.encode(updated), last=revision)
        except KeyWrongLastSequenceError:
            continue
        return updated
    raise Unavailable(f"plan run {run_id}: too many concurrent updates; try again")


async def _all(jc: JobContext, prefix: str) -> list[str]:
    return sorted(k[len(prefix) :] for k in await keys(_kv(jc)) if k.startswith(prefix))


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


# -- checking a project -------------------------------------------------------------------


class _Lines:
    """Refusals that name the YAML line of a JSON path."""

    def __init__(self, lines: dict[str, int]) -> None:
        self.lines = lines

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                break
            path = path[:cut]
        return self.lines.get("$")

    def bad(self, path: str, message: str) -> BadRequest:
        line = self.line(path)
        where = f"line {line}: " if line else ""
        return BadRequest(f"{where}{message} - at `{path}`")


async def _server_vms(jc: JobContext, server_id: str) -> ServerVms:
    vms = await jc.bus.request(
        InventoryCmd.VMS,
        ServerRef(server_id=server_id),
        ServerVms,
        timeout=timeouts.INVENTORY_QUERY,
    )
    if not vms.reachable:
        raise Unavailable(f"server {shown(server_id)} is unreachable: {vms.error}")
    return vms


async def _matching(jc: JobContext, server_id: str, pattern: str) -> list[str]:
    """The VMs of the server ``pattern`` (a name or a glob) names, asking the server for a
    plain name (a VM defined a moment ago is found)."""
    if not is_glob(pattern):
        try:
            await jc.bus.request(
                InventoryCmd.VM_INFO,
                VmRef(server_id=server_id, vm_name=pattern),
                VmInfo,
                timeout=timeouts.INVENTORY_QUERY,
            )
        except NotFound:
            return []
        return [pattern]
    vms = await _server_vms(jc, server_id)
    return sorted(v.vm.name for v in vms.vms if fnmatch.fnmatchcase(v.vm.name, pattern))


def _destination_ids(cfg: AgentConfig) -> set[str]:
    return {d.id for d in cfg.destinations}


def _check_icon(icon: str, at: _Lines) -> None:
    if icon.lstrip().startswith("<svg"):
        return
    for prefix in ("data:image/png;base64,", "data:image/svg+xml;base64,"):
        if icon.startswith(prefix):
            try:
                base64.b64decode(icon[len(prefix) :], validate=True)
            except ValueError:
                raise at.bad("$.icon", "the icon's base64 is not valid") from None
            return
    raise at.bad(
        "$.icon",
        "an icon is inline SVG text (<svg ...>) or a data:image/png;base64, or "
        "data:image/svg+xml;base64, URI",
    )


async def check_project(jc: JobContext, spec: ProjectSpec, lines: dict[str, int]) -> None:
    """``BadRequest`` naming the line for anything in ``spec`` that the system cannot run
    (see the module docstring); ``Unavailable`` when a server cannot be asked."""
    from virtbackup.job_orchestrator.schedules import check_cron, zone

    at = _Lines(lines)
    cfg = await jc.config()
    servers = {s.id for s in cfg.servers}
    destinations = _destination_ids(cfg)
    if spec.icon is not None:
        _check_icon(spec.icon, at)
    seen: set[str] = set()
    plan_ids: set[str] = set()
    lookups: list[tuple[str, str, str]] = []
    for i, plan in enumerate(spec.pipelines):
        where = f"$.pipelines[{i}]"
        if plan.id in seen:
            raise at.bad(f"{where}.id", f"the id {shown(plan.id)} is used twice in the project")
        seen.add(plan.id)
        plan_ids.add(plan.id)
        if plan.destination not in destinations:
            raise at.bad(f"{where}.destination", f"destination {shown(plan.destination)} not found")
        for j, sel in enumerate(plan.vms):
            if sel.server not in servers:
                raise at.bad(f"{where}.vms[{j}].server", f"server {shown(sel.server)} not found")
            lookups.append((f"{where}.vms[{j}].vm", sel.server, sel.vm))
        if plan.schedule is not None:
            try:
                check_cron(plan.schedule.cron)
            except BadRequest as exc:
                raise at.bad(f"{where}.schedule.cron", exc.message) from None
            try:
                zone(plan.schedule.timezone)
            except BadRequest as exc:
                raise at.bad(f"{where}.schedule.timezone", exc.message) from None
        if plan.retention is not None:
            try:
                check_retention(plan.retention, f"{where}.retention")
            except ConfigError as exc:
                raise BadRequest(f"line {at.line(f'{where}.retention')}: {exc}") from None
    for i, chain in enumerate(spec.chains):
        where = f"$.chains[{i}]"
        if chain.id in seen:
            raise at.bad(f"{where}.id", f"the id {shown(chain.id)} is used twice in the project")
        seen.add(chain.id)
        if not isinstance(chain.steps[0], BackupStep):
            raise at.bad(f"{where}.steps[0]", "a chain's first step must be a backup")
        for j, step in enumerate(chain.steps):
            sw = f"{where}.steps[{j}]"
            if isinstance(step, BackupStep):
                if step.pipeline not in plan_ids:
                    raise at.bad(
                        f"{sw}.pipeline", f"pipeline {shown(step.pipeline)} is not in the project"
                    )
                for k, dest in enumerate(step.destinations):
                    if dest not in destinations:
                        raise at.bad(
                            f"{sw}.destinations[{k}]", f"destination {shown(dest)} not found"
                        )
            elif isinstance(step, VerifyStep):
                if step.mode == "sample" and step.sample_percent is None:
                    raise at.bad(f"{sw}.samplePercent", "required with mode sample (1-100)")
                if step.mode == "full" and step.sample_percent is not None:
                    raise at.bad(f"{sw}.samplePercent", "only with mode sample")
                if step.destination is not None and step.destination not in destinations:
                    raise at.bad(
                        f"{sw}.destination", f"destination {shown(step.destination)} not found"
                    )
            else:
                for name in ("destination", "target"):
                    dest = getattr(step, name)
                    if dest not in destinations:
                        raise at.bad(f"{sw}.{name}", f"destination {shown(dest)} not found")
    found = await asyncio.gather(*(_matching(jc, server, vm) for _, server, vm in lookups))
    for (path, server, vm), names in zip(lookups, found, strict=True):
        if not names:
            what = "no VM matches" if is_glob(vm) else "no VM named"
            raise at.bad(path, f"{what} {shown(vm)} on server {shown(server)}")


# -- schedules ----------------------------------------------------------------------------


def schedule_id(project_id: str, plan_id: str, index: int) -> str:
    """The ``VB_SCHEDULES`` id of one VM selector of a scheduled plan."""
    digest = hashlib.sha256(f"{project_id}\0{plan_id}\0{index}".encode()).hexdigest()[:24]
    return f"plan-{digest}"


async def _drop_schedules(jc: JobContext, ids: list[str]) -> None:
    from virtbackup.job_orchestrator.schedules import delete_schedule

    for sid in ids:
        with contextlib.suppress(NotFound):
            await delete_schedule(jc, ScheduleRef(id=sid))


async def _make_schedules(jc: JobContext, spec: ProjectSpec) -> list[str]:
    """Create the schedules of ``spec``'s scheduled plans (removed again if one fails)."""
    from virtbackup.job_orchestrator.schedules import create_schedule

    made: list[str] = []
    try:
        for plan in spec.pipelines:
            if plan.schedule is None:
                continue
            for i, sel in enumerate(plan.vms):
                sid = schedule_id(spec.id, plan.id, i)
                template = JobDefinition(
                    vm_path=f"{sel.server}/{sel.vm}",
                    source={"type": "libvirt", "server_id": sel.server},
                    destination={"type": "backup", "destination_id": plan.destination},
                )
                await create_schedule(
                    jc,
                    ScheduleCreate(
                        id=sid,
                        name=f"plan {spec.id}.{plan.id}",
                        description=f"VMs {sel.server}/{sel.vm} of plan {spec.id}.{plan.id}",
                        schedule=plan.schedule.cron,
                        timezone=plan.schedule.timezone,
                        enabled=plan.schedule.enabled,
                        job_template=template,
                    ),
                )
                made.append(sid)
    except BaseException:
        await _drop_schedules(jc, made)
        raise
    return made


# -- project commands ---------------------------------------------------------------------


@plan_commands.handler(PlanCmd.IMPORT, ProjectImportRequest)
async def import_project(jc: JobContext, req: ProjectImportRequest) -> Project:
    """Check and store a project. ``Conflict`` when its id is taken (unless ``replace``);
    nothing is stored, and no schedule is made, when anything is refused."""
    spec = req.spec
    await check_project(jc, spec, req.lines)
    now = utcnow_iso()
    key = PROJECT_PREFIX + spec.id
    old: Project | None = None
    revision = 0
    if req.replace:
        old, revision = await get_project(jc, spec.id)
    else:
        with contextlib.suppress(NotFound):
            await get_project(jc, spec.id)
            raise Conflict(
                f"project {shown(spec.id)} already exists (reload it, or delete it first)"
            )
    if old is not None:
        await _drop_schedules(jc, old.schedule_ids)
    schedule_ids = await _make_schedules(jc, spec)
    project = Project(
        id=spec.id,
        name=spec.name or spec.id,
        description=spec.description,
        spec=spec,
        source=req.source,
        schedule_ids=schedule_ids,
        imported_at=old.imported_at if old else now,
        updated_at=now,
    )
    try:
        if old is None:
            await _kv(jc).create(key, _enc.encode(project))
        else:
            await _kv(jc).update(key, _enc.encode(project), last=revision)
    except KeyWrongLastSequenceError:
        await _drop_schedules(jc, schedule_ids)
        raise Conflict(f"project {shown(spec.id)} changed meanwhile; try again") from None
    return project


@plan_commands.handler(PlanCmd.LIST, Empty)
async def list_projects(jc: JobContext, _: Empty) -> ProjectList:
    out = []
    for pid in await _all(jc, PROJECT_PREFIX):
        with contextlib.suppress(NotFound):
            out.append((await get_project(jc, pid))[0])
    return ProjectList(projects=out)


@plan_commands.handler(PlanCmd.GET, ProjectRef)
async def project(jc: JobContext, req: ProjectRef) -> Project:
    return (await get_project(jc, req.id))[0]


@plan_commands.handler(PlanCmd.DELETE, ProjectRef)
async def delete_project(jc: JobContext, req: ProjectRef) -> Empty:
    """Remove the project and its schedules (its runs and jobs stay)."""
    found, _ = await get_project(jc, req.id)
    await _drop_schedules(jc, found.schedule_ids)
    await _kv(jc).delete(PROJECT_PREFIX + req.id)
    return Empty()


# -- resolving what a run would do --------------------------------------------------------


def _age_seconds(stamp: str) -> float | None:
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (datetime.now(UTC) - moment).total_seconds()


async def resolve_targets(
    jc: JobContext, plan: PipelineSpec, options: RunOptions
) -> list[tuple[str, str]]:
    """``(server, vm)`` of every VM the plan's selectors match now (sorted), narrowed to
    ``options.vms``. ``offline_cached``: from the inventory's cache, refused (400) when a
    server's cache is older than the plan's ``cacheMaxAgeSeconds``."""
    targets: set[tuple[str, str]] = set()
    if options.execution_mode == "offline_cached":
        limit = plan.options.cache_max_age_seconds
        caches: dict[str, ServerVms] = {}
        for sel in plan.vms:
            if sel.server not in caches:
                cache = await jc.bus.request(
                    InventoryCmd.VMS,
                    ServerRef(server_id=sel.server),
                    ServerVms,
                    timeout=timeouts.INVENTORY_QUERY,
                )
                age = _age_seconds(cache.refreshed_at) if cache.refreshed_at else None
                if age is None or age > limit:
                    shown_age = "unknown" if age is None else f"{age:.0f} s"
                    raise BadRequest(
                        f"execution_mode: offline_cached refused: the inventory cache of "
                        f"server {shown(sel.server)} is {shown_age} old (limit {limit} s, the "
                        "plan's options.cacheMaxAgeSeconds); refresh the server or run online"
                    )
                caches[sel.server] = cache
            names = [v.vm.name for v in caches[sel.server].vms]
            targets.update((sel.server, n) for n in names if fnmatch.fnmatchcase(n, sel.vm))
    else:
        found = await asyncio.gather(*(_matching(jc, s.server, s.vm) for s in plan.vms))
        for sel, names in zip(plan.vms, found, strict=True):
            targets.update((sel.server, n) for n in names)
    ordered = sorted(targets)
    if options.vms is not None:
        known = {f"{s}/{v}" for s, v in ordered}
        for i, wanted in enumerate(options.vms):
            if wanted not in known:
                raise BadRequest(
                    f"{shown(wanted)} is not a VM of the plan (write <server>/<vm>; the plan "
                    f"has {', '.join(sorted(known)) or 'none'}) - at `$.vms[{i}]`"
                )
        ordered = [t for t in ordered if f"{t[0]}/{t[1]}" in set(options.vms)]
    if not ordered:
        raise BadRequest("the plan matches no VM now - at `$.vms`")
    return ordered


async def _points(jc: JobContext, destination_id: str, vm: str, server: str) -> list[RestorePoint]:
    """The VM's points from ``server`` in the destination, oldest first (none when the
    destination has no repository yet)."""
    try:
        repo = await jc.repository(destination_id, create=False, locked=True)
    except NoRepositoryError:
        return []
    except RepositoryError as exc:
        raise Unavailable(f"destination {shown(destination_id)}: {exc}") from None
    try:
        return [p for p in await repo.restore_points(vm) if p.source_server_id == server]
    finally:
        await repo.close()


def parent_for(
    points: list[RestorePoint], source_ref: str | None, server: str, vm: str
) -> RestorePoint | None:
    """The point a backup builds on: ``source_ref``'s (400 if the VM has none of that
    timestamp from that server), none for ``full``, else the newest."""
    if source_ref == FULL_REF:
        return None
    if source_ref is not None:
        for p in points:
            if p.timestamp == source_ref:
                return p
        raise BadRequest(
            f"{shown(source_ref)} is not a restore point of vm {shown(vm)} from server "
            f"{shown(server)} (use a timestamp from source-refs, or 'full') - at `$.source_ref`"
        )
    return points[-1] if points else None


async def preview_vm(
    jc: JobContext, server: str, vm: str, destination_id: str, options: RunOptions
) -> PreviewVm:
    """What a backup of the VM would read, from the dirty sizes libvirt reports (no data is
    read); offline: from its points and known checkpoints only (sizes unknown)."""
    points = await _points(jc, destination_id, vm, server)
    parent = parent_for(points, options.source_ref, server, vm)
    base: dict[str, Any] = {"server_id": server, "vm_name": vm, "destination_id": destination_id}
    if options.execution_mode == "offline_cached":
        if parent is None or parent.checkpoint is None:
            return PreviewVm(
                **base,
                mode="full",
                cached=True,
                disks=[
                    PreviewDisk(target=d.target, mode="full", capacity=d.size, reason="no parent")
                    for d in (parent.disks if parent else [])
                ],
                problems=[]
                if parent
                else ["no restore point: the disks' sizes are unknown offline"],
            )
        return PreviewVm(
            **base,
            mode="incremental",
            parent_timestamp=parent.timestamp,
            parent_checkpoint=parent.checkpoint,
            cached=True,
            disks=[
                PreviewDisk(target=d.target, mode="incremental", capacity=d.size)
                for d in parent.disks
            ],
        )
    ref = VmRef(server_id=server, vm_name=vm)
    info = await jc.bus.request(InventoryCmd.VM_INFO, ref, VmInfo, timeout=timeouts.INVENTORY_QUERY)
    full_reason = ""
    sizes: dict[str, int | None] = {}
    problems: list[str] = []
    if parent is None:
        full_reason = (
            "source_ref full" if options.source_ref == FULL_REF else "no restore point yet"
        )
    elif parent.checkpoint is None:
        full_reason = f"point {parent.timestamp} has no checkpoint"
    else:
        known = await jc.bus.request(
            InventoryCmd.CHECKPOINTS, ref, CheckpointList, timeout=timeouts.INVENTORY_QUERY
        )
        if parent.checkpoint not in {c.name for c in known.checkpoints}:
            full_reason = f"checkpoint {parent.checkpoint} is gone from libvirt"
        else:
            try:
                size = await jc.bus.request(
                    InventoryCmd.CHECKPOINT_SIZE,
                    CheckpointSizeRequest(
                        server_id=server, vm_name=vm, checkpoint=parent.checkpoint
                    ),
                    CheckpointSize,
                    timeout=timeouts.INVENTORY_QUERY,
                )
                sizes = {d.target: d.size for d in size.disks}
            except Conflict as exc:
                problems.append(
                    f"dirty sizes unknown ({exc.message}): libvirt reports them for "
                    "running VMs only"
                )
    previous = {d.target: d.size for d in parent.disks} if parent else {}
    disks: list[PreviewDisk] = []
    for disk in info.disks:
        if full_reason:
            disks.append(
                PreviewDisk(
                    target=disk.target,
                    mode="full",
                    capacity=disk.capacity,
                    estimated_bytes=disk.capacity,
                    reason=full_reason,
                )
            )
            continue
        reason = ""
        if disk.target not in previous:
            reason = "new disk"
        elif previous[disk.target] != disk.capacity:
            reason = f"resized from {previous[disk.target]} to {disk.capacity} bytes"
        elif sizes and sizes.get(disk.target) is None:
            reason = "no usable dirty bitmap"
        if reason:
            disks.append(
                PreviewDisk(
                    target=disk.target,
                    mode="full",
                    capacity=disk.capacity,
                    estimated_bytes=disk.capacity,
                    reason=reason,
                )
            )
        else:
            disks.append(
                PreviewDisk(
                    target=disk.target,
                    mode="incremental",
                    capacity=disk.capacity,
                    estimated_bytes=sizes.get(disk.target),
                )
            )
    estimates = [d.estimated_bytes for d in disks]
    incremental = not full_reason and parent is not None
    return PreviewVm(
        **base,
        mode="incremental" if incremental else "full",
        parent_timestamp=parent.timestamp if incremental and parent else None,
        parent_checkpoint=parent.checkpoint if incremental and parent else None,
        disks=disks,
        estimated_bytes=None
        if any(e is None for e in estimates)
        else sum(e or 0 for e in estimates),
        problems=problems,
    )


def _total(vms: list[PreviewVm]) -> int | None:
    if any(v.estimated_bytes is None for v in vms):
        return None
    return sum(v.estimated_bytes or 0 for v in vms)


async def _plan_of(jc: JobContext, req: PlanRunRequest) -> tuple[PipelineSpec, str, list[str]]:
    """The plan a request is about (a chain's first backup step's), the destination its
    backups go to, and the chain's extra destinations."""
    if (req.pipeline_db_id is None) == (req.chain_db_id is None):
        raise BadRequest("give exactly one of pipeline_db_id and chain_db_id")
    if req.pipeline_db_id is not None:
        _, plan = await find_pipeline(jc, req.pipeline_db_id)
        return plan, plan.destination, []
    assert req.chain_db_id is not None
    project, chain = await find_chain(jc, req.chain_db_id)
    step = chain.steps[0]
    assert isinstance(step, BackupStep)
    plan = next(p for p in project.spec.pipelines if p.id == step.pipeline)
    dests = step.destinations or [plan.destination]
    return plan, dests[0], dests[1:]


@plan_commands.handler(PlanCmd.PREVIEW, PlanRunRequest)
async def preview(jc: JobContext, req: PlanRunRequest) -> Preview:
    """Per VM and disk: full or incremental, the parent point and checkpoint, the bytes the
    run would read. ``offline_cached_only`` keeps the VMs resolvable from the cache."""
    plan, dest, _ = await _plan_of(jc, req)
    targets = await resolve_targets(jc, plan, req.options)
    vms = list(await asyncio.gather(*(preview_vm(jc, s, v, dest, req.options) for s, v in targets)))
    if req.options.offline_cached_only:
        vms = [v for v in vms if v.cached and v.mode == "incremental"]
    return Preview(
        pipeline_db_id=req.pipeline_db_id,
        chain_db_id=req.chain_db_id,
        execution_mode=req.options.execution_mode,
        vms=vms,
        estimated_bytes=_total(vms),
    )


@plan_commands.handler(PlanCmd.TARGETS, PlanRunRequest)
async def targets(jc: JobContext, req: PlanRunRequest) -> PlanTargets:
    """The VMs the plan's (or the chain's backup step's) selectors match now."""
    plan, _, _ = await _plan_of(jc, req)
    return PlanTargets(vms=[f"{s}/{v}" for s, v in await resolve_targets(jc, plan, req.options)])


@plan_commands.handler(PlanCmd.SOURCE_REFS, PlanRunRequest)
async def source_refs(jc: JobContext, req: PlanRunRequest) -> SourceRefs:
    """Per VM: its restore points in the destination and libvirt's checkpoints of it
    (online; the checkpoints are left out with ``offline_cached``)."""
    plan, dest, _ = await _plan_of(jc, req)
    targets = await resolve_targets(jc, plan, req.options)

    async def one(server: str, vm: str) -> VmSourceRefs:
        points = await _points(jc, dest, vm, server)
        names: list[str] = []
        intact = False
        problems: list[str] = []
        if req.options.execution_mode != "offline_cached":
            try:
                known = await jc.bus.request(
                    InventoryCmd.CHECKPOINTS,
                    VmRef(server_id=server, vm_name=vm),
                    CheckpointList,
                    timeout=timeouts.INVENTORY_QUERY,
                )
                names, intact = [c.name for c in known.checkpoints], known.chain_intact
            except ServiceError as exc:
                problems.append(f"checkpoints: {exc.message}")
        return VmSourceRefs(
            server_id=server,
            vm_name=vm,
            destination_id=dest,
            points=[
                PointRefInfo(timestamp=p.timestamp, checkpoint=p.checkpoint, kind=p.kind)
                for p in points
            ],
            latest=points[-1].timestamp if points else None,
            checkpoints=names,
            chain_intact=intact,
            problems=problems,
        )

    return SourceRefs(vms=list(await asyncio.gather(*(one(s, v) for s, v in targets))))


# -- agents -------------------------------------------------------------------------------


class _Beat(msgspec.Struct, kw_only=True, rename="camel"):
    version: str = ""
    seen_at: str = ""
    busy_units: int = 0


async def list_agents(jc: JobContext) -> list[EligibleAgent]:
    """The agents that can run a plan: the live transfer workers (``VB_WORKERS``). Remote
    agents (registered with a ``bak_`` key) join this list where they exist."""
    try:
        kv = await jc.bus.key_value(buckets.WORKERS)
    except NotFound:
        return []
    out = []
    for key in await keys(kv):
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value is None:
            continue
        try:
            beat = msgspec.json.decode(entry.value, type=_Beat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            beat = _Beat()
        out.append(
            EligibleAgent(
                id=key,
                kind="transfer-worker",
                version=beat.version,
                last_seen=beat.seen_at,
                busy_units=beat.busy_units,
            )
        )
    return sorted(out, key=lambda a: a.id)


@plan_commands.handler(PlanCmd.ELIGIBLE_AGENTS, PlanRunRequest)
async def eligible_agents(jc: JobContext, req: PlanRunRequest) -> EligibleAgents:
    """The agents that could run the plan or chain (404 for an unknown one)."""
    await _plan_of(jc, req)
    return EligibleAgents(agents=await list_agents(jc))


async def _check_agent(jc: JobContext, agent_id: str | None) -> None:
    if agent_id is None:
        return
    agents = {a.id: a for a in await list_agents(jc)}
    agent = agents.get(agent_id)
    if agent is None or not agent.eligible:
        raise BadRequest(
            f"agent {shown(agent_id)} is not eligible (eligible: "
            f"{', '.join(sorted(agents)) or 'none'}) - at `$.agent_id`"
        )


# -- runs ---------------------------------------------------------------------------------


async def _submit_backup(
    jc: JobContext,
    run: PlanRun,
    server: str,
    vm: str,
    destination_id: str,
    extra: list[str],
) -> Job:
    from virtbackup.job_orchestrator.runner import execute

    if extra:
        if "also_destination_ids" not in BackupRequest.__struct_fields__:
            raise BadRequest(
                "writing one read to several destinations needs the fan-out data path "
                "(BackupRequest.also_destination_ids), which this build lacks"
            )
        from virtbackup.job_orchestrator.handlers import backup

        req = msgspec.convert(
            {
                "serverId": server,
                "vmName": vm,
                "destinationId": destination_id,
                "alsoDestinationIds": extra,
            },
            BackupRequest,
        )
        return await backup(jc, req)
    params: dict[str, Any] = {"fresh": False, "planRunId": run.id}
    if run.options.source_ref is not None:
        params["sourceRef"] = run.options.source_ref
    if run.options.agent_id is not None:
        params["agentId"] = run.options.agent_id
    if run.pipeline_db_id:
        params["pipelineDbId"] = run.pipeline_db_id
    if run.chain_db_id:
        params["chainDbId"] = run.chain_db_id
    await jc.bus.request(
        InventoryCmd.VM_INFO,
        VmRef(server_id=server, vm_name=vm),
        VmInfo,
        timeout=timeouts.INVENTORY_QUERY,
    )
    return await jc.submit(
        "backup",
        server_id=server,
        vm_name=vm,
        destination_id=destination_id,
        params=params,
        lock_vm=True,
        run=execute,
    )


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
        verify_dest = chain_step.destination or dest

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

        await each(verify_one)
    elif step.type == "copy":
        assert isinstance(chain_step, CopyStep)
        subject = getattr(subjects, "JOB_COPY", None) or getattr(subjects.JobCmd, "COPY", None)
        kind = getattr(v1jobs, "CopyRequest", None)
        if subject is None or kind is None:
            errors.append("copy: the copy job (CopyRequest, JOB_COPY) is not in this build")
        else:

            async def copy_one(server: str, vm: str) -> Job:
                req = msgspec.convert(
                    {
                        "destination_id": chain_step.destination,
                        "target_destination_id": chain_step.target,
                        "vm_name": vm,
                        "server_id": server,
                        "timestamp": None,
                    },
                    kind,
                    from_attributes=False,
                    str_keys=True,
                )
                return await jc.bus.request(subject, req, Job)

            await each(copy_one)
    return job_ids, errors


async def _run_plan(jc: JobContext, run: PlanRun) -> tuple[PipelineSpec, str, list[str]]:
    return await _plan_of(
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
    plan, dest, extra = await _plan_of(jc, req)
    if extra and "also_destination_ids" not in BackupRequest.__struct_fields__:
        raise BadRequest(
            "this chain backs up to several destinations at once, which needs the fan-out "
            "backup (BackupRequest.also_destination_ids) that this build lacks"
        )
    chain = None
    if req.chain_db_id is not None:
        _, chain = await find_chain(jc, req.chain_db_id)
    await _check_agent(jc, options.agent_id)
    targets = await resolve_targets(jc, plan, options)
    if options.source_ref is not None and options.source_ref != FULL_REF:
        for server, vm in targets:
            parent_for(await _points(jc, dest, vm, server), options.source_ref, server, vm)
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
    await _kv(jc).create(RUN_PREFIX + run.id, _enc.encode(run))
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
            age = _age_seconds(run.claimed_at or run.updated_at) or 0.0
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
            keep_last=keep.keep_last,
            keep_hourly=keep.keep_hourly,
            keep_daily=keep.keep_daily,
            keep_weekly=keep.keep_weekly,
            keep_monthly=keep.keep_monthly,
            keep_yearly=keep.keep_yearly,
            keep_all=keep.keep_all,
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
    age = _age_seconds(run.updated_at)
    if age is not None and age > RUN_KEEP_SECONDS:
        with contextlib.suppress(KeyNotFoundError):
            await _kv(jc).delete(RUN_PREFIX + run.id)


async def run_plan_runs(jc: JobContext) -> None:
    """Every replica: advance every running plan run once a second. A run that has ended
    never changes again, so each replica remembers it (only to read it no more) and
    deletes its record once it is ``RUN_KEEP_SECONDS`` old."""
    stopping = jc.ctx.stopping
    ended: dict[str, PlanRun] = {}
    while not stopping.is_set():
        try:
            for run_id in await _all(jc, RUN_PREFIX):
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
