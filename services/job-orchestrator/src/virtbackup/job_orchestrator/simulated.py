"""A simulated transfer, for benchmarks only: with ``VIRTBACKUP_SIMULATE_TRANSFER_SECONDS``
set, a backup of a VM on a *simulated* server (``uri`` ``test:///...``, libvirt's test
driver: no QEMU, no disks) runs the orchestrator's real path up to the transfer (job
record, queue, admission slots, lease, phases, events, final state), then waits that
many seconds instead of beginning a libvirt backup and running transfer units, and ends
``success`` with ``result.simulated = true`` and a message saying so. No restore point
is made, nothing is read from the VM and nothing is written to the destination (its
repository is not even opened).

Unset (the default), nothing changes: the inventory refuses the backup of a simulated
VM ("server X is simulated ... no QEMU"). A VM on a real server is never simulated.
"""

from __future__ import annotations

import asyncio
import contextlib

from virtbackup.contracts.v1.config import Server, is_simulated_uri
from virtbackup.contracts.v1.jobs import Job
from virtbackup.job_orchestrator.jobctx import JobContext

#: The setting that turns the simulation on (seconds a simulated backup takes).
SETTING = "VIRTBACKUP_SIMULATE_TRANSFER_SECONDS"


def seconds_for(jc: JobContext, server: Server) -> float | None:
    """The seconds a backup of a VM on ``server`` is simulated for; ``None`` when it runs
    for real (the setting is unset, or ``server`` is not a ``test:///`` server)."""
    seconds = jc.settings.simulate_transfer_seconds
    if seconds is None or not is_simulated_uri(server.uri):
        return None
    return seconds


def is_simulated(job: Job) -> bool:
    """Whether ``job`` is a backup that ended simulated (``result.simulated``)."""
    return job.result.get("simulated") is True


async def run_simulated_backup(jc: JobContext, job: Job, seconds: float) -> str:
    """Enter ``transferring`` (``result.simulated = true``), wait ``seconds`` (a cancel
    ends the wait: ``JobCanceled``), return the success message."""
    assert job.vm_name and job.server_id and job.destination_id
    result = {"simulated": True, "simulatedSeconds": seconds}
    await jc.enter(
        job.id,
        "transferring",
        result=result,
        message=f"simulated transfer of {seconds:g} s ({SETTING}): nothing is read or written",
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(jc.cancel_event(job.id).wait(), seconds)
    jc.check_canceled(job.id)
    return (
        f"simulated backup of {job.vm_name} (server {job.server_id} is simulated, "
        f"{SETTING}={seconds:g}): no restore point was made and nothing was written to "
        f"destination {job.destination_id}"
    )
