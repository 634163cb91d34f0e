"""A migrating VM's state files (UEFI NVRAM, writable loaders, TPM state), moved at the
cut-over with the helpers of backups and restores (``state_files``): the inventory
copies the source's state aside (``STATE_SNAPSHOT``, taken while the VM is stopped, so
it is final), the copies are read over the bus, built on the target beside where the
defined domain keeps each role (``STATE_PREPARE``, ``STATE_WRITE``) and moved into
place by the target's ``RESTORE_FINISH`` with the disks (or removed with them).
"""

from __future__ import annotations

import logging

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import Ok
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.state import (
    MAX_PIECE,
    StagedState,
    StatePrepared,
    StatePrepareRequest,
    StateWriteRequest,
)
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.state_files import read_state_file, source_state
from virtbackup.runtime import timeouts

log = logging.getLogger(__name__)


async def move_state(
    jc: JobContext,
    job: Job,
    target: str,
    domain_xml: str,
    vm_name: str,
    uuid: str,
    into: list[StagedState],
) -> StatePrepared | None:
    """Copy the source VM's state files (``job.server_id``, ``job.vm_name``) to server
    ``target``, staged for ``domain_xml`` as the target will define it (``vm_name``,
    ``uuid``: see ``StatePrepareRequest``); what was staged is appended to ``into`` as
    soon as it exists (the caller's ``RESTORE_FINISH`` moves or removes it). ``None``
    for a VM without state files. Raises what the inventory answers."""
    async with source_state(jc, job) as snap:
        if not snap.files:
            return None
        contents = {(f.role, f.relative): await read_state_file(jc, job, f) for f in snap.files}
        prepared = await jc.bus.request(
            InventoryCmd.STATE_PREPARE,
            StatePrepareRequest(
                server_id=target, job_id=job.id, domain_xml=domain_xml, files=snap.files,
                vm_name=vm_name, uuid=uuid,
            ),
            StatePrepared,
            timeout=timeouts.INVENTORY_JOB_STEP,
        )  # fmt: skip
        into.extend(prepared.staged)
        temps = {s.role: s.temp_path for s in prepared.staged}
        for f in snap.files:
            if f.kind != "file" or f.role not in temps:
                continue
            path = f"{temps[f.role]}/{f.relative}" if f.relative else temps[f.role]
            data = contents[(f.role, f.relative)]
            for offset in range(0, len(data), MAX_PIECE):
                write = StateWriteRequest(
                    server_id=target, job_id=job.id, path=path, offset=offset,
                    data=bytes(data[offset : offset + MAX_PIECE]),
                )  # fmt: skip
                await jc.bus.request(
                    InventoryCmd.STATE_WRITE, write, Ok, timeout=timeouts.INVENTORY_QUERY
                )
        return prepared
