"""What a run of a plan would do (``vb.cmd.plan.preview|targets|source-refs|
eligible-agents``): the VMs its selectors match, per VM and disk full or incremental,
the parent point and checkpoint, the bytes it would read (libvirt's dirty sizes, no data
read), and the agents that could run it."""

from __future__ import annotations

import asyncio
import fnmatch
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import InventoryCmd, PlanCmd
from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.inventory import (
    CheckpointList,
    ServerRef,
    ServerVms,
    VmInfo,
    VmRef,
)
from virtbackup.contracts.v1.plans import (
    BackupStep,
    CheckpointSize,
    CheckpointSizeRequest,
    EligibleAgent,
    EligibleAgents,
    PipelineSpec,
    PlanRunRequest,
    PlanTargets,
    PointRefInfo,
    Preview,
    PreviewDestination,
    PreviewDisk,
    PreviewVm,
    RunOptions,
    SourceRefs,
    VmSourceRefs,
)
from virtbackup.job_orchestrator.agent_jobs import agent_of
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.plan_projects import matching_vms
from virtbackup.job_orchestrator.plan_store import (
    FULL_REF,
    find_chain,
    find_pipeline,
    plan_commands,
)
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import NoRepositoryError, RepositoryError
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import (
    BadRequest,
    Conflict,
    NotFound,
    ServiceError,
    Unavailable,
)
from virtbackup.runtime.kv import keys

# -- resolving what a run would do --------------------------------------------------------


def age_seconds(stamp: str) -> float | None:
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
                age = age_seconds(cache.refreshed_at) if cache.refreshed_at else None
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
        found = await asyncio.gather(*(matching_vms(jc, s.server, s.vm) for s in plan.vms))
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


