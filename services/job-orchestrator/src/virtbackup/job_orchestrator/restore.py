"""Restore and sanity jobs.

A restore is planned by the inventory of the target server (where each disk goes, as
what format and kind, and whether that can be done: see ``RestorePrecheckRequest``)
twice: when it is asked for, so that bad input is refused before a job exists, and
again when the job starts, so that a host that changed in between fails the job before
anything is touched.
"""

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
    RestorePrecheckRequest,
    RestorePrecheckResult,
    RestorePrepared,
    RestorePrepareRequest,
    RestoreTarget,
    VmActionRequest,
)
from virtbackup.contracts.v1.jobs import Job, RestoreRequest
from virtbackup.contracts.v1.state import StagedState
from virtbackup.contracts.v1.work import BadChunk, ChunkRef, TransferUnit, UnitResult
from virtbackup.job_orchestrator.errors import JobFailed, SanityFailed
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.planner import UNIT_CHUNKS
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.state_files import chunk_owners, stage
from virtbackup.repository.records import DiskManifest, RestorePoint
from virtbackup.repository.repository import RepositoryError
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import Conflict, ServiceError
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)
VERIFY_CHUNKS_PER_UNIT = 64
#: Where a restore job records its NBD targets (so that another instance can clean up).
PREPARED = "prepared"


def prepared_targets(job: Job) -> list[RestoreTarget]:
    """The restore images a restore job has created (none before they exist)."""
    return msgspec.convert(job.params.get(PREPARED) or [], list[RestoreTarget])


def restore_params(req: RestoreRequest) -> dict[str, Any]:
    """A restore job's ``params``: the request's choices (camelCase, unset ones left out)."""
    params: dict[str, Any] = {"xmlPath": req.xml_path, "decision": req.decision}
    if req.vm_name:
        params["vmName"] = req.vm_name
    if req.target_directory:
        params["targetDirectory"] = req.target_directory
    if req.storage_pool:
        params["storagePool"] = req.storage_pool
    if req.start:
        params["start"] = True
    return params


def target_name(point: RestorePoint, params: dict[str, Any]) -> str:
    """The name the restored VM gets: ``vmName``, else the saved one."""
    name = params.get("vmName") or point.vm_name
    assert isinstance(name, str)
    return name


async def plan_restore(
    jc: JobContext,
    server_id: str,
    destination_id: str,
    point: RestorePoint,
    params: dict[str, Any],
    domain_xml: str | None = None,
) -> RestorePrecheckResult:
    """Ask the target server's inventory where each disk goes, and check the answer.

    Raises what the inventory raises (``BadRequest`` naming ``targetDirectory`` or
    ``storagePool``, ``Conflict`` for disks it would not write), and ``Conflict`` when
    the VM is running (``overwrite``), when a ``vmName`` exists and the decision is not
    ``overwrite``, or when ``define`` would not find the disks."""
    if domain_xml is None:
        repo = await jc.repository(destination_id, create=False)
        try:
            domain_xml = await repo.domain_xml(point)
        finally:
            await repo.close()
    name = target_name(point, params)
    decision = params["decision"]
    request = RestorePrecheckRequest(
        server_id=server_id,
        vm_name=name,
        disks=[
            RestoreDisk(target=d.target, path=d.path, size=d.size, format=d.format)
            for d in point.disks
        ],
        domain_xml=domain_xml,
        decision=decision,
        target_directory=params.get("targetDirectory") or "",
        storage_pool=params.get("storagePool") or "",
    )
    plan = await jc.bus.request(
        InventoryCmd.RESTORE_PRECHECK,
        request,
        RestorePrecheckResult,
        timeout=timeouts.INVENTORY_QUERY,
    )
    if params.get("vmName") and plan.vm_exists and decision != "overwrite":
        raise Conflict(
            f"vm {name} already exists on server {server_id}: restore with decision "
            "overwrite to replace it (it must be shut off), or choose another vmName"
        )
    if decision == "overwrite" and plan.vm_running:
        raise Conflict(f"vm {name} is running: shut it off before overwriting it")
    if decision == "define" and not plan.can_define_only:
        raise Conflict("cannot define only: " + "; ".join(plan.problems or ["disks do not match"]))
    return plan


