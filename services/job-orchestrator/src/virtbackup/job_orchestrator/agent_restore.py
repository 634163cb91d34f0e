"""Restores onto a remote agent's host (a server whose configuration names an
``agentId``).

The inventory does not reach such a host, so the restore is checked here with what can
be known without it, queued for the agent like its backups (``params.agentId``, leased
through ``JobCmd.AGENT_LEASE`` with the restore's choices in ``params``) and run by the
agent itself (``virtbackup agent``, ``cli/agent/restore.py``), which plans the
placement on its host with the inventory's rules (``virtbackup.virt.placement``) and
reports ``reading``, ``writing``, ``committing`` and its outcome; the job waits for
those reports as a backup does (``agent_jobs.run_agent_backup``).

Checked when the restore is asked for (nothing is queued otherwise): the destination is
one of the server's ``agentDestinationIds`` (400 naming ``destinationId``), the point's
record agrees with its sealed domain XML and manifests (409), ``targetDirectory`` and
``storagePool`` are not both given and ``targetDirectory`` is an absolute path inside
the server's ``restoreDirectories`` when it names some (400 naming ``targetDirectory``),
and, by the VMs the agent's last heartbeat reported (``host_domains``, added by the
gateway), the VM to ``overwrite`` is not running and a ``vmName`` that exists is only
replaced by ``overwrite`` (409s, as on the bus path). The agent checks all of it again on
its host, symbolic links resolved, with what only the host can tell (another VM's disks
or state where the restore would write, the host's pools when ``restoreDirectories`` is
not set): the job then fails naming why, having changed nothing.
"""

from __future__ import annotations

import posixpath
from typing import Any

from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.jobs import PrecheckResult
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.restore import restore_disks, target_name
from virtbackup.repository.records import RestorePoint
from virtbackup.runtime.errors import BadRequest, Conflict

#: What of a restore job's ``params`` its agent gets in the lease.
LEASED_PARAMS = ("xmlPath", "decision", "vmName", "targetDirectory", "storagePool", "start")


def leased_params(job_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """The restore's choices for its agent (empty for any other job)."""
    if job_type != "restore":
        return {}
    return {k: params[k] for k in LEASED_PARAMS if k in params}


def check_placement(server: Server, params: dict[str, Any]) -> None:
    """``BadRequest`` naming ``targetDirectory`` or ``storagePool`` for a placement the
    agent would refuse whatever its host holds (see the module docstring)."""
    wanted = params.get("targetDirectory") or ""
    if wanted and params.get("storagePool"):
        raise BadRequest("give targetDirectory or storagePool, not both")
    if not wanted:
        return
    if not wanted.startswith("/") or ".." in wanted.split("/"):
        raise BadRequest(f"targetDirectory {wanted!r} must be an absolute path without '..'")
    if server.restore_directories is None:
        return  # the host's pools decide: its agent checks
    normal = posixpath.normpath(wanted)
    allowed = [posixpath.normpath(d) for d in server.restore_directories]
    if not any(normal == d or normal.startswith(d.rstrip("/") + "/") for d in allowed):
        raise BadRequest(
            f"targetDirectory {wanted!r} is outside the directories restores may write to on "
            f"server {server.id} ({', '.join(allowed) or 'none'}); add it to the server's "
            "restoreDirectories"
        )


def check_host_domains(
    server: Server,
    point: RestorePoint,
    params: dict[str, Any],
    host_domains: dict[str, str],
    *,
    refuse: bool = True,
) -> tuple[bool, bool]:
    """Whether the VM the restore defines exists and runs on the agent's host, as its last
    heartbeat said (``host_domains``: name -> power state). With ``refuse`` (a restore,
    not a precheck), ``Conflict`` as on the bus path (``restore.plan_restore``): a
    ``vmName`` that exists when the decision is not ``overwrite``, a running VM to
    ``overwrite``."""
    name = target_name(point, params)
    state = host_domains.get(name)
    exists, running = state is not None, state not in (None, "", "shutoff")
    if not refuse:
        return exists, running
    decision = params["decision"]
    if params.get("vmName") and exists and decision != "overwrite":
        raise Conflict(
            f"vm {name} already exists on server {server.id}: restore with decision "
            "overwrite to replace it (it must be shut off), or choose another vmName"
        )
    if decision == "overwrite" and running:
        raise Conflict(f"vm {name} is running: shut it off before overwriting it")
    return exists, running


async def check_agent_restore(
    jc: JobContext,
    server: Server,
    destination_id: str,
    point: RestorePoint,
    params: dict[str, Any],
    host_domains: dict[str, str] | None = None,
    *,
    precheck: bool = False,
) -> tuple[bool, bool]:
    """Check a restore onto an agent's host before it is queued (see the module
    docstring): ``BadRequest`` naming ``destinationId``, ``targetDirectory`` or
    ``storagePool``; ``Conflict`` for a record that disagrees with the point's sealed
    data and, given the VMs of the agent's last heartbeat (``host_domains``), as
    :func:`check_host_domains` (not for a ``precheck``); the destination's own errors.
    Returns whether the VM exists and runs, as far as that heartbeat tells."""
    if destination_id not in server.agent_destination_ids:
        raise BadRequest(
            f"destinationId: destination {destination_id} is not allowed for agent "
            f"{server.agent_id} (add it to agentDestinationIds of server {server.id})"
        )
    check_placement(server, params)
    repo = await jc.repository(destination_id, create=False)
    try:
        domain_xml = await repo.domain_xml(point)
        manifests = [await repo.manifest(point, d.target) for d in point.disks]
    finally:
        await repo.close()
    restore_disks(point, domain_xml, manifests)
    return check_host_domains(server, point, params, host_domains or {}, refuse=not precheck)


def agent_precheck(server: Server, exists: bool, running: bool) -> PrecheckResult:
    """What a precheck can say of an agent's host without reaching it: whether the VM
    exists and runs as its last heartbeat said; not whether defining alone would do
    (the disks on the host are checked by the agent when the restore runs)."""
    return PrecheckResult(
        vm_exists=exists,
        can_define_only=False,
        vm_running=running,
        problems=[
            f"server {server.id} is reached only by remote agent {server.agent_id}: the "
            "disks on its host are checked by the agent when the restore runs"
        ],
    )
