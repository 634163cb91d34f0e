"""The work loop against a real nats-server and a filesystem repository: what a unit's job
record in ``VB_JOBS`` decides, results carrying the job's trace, caches dropped at job end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry import trace

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.streams import EVENTS
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.config import AgentConfig, Destination
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.work import ChunkRef, TransferUnit, UnitResult
from virtbackup.repository.repository import Repository
from virtbackup.runtime.agent_config import update_agent_config
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.events import EventFeed
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.service import ServiceContext, start_service, stop_service
from virtbackup.runtime.settings import load_settings
from virtbackup.runtime.work import WorkConsumer, publish_work
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker import service
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.consumer import Worker, follow_job_ends
from virtbackup.transfer_worker.units import UnitContext

#: The service as it runs, minus its background tasks (each test starts what it needs).
SPEC = dataclasses.replace(service.SPEC, start=None, stop=None)


@pytest.fixture
async def ctx(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[ServiceContext]:
    """A started transfer-worker context with a filesystem destination ``fs``."""
    settings = load_settings(
        **nats_server.client_settings(),  # admin: the test writes VB_JOBS as the orchestrator
        data_dir=tmp_path / "data",
        instance="worker-test",
        work_ack_wait=2.0,
        worker_units=2,
    )
    context = await start_service(SPEC, settings)
    dest = Destination(id="fs", driver_id="filesystem", params={"path": str(tmp_path / "repo")})

    def configure(cfg: AgentConfig) -> AgentConfig:
        return msgspec.structs.replace(cfg, destinations=[dest], backup_destination_id="fs")

    await update_agent_config(context.bucket(buckets.CONFIG), configure)
    try:
        yield context
    finally:
        await stop_service(SPEC, context)


@pytest.fixture
async def chunk(tmp_path: Path) -> str:
    """The id of a chunk stored in the destination's repository."""
    (tmp_path / "repo").mkdir()
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path / "repo" / "VirtBackup"))
    data = b"\x5a" * 4096
    chunk_id = repo.chunk_id(data)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    return chunk_id


def make_worker(ctx: ServiceContext, cls: type[Worker] = Worker) -> Worker:
    uctx = UnitContext(
        worker=ctx.settings.instance,
        executor=ThreadPoolExecutor(2),
        budget=ByteBudget(64 << 20),
    )
    consumer = WorkConsumer(ctx.bus, service.transfer_consumer(ctx), TransferUnit)
    return cls(ctx, uctx, consumer)


async def put_job(ctx: ServiceContext, job_id: str, **fields: Any) -> None:
    now = utcnow_iso()
    values: dict[str, Any] = {"state": "running", **fields}
    job = Job(id=job_id, type="sanity", created_at=now, updated_at=now, **values)
    await ctx.bucket(buckets.JOBS).put(job_id, msgspec.json.encode(job))


def verify_unit(job_id: str, chunk_ids: list[str], n: int = 0) -> TransferUnit:
    return TransferUnit(
        job_id=job_id,
        unit=n,
        kind="verify",
        destination_id="fs",
        chunks=[ChunkRef(index=0, id=c) for c in chunk_ids],
    )


async def publish(ctx: ServiceContext, unit: TransferUnit) -> None:
    await publish_work(
        ctx.bus,
        subjects.work_transfer(unit.job_id),
        unit,
        stream=streams.WORK,
        msg_id=f"{unit.job_id}-{unit.unit}",
    )


async def settled(ctx: ServiceContext, timeout: float = 10.0) -> None:
    """Until the consumer has no unit waiting and none in a worker's hands."""
    deadline = time.monotonic() + timeout
    while True:
        info = await ctx.bus.js.consumer_info(streams.WORK.name, streams.TRANSFER_CONSUMER.durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.1)


async def running(worker: Worker) -> asyncio.Task[None]:
    await worker.consumer.ensure()
    return asyncio.create_task(worker.run())


async def stop(ctx: ServiceContext, task: asyncio.Task[None]) -> None:
    ctx.stopping.set()
    await asyncio.wait_for(task, 10)


async def test_a_unit_of_a_running_job_is_worked_and_its_result_continues_the_trace(
    ctx: ServiceContext, chunk: str
) -> None:
    await put_job(ctx, "j1")
    missing = "0" * 64
    async with EventFeed(ctx.bus, subjects.event(EventType.UNIT_DONE, "j1")) as feed:
        with trace.get_tracer("test").start_as_current_span("job") as span:
            await publish(ctx, verify_unit("j1", [chunk, missing]))
        task = await running(make_worker(ctx))
        try:
            stored = await feed.next(timeout=15)
            await settled(ctx)
        finally:
            await stop(ctx, task)
    assert stored is not None
    result = msgspec.convert(stored.event.payload, UnitResult)
    assert result.ok and result.worker == "worker-test"
    assert [(b.id, b.problem) for b in result.bad] == [(missing, "missing")]
    # The result was published inside the unit's span: it carries the job's trace back.
    msg = await ctx.bus.js.get_msg(EVENTS.name, stored.sequence)
    trace_id = msg.headers["traceparent"].split("-")[1]
    assert trace_id == format(span.get_span_context().trace_id, "032x")


