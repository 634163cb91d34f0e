"""Restore and sanity jobs.

A restore is planned by the inventory of the target server (where each disk goes, as
what format and kind, and whether that can be done: see ``RestorePrecheckRequest``)
twice: when it is asked for, so that bad input is refused before a job exists, and
again when the job starts, so that a host that changed in between fails the job before
anything is touched. Where each disk was comes from the point's sealed data (its domain
XML and manifests), never from the plaintext record alone (:func:`restore_disks`).
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
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
from virtbackup.job_orchestrator.planner import unit_chunks
from virtbackup.job_orchestrator.progress import update_job
from virtbackup.job_orchestrator.state_files import chunk_owners, stage, state_summary
from virtbackup.job_orchestrator.verify_units import verify_units
from virtbackup.repository.records import DiskManifest, RestorePoint
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.runtime import joblog, timeouts
from virtbackup.runtime.errors import Conflict, ServiceError
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)
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


def restore_disks(
    point: RestorePoint, domain_xml: str, manifests: Sequence[DiskManifest] = ()
) -> list[RestoreDisk]:
    """Each disk of ``point`` where its saved domain XML says it was, with the size and
    format of its manifest when ``manifests`` are given (else of the record).

    The XML and the manifests are sealed with the repository's key (as associated data,
    their keys) when the destination is encrypted; ``backup.json`` is plaintext, a
    listing aid: it only says which disks the point holds, and must agree. Conflict when
    it does not (a record changed on the destination), naming the disk."""
    sources = _disk_sources(domain_xml)
    by_target = {m.target: m for m in manifests}
    disks = []
    for record in point.disks:
        path = sources.get(record.target)
        manifest = by_target.get(record.target)
        problem = ""
        if path is None:
            problem = "its saved domain XML has no such disk"
        elif path != record.path:
            problem = f"its saved domain XML says {path}"
        elif manifest is not None and manifest.source_path != path:
            problem = f"its manifest says {manifest.source_path}"
        elif manifest is not None and manifest.size != record.size:
            problem = f"its manifest says {manifest.size} bytes, the record {record.size}"
        if problem:
            raise Conflict(
                f"restore point {point.xml_path}: the record puts disk {record.target} at "
                f"{record.path}, but {problem}: the record was changed; nothing restored"
            )
        assert path is not None
        disks.append(
            RestoreDisk(
                target=record.target,
                path=path,
                size=manifest.size if manifest is not None else record.size,
                format=manifest.format if manifest is not None else record.format,
            )
        )
    return disks


def _disk_sources(domain_xml: str) -> dict[str, str]:
    """target -> the file or device of each disk of a domain XML."""
    try:
        root = ET.fromstring(domain_xml)  # noqa: S314 - our own backup, authenticated when sealed
    except ET.ParseError:
        return {}
    out: dict[str, str] = {}
    for disk in root.findall("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is None or source is None or not target.get("dev"):
            continue
        path = source.get("file") or source.get("dev") or source.get("name") or ""
        path = path or source.get("volume") or ""
        out.setdefault(target.get("dev", ""), path)
    return out


async def request_plan(
    jc: JobContext,
    server_id: str,
    destination_id: str,
    point: RestorePoint,
    params: dict[str, Any],
    domain_xml: str | None = None,
    *,
    manifests: Sequence[DiskManifest] = (),
    job_id: str = "",
) -> RestorePrecheckResult:
    """The target server's plan for restoring ``point`` with ``params`` (``vmName``,
    ``targetDirectory``, ``storagePool``, ``decision``): see ``RestorePrecheckRequest``
    for what it raises; ``Conflict`` also for a record that disagrees with the point's
    sealed data (:func:`restore_disks`). With ``job_id`` (the job's own plan) the
    inventory holds the existing domain for the job."""
    if domain_xml is None:
        repo = await jc.repository(destination_id, create=False)
        try:
            domain_xml = await repo.domain_xml(point)
        finally:
            await repo.close()
    request = RestorePrecheckRequest(
        server_id=server_id,
        vm_name=target_name(point, params),
        disks=restore_disks(point, domain_xml, manifests),
        domain_xml=domain_xml,
        decision=params["decision"],
        target_directory=params.get("targetDirectory") or "",
        storage_pool=params.get("storagePool") or "",
        state_roles=sorted({f.role for f in point.files}),
        job_id=job_id,
    )
    return await jc.bus.request(
        InventoryCmd.RESTORE_PRECHECK,
        request,
        RestorePrecheckResult,
        timeout=timeouts.INVENTORY_QUERY,
    )


async def plan_restore(
    jc: JobContext,
    server_id: str,
    destination_id: str,
    point: RestorePoint,
    params: dict[str, Any],
    domain_xml: str | None = None,
    *,
    manifests: Sequence[DiskManifest] = (),
    job_id: str = "",
) -> RestorePrecheckResult:
    """Ask the target server's inventory where each disk goes, and check the answer.

    Raises what :func:`request_plan` raises (``BadRequest`` naming ``targetDirectory``
    or ``storagePool``, ``Conflict`` for disks or state it would not write), and
    ``Conflict`` when the VM is running (``overwrite``), when a ``vmName`` exists and the
    decision is not ``overwrite``, or when ``define`` would not find the disks."""
    name = target_name(point, params)
    decision = params["decision"]
    plan = await request_plan(
        jc, server_id, destination_id, point, params, domain_xml,
        manifests=manifests, job_id=job_id,
    )  # fmt: skip
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
    if job.params.get("agentId"):
        # Onto a remote agent's host: its agent writes and defines (``agent_restore``).
        from virtbackup.job_orchestrator.agent_jobs import run_agent_backup

        return await run_agent_backup(jc, job)
    from virtbackup.job_orchestrator.migrate import map_networks  # an import cycle else

    xml_path: str = job.params["xmlPath"]
    decision: str = job.params["decision"]
    repo = await jc.repository(job.destination_id, create=False)
    try:
        point = await repo.restore_point(xml_path)
        # A migration through a destination (``migrate_via``) maps the networks.
        domain_xml = map_networks(
            await repo.domain_xml(point), job.params.get("networkMapping") or {}
        )
        name = target_name(point, job.params)
        manifests = [await repo.manifest(point, d.target) for d in point.disks]
        plan = await plan_restore(
            jc, job.server_id, job.destination_id, point, job.params, domain_xml,
            manifests=manifests, job_id=job.id,
        )  # fmt: skip
        as_name = f" as {name}" if name != point.vm_name else ""
        if decision == "define":
            done = await _define_only(jc, job, repo, point, domain_xml, plan, name)
            return await _start_if_asked(jc, job, name, done)
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
        await jc._hold("restore:prepared")  # tests stop the system here
        success = False
        state: list[StagedState] = []  # NVRAM, TPM state: staged, moved at the finish
        try:
            put_back = await stage(
                jc, job, repo, point, domain_xml, into=state, vm_name=name, uuid=plan.vm_uuid
            )
            units = _restore_units(job, manifests, prepared.disks)
            for disk in prepared.disks:  # the job's output log: one line per disk
                if not disk.nbd_url:
                    how = "kept as it is"
                elif disk.temp_path == disk.path:
                    how = "written in place"
                else:
                    how = f"written to {disk.temp_path}, moved into place at the commit"
                await joblog.try_append(jc.bus, job.id, f"disk {disk.target}: {disk.path} {how}")
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
                uuid=plan.vm_uuid,
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
        if summary := state_summary(put_back):
            done = f"{done}; {summary}"
        return await _start_if_asked(jc, job, name, done)
    finally:
        await repo.close()


async def _define_only(
    jc: JobContext,
    job: Job,
    repo: Repository,
    point: RestorePoint,
    domain_xml: str,
    plan: RestorePrecheckResult,
    name: str,
) -> str:
    """``define``: the disks are used as they are; the point's state files are put back
    only where the host has none (never replacing state that is there); then the domain
    is defined. Returns the job's message, which says what state was put back or left."""
    assert job.server_id
    targets = [
        RestoreTarget(
            target=d.target, path=d.path, temp_path="", nbd_url="", format=d.format, kind=d.kind
        )
        for d in plan.disks
    ]
    # Recorded, so that whoever commits this job again defines the same disks.
    await _record_targets(jc, job, targets)
    state: list[StagedState] = []
    success = False
    try:
        prepared = await stage(
            jc, job, repo, point, domain_xml, into=state, vm_name=name,
            uuid=plan.vm_uuid, only_missing=True,
        )  # fmt: skip
        await jc.enter(job.id, "committing", message="defining the domain")
        success = True
    finally:
        finish = RestoreFinishRequest(
            server_id=job.server_id, job_id=job.id, vm_name=name, success=success,
            domain_xml=domain_xml if success else "", disks=targets, state=state,
            uuid=plan.vm_uuid,
        )  # fmt: skip
        try:
            if success or jc.holds(job.id):
                await jc.bus.request(
                    InventoryCmd.RESTORE_FINISH, finish, Ok, timeout=timeouts.INVENTORY_JOB_STEP
                )
        except ServiceError:
            if success:
                raise
            log.exception("cleaning up the failed define of %s", point.vm_name)
    as_name = f" as {name}" if name != point.vm_name else ""
    done = f"defined {point.vm_name}{as_name} from {point.timestamp} (disks left as they are)"
    summary = state_summary(prepared)
    return f"{done}; {summary}" if summary else done


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
    """Units of up to :func:`unit_chunks` chunks per disk. Zero chunks are left out for a
    fresh image (they read as zeros already) and sent, to be written as zeros, for a
    target that is not (a block device written in place: it holds old data)."""
    assert job.destination_id
    by_target = {t.target: t for t in targets}
    units: list[TransferUnit] = []
    for manifest in manifests:
        target = by_target[manifest.target]
        refs = [r for r in _refs(manifest) if r.id is not None or not target.fresh]
        per_unit = unit_chunks(manifest.chunk_size)
        for start in range(0, len(refs), per_unit):
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
                    chunks=refs[start : start + per_unit],
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
        units = verify_units(job.id, job.destination_id, repo.chunk_size, ids)
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
