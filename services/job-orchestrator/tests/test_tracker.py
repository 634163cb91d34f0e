"""The unit tracker against a real nats-server: units out (with the job's trace), results
back once each, and giving up on a failed unit, a cancel or a stall."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.contracts import streams, subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.work import TransferUnit, UnitResult
from virtbackup.job_orchestrator.tracker import JobCanceled, UnitFailed, UnitTracker
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import provision
from virtbackup.runtime.settings import load_settings
from virtbackup.runtime.work import WorkConsumer, WorkMessage

JOB = "job1"


@pytest.fixture
def provider() -> TracerProvider:
    return TracerProvider()


@pytest.fixture
async def bus(nats_server: NatsServer, provider: TracerProvider) -> AsyncIterator[Bus]:
    settings = load_settings(**nats_server.client_settings())  # admin: it sets up a worker too
    broker = make_broker(settings, "job-orchestrator", provider)
    the_bus = Bus(broker, "job-orchestrator", request_timeout=5.0)
    await broker.connect()
    await provision(
        the_bus.js,
        streams=(streams.EVENTS, streams.WORK),
        consumers=(streams.TRANSFER_CONSUMER,),
    )
    try:
        yield the_bus
    finally:
        await broker.stop()


def units(count: int) -> list[TransferUnit]:
    return [
        TransferUnit(job_id=JOB, unit=n, kind="verify", destination_id="fs") for n in range(count)
    ]


def result(unit: TransferUnit, ok: bool = True, error: str = "") -> UnitResult:
    return UnitResult(
        job_id=unit.job_id,
        unit=unit.unit,
        kind=unit.kind,
        disk="vda",
        worker="w",
        ok=ok,
        error=error,
    )


async def take(bus: Bus, count: int) -> list[WorkMessage[TransferUnit]]:
    """``count`` units as a transfer worker gets them."""
    consumer = WorkConsumer(bus, streams.TRANSFER_CONSUMER, TransferUnit)
    got = []
    for _ in range(count):
        msg = await consumer.fetch(timeout=5)
        assert msg is not None
        got.append(msg)
    await consumer.close()
    return got


async def queued(bus: Bus) -> int:
    info = await bus.js.stream_info(streams.WORK.name, subjects_filter=subjects.WORK_ALL)
    return int(info.state.messages)


async def test_each_units_result_comes_back_once(bus: Bus, provider: TracerProvider) -> None:
    tracker = UnitTracker(bus, JOB, asyncio.Event())
    await tracker.open()
    try:
        with provider.get_tracer("test").start_as_current_span("job") as span:
            await tracker.publish(units(3))
        await tracker.publish(units(3)[:1])  # published again (e.g. a retried step)
        assert tracker.published == 3
        assert await queued(bus) == 3
        msgs = await take(bus, 3)
        job_trace = span.get_span_context().trace_id
        for msg in msgs:
            parent = trace.get_current_span(msg.trace_context).get_span_context()
            assert parent.trace_id == job_trace
        # Unit 1 is reported twice (redelivered after its worker died), then 2 and 0.
        for n in (1, 1, 2, 0):
            await bus.publish_event(EventType.UNIT_DONE, result(msgs[n].item), key=JOB)
        got = [r.unit async for r in tracker.results()]
    finally:
        await tracker.close()
    assert got == [1, 2, 0]
    assert sorted(tracker.done) == [0, 1, 2]


async def test_a_failed_unit_fails_the_job(bus: Bus) -> None:
    tracker = UnitTracker(bus, JOB, asyncio.Event())
    await tracker.open()
    try:
        await tracker.publish(units(2))
        await bus.publish_event(
            EventType.UNIT_DONE, result(units(2)[1], ok=False, error="disk gone"), key=JOB
        )
        with pytest.raises(UnitFailed, match="unit 1 \\(vda\\): disk gone"):
            async for _ in tracker.results():
                pass
    finally:
        await tracker.close()


async def test_a_cancel_stops_the_wait_and_purge_drops_the_queued_units(bus: Bus) -> None:
    canceled = asyncio.Event()
    tracker = UnitTracker(bus, JOB, canceled)
    other = UnitTracker(bus, "job2", asyncio.Event())
    await tracker.open()
    try:
        await tracker.publish(units(3))
        await other.publish(
            [TransferUnit(job_id="job2", unit=0, kind="verify", destination_id="fs")]
        )
        asyncio.get_running_loop().call_later(0.3, canceled.set)
        with pytest.raises(JobCanceled):
            async for _ in tracker.results():
                pass
        await tracker.purge()
    finally:
        await tracker.close()
    assert await queued(bus) == 1  # job2's unit stays


async def test_no_progress_for_stall_seconds_fails_the_job(bus: Bus) -> None:
    tracker = UnitTracker(bus, JOB, asyncio.Event(), stall_seconds=0.5)
    await tracker.open()
    try:
        await tracker.publish(units(1))
        with pytest.raises(UnitFailed, match="no transfer worker finished a unit"):
            async for _ in tracker.results():
                pass
    finally:
        await tracker.close()
        await tracker.close()  # idempotent
