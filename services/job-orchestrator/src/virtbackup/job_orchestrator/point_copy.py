"""Copy jobs: one restore point copied from one destination to another, deduplicated.

``vb.cmd.job.copy`` (``CopyRequest``; ``POST /api/v1/destinations/{id}/copy``):

1. The submit finds the point (``timestamp``, else the VM's newest, optionally only
   those from ``server_id``), and takes the target's VM folder lock (a backup into that
   folder, or another copy, is a 409 naming its job) before the job exists.
2. The job passes the target's GC gate as a writer, exactly like a backup
   (docs/repository-format.md, "Garbage collection"): a GC's sweep waits for it, and it
   waits for a sweep; so a chunk it finds already in the target (deduplicated) cannot
   be swept before the point naming it is committed. The source point is in use while
   the job runs (a delete of it is a 409 naming the job), so its chunks stay.
3. Transfer workers copy the chunks the point names (disks and state files), units of
   ``unit_chunks`` (64 MiB of) distinct chunks: each is read and decoded from the source (checked
   against its id), takes its id in the target (another one when either repository is
   encrypted: ids are keyed there), and is stored compressed and sealed as the target
   does, unless the target has it. When both repositories are unencrypted (same ids), a
   chunk the target has is not even read.
4. Committing: the point's manifests (with the target's ids), its domain XML (sealed
   with the target's key) and last its ``backup.json``, with the same timestamp, kind,
   checkpoint and job id as the source's. So the copy is the same restore point: a
   fan-out backup of the VM can build on it (same checkpoint), and copying it again is
   a no-op. A target that holds another point at that time fails the job.

Both repositories must have the same chunk size (a copy does not re-cut disks).
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.jobs import CopyRequest, Job
from virtbackup.contracts.v1.work import ChunkRef, TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import JobFailed
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import point_folder_lock
from virtbackup.job_orchestrator.planner import unit_chunks
from virtbackup.repository.format import vm_segment, xml_path
from virtbackup.repository.records import DiskManifest, RestorePoint
from virtbackup.repository.repository import NoRepositoryError, Repository, RepositoryError
from virtbackup.runtime.agent_config import find_destination
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.errors import BadRequest, NotFound, Unavailable
from virtbackup.storage.errors import NotFoundError, StorageError


async def find_point(jc: JobContext, req: CopyRequest) -> RestorePoint:
    """The point ``req`` names in its source destination: ``NotFound`` when the
    destination has no repository or no such point; ``Unavailable`` when it cannot be
    read."""
    try:
        repo = await jc.repository(req.destination_id, create=False, locked=True)
    except NoRepositoryError:
        raise NotFound(f"destination {shown(req.destination_id)} holds no backups") from None
    except (RepositoryError, StorageError) as exc:
        raise Unavailable(f"destination {shown(req.destination_id)}: {exc}") from None
    try:
        points = [
            p
            for p in await repo.restore_points(req.vm_name)
            if req.server_id is None or p.source_server_id == req.server_id
        ]
    except StorageError as exc:
        raise Unavailable(f"destination {shown(req.destination_id)}: {exc}") from None
    finally:
        await repo.close()
    if req.timestamp is not None:
        points = [p for p in points if p.timestamp == req.timestamp]
    if not points:
        what = f"point {req.timestamp}" if req.timestamp else "restore point"
        source = f" from server {shown(req.server_id)}" if req.server_id else ""
        raise NotFound(
            f"no {what} of vm {shown(req.vm_name)}{source} in destination "
            f"{shown(req.destination_id)}"
        )
    return points[-1]


async def submit_copy(jc: JobContext, req: CopyRequest, run: Any) -> Job:
    """Check ``req`` and start the copy job (see the module docstring). 404 for an
    unknown source destination or point; 400 naming ``targetDestinationId`` (unknown, or
    the source itself) or ``vmName``; 409 while a backup or copy writes the VM's folder
    in the target."""
    cfg = await jc.config()
    find_destination(cfg, req.destination_id)
    if req.target_destination_id == req.destination_id:
        raise BadRequest("targetDestinationId: is the source destination itself")
    if not any(d.id == req.target_destination_id for d in cfg.destinations):
        raise BadRequest(f"targetDestinationId: no destination {shown(req.target_destination_id)}")
    try:
        vm_segment(req.vm_name)
    except ValueError as exc:
        raise BadRequest(f"vmName: {exc}") from None
    point = await find_point(jc, req)
    folder = point_folder_lock("backup", req.target_destination_id, req.vm_name)
    assert folder is not None
    job_id = new_id()
    what = f"the folder of vm {req.vm_name} in destination {req.target_destination_id}"
    await jc.locks.acquire(*folder, job_id, "copy", what=what)
    try:
        return await jc.submit(
            "copy",
            server_id=point.source_server_id,
            vm_name=point.vm_name,
            destination_id=req.destination_id,
            params={
                "targetDestinationId": req.target_destination_id,
                "xmlPath": point.xml_path,
                "timestamp": point.timestamp,
            },
            run=run,
            job_id=job_id,
        )
    except BaseException:
        await jc.locks.release(*folder, job_id)
        raise


def chunk_list(point: RestorePoint, manifests: list[DiskManifest]) -> list[str]:
    """Every distinct chunk id the point names (its disks', then its state files'), in
    first-seen order."""
    ids: dict[str, None] = {}
    for manifest in manifests:
        ids.update((c, None) for c in manifest.chunks if c is not None)
    for record in point.files:
        ids.update((c, None) for c in record.chunks)
    return list(ids)


def copy_units(
    job_id: str, source: str, target: str, chunk_size: int, ids: list[str]
) -> list[TransferUnit]:
    """``ids`` cut into copy units of :func:`unit_chunks` of ``chunk_size``;
    ``ChunkRef.index`` is the id's position in ``ids``."""
    refs = [ChunkRef(index=i, id=c) for i, c in enumerate(ids)]
    per_unit = unit_chunks(chunk_size)
    return [
        TransferUnit(
            job_id=job_id,
            unit=n,
            kind="copy",
            destination_id=source,
            target_destination_id=target,
            chunk_size=chunk_size,
            chunks=refs[start : start + per_unit],
        )
        for n, start in enumerate(range(0, len(refs), per_unit))
    ]


