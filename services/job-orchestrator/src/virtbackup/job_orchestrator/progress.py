"""Job progress as the agent API reports it, written at most a few times a second."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.jobs import TERMINAL_STATES, Job
from virtbackup.contracts.v1.work import UnitResult
from virtbackup.job_orchestrator.store import JobStore
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.clock import utcnow_iso

UPDATE_EVERY = 0.5


@dataclass
class Progress:
    """Counts what the units did: ``bytes_transferred`` is bytes read from or written to
    the VM's disks (a migration's: bytes copied from the source's disks to the
    target's), ``physical_bytes`` bytes written to or read from the destination.
    ``bytes_before``: bytes an earlier step of the job transferred (a migration's earlier
    passes), added to the job's ``bytes_transferred`` and ``total_bytes``."""

    store: JobStore
    bus: Bus
    job_id: str
    total_units: int = 0
    total_bytes: int = 0
    completed_units: int = 0
    bytes_transferred: int = 0
    physical_bytes: int = 0
    bytes_before: int = 0
    started: float = field(default_factory=time.monotonic)
    last_write: float = 0.0

    def add(self, result: UnitResult) -> None:
        self.completed_units += 1
        if result.kind == "backup":
            self.bytes_transferred += result.bytes_read
            self.physical_bytes += result.bytes_written
        elif result.kind == "restore":
            self.bytes_transferred += result.bytes_written
            self.physical_bytes += result.bytes_read
        elif result.kind == "migrate":  # read from one VM disk, written to another
            self.bytes_transferred += result.bytes_read
            self.physical_bytes += result.bytes_read
        else:
            self.physical_bytes += result.bytes_read

    def fields(self, published: int) -> dict[str, object]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = self.bytes_transferred / elapsed
        remaining = max(self.total_bytes - self.bytes_transferred, 0)
        return {
            "total_units": self.total_units,
            "completed_units": self.completed_units,
            "bytes_transferred": self.bytes_before + self.bytes_transferred,
            "total_bytes": self.bytes_before + self.total_bytes,
            "speed_bytes_per_sec": round(speed, 1),
            "physical_bytes": self.physical_bytes,
            "physical_speed_bytes_per_sec": round(self.physical_bytes / elapsed, 1),
            "eta_seconds": round(remaining / speed, 1) if speed > 0 and remaining else None,
            "writer_backlog": max(published - self.completed_units, 0),
        }

    async def write(
        self, published: int, *, force: bool = False, message: str | None = None
    ) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < UPDATE_EVERY:
            return
        self.last_write = now
        changes = self.fields(published)
        if message is not None:
            changes["message"] = message
        await update_job(self.store, self.bus, self.job_id, changes)


async def update_job(
    store: JobStore, bus: Bus, job_id: str, changes: dict[str, object], *, event: str | None = None
) -> Job:
    """Apply ``changes`` unless the job has already finished (a cancel wins), and publish
    ``job.updated`` (or ``event``)."""

    def change(job: Job) -> Job:
        if job.state in TERMINAL_STATES:
            return job
        return msgspec.structs.replace(job, updated_at=utcnow_iso(), **changes)

    job = await store.update(job_id, change)
    payload = msgspec.to_builtins(job)
    await bus.publish_event(event or EventType.JOB_UPDATED, payload, key=job_id)
    return job
