"""The HyperSDK API's job definitions: checked, expanded (globs) and submitted as backups.

A definition (``v1.schedules.JobDefinition``) names VMs by ``vm_path``
(``<server>/<vm>``, either part a glob) and says where they go. Everything is checked
and every glob expanded against the configuration and the inventory before the first
job is created, so that bad input (a vSphere source, a ``kvm`` destination, an unknown
server or destination, a glob that matches no VM) changes nothing. Each VM's job is
then the agent API's backup (``handlers.backup``): the same jobs, locks and events.
``JobCmd.SUBMIT`` is ``definition_commands``' (attached by ``service``).
"""

from __future__ import annotations

import asyncio
import fnmatch
from typing import Any

import msgspec

from virtbackup.contracts.subjects import InventoryCmd, JobCmd
from virtbackup.contracts.v1.common import ServerId, VmName, shown
from virtbackup.contracts.v1.inventory import ServerRef, ServerVms, VmInfo, VmRef
from virtbackup.contracts.v1.jobs import BackupRequest
from virtbackup.contracts.v1.schedules import (
    JobDefinition,
    JobSubmitRequest,
    JobSubmitResult,
    JobTarget,
)
from virtbackup.job_orchestrator.agent_jobs import agent_of
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.runtime import timeouts
from virtbackup.runtime.agent_config import find_destination
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, NotFound, ServiceError, Unavailable

definition_commands: Commands[JobContext] = Commands()
GLOB_CHARS = frozenset("*?[")
SOURCE_FIELDS = frozenset({"type", "server_id"})
VSPHERE_FIELDS = frozenset({"vcenter_url", "username", "password", "datacenter"})
DESTINATION_FIELDS = frozenset({"type", "destination_id"})
OPTION_FIELDS = frozenset({"fresh"})
#: Jobs of one glob created at once (``submit``).
SUBMIT_IN_FLIGHT = 16


def is_glob(pattern: str) -> bool:
    return any(c in GLOB_CHARS for c in pattern)


def _unknown(fields: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(fields) - allowed)
    if extra:
        raise BadRequest(
            f"{where}.{extra[0]}: unknown field (allowed: {', '.join(sorted(allowed))})"
        )


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field}: expected a string, got {shown(value)}")
    return value


def check_source(source: dict[str, Any]) -> str | None:
    """The ``server_id`` a libvirt source names (None when it names none); no source
    (``{}``, ``{"type": null}``), vSphere and any other type are a 400."""
    kind = source.get("type", "libvirt" if "server_id" in source else None)
    if kind == "vsphere" or (kind is None and VSPHERE_FIELDS & set(source)):
        raise BadRequest(
            "source.type: 'vsphere': VirtBackup has no vSphere driver; back up libvirt VMs "
            'with source {"type": "libvirt", "server_id": "<server>"}'
        )
    if kind is None:
        raise BadRequest(
            'source.type is required: give source {"type": "libvirt"} (its "server_id" may be'
            " left out when vm_path starts with the server: '<server>/<vm>')"
        )
    if kind != "libvirt":
        raise BadRequest(f"source.type: {shown(kind)} is not a source type (use 'libvirt')")
    _unknown(source, SOURCE_FIELDS, "source")
    if "server_id" not in source:
        return None
    try:
        return msgspec.convert(source["server_id"], ServerId)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"source.server_id: {exc}") from None


def check_destination(destination: dict[str, Any]) -> str | None:
    """The ``destination_id`` a backup destination names (None: the default one)."""
    kind = destination.get("type", "backup")
    if kind == "kvm":
        raise BadRequest(
            "destination.type: 'kvm' (a migration to another libvirt server) is submitted "
            "as a job (POST /jobs/submit), not as a schedule's job template"
        )
    if kind != "backup":
        raise BadRequest(
            f"destination.type: {shown(kind)} is not a destination type (use 'backup')"
        )
    _unknown(destination, DESTINATION_FIELDS, "destination")
    if destination.get("destination_id") is None:
        return None
    return _text(destination["destination_id"], "destination.destination_id") or None


