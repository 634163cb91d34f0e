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
the server's ``restoreDirectories`` when it names some (400 naming ``targetDirectory``).
The agent checks again on its host, symbolic links resolved, and what only the host
can tell (a running VM for ``overwrite``, a name that exists, another VM's disks or
state where the restore would write, the host's pools when ``restoreDirectories`` is
not set): the job then fails naming why, having changed nothing.
"""

from __future__ import annotations

import posixpath
from typing import Any

from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.jobs import PrecheckResult
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.restore import restore_disks
from virtbackup.repository.records import RestorePoint
from virtbackup.runtime.errors import BadRequest

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


async def check_agent_restore(
    jc: JobContext, server: Server, destination_id: str, point: RestorePoint, params: dict[str, Any]
) -> None:
    """Check a restore onto an agent's host before it is queued (see the module
    docstring): ``BadRequest`` naming ``destinationId``, ``targetDirectory`` or
    ``storagePool``; ``Conflict`` for a record that disagrees with the point's sealed
    data; the destination's own errors."""
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


def agent_precheck(server: Server) -> PrecheckResult:
    """What a precheck can say of an agent's host without reaching it: nothing of its
    VMs (its agent checks when the restore runs)."""
    return PrecheckResult(
        vm_exists=False,
        can_define_only=False,
        vm_running=False,
        problems=[
            f"server {server.id} is reached only by remote agent {server.agent_id}: whether "
            "the VM exists or runs, and the disks on the host, are checked by the agent when "
            "the restore runs"
        ],
    )
