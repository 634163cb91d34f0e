"""Submitting a backup to several destinations: the extra destinations are checked and
their VM folders locked (as a backup locks its own) before the job exists."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.config import AgentConfig
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import point_folder_lock
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.errors import BadRequest


def check_also_destinations(cfg: AgentConfig, own: str, also: list[str]) -> list[str]:
    """``also`` (``alsoDestinationIds``) as given, once checked: ``BadRequest`` naming
    ``alsoDestinationIds`` for an id no destination has, one given twice, or the
    backup's own destination."""
    known = {d.id: d for d in cfg.destinations}
    seen: set[str] = set()
    for dest in also:
        if dest not in known:
            raise BadRequest(f"alsoDestinationIds: no destination {shown(dest)}")
        if dest == own:
            raise BadRequest(f"alsoDestinationIds: {shown(dest)} is the backup's own destination")
        if dest in seen:
            raise BadRequest(f"alsoDestinationIds: {shown(dest)} is given twice")
        if not known[dest].enabled:
            raise BadRequest(f"alsoDestinationIds: destination {shown(dest)} is disabled")
        seen.add(dest)
    return list(also)


@contextlib.asynccontextmanager
async def also_folders(jc: JobContext, vm_name: str, also: list[str]) -> AsyncIterator[str]:
    """A new job id holding the VM's folder lock in each of ``also`` (``Conflict``
    naming the job that writes one of them). If the body fails (the submit was
    refused), the locks are released; else the job's ``finish`` releases them."""
    job_id = new_id()
    taken: list[tuple[str, str]] = []
    try:
        for dest in also:
            folder = point_folder_lock("backup", dest, vm_name)
            assert folder is not None
            what = f"the folder of vm {vm_name} in destination {dest}"
            await jc.locks.acquire(*folder, job_id, "backup", what=what)
            taken.append(folder)
        yield job_id
    except BaseException:
        for folder in taken:
            await jc.locks.release(*folder, job_id)
        raise