async def points_of(
    jc: JobContext, destination_id: str, vm: str, server: str
) -> list[RestorePoint]:
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
    read); offline, or for a server backed up by a remote agent (the inventory does not
    reach its host): from its points and known checkpoints only (sizes unknown; such a
    VM has ``cached`` false and a ``problems`` line naming the agent)."""
    points = await points_of(jc, destination_id, vm, server)
    parent = parent_for(points, options.source_ref, server, vm)
    base: dict[str, Any] = {"server_id": server, "vm_name": vm, "destination_id": destination_id}
    offline = options.execution_mode == "offline_cached"
    remote = None if offline else agent_of(await jc.config(), server)
    if offline or remote is not None:
        notes = (
            [f"server {server} is backed up by remote agent {remote}: sizes are unknown here"]
            if remote is not None
            else []
        )
        if parent is None or parent.checkpoint is None:
            return PreviewVm(
                **base,
                mode="full",
                cached=offline,
                disks=[
                    PreviewDisk(target=d.target, mode="full", capacity=d.size, reason="no parent")
                    for d in (parent.disks if parent else [])
                ],
                problems=notes
                + ([] if parent else ["no restore point: the disks' sizes are unknown offline"]),
            )
        return PreviewVm(
            **base,
            mode="incremental",
            parent_timestamp=parent.timestamp,
            parent_checkpoint=parent.checkpoint,
            cached=offline,
            disks=[
                PreviewDisk(target=d.target, mode="incremental", capacity=d.size)
                for d in parent.disks
            ],
            problems=notes,
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


async def with_destinations(jc: JobContext, vm: PreviewVm, extra: list[str]) -> PreviewVm:
    """``vm`` (its first destination's preview) with every destination of a fan-out
    backup (``fanout``): the read is incremental from the first one's parent checkpoint;
    another destination builds on its newest point only when that point has the very
    same checkpoint, else it is sent a full read, and then the read is full (every
    disk's capacity, an upper bound)."""
    capacity: int | None = sum(d.capacity or 0 for d in vm.disks)
    if not vm.disks or any(d.capacity is None for d in vm.disks):
        capacity = None
    entries = [
        PreviewDestination(
            destination_id=vm.destination_id,
            mode=vm.mode,
            parent_timestamp=vm.parent_timestamp,
            estimated_bytes=vm.estimated_bytes,
        )
    ]
    for dest in extra:
        points = await points_of(jc, dest, vm.vm_name, vm.server_id)
        newest = points[-1] if points else None
        if (
            vm.mode == "incremental"
            and newest is not None
            and newest.checkpoint is not None
            and newest.checkpoint == vm.parent_checkpoint
        ):
            entries.append(
                PreviewDestination(
                    destination_id=dest,
                    mode="incremental",
                    parent_timestamp=newest.timestamp,
                    estimated_bytes=vm.estimated_bytes,
                )
            )
            continue
        reason = (
            "the run reads in full"
            if vm.mode == "full"
            else "no restore point yet"
            if newest is None
            else f"its newest point {newest.timestamp} is not of checkpoint {vm.parent_checkpoint}"
        )
        entries.append(
            PreviewDestination(
                destination_id=dest, mode="full", estimated_bytes=capacity, reason=reason
            )
        )
    read = vm.estimated_bytes
    if vm.mode == "incremental" and any(e.mode == "full" for e in entries):
        read = capacity
    return msgspec.structs.replace(vm, destinations=entries, estimated_bytes=read)


def _total(vms: list[PreviewVm]) -> int | None:
    if any(v.estimated_bytes is None for v in vms):
        return None
    return sum(v.estimated_bytes or 0 for v in vms)


async def plan_of(jc: JobContext, req: PlanRunRequest) -> tuple[PipelineSpec, str, list[str]]:
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
    plan, dest, extra = await plan_of(jc, req)
    targets = await resolve_targets(jc, plan, req.options)
    vms = list(await asyncio.gather(*(preview_vm(jc, s, v, dest, req.options) for s, v in targets)))
    if extra:
        vms = list(await asyncio.gather(*(with_destinations(jc, v, extra) for v in vms)))
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
    """The VMs the plan's (or the chain's backup step's) selectors match now.
    ``BadRequest`` naming ``$.source_ref`` when a VM has no such point, as the preview
    (so that ``version-resolve`` refuses it before its stream starts)."""
    plan, dest, _ = await plan_of(jc, req)
    found = await resolve_targets(jc, plan, req.options)
    source_ref = req.options.source_ref
    if source_ref is not None:

        async def check(server: str, vm: str) -> None:
            parent_for(await points_of(jc, dest, vm, server), source_ref, server, vm)

        await asyncio.gather(*(check(s, v) for s, v in found))
    return PlanTargets(vms=[f"{s}/{v}" for s, v in found])


@plan_commands.handler(PlanCmd.SOURCE_REFS, PlanRunRequest)
async def source_refs(jc: JobContext, req: PlanRunRequest) -> SourceRefs:
    """Per VM: its restore points in the destination and libvirt's checkpoints of it
    (online; the checkpoints are left out with ``offline_cached``)."""
    plan, dest, _ = await plan_of(jc, req)
    targets = await resolve_targets(jc, plan, req.options)

    async def one(server: str, vm: str) -> VmSourceRefs:
        points = await points_of(jc, dest, vm, server)
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


async def list_agents(jc: JobContext, plan: PipelineSpec | None = None) -> list[EligibleAgent]:
    """The agents that can run a plan: the live transfer workers (``VB_WORKERS``; id
    ``worker:<name>``, as ``GET /api/v1/agents`` names them) and the remote agents that
    the configuration's servers name (``agentId``: they back up those servers' VMs).

    With ``plan``, each says whether it can run that plan's backups (``eligible``, and
    ``reason`` when not): a remote agent only if it backs up every server the plan's VM
    selectors name (it reaches no other host); the workers only if at least one of those
    servers is not a remote agent's (those are read by the inventory and the workers)."""
    cfg = await jc.config()
    wanted = sorted({sel.server for sel in plan.vms}) if plan is not None else []
    served_by = {s.id: s.agent_id for s in cfg.servers}
    out: list[EligibleAgent] = []
    for agent in sorted({s.agent_id for s in cfg.servers if s.agent_id}):
        served = [s.id for s in cfg.servers if s.agent_id == agent]
        others = [s for s in wanted if served_by.get(s) != agent]
        out.append(
            EligibleAgent(
                id=agent,
                kind="remote",
                eligible=not others,
                reason=f"backs up the VMs of server(s) {', '.join(served)}"
                + (
                    f"; the plan's VMs on server(s) {', '.join(others)} are not its to reach"
                    if others
                    else ""
                ),
            )
        )
    local = [s for s in wanted if not served_by.get(s)]
    worker_reason = (
        ""
        if not wanted or local
        else "the plan's servers are backed up by their remote agents, not by the workers"
    )
    try:
        kv = await jc.bus.key_value(buckets.WORKERS)
    except NotFound:
        return out
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
                id=f"worker:{key}",
                kind="transfer-worker",
                version=beat.version,
                last_seen=beat.seen_at,
                busy_units=beat.busy_units,
                eligible=not worker_reason,
                reason=worker_reason,
            )
        )
    return sorted(out, key=lambda a: a.id)


@plan_commands.handler(PlanCmd.ELIGIBLE_AGENTS, PlanRunRequest)
async def eligible_agents(jc: JobContext, req: PlanRunRequest) -> EligibleAgents:
    """The agents that could run the plan or chain, each with ``eligible`` for this one
    (``list_agents``; 404 for an unknown plan or chain)."""
    plan, _, _ = await plan_of(jc, req)
    return EligibleAgents(agents=await list_agents(jc, plan))


async def check_agent(jc: JobContext, agent_id: str | None, plan: PipelineSpec) -> None:
    """``BadRequest`` naming ``$.agent_id`` unless ``agent_id`` (if given) is one of the
    agents ``list_agents`` finds eligible for ``plan``: unknown, or a remote agent of
    another server than the plan's VMs are on, or a worker for a plan all of whose
    servers are remote agents'."""
    if agent_id is None:
        return
    agents = await list_agents(jc, plan)
    agent = next((a for a in agents if a.id == agent_id), None)
    eligible = sorted(a.id for a in agents if a.eligible)
    if agent is None or not agent.eligible:
        why = f": {agent.reason}" if agent is not None and agent.reason else ""
        raise BadRequest(
            f"agent {shown(agent_id)} is not eligible for this plan{why} (eligible: "
            f"{', '.join(eligible) or 'none'}) - at `$.agent_id`"
        )