def check_options(options: dict[str, Any], *, debug: bool) -> bool:
    """``fresh`` (a full backup): a debug mode's option, as the agent API's; outside
    debug mode ``fresh: true`` is a ``BadRequest`` naming ``options.fresh`` rather than
    an option silently ignored (a backup builds on the chain it finds; a full read is
    what a missing or inconsistent checkpoint gives anyway)."""
    _unknown(options, OPTION_FIELDS, "options")
    fresh = options.get("fresh", False)
    if not isinstance(fresh, bool):
        raise BadRequest(f"options.fresh: expected a boolean, got {shown(fresh)}")
    if fresh and not debug:
        raise BadRequest(
            "options.fresh: true is honoured in debug mode only (VIRTBACKUP_DEBUG):"
            " leave it out or false"
        )
    return fresh


def split_path(vm_path: str, server_id: str | None) -> tuple[str, str]:
    """``(server pattern, vm pattern)`` of ``vm_path``; a path without ``/`` is a VM of
    ``source.server_id``. A ``vm_path`` whose server is not ``source.server_id`` is a
    400 (they must agree)."""
    if not vm_path:
        raise BadRequest("vm_path is required ('<server>/<vm>', either part may be a glob)")
    if "/" in vm_path:
        server_pat, vm_pat = vm_path.split("/", 1)
        if server_id is not None and not fnmatch.fnmatchcase(server_id, server_pat):
            raise BadRequest(
                f"vm_path: server {shown(server_pat)} is not source.server_id {shown(server_id)}"
            )
        if server_id is not None:
            server_pat = server_id
    elif server_id is not None:
        server_pat, vm_pat = server_id, vm_path
    else:
        raise BadRequest("vm_path: write it '<server>/<vm>', or give source.server_id")
    if not server_pat or not vm_pat:
        raise BadRequest(f"vm_path: {shown(vm_path)} names no server or no VM")
    if not is_glob(vm_pat):
        try:
            msgspec.convert(vm_pat, VmName)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"vm_path: invalid VM name: {exc}") from None
    return server_pat, vm_pat


async def _vms_of(jc: JobContext, server_id: str, vm_pat: str) -> list[str]:
    """The VMs of the server ``vm_pat`` matches: a glob against the inventory's list, a
    plain name asked of the server itself (a VM defined a moment ago is found). A plain
    name on a remote agent's server is taken as it is: the inventory does not reach that
    host, and the agent fails the job if the VM is not there."""
    if not is_glob(vm_pat) and agent_of(await jc.config(), server_id) is not None:
        return [vm_pat]
    if not is_glob(vm_pat):
        ref = VmRef(server_id=server_id, vm_name=vm_pat)
        try:
            await jc.bus.request(
                InventoryCmd.VM_INFO, ref, VmInfo, timeout=timeouts.INVENTORY_QUERY
            )
        except NotFound:
            return []
        return [vm_pat]
    vms = await jc.bus.request(
        InventoryCmd.VMS,
        ServerRef(server_id=server_id),
        ServerVms,
        timeout=timeouts.INVENTORY_QUERY,
    )
    if not vms.reachable:
        raise Unavailable(f"server {shown(server_id)} is unreachable: {vms.error}")
    return [v.vm.name for v in vms.vms]


