"""Work queues against a real nats-server: trace context, redelivery, drops, keepalive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import WORK, ConsumerSpec
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.work import WorkConsumer, WorkMessage, publish_work, purge_subject


class Item(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
async def queue(bus: Bus, provider: TracerProvider) -> WorkConsumer[Item]:
    """A durable consumer of ``vb.work.transfer.j1`` with a one-second ack wait."""
    spec = ConsumerSpec(
        durable="test-workers",
        stream=WORK.name,
        filter_subject=subjects.work_transfer("j1"),
        ack_wait_seconds=1.0,
        max_deliver=3,
    )
    consumer = WorkConsumer(bus, spec, Item, tracer=provider.get_tracer("worker"))
    await consumer.ensure()
    return consumer


Handler = Callable[[WorkMessage[Item]], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(
    queue: WorkConsumer[Item], handler: Handler, concurrency: int = 1
) -> AsyncIterator[None]:
    stopping = asyncio.Event()
    task = asyncio.create_task(
        queue.serve(handler, concurrency=concurrency, stopping=stopping, retry_delay=0.1)
    )
    try:
        yield
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


async def publish(bus: Bus, n: int, job: str = "j1") -> bool:
    return await publish_work(
        bus, subjects.work_transfer(job), Item(n), stream=WORK, msg_id=f"{job}-{n}"
    )


async def pending(bus: Bus, consumer: str = "test-workers") -> tuple[int, int]:
    """(messages not yet delivered, delivered but not settled) of the consumer."""
    info = await bus.js.consumer_info(WORK.name, consumer)
    return info.num_pending, info.num_ack_pending


async def test_the_handler_runs_in_the_publishers_trace(
    bus: Bus, queue: WorkConsumer[Item], provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    seen: list[tuple[int, int, int]] = []
    done = asyncio.Event()

    async def handler(msg: WorkMessage[Item]) -> None:
        ctx = trace.get_current_span().get_span_context()
        seen.append((msg.item.n, ctx.trace_id, msg.num_delivered))
        await msg.ack()
        done.set()

    with provider.get_tracer("client").start_as_current_span("job") as job_span:
        assert await publish(bus, 7)
    trace_id = job_span.get_span_context().trace_id

    async with serving(queue, handler):
        await asyncio.wait_for(done.wait(), 10)
    assert seen == [(7, trace_id, 1)]
    process = [s for s in spans.get_finished_spans() if s.name.endswith(" process")]
    assert len(process) == 1
    span = process[0]
    assert span.name == "vb.work.transfer.j1 process"
    assert span.kind == trace.SpanKind.CONSUMER
    assert span.context is not None and span.context.trace_id == trace_id
    # Its parent is the publish side's span, not a span of its own making.
    assert span.parent is not None
    published = {s.context.span_id for s in spans.get_finished_spans() if s.context}
    assert span.parent.span_id in published
    assert await pending(bus) == (0, 0)


async def test_an_item_without_trace_context_gets_a_trace_of_its_own(
    bus: Bus, queue: WorkConsumer[Item]
) -> None:
    # Published as an outside client would: no traceparent header.
    await bus.js.publish(subjects.work_transfer("j1"), b'{"n":1}', stream=WORK.name)
    msg = await queue.fetch(timeout=5)
    assert msg is not None and msg.item == Item(1)
    assert len(msg.trace_context) == 0
    await msg.ack()
    await queue.close()


async def test_nak_redelivers_and_counts_deliveries(bus: Bus, queue: WorkConsumer[Item]) -> None:
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handler(msg: WorkMessage[Item]) -> None:
        deliveries.append(msg.num_delivered)
        if msg.num_delivered < 2:
            await msg.nak(delay=0.2)
        else:
            await msg.ack()
            done.set()

    await publish(bus, 1)
    async with serving(queue, handler):
        await asyncio.wait_for(done.wait(), 10)
    assert deliveries == [1, 2]
    assert await pending(bus) == (0, 0)


async def test_term_drops_the_item_for_good(bus: Bus, queue: WorkConsumer[Item]) -> None:
    deliveries: list[int] = []

    async def handler(msg: WorkMessage[Item]) -> None:
        deliveries.append(msg.item.n)
        await msg.term()

    await publish(bus, 1)
    async with serving(queue, handler):
        await asyncio.sleep(2.5)  # more than twice the ack wait
    assert deliveries == [1]
    assert await pending(bus) == (0, 0)


async def test_a_handler_that_raises_gets_its_item_again(
    bus: Bus, queue: WorkConsumer[Item], provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handler(msg: WorkMessage[Item]) -> None:
        deliveries.append(msg.num_delivered)
        if msg.num_delivered == 1:
            raise RuntimeError("boom")
        await msg.ack()
        done.set()

    await publish(bus, 1)
    async with serving(queue, handler):
        await asyncio.wait_for(done.wait(), 10)
    assert deliveries == [1, 2]
    failed = [
        s
        for s in spans.get_finished_spans()
        if s.name.endswith(" process") and s.status.status_code == trace.StatusCode.ERROR
    ]
    assert len(failed) == 1


async def test_a_long_item_is_kept_alive_past_the_ack_wait(
    bus: Bus, queue: WorkConsumer[Item]
) -> None:
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handler(msg: WorkMessage[Item]) -> None:
        deliveries.append(msg.num_delivered)
        await asyncio.sleep(2.5)  # 2.5 ack waits
        await msg.ack()
        done.set()

    await publish(bus, 1)
    # Two slots: a redelivery would reach the second one.
    async with serving(queue, handler, concurrency=2):
        await asyncio.wait_for(done.wait(), 10)
    assert deliveries == [1]


async def test_items_wait_in_the_stream_not_in_the_worker(
    bus: Bus, queue: WorkConsumer[Item]
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(msg: WorkMessage[Item]) -> None:
        started.set()
        await release.wait()
        await msg.ack()

    for n in range(3):
        await publish(bus, n)
    async with serving(queue, handler, concurrency=1):
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.5)
        # One item in the handler; the other two are still undelivered.
        assert await pending(bus) == (2, 1)
        release.set()
        await asyncio.sleep(0.5)
    assert await pending(bus) == (0, 0)


async def test_a_second_publish_of_an_id_is_dropped(bus: Bus, queue: WorkConsumer[Item]) -> None:
    assert await publish(bus, 1) is True
    assert await publish(bus, 1) is False
    assert await pending(bus) == (1, 0)


async def test_purge_drops_one_jobs_items_only(bus: Bus, queue: WorkConsumer[Item]) -> None:
    for n in range(3):
        await publish(bus, n, job="j1")
        await publish(bus, n, job="j2")
    await purge_subject(bus, WORK, subjects.work_transfer("j1"))
    assert await pending(bus) == (0, 0)
    info = await bus.js.stream_info(WORK.name)
    assert info.state.messages == 3  # j2's


async def test_an_undecodable_item_is_dropped(bus: Bus, queue: WorkConsumer[Item]) -> None:
    await bus.js.publish(subjects.work_transfer("j1"), b"not json", stream=WORK.name)
    await publish(bus, 5)
    assert await queue.fetch(timeout=5) is None
    msg = await queue.fetch(timeout=5)
    assert msg is not None and msg.item == Item(5)
    await msg.ack()
    await queue.close()
    assert await pending(bus) == (0, 0)


async def test_stop_cancels_busy_handlers_at_once_and_leaves_their_items(
    bus: Bus, queue: WorkConsumer[Item]
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(msg: WorkMessage[Item]) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await publish(bus, 1)
    stopping = asyncio.Event()
    task = asyncio.create_task(queue.serve(handler, concurrency=1, stopping=stopping))
    await asyncio.wait_for(started.wait(), 10)
    stopping.set()
    await asyncio.wait_for(task, 1.0)  # every slot busy: no waiting for one to free
    assert cancelled.is_set()
    # Not settled: it goes to another worker once its ack wait is over.
    assert await pending(bus) == (0, 1)
