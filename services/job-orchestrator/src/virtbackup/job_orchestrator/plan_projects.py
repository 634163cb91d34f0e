"""Projects of backup plans (``vb.cmd.plan.import|list|get|delete``).

A project (``v1.plans.ProjectSpec``, parsed strictly by the gateway) is checked here
against the configuration and the inventory before anything is stored: every server and
destination must exist, every VM selector must match a VM, cron expressions, time zones
and retention policies must be valid, chain steps must name the project's plans. A
refusal is a 400 naming the YAML line (``ProjectImportRequest.lines``). Only then is the
project written to ``VB_PLANS`` (key ``project.<id>``) and each scheduled plan's VM
selectors become schedules of ``VB_SCHEDULES`` (the scheduler of ``schedules`` runs
them, exactly once per due time across replicas).

At fleet scale (a plan naming 1,000 servers, one ``vm: "*"`` glob each) the checks ask
the inventory once per server (the globs of one server share its VM list) with at most
``INVENTORY_PARALLEL`` requests in flight, and the schedules are checked once per plan
and written ``INVENTORY_PARALLEL`` at a time, so an import costs a few round trips per
server rather than a few per selector in sequence.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
from collections.abc import Awaitable, Iterable
from typing import Final, TypeVar

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from virtbackup.contracts.subjects import InventoryCmd, PlanCmd
from virtbackup.contracts.v1.common import Empty, shown
from virtbackup.contracts.v1.config import AgentConfig, ConfigError, check_retention
from virtbackup.contracts.v1.inventory import (
    ServerRef,
    ServerVms,
    VmInfo,
    VmRef,
)
from virtbackup.contracts.v1.plans import (
    BackupStep,
    Project,
    ProjectImportRequest,
    ProjectList,
    ProjectRef,
    ProjectSpec,
    VerifyStep,
)
from virtbackup.contracts.v1.schedules import JobDefinition, Schedule, ScheduleRef
from virtbackup.job_orchestrator.agent_jobs import agent_of
from virtbackup.job_orchestrator.definitions import is_glob
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.plan_store import (
    PROJECT_PREFIX,
    encoder,
    get_project,
    keys_under,
    plan_commands,
    plans_kv,
)
from virtbackup.runtime import timeouts
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import (
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
)

#: Inventory requests (and schedule writes) one import or preview keeps in flight at most:
#: enough to hide the round trips, few enough that the inventory answers each well
#: within ``timeouts.INVENTORY_QUERY`` however many servers a plan names.
INVENTORY_PARALLEL: Final = 32

T = TypeVar("T")


async def bounded_gather(coros: Iterable[Awaitable[T]], limit: int = INVENTORY_PARALLEL) -> list[T]:
    """``asyncio.gather`` of ``coros`` (results in their order) with at most ``limit`` of
    them running at once; the first exception is raised (the others still run out)."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


# -- checking a project -------------------------------------------------------------------


class Lines:
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


async def server_vms(jc: JobContext, server_id: str) -> ServerVms:
    vms = await jc.bus.request(
        InventoryCmd.VMS,
        ServerRef(server_id=server_id),
        ServerVms,
        timeout=timeouts.INVENTORY_QUERY,
    )
    if not vms.reachable:
        raise Unavailable(f"server {shown(server_id)} is unreachable: {vms.error}")
    return vms


async def vm_lists(jc: JobContext, server_ids: Iterable[str]) -> dict[str, list[str]]:
    """The VM names of each server (the inventory's list, one request per distinct server,
    ``INVENTORY_PARALLEL`` at a time); ``Unavailable`` when a server is unreachable."""
    wanted = sorted(set(server_ids))
    found = await bounded_gather(server_vms(jc, s) for s in wanted)
    return {s: [v.vm.name for v in vms.vms] for s, vms in zip(wanted, found, strict=True)}


async def matching_many(jc: JobContext, selectors: list[tuple[str, str]]) -> list[list[str]]:
    """``matching_vms`` of every ``(server, pattern)``, in order: the globs of one server
    are matched against one listing of it, the plain names asked one by one (bounded)."""
    cfg = await jc.config()
    local = [(s, p) for s, p in selectors if agent_of(cfg, s) is None]
    lists = await vm_lists(jc, (s for s, p in local if is_glob(p)))
    plain = sorted({(s, p) for s, p in local if not is_glob(p)})
    named = dict(
        zip(plain, await bounded_gather(matching_vms(jc, s, p) for s, p in plain), strict=True)
    )
    out: list[list[str]] = []
    for server, pattern in selectors:
        if agent_of(cfg, server) is not None:
            out.append([] if is_glob(pattern) else [pattern])
        elif is_glob(pattern):
            out.append(sorted(n for n in lists[server] if fnmatch.fnmatchcase(n, pattern)))
        else:
            out.append(named[(server, pattern)])
    return out


async def matching_vms(jc: JobContext, server_id: str, pattern: str) -> list[str]:
    """The VMs of the server ``pattern`` (a name or a glob) names, asking the server for a
    plain name (a VM defined a moment ago is found). A server backed up by a remote agent
    (``agentId``) is not the inventory's to ask: a plain name is taken as given (its
    agent fails the job if the host has no such VM, as for ``POST /servers/{id}/backup``)
    and a glob matches nothing."""
    if agent_of(await jc.config(), server_id) is not None:
        return [] if is_glob(pattern) else [pattern]
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
    vms = await server_vms(jc, server_id)
    return sorted(v.vm.name for v in vms.vms if fnmatch.fnmatchcase(v.vm.name, pattern))


