"""The per-destination gate of garbage collection, across two orchestrator instances
against a real nats-server: a GC's sweep waits for the backups that passed the gate,
backups wait while it sweeps, a second GC is refused, and a dead GC blocks nothing."""

from __future__ import annotations

import asyncio

import pytest

from virtbackup.contracts.v1.jobs import Job
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.lifecycle_gc import (
    claim_destination,
    claim_gate,
    claimed,
    close_gate,
    enter_gate,
    leave_gate,
    release_destination,
    release_gate,
)
from virtbackup.runtime.errors import Conflict


async def job(jc: JobContext, kind: str, dest: str) -> Job:
    if kind == "gc":
        return await jc.submit("gc", destination_id=dest)
    return await jc.submit("backup", server_id="s1", vm_name=f"vm-{dest}", destination_id=dest)


async def message(jc: JobContext, job_id: str) -> str:
    return (await jc.store.get(job_id))[0].message


async def test_the_sweep_is_exclusive_per_destination(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    gc = await job(a, "gc", "d1")
    await claim_gate(a, gc)
    # A backup passes while the GC marks; one of another destination is never held.
    first = await job(b, "backup", "d1")
    await enter_gate(b, first)
    with pytest.raises(Conflict, match=gc.id):
        await claim_gate(b, await job(b, "gc", "d1"))
    # The GC closes the gate and waits for the backup that passed it ...
    closing = asyncio.create_task(close_gate(a, gc))
    await asyncio.sleep(1.0)
    assert not closing.done()
    assert "waiting for 1 running backup" in await message(a, gc.id)
    # ... while a new backup of the destination waits, queued, and one elsewhere does not.
    second = await job(b, "backup", "d1")
    entering = asyncio.create_task(enter_gate(b, second))
    elsewhere = await job(b, "backup", "d2")
    await asyncio.wait_for(enter_gate(b, elsewhere), 5)
    await asyncio.sleep(1.0)
    assert not entering.done()
    waiting = (await b.store.get(second.id))[0]
    assert waiting.state == "queued" and "waiting for garbage collection" in waiting.message
    await leave_gate(b, first)
    await b.finish(first.id, "success", "done")
    await asyncio.wait_for(closing, 5)
    await asyncio.sleep(1.0)
    assert not entering.done()  # the sweep runs: still held
    await release_gate(a, gc)
    await asyncio.wait_for(entering, 5)
    for done in (second, elsewhere):
        await leave_gate(b, done)
        await b.finish(done.id, "success", "done")
    await a.finish(gc.id, "success", "done")


async def test_a_gc_that_died_sweeping_holds_nothing_back(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    gc = await job(a, "gc", "d3")
    await claim_gate(a, gc)
    await close_gate(a, gc)
    # Its orchestrator died: another replica ended the job; the gate record stays.
    await a.finish(gc.id, "failure", "the job-orchestrator instance running it stopped")
    backup = await job(b, "backup", "d3")
    await asyncio.wait_for(enter_gate(b, backup), 5)
    # A backup that died without leaving the gate holds no later GC back either.
    await b.finish(backup.id, "failure", "stopped")
    later = await job(a, "gc", "d3")
    await claim_gate(a, later)
    await asyncio.wait_for(close_gate(a, later), 5)
    await release_gate(a, later)
    await a.finish(later.id, "success", "done")


async def test_a_gc_and_a_prune_never_both_hold_a_destination(
    replicas: tuple[JobContext, JobContext],
) -> None:
    """The claim is made before the job is submitted, and read from the bucket, not the
    job index: at once, on another replica, whether the holder is queued or running."""
    a, b = replicas

    async def submit(jc: JobContext, kind: str) -> Job:
        async with claimed(jc, "d4", kind) as job_id:
            return await jc.submit(kind, destination_id="d4", job_id=job_id)  # type: ignore[arg-type]

    gc = await submit(a, "gc")
    assert gc.state == "queued"
    for jc, kind in ((b, "prune"), (b, "gc"), (a, "prune")):
        with pytest.raises(Conflict, match=gc.id):
            await submit(jc, kind)
    await claim_destination(a, "d4", "gc", gc.id)  # its run claims again: idempotent
    await a.finish(gc.id, "success", "done")  # ended: holds nothing back, even unreleased
    first = await submit(b, "prune")
    second = await submit(a, "prune")  # prunes share the destination
    with pytest.raises(Conflict, match=first.id):
        await submit(a, "gc")
    await release_destination(b, "d4", first.id)
    await b.finish(first.id, "success", "done")
    with pytest.raises(Conflict, match=second.id):
        await submit(b, "gc")
    await release_destination(a, "d4", second.id)
    await a.finish(second.id, "success", "done")
    later = await submit(b, "gc")
    await b.finish(later.id, "success", "done")
    await release_destination(b, "d4", later.id)