def translated(
    point: RestorePoint, manifests: list[DiskManifest], mapping: dict[str, str]
) -> tuple[RestorePoint, list[DiskManifest]]:
    """The point and manifests with every chunk id replaced by its id in the target;
    ``JobFailed`` naming a chunk that was not copied."""

    def one(chunk: str) -> str:
        try:
            return mapping[chunk]
        except KeyError:
            raise JobFailed(f"chunk {chunk} was not copied") from None

    new_manifests = [
        msgspec.structs.replace(m, chunks=[None if c is None else one(c) for c in m.chunks])
        for m in manifests
    ]
    files = [msgspec.structs.replace(f, chunks=[one(c) for c in f.chunks]) for f in point.files]
    return msgspec.structs.replace(point, files=files), new_manifests


async def run_copy(jc: JobContext, job: Job) -> str:
    """Run a copy job (see the module docstring); returns its success message."""
    assert job.destination_id and job.vm_name
    target_id = str(job.params["targetDestinationId"])
    key = str(job.params["xmlPath"])
    async with contextlib.AsyncExitStack() as stack:
        source = await jc.repository(job.destination_id, create=False)
        stack.push_async_callback(source.close)
        target = await jc.repository(target_id)
        stack.push_async_callback(target.close)
        if source.chunk_size != target.chunk_size:
            raise JobFailed(
                f"destination {target_id} has chunks of {target.chunk_size} bytes, "
                f"{job.destination_id} of {source.chunk_size}: a copy needs equal chunk sizes"
            )
        point = await source.restore_point(key)
        if await _already_there(target, point):
            return f"restore point {point.timestamp} is in destination {target_id} already"
        manifests = [await source.manifest(point, d.target) for d in point.disks]
        domain_xml = await source.domain_xml(point)
        ids = chunk_list(point, manifests)
        units = copy_units(job.id, job.destination_id, target_id, source.chunk_size, ids)
        mapping: dict[str, str] = {}
        stats = {"stored": 0, "dedup": 0}

        def on_result(result: UnitResult) -> None:
            for ref in result.chunks:
                if ref.id is not None:
                    mapping[ids[ref.index]] = ref.id
            stats["stored"] += result.chunks_stored
            stats["dedup"] += result.chunks_deduplicated

        await jc.enter(
            job.id,
            "transferring",
            message=f"copying {len(ids)} chunks of point {point.timestamp} to {target_id}",
            result={"targetDestinationId": target_id, "timestamp": point.timestamp},
        )
        progress = await jc.run_units(job.id, units, 0, on_result)
        copied, new_manifests = translated(point, manifests, mapping)
        result: dict[str, Any] = {
            "targetDestinationId": target_id,
            "timestamp": point.timestamp,
            "chunks": len(ids),
            "chunksStored": stats["stored"],
            "chunksDeduplicated": stats["dedup"],
            "bytesWritten": progress.physical_bytes,
        }
        await jc.enter(job.id, "committing", message="committing the copy", result=result)
        await target.commit(copied, new_manifests, domain_xml)
        return (
            f"restore point {point.timestamp} copied to {target_id}: {len(ids)} chunks, "
            f"{stats['stored']} stored, {stats['dedup']} deduplicated"
        )
    raise AssertionError("unreachable")  # pragma: no cover


async def _already_there(target: Repository, point: RestorePoint) -> bool:
    """Whether the target holds this very point (same backup job and checkpoint) at its
    time; ``JobFailed`` when it holds another one there."""
    try:
        existing = await target.restore_point(xml_path(point.vm_name, point.timestamp))
    except NotFoundError:
        return False
    if existing.job_id == point.job_id and existing.checkpoint == point.checkpoint:
        return True
    raise JobFailed(
        f"destination holds another restore point of vm {point.vm_name} at "
        f"{point.timestamp} (job {existing.job_id}): not replaced"
    )
