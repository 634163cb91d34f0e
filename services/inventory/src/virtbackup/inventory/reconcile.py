"""Ending the libvirt backup jobs nobody will end, when the inventory starts.

An inventory killed mid-backup (or an orchestrator that could not reach it to end a
backup) leaves the domain's libvirt backup job, its NBD export and its scratch files
behind, and every later backup of the VM fails ("already has a backup job"); an offline
backup (:mod:`.backups`) also leaves its shut-off VM running paused. When the inventory
connects to a server it looks at every domain with a backup job, and at every paused
domain tagged as started by an offline backup:

* tagged by this installation (:mod:`.ownership`) for a job that ``VB_JOBS`` lists as
  queued or running: left alone, the orchestrator running the job ends it;
* tagged by this installation for a job that ended or that ``VB_JOBS`` does not know:
  ended, and its new checkpoint dropped unless the job succeeded (a restore point was
  committed with it, so the next incremental starts from it); a domain an offline
  backup started is shut off again if it is still paused;
* tagged by another installation, or by an inventory from before installations were
  named: left alone (job ids mean something only in their own ``VB_JOBS``);
* untagged, with scratch files of VirtBackup's in this inventory's scratch folder (the
  inventory died between the begin and the tag): ended if it is still untagged after
  ``grace`` seconds (a begin in progress tags its job within milliseconds). Other
  untagged jobs were begun by someone else: they show as leftovers (``hasOverlay``) and
  ``cleanup`` removes them on request.

The ``qemu-nbd`` exports of a migration's last delta (:mod:`.bitmap_exports`) and
those restores write to (:mod:`.restore_leftovers`, with their temporary images) are
stopped by the same rule: those of this installation whose job is not active. Restore
exports of jobs still active are looked at again until their jobs have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import vm_lock_key
from virtbackup.contracts.v1.inventory import BackupEndRequest
from virtbackup.contracts.v1.jobs import ACTIVE_STATES
from virtbackup.inventory import backups, bitmap_exports, ownership, restore_leftovers
from virtbackup.inventory.hosts import HostServer
from virtbackup.runtime.errors import Conflict
from virtbackup.virt import Connection, current_backup, end_backup, job_info, list_domains
from virtbackup.virt.domains import PowerState
from virtbackup.virt.errors import NotFound as VirtNotFound

log = logging.getLogger(__name__)

#: Seconds an untagged backup job of ours must stay untagged before it is ended.
UNTAGGED_GRACE = 10.0
#: Seconds a VM lock whose job has no record yet counts (the orchestrator's
#: ``locks.ORPHAN_GRACE``: the lock is taken before the job record is written).
LOCK_ORPHAN_GRACE = 30.0


class _Lock(msgspec.Struct, rename="camel"):
    """What a ``VB_LOCKS`` entry says (``buckets.vm_lock_key``)."""

    job_id: str
    job_type: str = "backup"
    taken_at: float = 0.0


_LEFTOVERS = "cleanup is for what ended jobs leave behind: cancel the job or wait for it to end"


async def check_no_job_holds(
    server: HostServer,
    vm_name: str,
    jobs: KeyValue,
    locks: KeyValue,
    installation: str,
    holder: str = "",
) -> None:
    """Refuse (Conflict naming the job) to clean up a VM that a job of this installation
    holds now: its backup (live or offline: the domain's tag names a job that ``VB_JOBS``
    lists as queued or running) or its restore or backup in any phase (the VM's lock in
    ``VB_LOCKS`` names such a job, or one that is being created). What a backup of
    another installation, or a job that ended, left behind is a leftover: not refused.
    Raises VirtError when libvirt cannot be asked (NotFound for an unknown VM).
    ``holder``: the job asking (a migration dropping its own checkpoints) is no hold."""
    conn = await server.connection()
    found = await ownership.read_tag(conn, vm_name)
    if (
        found is not None
        and found.job_id
        and found.installation == installation
        and found.job_id != (holder or None)
    ):
        state = await ownership.job_state(jobs, found.job_id)
        if state in ACTIVE_STATES:
            kind = "an offline backup" if found.offline else "a backup"
            raise Conflict(
                f"vm {vm_name} is held by {kind} running (job {found.job_id}): {_LEFTOVERS}"
            )
    try:
        entry = await locks.get(vm_lock_key(server.id, vm_name))
    except KeyNotFoundError:
        return
    if entry.value is None:
        return
    try:
        lock = msgspec.json.decode(entry.value, type=_Lock)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("the lock of vm %s on %s cannot be read", vm_name, server.id)
        return
    if holder and lock.job_id == holder:
        return
    state = await ownership.job_state(jobs, lock.job_id)
    if state in ACTIVE_STATES:
        raise Conflict(
            f"vm {vm_name} has a {lock.job_type} job running ({lock.job_id}): {_LEFTOVERS}"
        )
    if state is None and time.time() - lock.taken_at < LOCK_ORPHAN_GRACE:
        raise Conflict(
            f"vm {vm_name} has a {lock.job_type} job starting ({lock.job_id}): {_LEFTOVERS}"
        )


async def _backup_job_running(conn: Connection, name: str) -> bool:
    info = await job_info(conn, name)
    return info is not None and info.is_backup


async def _ours_untagged(conn: Connection, name: str, scratch_dir: str) -> bool:
    """Whether the domain's backup job is untagged and keeps its scratch files in
    ``scratch_dir`` under VirtBackup's names."""
    if await ownership.read_tag(conn, name) is not None:
        return False
    job = await current_backup(conn, name)
    if job is None:
        return False
    prefix = os.path.join(scratch_dir, "vb-")
    scratch = [e.scratch for e in job.exports]
    return bool(scratch) and all(s is not None and s.startswith(prefix) for s in scratch)


