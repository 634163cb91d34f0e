"""The gateway's live streams under many clients (issue 20, ``bench/load.py``): every
``/events`` stream that starts now shares one feed, each message is encoded once for all
of them, a stream that falls behind ends without slowing the others, a fan-out lets the
event loop run between batches of clients, and the start-up heap is frozen out of the
cyclic garbage collector; ``/ws`` clients that connect together share one listing of the
jobs, made in slices. Against a real nats-server (the hub in this process) and the
session's running system (the gateway's log); no timing is asserted."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from harness import System
from litestar.response import ServerSentEventMessage
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import EVENTS, JOB_LOGS
from virtbackup.contracts.v1.hypersdk_jobs import job_view
from virtbackup.contracts.v1.jobctl import LogLine
from virtbackup.contracts.v1.jobs import Job
from virtbackup.gateway.controllers.events import from_hub
from virtbackup.gateway.fanout import BATCH, offer_in_batches
from virtbackup.gateway.heap import freeze_when_started
from virtbackup.gateway.hypersdk_ws import message
from virtbackup.gateway.sse_hub import Listener, SseHub
from virtbackup.gateway.ws_snapshot import VIEW_SLICE, Snapshots, jobs_message
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import ensure_stream
from virtbackup.runtime.settings import load_settings

STREAMS = 20


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    settings = load_settings(**nats_server.client_settings(), request_timeout=5.0)
    broker = make_broker(settings, "test", TracerProvider())
    the_bus = Bus(broker, "test", request_timeout=5.0)
    await broker.connect()
    try:
        await ensure_stream(the_bus.js, EVENTS)
        await ensure_stream(the_bus.js, JOB_LOGS)
        yield the_bus
    finally:
        await broker.stop()


async def take(listener: Listener, count: int) -> list[ServerSentEventMessage]:
    """``count`` messages of ``listener``, waiting at most 10 s for each."""
    return [await asyncio.wait_for(listener.queue.get(), 10) for _ in range(count)]


def sse_fields(message: ServerSentEventMessage) -> dict[str, Any]:
    """The fields of one encoded server-sent event (``id``, ``event``, ``data`` decoded)."""
    fields: dict[str, Any] = {}
    for line in message.encode().decode().splitlines():
        if line:
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
    return fields


async def test_every_stream_gets_each_message_encoded_once_in_order(bus: Bus) -> None:
    hub = SseHub(bus)
    listeners = [Listener() for _ in range(STREAMS)]
    for listener in listeners:
        await hub.join(listener)
    assert len(hub.tasks) == 2  # one event feed and one log feed, whatever the streams
    for n in range(5):
        await bus.publish_event("job.progress", {"id": "j1", "n": n}, key="j1")
    line = LogLine(ts="2026-12-01T00:00:00Z", line="reading disk vda")
    await bus.publish_core(subjects.job_log("j1"), msgspec.json.encode(line))
    got = [await take(listener, 6) for listener in listeners]
    assert hub.encoded == 6  # once per message, not once per stream (120 before)
    for messages in got:
        # The very objects the hub encoded: no stream encodes a message again.
        assert all(a is b for a, b in zip(messages, got[0], strict=True))
    events = [sse_fields(m) for m in got[0] if m.event == "job.progress"]
    assert [e["data"]["payload"]["n"] for e in events] == [0, 1, 2, 3, 4]
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
    assert events[0]["data"]["type"] == "job.progress"
    (log_line,) = [sse_fields(m) for m in got[0] if m.event == "job.log"]
    assert "id" not in log_line
    assert log_line["data"] == {
        "type": "job.log",
        "payload": {"jobId": "j1", "ts": line.ts, "level": "info", "line": line.line},
    }
    for listener in listeners:
        await hub.leave(listener)
    assert hub.tasks == []  # the last stream gone: the feeds are closed


async def test_a_stream_that_falls_behind_ends_and_the_others_get_everything(
    bus: Bus,
) -> None:
    hub = SseHub(bus)
    slow, fast = Listener(size=2), Listener()
    await hub.join(slow)
    await hub.join(fast)
    for n in range(4):
        await bus.publish_event("job.progress", {"id": "j2", "n": n}, key="j2")
    got = await take(fast, 4)
    assert [sse_fields(m)["data"]["payload"]["n"] for m in got] == [0, 1, 2, 3]
    assert slow.ended.is_set() and slow.queue.qsize() == 2
    assert hub.clients == {fast}  # let go of at once, whether or not it leaves
    await hub.leave(slow)
    await hub.leave(fast)
    assert hub.tasks == []
    # Its stream ends without sending what it had queued: the client resumes by id.
    assert [m async for m in from_hub(slow)] == []


async def test_a_stream_waiting_for_messages_ends_at_once_when_ended() -> None:
    listener = Listener()
    got: list[ServerSentEventMessage] = []

    async def read() -> None:
        got.extend([m async for m in from_hub(listener)])

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.05)  # waiting on the empty queue
    assert not reader.done()
    listener.end()  # as when the hub's feeds fail
    await asyncio.wait_for(reader, 5)  # not after the 15 s keep-alive
    assert got == []


async def test_a_fan_out_lets_the_loop_run_between_batches() -> None:
    """Another task runs before the last client is offered the message: one event loop
    turn never carries the sends of every client."""
    offered: list[int] = []

    class Probe:
        def offer(self, item: int, /) -> None:
            offered.append(item)

    clients = [Probe() for _ in range(5 * BATCH)]
    seen_when_other_task_ran: list[int] = []

    async def other() -> None:
        seen_when_other_task_ran.append(len(offered))

    task = asyncio.create_task(other())
    await offer_in_batches(clients, 7)
    await task
    assert offered == [7] * len(clients)
    assert seen_when_other_task_ran and 0 < seen_when_other_task_ran[0] <= BATCH


async def test_the_heap_is_frozen_once_the_servers_have_started() -> None:
    class Server:
        started = False

    server = Server()
    frozen = asyncio.create_task(freeze_when_started([server], poll=0.01))
    try:
        await asyncio.sleep(0.1)
        assert not frozen.done() and gc.get_freeze_count() == 0
        server.started = True
        await asyncio.wait_for(frozen, 10)
        assert gc.get_freeze_count() > 1000  # this process's modules, at least
    finally:
        gc.unfreeze()


def test_the_running_gateway_froze_its_start_up_heap(system: System) -> None:
    log_path = system.data_dir / "gateway.log"
    deadline = time.monotonic() + 60
    records: list[dict[str, Any]] = []
    while not records:
        records = [
            json.loads(line)
            for line in log_path.read_text(errors="replace").splitlines()
            if "start-up heap frozen" in line
        ]
        if not records:
            assert time.monotonic() < deadline, "the gateway never froze its heap"
            time.sleep(0.2)
    assert records[-1]["objects"] > 50_000, records[-1]


# --- /ws's first message -------------------------------------------------------------


async def test_ws_clients_that_connect_together_share_one_listing_begun_after_they_asked() -> None:
    started: list[int] = []
    gate = asyncio.Event()

    async def build() -> bytes:
        started.append(len(started) + 1)
        number = len(started)
        await gate.wait()
        gate.clear()
        return f"listing {number}".encode()

    snapshots = Snapshots(build)
    first = asyncio.create_task(snapshots.get())
    await asyncio.sleep(0.01)
    assert started == [1]
    # Twenty clients ask while listing 1 runs: it began before them, so they share 2.
    others = [asyncio.create_task(snapshots.get()) for _ in range(20)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.wait_for(first, 5) == b"listing 1"
    await asyncio.sleep(0.01)
    assert started == [1, 2]
    gate.set()
    assert set(await asyncio.wait_for(asyncio.gather(*others), 5)) == {b"listing 2"}
    assert snapshots.builds == 2  # 21 before: one listing per client


async def test_a_failed_listing_fails_its_clients_and_the_next_one_lists_again() -> None:
    calls = 0

    async def build() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("no orchestrator answers")
        return b"ok"

    snapshots = Snapshots(build)
    with pytest.raises(RuntimeError, match="no orchestrator"):
        await asyncio.wait_for(snapshots.get(), 5)
    assert await asyncio.wait_for(snapshots.get(), 5) == b"ok"


async def test_the_jobs_message_is_made_in_slices_that_let_the_loop_run() -> None:
    jobs = [
        Job(id=f"job-{n:05d}", type="backup", state="success", vm_name="web1",
            created_at="2026-12-01T00:00:00Z", updated_at="2026-12-01T00:01:00Z")
        for n in range(3 * VIEW_SLICE)
    ]  # fmt: skip
    ran_at: list[int] = []
    made: list[int] = []

    def encode(kind: str, data: dict[str, Any]) -> bytes:
        made.append(len(data["jobs"]))
        return message(kind, data)

    async def other() -> None:
        ran_at.append(len(made))

    task = asyncio.create_task(other())
    data = json.loads(await jobs_message(jobs, encode))
    await task
    assert ran_at == [0]  # ran before the message was made: the loop was not held
    assert data["type"] == "jobs"
    assert data["data"]["jobs"] == [json.loads(msgspec.json.encode(job_view(j))) for j in jobs]
