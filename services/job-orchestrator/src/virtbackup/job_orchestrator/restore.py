"""Restore and sanity jobs."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import (
    Ok,
    RestoreDisk,
    RestoreFinishRequest,
    RestorePrepared,
    RestorePrepareRequest,
    RestoreTarget,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.state import StagedState
from virtbackup.contracts.v1.work import BadChunk, ChunkRef, TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import SanityFailed
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.planner import group_refs
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.state_files import chunk_owners, stage
from virtbackup.repository.records import DiskManifest
from virtbackup.repository.repository import RepositoryError
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import ServiceError
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)
VERIFY_CHUNKS_PER_UNIT = 64
#: Where a restore job records its NBD targets (so that another instance can clean up).
PREPARED = "prepared"


def prepared_targets(job: Job) -> list[RestoreTarget]:
    """The restore images a restore job has created (none before they exist)."""
    return msgspec.convert(job.params.get(PREPARED) or [], list[RestoreTarget])


async def run_restore(jc: JobContext, job: Job) -> str:
    assert job.server_id and job.destination_id and job.vm_name
    xml_path: str = job.params["xmlPath"]
    decision: str = job.params["decision"]
    repo = await jc.repository(job.destination_id, create=False)
    try:
        point = await repo.restore_point(xml_path)
        domain_xml = await repo.domain_xml(point)
        if decision == "define":
            finish = RestoreFinishRequest(
                server_id=job.server_id, job_id=job.id, vm_name=point.vm_name,
                success=True, domain_xml=domain_xml,
            )  # fmt: skip
            await jc.enter(job.id, "committing", message="defining the domain")
            await jc.bus.request(
                InventoryCmd.RESTORE_FINISH, finish, Ok, timeout=timeouts.INVENTORY_JOB_STEP
            )
            return f"defined {point.vm_name} from {point.timestamp} (disks left as they are)"
        manifests = [await repo.manifest(point, d.target) for d in point.disks]
        prepare = RestorePrepareRequest(
            server_id=job.server_id,
            job_id=job.id,
            disks=[RestoreDisk(target=d.target, path=d.path, size=d.size) for d in point.disks],
        )
        await jc.message(job.id, "creating the disk images")
        prepared = await jc.bus.request(
            InventoryCmd.RESTORE_PREPARE,
            prepare,
            RestorePrepared,
            timeout=timeouts.INVENTORY_JOB_STEP,
        )
        urls = {t.target: t.nbd_url for t in prepared.disks}
        # Recorded at once, so that whoever ends this job can remove the images.
        await update_job(
            jc.store,
            jc.bus,
            job.id,
            {"params": {**job.params, PREPARED: msgspec.to_builtins(prepared.disks)}},
        )
        success = False
        state: list[StagedState] = []  # NVRAM, TPM state: staged, moved at the finish
        try:
            await stage(jc, job, repo, point, domain_xml, into=state)
            units = _restore_units(job, manifests, urls)
            total = sum(
                min(m.chunk_size, m.size - r.index * m.chunk_size)
                for m in manifests
                for r in _refs(m)
                if r.id is not None
            )
            await jc.enter(job.id, "transferring", message=f"writing {len(units)} units")
            await jc.run_units(job.id, units, total, lambda _: None)
            # The point of no return: from here a cancel is refused, and the job ends in
            # what moving the images into place does.
            await jc.enter(job.id, "committing", message="moving the restored disks into place")
            success = True
        finally:
            finish = RestoreFinishRequest(
                server_id=job.server_id,
                job_id=job.id,
                vm_name=point.vm_name,
                success=success,
                domain_xml=domain_xml if success else "",
                disks=prepared.disks,
                state=state,
            )
            try:
                # A runner that no longer holds the job leaves the images to its new
                # holder (which removes them, or commits them if it was committing).
                if success or jc.holds(job.id):
                    await jc.bus.request(
                        InventoryCmd.RESTORE_FINISH,
                        finish,
                        Ok,
                        timeout=timeouts.INVENTORY_JOB_STEP,
                    )
            except ServiceError:
                if success:
                    raise
                log.exception("cleaning up the failed restore of %s", point.vm_name)
        disks = ", ".join(d.path for d in point.disks)
        return f"restored {point.vm_name} from {point.timestamp}: {disks}"
    finally:
        await repo.close()


def _refs(manifest: DiskManifest) -> list[ChunkRef]:
    return [ChunkRef(index=i, id=c) for i, c in enumerate(manifest.chunks)]


def _restore_units(
    job: Job, manifests: list[DiskManifest], urls: dict[str, str]
) -> list[TransferUnit]:
    assert job.destination_id
    units: list[TransferUnit] = []
    for manifest in manifests:
        for refs in group_refs(_refs(manifest)):
            units.append(
                TransferUnit(
                    job_id=job.id,
                    unit=len(units),
                    kind="restore",
                    destination_id=job.destination_id,
                    disk=manifest.target,
                    disk_size=manifest.size,
                    chunk_size=manifest.chunk_size,
                    nbd_url=urls[manifest.target],
                    chunks=refs,
                )
            )
    return units


async def run_sanity(jc: JobContext, job: Job) -> str:
    """Re-read every manifest and chunk of a restore point and check every hash; the job
    fails naming what is missing or corrupt."""
    assert job.destination_id
    repo = await jc.repository(job.destination_id, create=False)
    try:
        point = await repo.restore_point(job.params["xmlPath"])
        problems: list[str] = []
        owners: dict[str, set[str]] = {}
        for disk in point.disks:
            try:
                manifest = await repo.manifest(point, disk.target)
            except (NotFoundError, RepositoryError) as exc:
                problems.append(f"manifest of {disk.target}: {exc}")
                continue
            for chunk_id in manifest.chunks:
                if chunk_id is not None:
                    owners.setdefault(chunk_id, set()).add(disk.target)
        for chunk_id, owner in chunk_owners(point):  # NVRAM, TPM state
            owners.setdefault(chunk_id, set()).add(owner)
        with contextlib.suppress(NotFoundError, RepositoryError):
            await repo.domain_xml(point)
        ids = sorted(owners)
        units = [
            TransferUnit(
                job_id=job.id,
                unit=n,
                kind="verify",
                destination_id=job.destination_id,
                chunk_size=repo.chunk_size,
                chunks=[
                    ChunkRef(index=0, id=i) for i in ids[start : start + VERIFY_CHUNKS_PER_UNIT]
                ],
            )
            for n, start in enumerate(range(0, len(ids), VERIFY_CHUNKS_PER_UNIT))
        ]
        bad: list[BadChunk] = []

        def collect(result: UnitResult) -> None:
            bad.extend(result.bad)

        await jc.enter(
            job.id, "transferring", message=f"checking {len(ids)} chunks in {len(units)} units"
        )
        await jc.run_units(job.id, units, 0, collect)
        details: list[dict[str, Any]] = [
            {"id": b.id, "problem": b.problem, "detail": b.detail, "disks": sorted(owners[b.id])}
            for b in sorted(bad, key=lambda b: b.id)
        ]
        await update_job(
            jc.store, jc.bus, job.id,
            {"result": {"checkedChunks": len(ids), "damaged": details, "problems": problems}},
        )  # fmt: skip
        if bad or problems:
            named = [f"{d['problem']} chunk {d['id']} ({', '.join(d['disks'])})" for d in details]
            raise SanityFailed(
                f"{len(bad)} of {len(ids)} chunks damaged: " + "; ".join(problems + named)
            )
        return f"all {len(ids)} chunks of {point.vm_name} {point.timestamp} verified"
    finally:
        await repo.close()