@pytest.mark.parametrize(
    "job",
    [
        {"cancel_requested": True},
        {"state": "canceled"},
        {"state": "success"},
        None,  # no record at all
    ],
    ids=["cancel-requested", "canceled", "finished", "no-record"],
)
async def test_units_of_a_job_that_ended_or_is_cancelled_are_dropped_unworked(
    ctx: ServiceContext, chunk: str, job: dict[str, Any] | None
) -> None:
    # A worker that never saw a cancel event decides from the job's record alone.
    if job is not None:
        await put_job(ctx, "gone", **job)
    await put_job(ctx, "live")
    async with EventFeed(ctx.bus, subjects.event(EventType.UNIT_DONE) + ".*") as feed:
        for n in range(3):
            await publish(ctx, verify_unit("gone", [chunk], n))
        await publish(ctx, verify_unit("live", [chunk]))
        task = await running(make_worker(ctx))
        try:
            stored = await feed.next(timeout=15)
            await settled(ctx)
            assert await feed.next(timeout=0.5) is None
        finally:
            await stop(ctx, task)
    assert stored is not None and stored.key == "live"


async def test_a_cancel_while_a_unit_runs_keeps_its_result_back(
    ctx: ServiceContext, chunk: str
) -> None:
    worked: list[int] = []

    class CancelledMidway(Worker):
        async def _process(self, unit: TransferUnit) -> UnitResult:
            result = await super()._process(unit)
            worked.append(unit.unit)
            await put_job(ctx, unit.job_id, cancel_requested=True)  # a cancel comes in
            return result

    await put_job(ctx, "j2")
    async with EventFeed(ctx.bus, subjects.event(EventType.UNIT_DONE, "j2")) as feed:
        await publish(ctx, verify_unit("j2", [chunk]))
        task = await running(make_worker(ctx, CancelledMidway))
        try:
            await settled(ctx)
            assert await feed.next(timeout=0.5) is None
        finally:
            await stop(ctx, task)
    assert worked == [0]


async def test_a_jobs_caches_go_when_it_ends(ctx: ServiceContext) -> None:
    worker = make_worker(ctx)
    worker.uctx.known.update({"j8": {"a"}, "j9": {"b"}})
    task = asyncio.create_task(follow_job_ends(ctx, worker))
    try:
        await asyncio.sleep(0.3)  # the feed is open
        await ctx.bus.publish_event(EventType.JOB_UPDATED, {"id": "j8"}, key="j8")
        await ctx.bus.publish_event(EventType.JOB_FINISHED, {"id": "j9"}, key="j9")
        await wait_for(lambda: "j9" not in worker.uctx.known)
        assert "j8" in worker.uctx.known  # an update is not an end
        await ctx.bus.publish_event(EventType.JOB_CANCELED, {"id": "j8"}, key="j8")
        await wait_for(lambda: "j8" not in worker.uctx.known)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["event", "record"])
async def test_a_unit_in_progress_is_abandoned_when_its_job_ends(
    ctx: ServiceContext, chunk: str, how: str
) -> None:
    """Issue 11, item 11: after an orchestrator died and another failed its job, workers
    kept working on the units in their hands to the end. Now the unit stops at the job's
    end event, or (the event missed) at the next look at its record."""
    started = asyncio.Event()
    finished: list[int] = []

    class Slow(Worker):
        async def _process(self, unit: TransferUnit) -> UnitResult:
            started.set()
            await asyncio.sleep(60)  # a unit reading a large disk
            finished.append(unit.unit)
            return await super()._process(unit)

    await put_job(ctx, "j3")
    worker = make_worker(ctx, Slow)
    follower = asyncio.create_task(follow_job_ends(ctx, worker)) if how == "event" else None
    async with EventFeed(ctx.bus, subjects.event(EventType.UNIT_DONE, "j3")) as feed:
        await publish(ctx, verify_unit("j3", [chunk]))
        task = await running(worker)
        try:
            await asyncio.wait_for(started.wait(), 10)
            t0 = time.monotonic()
            await put_job(ctx, "j3", state="failure")  # failed by another replica
            if how == "event":
                await asyncio.sleep(0.3)  # the feed is open
                await ctx.bus.publish_event(EventType.JOB_FINISHED, {"id": "j3"}, key="j3")
            await wait_for(lambda: not worker.running, timeout=10)
            await settled(ctx)
            elapsed = time.monotonic() - t0
            assert await feed.next(timeout=0.5) is None
        finally:
            await stop(ctx, task)
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
    assert finished == []
    assert elapsed < (2.0 if how == "event" else 5.0), elapsed
