"""Per-VM locks in ``VB_LOCKS``: one backup or restore of a VM at a time, across replicas.

A lock's value names the job holding it. The lock is valid exactly while that job is
active, so a holder that dies never leaves a VM locked for good: once its job has
ended (or been taken over and failed), the next ``acquire`` replaces the stale lock by
compare-and-swap. Locks are taken before the job record is written; a lock naming a
job that does not exist yet is honoured for ``ORPHAN_GRACE`` seconds.

A lock may also be held by a short *operation* that is no job (a restore point's
``PATCH`` or delete, ``operation=True``): a refusal then says that another change is in
progress (``Busy``), never naming the operation's id as if it were a job's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import vm_lock_key
from virtbackup.contracts.v1.jobs import ACTIVE_STATES, Job
from virtbackup.repository.format import vm_segment
from virtbackup.runtime.errors import Conflict, NotFound

#: Seconds a lock whose job record is missing still counts (the record follows the lock).
ORPHAN_GRACE = 30.0


class LockRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    job_id: str
    job_type: str
    taken_at: float
    #: Held by an operation that is no job (``job_id`` is then no job's id).
    operation: bool = False


class Busy(Conflict):
    """409: an operation that is no job (a change of restore points) holds the lock;
    it ends within moments, so a retry helps."""


def lock_key(server_id: str, vm_name: str) -> str:
    """``vm.<server>.<vm>``, each part base64url so that any VM name is a valid key
    (``buckets.vm_lock_key``: the inventory reads the locks too)."""
    return vm_lock_key(server_id, vm_name)


def point_folder_lock(
    job_type: str, destination_id: str | None, vm_name: str | None
) -> tuple[str, str] | None:
    """The second lock a backup takes: its VM's folder in the destination
    (``("@<destination>", <folder, case-folded>)``, in the same bucket as the VM locks),
    or ``None`` for other jobs.

    Two servers may each have a VM of one name, and a case-insensitive destination keeps
    ``Web1`` and ``web1`` in one folder: backups of such VMs to one destination would
    each pick the same free timestamp (``Repository.new_timestamp``), and the second
    commit would replace the first point's record. They take turns instead (409 naming
    the running job, like a second backup of one VM)."""
    if job_type != "backup" or not destination_id or not vm_name:
        return None
    try:
        return f"@{destination_id}", vm_segment(vm_name).casefold()
    except ValueError:  # a name no repository key can hold: refused before any job
        return None


JobLookup = Callable[[str], Awaitable[Job | None]]


class VmLocks:
    def __init__(self, kv: KeyValue, lookup: JobLookup) -> None:
        self.kv = kv
        self.lookup = lookup

    async def acquire(
        self,
        server_id: str,
        vm_name: str,
        job_id: str,
        job_type: str,
        *,
        what: str = "",
        operation: bool = False,
    ) -> None:
        """Take the VM's lock for ``job_id`` (an operation's id when ``operation``);
        ``Conflict`` naming the job that holds it (and ``what`` is locked, default
        ``vm <vm_name>``), ``Busy`` when an operation holds it."""
        what = what or f"vm {vm_name}"
        key = lock_key(server_id, vm_name)
        mine = msgspec.json.encode(
            LockRecord(job_id=job_id, job_type=job_type, taken_at=time.time(), operation=operation)
        )
        for _ in range(10):
            try:
                await self.kv.create(key, mine)
                return
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue  # released meanwhile
            if entry.value is None:
                continue
            holder = msgspec.json.decode(entry.value, type=LockRecord)
            if holder.operation:
                if time.time() - holder.taken_at < ORPHAN_GRACE:
                    raise Busy(f"another change to {what} is in progress: retry in a moment")
                try:  # its instance died holding it
                    await self.kv.update(key, mine, last=entry.revision)
                    return
                except KeyWrongLastSequenceError:
                    continue
            job = await self.lookup(holder.job_id)
            if job is not None and job.state in ACTIVE_STATES:
                raise Conflict(
                    f"{what} has a {job.type} job running ({job.id}): "
                    "wait for it to end or cancel it"
                )
            if job is None and time.time() - holder.taken_at < ORPHAN_GRACE:
                raise Conflict(f"{what} has a {holder.job_type} job starting ({holder.job_id})")
            try:
                await self.kv.update(key, mine, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise Conflict(f"{what}: too many jobs racing for it, try again")

    async def release(self, server_id: str, vm_name: str, job_id: str) -> None:
        """Drop the lock if ``job_id`` still holds it (a stale holder never drops another's)."""
        key = lock_key(server_id, vm_name)
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return
        if entry.value is None:
            return
        if msgspec.json.decode(entry.value, type=LockRecord).job_id != job_id:
            return
        # Replaced meanwhile: JetStream refuses the conditional delete (a bad request).
        with contextlib.suppress(KeyWrongLastSequenceError, APIError):
            await self.kv.delete(key, last=entry.revision)

    async def holds(self, server_id: str, vm_name: str, job_id: str) -> bool:
        """Whether the VM's lock names ``job_id`` now."""
        try:
            entry = await self.kv.get(lock_key(server_id, vm_name))
        except KeyNotFoundError:
            return False
        if entry.value is None:
            return False
        return msgspec.json.decode(entry.value, type=LockRecord).job_id == job_id


async def lookup_in(get: Callable[[str], Awaitable[tuple[Job, int]]], job_id: str) -> Job | None:
    """Adapter: a ``JobStore.get`` that answers ``None`` for a missing job."""
    try:
        return (await get(job_id))[0]
    except NotFound:
        return None