async def run_restore(jc: JobContext, job: Job) -> str:
    assert job.server_id and job.destination_id and job.vm_name
    xml_path: str = job.params["xmlPath"]
    decision: str = job.params["decision"]
    repo = await jc.repository(job.destination_id, create=False)
    try:
        point = await repo.restore_point(xml_path)
        domain_xml = await repo.domain_xml(point)
        name = target_name(point, job.params)
        plan = await plan_restore(
            jc, job.server_id, job.destination_id, point, job.params, domain_xml
        )
        as_name = f" as {name}" if name != point.vm_name else ""
        if decision == "define":
            targets = [
                RestoreTarget(
                    target=d.target,
                    path=d.path,
                    temp_path="",
                    nbd_url="",
                    format=d.format,
                    kind=d.kind,
                )
                for d in plan.disks
            ]
            # Recorded, so that whoever commits this job again defines the same disks.
            await _record_targets(jc, job, targets)
            finish = RestoreFinishRequest(
                server_id=job.server_id, job_id=job.id, vm_name=name,
                success=True, domain_xml=domain_xml, disks=targets,
            )  # fmt: skip
            await jc.enter(job.id, "committing", message="defining the domain")
            await jc.bus.request(
                InventoryCmd.RESTORE_FINISH, finish, Ok, timeout=timeouts.INVENTORY_JOB_STEP
            )
            done = (
                f"defined {point.vm_name}{as_name} from {point.timestamp} (disks left as they are)"
            )
            return await _start_if_asked(jc, job, name, done)
        manifests = [await repo.manifest(point, d.target) for d in point.disks]
        prepare = RestorePrepareRequest(server_id=job.server_id, job_id=job.id, disks=plan.disks)
        await jc.message(job.id, "creating the disk images")
        prepared = await jc.bus.request(
            InventoryCmd.RESTORE_PREPARE,
            prepare,
            RestorePrepared,
            timeout=timeouts.INVENTORY_JOB_STEP,
        )
        # Recorded at once, so that whoever ends this job can remove the images.
        await _record_targets(jc, job, prepared.disks)
        success = False
        state: list[StagedState] = []  # NVRAM, TPM state: staged, moved at the finish
        try:
            await stage(jc, job, repo, point, domain_xml, into=state, vm_name=name)
            units = _restore_units(job, manifests, prepared.disks)
            total = sum(
                min(unit.chunk_size, unit.disk_size - r.index * unit.chunk_size)
                for unit in units
                for r in unit.chunks
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
                vm_name=name,
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
        disks = ", ".join(d.path for d in plan.disks)
        done = f"restored {point.vm_name}{as_name} from {point.timestamp}: {disks}"
        return await _start_if_asked(jc, job, name, done)
    finally:
        await repo.close()


async def _record_targets(jc: JobContext, job: Job, targets: list[RestoreTarget]) -> None:
    await update_job(
        jc.store, jc.bus, job.id, {"params": {**job.params, PREPARED: msgspec.to_builtins(targets)}}
    )


async def _start_if_asked(jc: JobContext, job: Job, name: str, done: str) -> str:
    """Start the restored VM if the job asks to (``start``); the job fails naming why
    if it does not start (the restore itself stays done)."""
    if not job.params.get("start"):
        return done
    assert job.server_id
    request = VmActionRequest(server_id=job.server_id, vm_name=name, action="start")
    try:
        await jc.bus.request(InventoryCmd.ACTION, request, Ok, timeout=timeouts.INVENTORY_QUERY)
    except ServiceError as exc:
        raise JobFailed(f"{done}; but {name} did not start: {exc.message}") from None
    return f"{done}; started {name}"


def _refs(manifest: DiskManifest) -> list[ChunkRef]:
    return [ChunkRef(index=i, id=c) for i, c in enumerate(manifest.chunks)]


def _restore_units(
    job: Job, manifests: list[DiskManifest], targets: list[RestoreTarget]
) -> list[TransferUnit]:
    """Units of up to ``UNIT_CHUNKS`` chunks per disk. Zero chunks are left out for a
    fresh image (they read as zeros already) and sent, to be written as zeros, for a
    target that is not (a block device written in place: it holds old data)."""
    assert job.destination_id
    by_target = {t.target: t for t in targets}
    units: list[TransferUnit] = []
    for manifest in manifests:
        target = by_target[manifest.target]
        refs = [r for r in _refs(manifest) if r.id is not None or not target.fresh]
        for start in range(0, len(refs), UNIT_CHUNKS):
            units.append(
                TransferUnit(
                    job_id=job.id,
                    unit=len(units),
                    kind="restore",
                    destination_id=job.destination_id,
                    disk=manifest.target,
                    disk_size=manifest.size,
                    chunk_size=manifest.chunk_size,
                    nbd_url=target.nbd_url,
                    chunks=refs[start : start + UNIT_CHUNKS],
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