def _destination_ids(cfg: AgentConfig) -> set[str]:
    return {d.id for d in cfg.destinations}


def _check_icon(icon: str, at: Lines) -> None:
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
    from virtbackup.job_orchestrator.schedules import check_cron, check_interval, zone

    at = Lines(lines)
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
            remote = agent_of(cfg, sel.server)
            if remote is not None and is_glob(sel.vm):
                raise at.bad(
                    f"{where}.vms[{j}].vm",
                    f"server {shown(sel.server)} is backed up by remote agent {shown(remote)}, "
                    "which the inventory does not reach: name its VMs one by one, not by a glob",
                )
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
            try:  # here, not first when its schedule is made: a reload drops the old ones
                check_interval(
                    plan.schedule.cron, plan.schedule.timezone, jc.settings.schedule_min_interval
                )
            except BadRequest as exc:
                raise at.bad(f"{where}.schedule.cron", exc.message) from None
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
                plan = next(p for p in spec.pipelines if p.id == step.pipeline)
                agents = {agent_of(cfg, sel.server) for sel in plan.vms} - {None}
                if len(step.destinations) > 1 and agents:
                    raise at.bad(
                        f"{sw}.destinations",
                        f"pipeline {shown(step.pipeline)} backs up VMs of a remote agent's "
                        "server, which writes one destination per backup",
                    )
                for k, dest in enumerate(step.destinations):
                    if dest not in destinations:
                        raise at.bad(
                            f"{sw}.destinations[{k}]", f"destination {shown(dest)} not found"
                        )
                    if dest in step.destinations[:k]:
                        raise at.bad(
                            f"{sw}.destinations[{k}]", f"destination {shown(dest)} is named twice"
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
                if step.target == step.destination:
                    raise at.bad(
                        f"{sw}.target",
                        f"destination {shown(step.target)} is the copy's source itself",
                    )
    found = await matching_many(jc, [(server, vm) for _, server, vm in lookups])
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

    async def drop(sid: str) -> None:
        with contextlib.suppress(NotFound):
            await delete_schedule(jc, ScheduleRef(id=sid))

    await bounded_gather(drop(sid) for sid in ids)


async def _make_schedules(jc: JobContext, spec: ProjectSpec) -> list[str]:
    """Create the schedules of ``spec``'s scheduled plans (removed again if one fails).

    ``spec`` has passed ``check_project``: each plan's cron expression, time zone and
    interval, its destination, and every selector's server and VMs are checked there
    (once per plan, not once per schedule as ``create_schedule`` would, whose interval
    check alone walks 1,000 runs of the expression). ``Conflict`` when the schedules
    would outnumber ``VIRTBACKUP_MAX_SCHEDULES``."""
    from virtbackup.job_orchestrator.schedules import iso, now_utc, planned, store_of

    now = now_utc()
    wanted: list[Schedule] = []
    for plan in spec.pipelines:
        if plan.schedule is None:
            continue
        for i, sel in enumerate(plan.vms):
            sid = schedule_id(spec.id, plan.id, i)
            schedule = Schedule(
                id=sid,
                name=f"plan {spec.id}.{plan.id}",
                description=f"VMs {sel.server}/{sel.vm} of plan {spec.id}.{plan.id}",
                schedule=plan.schedule.cron,
                timezone=plan.schedule.timezone,
                enabled=plan.schedule.enabled,
                job_template=JobDefinition(
                    vm_path=f"{sel.server}/{sel.vm}",
                    source={"type": "libvirt", "server_id": sel.server},
                    destination={"type": "backup", "destination_id": plan.destination},
                ),
                created_at=iso(now),
                updated_at=iso(now),
            )
            wanted.append(msgspec.structs.replace(schedule, next_run=planned(schedule, now)))
    if not wanted:
        return []
    store = store_of(jc)
    limit = jc.settings.max_schedules
    if await store.count() + len(wanted) > limit:
        raise Conflict(
            f"the project needs {len(wanted)} schedules (one per VM selector of a scheduled "
            f"plan) and the installation keeps at most {limit} (VIRTBACKUP_MAX_SCHEDULES): "
            "let one selector cover many VMs with a glob, or delete schedules"
        )
    made: list[str] = []

    async def create(schedule: Schedule) -> None:
        await store.create(schedule)
        made.append(schedule.id)

    try:
        await bounded_gather(create(s) for s in wanted)
    except BaseException:
        await _drop_schedules(jc, made)
        raise
    return [s.id for s in wanted]


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
            await plans_kv(jc).create(key, encoder.encode(project))
        else:
            await plans_kv(jc).update(key, encoder.encode(project), last=revision)
    except KeyWrongLastSequenceError:
        await _drop_schedules(jc, schedule_ids)
        raise Conflict(f"project {shown(spec.id)} changed meanwhile; try again") from None
    return project


@plan_commands.handler(PlanCmd.LIST, Empty)
async def list_projects(jc: JobContext, _: Empty) -> ProjectList:
    out = []
    for pid in await keys_under(jc, PROJECT_PREFIX):
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
    await plans_kv(jc).delete(PROJECT_PREFIX + req.id)
    return Empty()
