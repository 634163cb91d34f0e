"""The job state machine across two orchestrator instances, against a real nats-server.

Both instances run in this process (``start_service``), so each test drives the
handlers and the state machine directly and deterministically: no libvirt, no workers.
"""

from __future__ import annotations

import asyncio

import pytest

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.jobs import JobCancelRequest, JobListRequest
from virtbackup.job_orchestrator import handlers
from virtbackup.job_orchestrator.errors import JobCanceled, JobLost
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.locks import lock_key
from virtbackup.job_orchestrator.runner import sweep_once
from virtbackup.runtime.errors import Conflict


async def until(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_cancel_before_the_commit_wins_and_the_commit_never_happens(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    job = await a.submit("sanity", vm_name="vm-c1")
    await a.enter(job.id, "transferring")
    # The other replica answers the cancel: the record says so, and the holder sees it.
    asked = await handlers.cancel_job(b, JobCancelRequest(id=job.id))
    assert asked.cancel_requested and asked.state == "running"
    await until(lambda: a.cancel_event(job.id).is_set())
    with pytest.raises(JobCanceled):
        await a.enter(job.id, "committing")
    # Asking again is harmless; the job ends canceled.
    await handlers.cancel_job(b, JobCancelRequest(id=job.id))
    final = await a.finish(job.id, "canceled", "cancelled by user")
    assert final is not None and final.state == "canceled" and final.phase == "finished"


async def test_past_the_point_of_no_return_a_cancel_is_refused(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    job = await a.submit("sanity", vm_name="vm-c2")
    await a.enter(job.id, "committing")
    with pytest.raises(Conflict, match="point of no return"):
        await handlers.cancel_job(b, JobCancelRequest(id=job.id))
    assert not (await a.store.get(job.id))[0].cancel_requested
    final = await a.finish(job.id, "success", "done")
    assert final is not None and final.state == "success"
    with pytest.raises(Conflict, match="already finished"):
        await handlers.cancel_job(b, JobCancelRequest(id=job.id))


async def test_two_replicas_submitting_one_vm_at_once_run_one_job(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    results = await asyncio.gather(
        a.submit("backup", server_id="local", vm_name="vm odd/name", lock_vm=True),
        b.submit("backup", server_id="local", vm_name="vm odd/name", lock_vm=True),
        return_exceptions=True,
    )
    jobs = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(jobs) == 1 and len(refused) == 1, results
    assert jobs[0].id in str(refused[0])
    # A third submit while it runs is refused too; once it ends, the VM is free.
    with pytest.raises(Conflict, match=jobs[0].id):
        await b.submit("restore", server_id="local", vm_name="vm odd/name", lock_vm=True)
    winner = a if jobs[0].owner == a.holder else b
    await winner.finish(jobs[0].id, "failure", "test")
    again = await b.submit("backup", server_id="local", vm_name="vm odd/name", lock_vm=True)
    await b.finish(again.id, "success", "test")


async def test_backups_of_one_vm_name_from_two_servers_to_one_destination_take_turns(
    replicas: tuple[JobContext, JobContext],
) -> None:
    """Both would pick the same free timestamp in the VM's folder, and the second commit
    would replace the first point's record: the folder is locked per destination (case
    folded, as a case-insensitive destination keeps ``Web1`` and ``web1`` together)."""
    a, b = replicas
    first = await a.submit(
        "backup", server_id="kvm1", vm_name="Web1", destination_id="d1", lock_vm=True
    )
    with pytest.raises(Conflict, match=f"folder of vm web1 in destination d1.*{first.id}"):
        await b.submit(
            "backup", server_id="kvm2", vm_name="web1", destination_id="d1", lock_vm=True
        )
    # Another destination, or a restore, is not held up; and the refused backup left no
    # lock on its own VM behind.
    other = await b.submit(
        "backup", server_id="kvm2", vm_name="web1", destination_id="d2", lock_vm=True
    )
    await b.finish(other.id, "success", "test")
    await a.finish(first.id, "success", "test")
    again = await b.submit(
        "backup", server_id="kvm2", vm_name="web1", destination_id="d1", lock_vm=True
    )
    await b.finish(again.id, "success", "test")


async def test_a_stale_lock_of_an_ended_job_is_replaced(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    job = await a.submit("backup", server_id="local", vm_name="vm-stale", lock_vm=True)

    # The job ends without its lock being released (its holder died after the write).
    def end(j: object) -> object:
        import msgspec

        return msgspec.structs.replace(j, state="failure", phase="finished")  # type: ignore[type-var]

    await a.store.update(job.id, end)  # type: ignore[arg-type]
    kv = a.ctx.bucket(buckets.LOCKS)
    assert (await kv.get(lock_key("local", "vm-stale"))).value is not None
    second = await b.submit("backup", server_id="local", vm_name="vm-stale", lock_vm=True)
    assert second.id != job.id
    await b.finish(second.id, "success", "test")


async def test_the_job_of_a_dead_holder_is_taken_over_and_ended(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    job = await a.submit("sanity", vm_name="vm-dead")
    await a.enter(job.id, "transferring")
    assert await sweep_once(b) == []  # a live holder keeps its job

    # a dies: its lease is no longer renewed and expires (deleted here, not waited for).
    a.leases.held.pop(job.id)
    await a.ctx.bucket(buckets.LEASES).delete(job.id)

    taken = await sweep_once(b)
    assert taken == [job.id] or (await a.store.get(job.id))[0].owner != a.holder
    await until(
        lambda: b.jobs.jobs.get(job.id) is not None and b.jobs.jobs[job.id].state != "running"
    )
    final = (await b.store.get(job.id))[0]
    assert final.state == "failure", final
    assert "stopped while transferring" in final.message
    assert final.owner != a.holder
    # The old holder, should it wake up, can no longer move the job.
    with pytest.raises((JobLost, JobCanceled)):
        await a.enter(job.id, "committing")
    assert await a.finish(job.id, "success", "too late") is None
    assert (await b.store.get(job.id))[0].state == "failure"


async def test_a_job_cancelled_before_its_holder_died_ends_canceled(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    job = await a.submit("sanity", vm_name="vm-dead-2")
    await handlers.cancel_job(b, JobCancelRequest(id=job.id))
    a.leases.held.pop(job.id)
    await a.ctx.bucket(buckets.LEASES).delete(job.id)
    await sweep_once(b)
    await until(lambda: b.jobs.jobs[job.id].state != "queued", timeout=10)
    assert (await b.store.get(job.id))[0].state == "canceled"


async def test_a_lease_renewal_finds_a_lost_lease(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    assert await a.leases.take("lease-test-1")
    assert not await a.leases.take("lease-test-1")
    assert await a.leases.renew_all() == []
    # Lapsed while nobody took it (renewals lagged): taken again by its holder.
    await a.ctx.bucket(buckets.LEASES).delete("lease-test-1")
    assert await a.leases.renew_all() == []
    assert await a.leases.holder_of("lease-test-1") == a.holder
    # Lapsed and taken by another instance (its sweep): lost, and forgotten here.
    await a.ctx.bucket(buckets.LEASES).delete("lease-test-1")
    assert await b.leases.take("lease-test-1")
    assert await a.leases.renew_all() == ["lease-test-1"]
    assert "lease-test-1" not in a.leases.held
    await b.leases.release("lease-test-1")


async def test_list_answers_from_the_index_newest_first(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    made = [await a.submit("sanity", vm_name=f"vm-list-{n}") for n in range(3)]
    await a.finish(made[1].id, "success", "done")
    await until(lambda: all(j.id in b.jobs.jobs for j in made))
    await until(lambda: b.jobs.jobs[made[1].id].state == "success")
    listed = await handlers.list_jobs(b, JobListRequest(type="sanity", limit=1000))
    ids = [j.id for j in listed.jobs]
    assert ids.index(made[2].id) < ids.index(made[1].id) < ids.index(made[0].id)
    done = await handlers.list_jobs(b, JobListRequest(state="success"))
    assert made[1].id in [j.id for j in done.jobs]
    assert made[0].id not in [j.id for j in done.jobs]
    assert len((await handlers.list_jobs(b, JobListRequest(limit=2))).jobs) == 2


async def test_a_job_whose_run_died_without_ending_it_is_ended_by_the_sweep(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, _ = replicas

    async def dies(jc: JobContext, job: object) -> None:
        return None  # ends without a final state, the lease still held here

    job = await a.submit("sanity", vm_name="vm-died", run=dies)
    await until(
        lambda: a.jobs.jobs.get(job.id) is not None and a.jobs.jobs[job.id].state == "failure",
        timeout=10,
    )
    # The final state is written before the lease is released (and the index sees it
    # first): the release follows within the same finish.
    await until(lambda: job.id not in a.leases.held, timeout=10)


async def test_a_holder_that_could_not_renew_for_half_the_lease_stops(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    job = await a.submit("sanity", vm_name="vm-stalled")
    a.leases.renewed[job.id] -= buckets.LEASE_SECONDS / 2  # as if NATS was unreachable
    assert not a.holds(job.id)
    # Its lease still there: a phase change renews it first and goes on (a busy
    # instance's renewals lag; that is no reason to give the job up).
    await a.enter(job.id, "preparing")
    assert a.holds(job.id)
    # Meanwhile taken by another instance: the holder must stop, never commit.
    a.leases.renewed[job.id] -= buckets.LEASE_SECONDS / 2
    await a.ctx.bucket(buckets.LEASES).delete(job.id)
    assert await b.leases.take(job.id)
    with pytest.raises(JobLost):
        await a.enter(job.id, "committing")
    assert not a.holds(job.id)
    await b.leases.release(job.id)
    assert await a.leases.take(job.id)
    await a.finish(job.id, "canceled", "test")


async def test_releasing_an_expired_lease_or_a_replaced_lock_is_quiet(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    assert await a.leases.take("lease-test-2")
    await a.ctx.bucket(buckets.LEASES).delete("lease-test-2")
    assert await b.leases.take("lease-test-2")
    await a.leases.release("lease-test-2")  # not ours any more: nothing happens
    assert await b.leases.holder_of("lease-test-2") == b.holder
    await b.leases.release("lease-test-2")
    assert await b.leases.holder_of("lease-test-2") is None
    assert (await handlers.list_jobs(b, JobListRequest(limit=0))).jobs == []
