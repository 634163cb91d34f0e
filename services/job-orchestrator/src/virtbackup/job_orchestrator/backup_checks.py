"""Checks after a successful backup (on the bus or by a remote agent): definition drift
and size anomalies (``runtime.anomalies``; records in ``VB_ANOMALIES``).

* Drift: the domain XML of the new restore point (with its disks' sizes from
  ``backup.json``) against the previous point of that VM and server in the same
  destination, or, when there is none, against ``def.<server>.<vm>`` (the definition
  of the VM's last backup anywhere, also what an agent's ``schema-snapshot`` is
  compared with). A change is an anomaly of type ``schema_drift`` (severity
  ``warning``) and a ``vm.definition_drift`` event. The new definition becomes
  ``def.<server>.<vm>``.
* Size: a full backup (no parent point) whose read bytes (``bytesTransferred``) are
  below 50% or above 200% of the median of the last 5 successful full backups of that
  VM and server into that destination (at least 3 of them, from ``VB_JOBS``) is an
  anomaly of type ``size_anomaly`` (severity ``warning``).

Never raises: a check that cannot be made is logged and skipped; the backup's outcome
stays what it was.
"""

from __future__ import annotations

import logging

import msgspec

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.anomalies import Anomaly, DefinitionRecord, DomainDefinition
from virtbackup.contracts.v1.jobs import Job
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.repository.format import xml_path
from virtbackup.repository.records import RestorePoint
from virtbackup.runtime import anomalies
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.kv import read_value
from virtbackup.storage.errors import NotFoundError

log = logging.getLogger(__name__)


def _is_full(job: Job) -> bool:
    return job.result.get("parentTimestamp") is None


async def after_backup(jc: JobContext, job: Job) -> None:
    """Run the checks for ``job`` (a backup that has just succeeded); see the module."""
    if not (job.server_id and job.vm_name and job.destination_id):
        return
    current = job
    try:
        await _check_size(jc, current)
    except Exception:
        log.exception("size check after backup %s failed", job.id)
    try:
        await _check_definition(jc, current)
    except Exception:
        log.exception("definition check after backup %s failed", job.id)


async def _check_size(jc: JobContext, job: Job) -> None:
    if not _is_full(job) or job.bytes_transferred <= 0:
        return
    earlier = sorted(
        (
            j
            for j in jc.jobs.jobs.values()
            if j.id != job.id
            and j.type == "backup"
            and j.state == "success"
            and (j.server_id, j.vm_name, j.destination_id)
            == (job.server_id, job.vm_name, job.destination_id)
            and _is_full(j)
            and (j.finished_at or "") <= (job.finished_at or utcnow_iso())
        ),
        key=lambda j: j.finished_at or j.created_at,
    )
    verdict = anomalies.size_verdict(job.bytes_transferred, [j.bytes_transferred for j in earlier])
    if verdict is None:
        return
    direction, median = verdict
    pct = round(100 * job.bytes_transferred / median)
    mib = 1 << 20
    await anomalies.record(
        jc.bus,
        jc.ctx.bucket(buckets.ANOMALIES),
        Anomaly(
            id="",
            type="size_anomaly",
            severity="warning",
            title=f"Backup of {job.vm_name} {pct}% of its usual size ({direction})",
            description=(
                f"Full backup read {job.bytes_transferred / mib:.1f} MiB; the median of the "
                f"last full backups into {job.destination_id} is {median / mib:.1f} MiB"
            ),
            server_id=job.server_id,
            vm_name=job.vm_name,
            job_id=job.id,
            destination_id=job.destination_id,
            details={
                "readBytes": job.bytes_transferred,
                "medianBytes": median,
                "percent": pct,
                "rule": "full backup below 50% or above 200% of the median of the last 5 "
                "full backups (at least 3) of the VM into the destination",
            },
        ),
    )


def _definition(repo_point: RestorePoint, xml: str) -> DomainDefinition:
    return anomalies.with_sizes(
        anomalies.summarize(xml), {d.target: d.size for d in repo_point.disks}
    )


async def _check_definition(jc: JobContext, job: Job) -> None:
    timestamp = job.result.get("timestamp")
    if not isinstance(timestamp, str) or not timestamp:
        return
    assert job.server_id and job.vm_name and job.destination_id
    kv = jc.ctx.bucket(buckets.ANOMALIES)
    key = anomalies.definition_key(job.server_id, job.vm_name)
    repo = await jc.repository(job.destination_id, create=False)
    try:
        try:
            point = await repo.restore_point(xml_path(job.vm_name, timestamp))
        except NotFoundError:  # a destination that keeps nothing (dummy), or pruned already
            return
        new = _definition(point, await repo.domain_xml(point))
        earlier = [
            p
            for p in await repo.restore_points(job.vm_name)
            if p.source_server_id == job.server_id and p.timestamp < timestamp
        ]
        old: DomainDefinition | None = None
        if earlier:
            old = _definition(earlier[-1], await repo.domain_xml(earlier[-1]))
    finally:
        await repo.close()
    if old is None:
        recorded = await read_value(kv, key, DefinitionRecord)
        old = recorded.definition if recorded is not None else None
    changes = anomalies.drift(old, new) if old is not None else []
    await kv.put(
        key,
        msgspec.json.encode(
            DefinitionRecord(
                server_id=job.server_id,
                vm_name=job.vm_name,
                definition=new,
                destination_id=job.destination_id,
                timestamp=timestamp,
                job_id=job.id,
                recorded_at=utcnow_iso(),
            )
        ),
    )
    if not changes:
        return
    await anomalies.record(
        jc.bus,
        kv,
        Anomaly(
            id="",
            type="schema_drift",
            severity="warning",
            title=f"Definition of {job.vm_name} changed since its last backup",
            description="; ".join(changes),
            server_id=job.server_id,
            vm_name=job.vm_name,
            job_id=job.id,
            destination_id=job.destination_id,
            changes=changes,
            details={"timestamp": timestamp},
        ),
    )
