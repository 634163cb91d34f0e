"""A migration's ``options.remove_source`` (and ``remove_source_disks``): the source VM
removed once the migration has succeeded.

Only after the cut-over: the VM is defined on the target, and running there when
``startOnTarget`` (asked again of the target's inventory, not taken from the migration's
own record), and the source is shut off. Then the source's inventory undefines it
(``vm-remove``: checkpoint, snapshot and managed-save metadata, NVRAM, TPM state) and,
with ``removeSourceDisks``, deletes its images (``VmRemoveRequest``: only what is the
VM's alone). A removal that fails or is not attempted does not fail the migration (the
VM runs on the target): the job's message and ``result.sourceRemoval`` say what
happened.
"""

from __future__ import annotations

from typing import Any

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import VmInfo, VmRef, VmRemoved, VmRemoveRequest
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import ServiceError


async def power_state(jc: JobContext, server: str, vm: str) -> str:
    """The power state (libvirt's, e.g. ``running``, ``shutoff``) of ``vm`` on ``server``."""
    info = await jc.bus.request(
        InventoryCmd.VM_INFO, VmRef(server_id=server, vm_name=vm), VmInfo,
        timeout=timeouts.INVENTORY_QUERY,
    )  # fmt: skip
    return info.power_state


async def remove_source(
    jc: JobContext,
    job_id: str,
    source: tuple[str, str, str],
    target: tuple[str, str],
    *,
    started: bool,
    disks: bool,
) -> tuple[dict[str, Any], str]:
    """Remove the source VM ``source`` (server, name, UUID) of migration ``job_id`` once
    ``target`` (server, name) is confirmed: running there if ``started``, else defined.
    Returns ``(result.sourceRemoval, a line for the job's message)``; never raises a
    ``ServiceError`` (what failed is in both). ``sourceRemoval``: ``undefined`` (bool),
    ``removedDisks`` and ``keptDisks`` (``<path>: <why>``) and, when it was not done,
    ``error``."""
    server, vm, uuid = source
    outcome: dict[str, Any] = {"undefined": False, "removedDisks": [], "keptDisks": []}
    try:
        state = await power_state(jc, *target)
    except ServiceError as exc:
        state = f"unknown ({exc.message})"
    if state != ("running" if started else "shutoff"):
        outcome["error"] = f"vm {target[1]} on server {target[0]} is {state}"
        return outcome, (
            f"the source vm {vm} was kept on server {server}: the target could not be "
            f"confirmed ({outcome['error']})"
        )
    try:
        source_state = await power_state(jc, server, vm)
        if source_state != "shutoff":
            raise _Kept(f"it is {source_state}")
        request = VmRemoveRequest(
            server_id=server, vm_name=vm, job_id=job_id, uuid=uuid, remove_disks=disks
        )
        removed = await jc.bus.request(
            InventoryCmd.VM_REMOVE, request, VmRemoved, timeout=timeouts.INVENTORY_JOB_STEP
        )
    except (ServiceError, _Kept) as exc:
        outcome["error"] = getattr(exc, "message", None) or str(exc)
        return outcome, f"the source vm {vm} could NOT be removed: {outcome['error']}"
    outcome.update(undefined=True, removedDisks=removed.removed, keptDisks=removed.kept)
    line = f"the source vm {vm} was undefined on server {server}"
    if disks:
        line += f", {len(removed.removed)} disk image(s) deleted"
        if removed.kept:
            line += f" ({len(removed.kept)} kept: {'; '.join(removed.kept)})"
    return outcome, line


class _Kept(Exception):
    """The source is not in a state to be removed."""