async def reconcile(
    server: HostServer,
    jobs: KeyValue,
    installation: str,
    scratch_dir: str,
    *,
    grace: float = UNTAGGED_GRACE,
) -> list[str]:
    """End the backup jobs on ``server`` that nobody will end (see the module docstring);
    returns what was done, one line per domain. A domain that fails is logged and
    skipped. Raises Unavailable or VirtError when the server cannot be reached."""
    conn = await server.connection()
    done: list[str] = []
    suspects: list[str] = []
    for dom in await list_domains(conn):
        name = dom.name
        try:
            job_running = await _backup_job_running(conn, name)
            if not job_running and dom.power_state != PowerState.PAUSED:
                continue
            found = await ownership.read_tag(conn, name)
            if found is None:
                if job_running and await _ours_untagged(conn, name, scratch_dir):
                    suspects.append(name)
                continue
            if found.installation != installation or not (job_running or found.offline):
                continue
            state = await ownership.job_state(jobs, found.job_id) if found.job_id else None
            if state in ACTIVE_STATES:
                continue
            success = state == "success"
            await backups.end(
                server,
                BackupEndRequest(
                    server_id=server.id,
                    vm_name=name,
                    checkpoint=found.checkpoint or None,
                    success=success,
                ),
                scratch_dir,
            )
            kept = "kept" if success else "dropped"
            what = f"job {found.job_id} ({state or 'unknown'})" if found.job_id else "no job"
            ended = "ended the backup job" if job_running else "ended the offline backup"
            off = "; shut off again if still paused" if found.offline else ""
            done.append(f"{name}: {ended} of {what}; checkpoint {found.checkpoint} {kept}{off}")
        except VirtNotFound:
            continue
        except Exception:
            log.exception("reconciling the backup job of %s on %s failed", name, server.id)
    if suspects:
        await asyncio.sleep(grace)
        host = await server.host()
        for name in suspects:
            try:
                if not await _ours_untagged(conn, name, scratch_dir):
                    continue
                with contextlib.suppress(VirtNotFound):
                    await end_backup(conn, name, host=host)
                done.append(f"{name}: ended an untagged backup job of VirtBackup's")
            except Exception:
                log.exception("ending the untagged backup job of %s on %s failed", name, server.id)
    try:
        done += await bitmap_exports.reconcile(server, jobs, installation)
    except Exception:
        log.exception("stopping the bitmap exports nobody will stop on %s failed", server.id)
    pending: set[str] = set()
    try:
        lines, pending = await restore_leftovers.reconcile(server, jobs, installation)
        done += lines
    except Exception:
        log.exception("stopping the restore exports nobody will stop on %s failed", server.id)
    for line in done:
        log.warning("server %s: %s", server.id, line)
    if pending:  # their jobs' own ends may still miss them: looked at until they end
        done += await restore_leftovers.follow(server, jobs, installation, pending)
    return done