async def expand(jc: JobContext, definition: JobDefinition) -> tuple[list[BackupRequest], bool]:
    """The backups a definition asks for (one per VM, sorted) and whether ``vm_path`` is
    a glob. ``BadRequest`` for a field that is wrong, ``NotFound`` for an unknown server
    or destination, a VM that does not exist, or a glob that matches no VM.

    A server backed up by a remote agent (``agentId``) is not the inventory's: named
    exactly, its VM is taken by name without a look-up (a VM glob there is a
    ``BadRequest``); a server glob leaves such servers out."""
    server_id = check_source(definition.source)
    destination_id = check_destination(definition.destination)
    fresh = check_options(definition.options, debug=jc.settings.debug)
    server_pat, vm_pat = split_path(definition.vm_path, server_id)
    cfg = await jc.config()
    dest = find_destination(cfg, destination_id)
    servers = sorted(s.id for s in cfg.servers if fnmatch.fnmatchcase(s.id, server_pat))
    if not servers:
        if is_glob(server_pat):
            raise NotFound(f"vm_path: no configured server matches {shown(server_pat)}")
        raise NotFound(f"server {shown(server_pat)} not found")
    agents = {s.id: s.agent_id for s in cfg.servers if s.agent_id}
    if is_glob(server_pat):
        servers = [s for s in servers if s not in agents]  # their VMs cannot be listed
        if not servers:
            raise NotFound(
                f"vm_path: {shown(server_pat)} matches only servers of remote agents: "
                "name the server"
            )
    elif server_pat in agents:
        # The agent's host is not the inventory's to reach: its VMs are taken by name
        # (as a plan's), and a VM the host lacks fails its job.
        if is_glob(vm_pat):
            raise BadRequest(
                f"vm_path: server {shown(server_pat)} is backed up by remote agent "
                f"{shown(agents[server_pat])}, which the inventory does not reach: name "
                "its VMs one by one, not by a glob"
            )
        request = BackupRequest(
            server_id=server_pat, vm_name=vm_pat, destination_id=dest.id, fresh=fresh
        )
        return [request], False
    listed = await asyncio.gather(*(_vms_of(jc, s, vm_pat) for s in servers))
    requests = [
        BackupRequest(server_id=server, vm_name=name, destination_id=dest.id, fresh=fresh)
        for server, names in zip(servers, listed, strict=True)
        for name in sorted(names)
        if fnmatch.fnmatchcase(name, vm_pat)
    ]
    glob = is_glob(server_pat) or is_glob(vm_pat)
    if not requests:
        if glob:
            raise NotFound(f"vm_path: {shown(definition.vm_path)} matches no VM")
        raise NotFound(f"vm {shown(vm_pat)} not found on server {shown(servers[0])}")
    return requests, glob


async def submit(jc: JobContext, definition: JobDefinition) -> JobSubmitResult:
    """Create one backup job per VM of ``definition`` (see ``expand`` for what is
    refused before anything is created). For a single VM an error creating its job is
    raised (409 when it has a backup running); for a glob such errors are listed in
    ``errors`` and raised only when no job could be created."""
    # Imported here: ``handlers`` is in an import cycle (handlers -> runner -> points ->
    # exports -> handlers) that only an import of ``exports`` first resolves.
    from virtbackup.job_orchestrator.handlers import backup
    from virtbackup.job_orchestrator.migrate import is_migration, submit_migration

    if is_migration(definition):
        return await submit_migration(jc, definition)
    requests, glob = await expand(jc, definition)
    if not glob:
        job = await backup(jc, requests[0])
        targets = [JobTarget(server_id=r.server_id, vm_name=r.vm_name) for r in requests]
        return JobSubmitResult(job_ids=[job.id], targets=targets)
    # A glob's jobs are created SUBMIT_IN_FLIGHT at a time (one after the other, each
    # waiting on several bus round trips, a schedule of a fleet's VMs took minutes).
    gate = asyncio.Semaphore(SUBMIT_IN_FLIGHT)

    async def one(req: BackupRequest) -> str | ServiceError:
        async with gate:
            try:
                return (await backup(jc, req)).id
            except ServiceError as exc:
                return exc

    job_ids: list[str] = []
    errors: list[str] = []
    first: ServiceError | None = None
    made = await asyncio.gather(*(one(req) for req in requests))
    for req, outcome in zip(requests, made, strict=True):
        if isinstance(outcome, str):
            job_ids.append(outcome)
        else:
            first = first or outcome
            errors.append(f"{req.server_id}/{req.vm_name}: {outcome}")
    if not job_ids and first is not None:
        raise first
    targets = [JobTarget(server_id=r.server_id, vm_name=r.vm_name) for r in requests]
    return JobSubmitResult(job_ids=job_ids, targets=targets, errors=errors)


@definition_commands.handler(JobCmd.SUBMIT, JobSubmitRequest)
async def submit_definition(jc: JobContext, req: JobSubmitRequest) -> JobSubmitResult:
    """``POST /jobs/submit``: check and expand a definition, then create its jobs."""
    return await submit(jc, req.definition)
