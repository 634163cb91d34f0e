"""A VM's state files (UEFI NVRAM, writable loaders, TPM state) in backups and restores.

Backup (:func:`capture`, right after the libvirt backup job began): the inventory copies
the state the domain references aside on the host, the copies are read in pieces over
the bus and stored as repository chunks (content-addressed, compressed, encrypted like a
disk's), and the point's ``files`` list names them; the chunks are durable before the
point's ``backup.json`` is written, so a listed point holds its state.

Restore (:func:`stage`): the inventory builds each saved role's state beside where the
domain XML being defined keeps it, under a temporary name, and the chunks are written
into it; the restore's ``RESTORE_FINISH`` moves it into place with the disks, before the
domain is defined (or removes it). A point without ``files`` (made before they were
backed up) restores as before, and leaves the state on the host as it is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import Ok
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.state import (
    MAX_PIECE,
    StagedState,
    StateFile,
    StatePiece,
    StatePrepared,
    StatePrepareRequest,
    StateReadRequest,
    StateReleaseRequest,
    StateSnapshot,
    StateSnapshotRequest,
    StateWriteRequest,
)
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.repository.records import RestorePoint, StateFileRecord
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import ServiceError
from virtbackup.storage.errors import StorageError

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def source_state(jc: JobContext, job: Job) -> AsyncIterator[StateSnapshot]:
    """The state files of the job's VM (``job.server_id``, ``job.vm_name``) copied aside
    on its host as they are now (the inventory's ``STATE_SNAPSHOT``), for as long as the
    block runs; the copies are removed after it (a failure to is logged). Raises what
    the inventory answers."""
    assert job.server_id and job.vm_name
    snap = await jc.bus.request(
        InventoryCmd.STATE_SNAPSHOT,
        StateSnapshotRequest(server_id=job.server_id, vm_name=job.vm_name, job_id=job.id),
        StateSnapshot,
        timeout=timeouts.INVENTORY_JOB_STEP,
    )
    try:
        yield snap
    finally:
        release = StateReleaseRequest(server_id=job.server_id, job_id=job.id)
        try:
            await jc.bus.request(
                InventoryCmd.STATE_RELEASE, release, Ok, timeout=timeouts.INVENTORY_QUERY
            )
        except ServiceError as exc:
            log.warning("removing the state copies of job %s: %s", job.id, exc)


async def capture(jc: JobContext, job: Job, repo: Repository) -> list[StateFileRecord]:
    """The VM's state files as they are now, stored in ``repo``; empty for a VM without
    any. Raises what the inventory answers (the backup then fails: a point must not
    silently lack the state) or the repository's errors."""
    async with source_state(jc, job) as snap:
        if snap.files:
            await jc.message(job.id, f"saving {_roles(snap.files)}")
        return [await _store(jc, job, repo, f) for f in snap.files]


async def capture_into(
    jc: JobContext, job: Job, repos: dict[str, Repository]
) -> tuple[dict[str, list[StateFileRecord]], dict[str, str]]:
    """:func:`capture` for a backup to several destinations: the state files are read
    from the host once and stored in each repository. Returns each destination's
    records, and the destinations whose repository failed (destination -> error: they
    commit nothing); raises what the inventory answers."""
    records: dict[str, list[StateFileRecord]] = {d: [] for d in repos}
    failed: dict[str, str] = {}
    async with source_state(jc, job) as snap:
        if snap.files:
            await jc.message(job.id, f"saving {_roles(snap.files)}")
        for f in snap.files:
            data = await read_state_file(jc, job, f)
            for dest, repo in repos.items():
                if dest in failed:
                    continue
                try:
                    records[dest].append(await _record(repo, f, data))
                except (StorageError, RepositoryError) as exc:
                    failed[dest] = f"storing the VM's state files: {exc}"
        return records, failed


def _roles(files: list[StateFile]) -> str:
    return _names([f.role for f in files])


async def _store(jc: JobContext, job: Job, repo: Repository, f: StateFile) -> StateFileRecord:
    return await _record(repo, f, await read_state_file(jc, job, f))


async def read_state_file(jc: JobContext, job: Job, f: StateFile) -> bytearray:
    """The content of state file ``f`` (empty for a directory), read over the bus."""
    assert job.server_id
    data = bytearray()
    while f.kind == "file" and len(data) < f.size:
        want = min(MAX_PIECE, f.size - len(data))
        piece = await jc.bus.request(
            InventoryCmd.STATE_READ,
            StateReadRequest(
                server_id=job.server_id, job_id=job.id, path=f.source, offset=len(data),
                length=want,
            ),
            StatePiece,
            timeout=timeouts.INVENTORY_QUERY,
        )  # fmt: skip
        if len(piece.data) != want:
            raise ServiceError(f"{f.path}: read {len(piece.data)} bytes at {len(data)}, not {want}")
        data += piece.data
    return data


async def _record(repo: Repository, f: StateFile, data: bytearray) -> StateFileRecord:
    """``f`` with ``data`` stored as chunks of ``repo``."""
    return StateFileRecord(
        role=f.role,
        path=f.path,
        relative=f.relative,
        kind=f.kind,
        size=len(data),
        mode=f"{f.mode & 0o7777:04o}",
        owner=f.owner,
        group=f.group,
        chunks=await repo.store_bytes(data) if f.kind == "file" else [],
    )


async def stage(
    jc: JobContext,
    job: Job,
    repo: Repository,
    point: RestorePoint,
    domain_xml: str,
    into: list[StagedState],
    vm_name: str = "",
    *,
    uuid: str = "",
    only_missing: bool = False,
) -> StatePrepared | None:
    """Build the point's state files where ``domain_xml`` (the saved XML, as the restore
    defines it under ``vm_name`` with ``uuid``: see ``StatePrepareRequest``) keeps each
    role, under temporary names, and append what was built to ``into`` (as soon as it
    exists, so that the caller's finish removes it whatever fails later). With
    ``only_missing``, roles whose place holds state are left as they are. Returns the
    inventory's answer (what was built, skipped and kept); ``None`` for a point without
    files (nothing done)."""
    assert job.server_id
    if not point.files:
        return None
    prepared = await jc.bus.request(
        InventoryCmd.STATE_PREPARE,
        StatePrepareRequest(
            server_id=job.server_id,
            job_id=job.id,
            domain_xml=domain_xml,
            files=[_wire(r) for r in point.files],
            vm_name=vm_name,
            uuid=uuid,
            only_missing=only_missing,
        ),
        StatePrepared,
        timeout=timeouts.INVENTORY_JOB_STEP,
    )
    into.extend(prepared.staged)
    if prepared.skipped:
        skipped = ", ".join(prepared.skipped)
        await jc.message(job.id, f"not restored (the domain has no place for it): {skipped}")
    temps = {s.role: s.temp_path for s in prepared.staged}
    if temps:
        await jc.message(job.id, "writing the VM's state files")
    for record in point.files:
        if record.kind != "file" or record.role not in temps:
            continue
        base = temps[record.role]
        path = f"{base}/{record.relative}" if record.relative else base
        data = await repo.load_bytes(record.chunks, record.size)
        for offset in range(0, len(data), MAX_PIECE):
            write = StateWriteRequest(
                server_id=job.server_id, job_id=job.id, path=path, offset=offset,
                data=data[offset : offset + MAX_PIECE],
            )  # fmt: skip
            await jc.bus.request(
                InventoryCmd.STATE_WRITE, write, Ok, timeout=timeouts.INVENTORY_QUERY
            )
    return prepared


def state_summary(prepared: StatePrepared | None) -> str:
    """What a restore did with the point's state files, for the job's message (``""``
    when the point holds none): ``state put back: the UEFI variable store; left as it
    was: the TPM state``."""
    if prepared is None:
        return ""
    parts = []
    if prepared.staged:
        parts.append("state put back: " + _names([s.role for s in prepared.staged]))
    if prepared.kept:
        parts.append("left as it was (already there): " + _names(prepared.kept))
    if prepared.skipped:
        parts.append("not put back (the domain has no place for it): " + _names(prepared.skipped))
    return "; ".join(parts)


def _names(roles: list[str]) -> str:
    names = {"nvram": "the UEFI variable store", "loader": "the writable firmware"}
    unique = dict.fromkeys(roles)
    return ", ".join(names.get(r, "the TPM state" if r.startswith("tpm") else r) for r in unique)


def chunk_owners(point: RestorePoint) -> list[tuple[str, str]]:
    """``(chunk id, what it belongs to)`` for every chunk of the point's state files
    (``nvram``, ``tpm:tpm2/tpm2-00.permall``...), for a check of the point."""
    return [
        (chunk, f"{r.role}:{r.relative}" if r.relative else r.role)
        for r in point.files
        for chunk in r.chunks
    ]


def _wire(record: StateFileRecord) -> StateFile:
    return StateFile(
        role=record.role,
        path=record.path,
        relative=record.relative,
        kind=record.kind,
        size=record.size,
        mode=int(record.mode, 8),
        owner=record.owner,
        group=record.group,
    )
