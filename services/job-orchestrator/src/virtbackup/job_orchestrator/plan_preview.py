"""What a run of a plan would do (``vb.cmd.plan.preview|targets|source-refs|
eligible-agents``): the VMs its selectors match, per VM and disk full or incremental,
the parent point and checkpoint, the bytes it would read (libvirt's dirty sizes, no data
read), and the agents that could run it.

A preview's reply must fit in one bus message, so the gateway asks for the plan's targets
first and then previews them a page at a time (``options.vms``); a request naming VMs
resolves only the selectors of those VMs' servers, and one request opens each
destination's repository once (``PointReader``), not once per VM.
"""

from __future__ import annotations

import asyncio
import fnmatch
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import InventoryCmd, PlanCmd
from virtbackup.contracts.v1.common import Fault, shown
from virtbackup.contracts.v1.config import AgentConfig
from virtbackup.contracts.v1.inventory import (
    DISKS_MANY_MAX,
    CheckpointList,
    DiskInfo,
    DiskList,
    ServerRef,
    ServerVms,
    VmRef,
    VmsDisks,
    VmsDisksRequest,
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
from virtbackup.job_orchestrator.plan_projects import bounded_gather, matching_many
from virtbackup.job_orchestrator.plan_store import (
    FULL_REF,
    find_chain,
    find_pipeline,
    plan_commands,
)
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import NoRepositoryError, Repository, RepositoryError
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
    ``options.vms`` (then only the selectors of those VMs' servers are resolved: a page of
    a preview costs the inventory its own servers only). ``offline_cached``: from the
    inventory's cache, refused (400) when a server's cache is older than the plan's
    ``cacheMaxAgeSeconds``. The inventory is asked once per server, at most
    ``INVENTORY_PARALLEL`` requests at a time."""
    targets: set[tuple[str, str]] = set()
    selectors = plan.vms
    if options.vms is not None:
        servers = {name.partition("/")[0] for name in options.vms}
        selectors = [sel for sel in plan.vms if sel.server in servers]
    if options.execution_mode == "offline_cached":
        limit = plan.options.cache_max_age_seconds
        wanted = sorted({sel.server for sel in selectors})
        listed = await bounded_gather(
            jc.bus.request(
                InventoryCmd.VMS,
                ServerRef(server_id=server),
                ServerVms,
                timeout=timeouts.INVENTORY_QUERY,
            )
            for server in wanted
        )
        caches = dict(zip(wanted, listed, strict=True))
        for server in wanted:
            cache = caches[server]
            age = age_seconds(cache.refreshed_at) if cache.refreshed_at else None
            if age is None or age > limit:
                shown_age = "unknown" if age is None else f"{age:.0f} s"
                raise BadRequest(
                    f"execution_mode: offline_cached refused: the inventory cache of "
                    f"server {shown(server)} is {shown_age} old (limit {limit} s, the "
                    "plan's options.cacheMaxAgeSeconds); refresh the server or run online"
                )
        for sel in selectors:
            names = [v.vm.name for v in caches[sel.server].vms]
            targets.update((sel.server, n) for n in names if fnmatch.fnmatchcase(n, sel.vm))
    else:
        found = await matching_many(jc, [(s.server, s.vm) for s in selectors])
        for sel, names in zip(selectors, found, strict=True):
            targets.update((sel.server, n) for n in names)
    ordered = sorted(targets)
    if options.vms is not None:
        known = {f"{s}/{v}" for s, v in ordered}
        for i, wanted_vm in enumerate(options.vms):
            if wanted_vm not in known:
                listed_known = sorted(known)
                more = len(listed_known) - 20
                some = ", ".join(listed_known[:20]) + (f" and {more} more" if more > 0 else "")
                raise BadRequest(
                    f"{shown(wanted_vm)} is not a VM of the plan (write <server>/<vm>; the "
                    f"plan has {some or 'none on that server'}) - at `$.vms[{i}]`"
                )
        chosen = set(options.vms)
        ordered = [t for t in ordered if f"{t[0]}/{t[1]}" in chosen]
    if not ordered:
        raise BadRequest("the plan matches no VM now - at `$.vms`")
    return ordered


class PointReader:
    """What one request reads for every VM it looks at, read once: the configuration
    (``config``) and each destination's repository (opened on first use; ``close``
    closes them), whose restore points ``points`` lists. ``Unavailable`` when a
    destination cannot be read."""

    def __init__(self, jc: JobContext) -> None:
        self.jc = jc
        self._repos: dict[str, Repository | None] = {}
        self._opening = asyncio.Lock()
        self._config: AgentConfig | None = None

        #: ``(server, vm)``: its disks, or why they could not be read (``read_disks``).
        self.disks: dict[tuple[str, str], list[DiskInfo] | Fault] = {}

    async def config(self) -> AgentConfig:
        """The configuration as the first call read it."""
        if self._config is None:
            self._config = await self.jc.config()
        return self._config

    async def read_disks(self, targets: list[tuple[str, str]]) -> None:
        """Ask the inventory for the disks of every ``(server, vm)`` of a server it reads
        (not a remote agent's), one ``disks-many`` request per server and up to
        ``DISKS_MANY_MAX`` VMs, ``INVENTORY_PARALLEL`` at a time, into ``disks``: a
        preview then costs a round trip per server, not one per VM."""
        cfg = await self.config()
        by_server: dict[str, list[str]] = {}
        for server, vm in targets:
            if agent_of(cfg, server) is None:
                by_server.setdefault(server, []).append(vm)
        asks = [
            VmsDisksRequest(server_id=server, vm_names=vms[i : i + DISKS_MANY_MAX])
            for server, vms in by_server.items()
            for i in range(0, len(vms), DISKS_MANY_MAX)
        ]
        answers = await bounded_gather(
            self.jc.bus.request(
                InventoryCmd.DISKS_MANY, ask, VmsDisks, timeout=timeouts.INVENTORY_QUERY
            )
            for ask in asks
        )
        for ask, answer in zip(asks, answers, strict=True):
            for entry in answer.vms:
                found = entry.fault if entry.fault is not None else entry.disks
                self.disks[(ask.server_id, entry.vm_name)] = found

    async def _repo(self, destination_id: str) -> Repository | None:
        async with self._opening:
            if destination_id not in self._repos:
                try:
                    self._repos[destination_id] = await self.jc.repository(
                        destination_id, create=False, locked=True
                    )
                except NoRepositoryError:
                    self._repos[destination_id] = None
                except RepositoryError as exc:
                    raise Unavailable(f"destination {shown(destination_id)}: {exc}") from None
            return self._repos[destination_id]

    async def points(self, destination_id: str, vm: str, server: str) -> list[RestorePoint]:
        """The VM's points from ``server`` in the destination, oldest first (none when
        the destination has no repository yet)."""
        repo = await self._repo(destination_id)
        if repo is None:
            return []
        return [p for p in await repo.restore_points(vm) if p.source_server_id == server]

    async def close(self) -> None:
        repos = [r for r in self._repos.values() if r is not None]
        self._repos.clear()
        for repo in repos:
            await repo.close()


async def points_of(
    jc: JobContext, destination_id: str, vm: str, server: str
) -> list[RestorePoint]:
    """The VM's points from ``server`` in the destination, oldest first (none when the
    destination has no repository yet)."""
    reader = PointReader(jc)
    try:
        return await reader.points(destination_id, vm, server)
    finally:
        await reader.close()


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
    jc: JobContext,
    server: str,
    vm: str,
    destination_id: str,
    options: RunOptions,
    reader: PointReader | None = None,
) -> PreviewVm:
    """What a backup of the VM would read, from the dirty sizes libvirt reports (no data is
    read); offline, or for a server backed up by a remote agent (the inventory does not
    reach its host): from its points and known checkpoints only (sizes unknown; such a
    VM has ``cached`` false and a ``problems`` line naming the agent)."""
    if reader is None:
        points = await points_of(jc, destination_id, vm, server)
    else:
        points = await reader.points(destination_id, vm, server)
    parent = parent_for(points, options.source_ref, server, vm)
    base: dict[str, Any] = {"server_id": server, "vm_name": vm, "destination_id": destination_id}
    offline = options.execution_mode == "offline_cached"
    remote = None
    if not offline:
        remote = agent_of(await (reader.config() if reader else jc.config()), server)
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
    # The disks alone (not VM_INFO's state, CPUs and memory, which a preview shows not),
    # read with the other VMs of the request where the reader has them.
    prefetched = reader.disks.get((server, vm)) if reader is not None else None
    if isinstance(prefetched, Fault):
        raise ServiceError.from_fault(prefetched)
    if prefetched is None:
        prefetched = (
            await jc.bus.request(
                InventoryCmd.DISKS, ref, DiskList, timeout=timeouts.INVENTORY_QUERY
            )
        ).disks
    vm_disks: list[DiskInfo] = prefetched
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
    for disk in vm_disks:
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


async def with_destinations(
    jc: JobContext, vm: PreviewVm, extra: list[str], reader: PointReader | None = None
) -> PreviewVm:
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
        if reader is None:
            points = await points_of(jc, dest, vm.vm_name, vm.server_id)
        else:
            points = await reader.points(dest, vm.vm_name, vm.server_id)
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
    reader = PointReader(jc)
    try:
        if req.options.execution_mode != "offline_cached":
            await reader.read_disks(targets)
        vms = await bounded_gather(
            preview_vm(jc, s, v, dest, req.options, reader) for s, v in targets
        )
        if extra:
            vms = await bounded_gather(with_destinations(jc, v, extra, reader) for v in vms)
    finally:
        await reader.close()
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
        reader = PointReader(jc)

        async def check(server: str, vm: str) -> None:
            parent_for(await reader.points(dest, vm, server), source_ref, server, vm)

        try:
            await bounded_gather(check(s, v) for s, v in found)
        finally:
            await reader.close()
    return PlanTargets(vms=[f"{s}/{v}" for s, v in found])


@plan_commands.handler(PlanCmd.SOURCE_REFS, PlanRunRequest)
async def source_refs(jc: JobContext, req: PlanRunRequest) -> SourceRefs:
    """Per VM: its restore points in the destination and libvirt's checkpoints of it
    (online; the checkpoints are left out with ``offline_cached``)."""
    plan, dest, _ = await plan_of(jc, req)
    targets = await resolve_targets(jc, plan, req.options)

    reader = PointReader(jc)

    async def one(server: str, vm: str) -> VmSourceRefs:
        points = await reader.points(dest, vm, server)
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

    try:
        return SourceRefs(vms=await bounded_gather(one(s, v) for s, v in targets))
    finally:
        await reader.close()


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
