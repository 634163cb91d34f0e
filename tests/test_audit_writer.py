"""The operation log's writer against a real nats-server: a record that cannot be stored
is never dropped silently (an error naming it, and ``virtbackup_audit_records_lost``),
records are stored in order once ``VB_AUDIT`` exists, and the stream is made with the
retention setting and no purge. And the monitor's reading of nats-server's own
monitoring endpoint."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from virtbackup.contracts.streams import AUDIT, DAY
from virtbackup.contracts.v1.audit import OperaRecord
from virtbackup.gateway.audit_log import AuditTrail, OperaFilter
from virtbackup.gateway.controllers.admin_monitor import read_varz
from virtbackup.runtime.audit import provision_audit
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.nats_server import NatsServer, nats_server_binary
from virtbackup.runtime.ports import free_port
from virtbackup.runtime.settings import load_settings


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    settings = load_settings(**nats_server.client_settings(), request_timeout=2.0)
    broker = make_broker(settings, "test", TracerProvider())
    the_bus = Bus(broker, "test", request_timeout=2.0)
    await broker.connect()
    try:
        yield the_bus
    finally:
        await broker.stop()


def record(request_id: str) -> OperaRecord:
    return OperaRecord(
        actor="token",
        time="2026-11-30T12:00:00.000Z",
        listener="api",
        method="POST",
        route="/servers/{server_id}/refresh",
        path="/servers/local/refresh",
        target={"server_id": "local"},
        status=200,
        success=True,
        request_id=request_id,
    )


def lost() -> float:
    return REGISTRY.get_sample_value("virtbackup_audit_records_lost_total") or 0.0


async def test_records_that_cannot_be_stored_are_logged_and_counted(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="virtbackup.gateway.audit_log")
    trail = AuditTrail(bus, queue_max=1)
    before = lost()
    trail.submit(record("queued-1"))
    trail.submit(record("overflow-2"))  # the queue holds one
    assert lost() == before + 1
    assert "overflow-2" in caplog.text and "the queue is full" in caplog.text
    # No VB_AUDIT: JetStream acknowledges nothing; the writer gives up after retrying.
    writer = asyncio.create_task(trail.run())
    try:
        await asyncio.wait_for(trail.queue.join(), 20)
        assert lost() == before + 2
        assert "queued-1" in caplog.text and "JetStream did not store it" in caplog.text
        # Once the stream exists, records are stored in order and listed newest first.
        await provision_audit(bus, 30)
        for index in range(3):
            trail.submit(record(f"stored-{index}"))
            await asyncio.wait_for(trail.queue.join(), 20)
    finally:
        writer.cancel()
    found = await trail.list(OperaFilter())
    assert [r.request_id for _, r in found] == ["stored-2", "stored-1", "stored-0"]
    assert lost() == before + 2
    info = await bus.js.stream_info(AUDIT.name)
    assert info.config.max_age == 30 * DAY and info.config.deny_purge
    assert not info.config.deny_delete  # single entries: DELETE .../opera-logs/{id}
    # Stopping with records still queued: each is logged and counted.
    trail.submit(record("at-stop"))
    await trail.drain(0.1)
    assert lost() == before + 3 and "at-stop" in caplog.text


@pytest.fixture
def monitored_nats() -> Iterator[tuple[int, int]]:
    """A nats-server of its own with its monitoring port: (client port, monitoring port)."""
    port, monitor = free_port(), free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port, monitor
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_monitor_reads_nats_own_view_from_its_monitoring_endpoint(
    monitored_nats: tuple[int, int],
) -> None:
    """``read_varz`` against a real nats-server started with its monitoring port: the
    server's own connection count (one client here); a closed port is an error named,
    not an exception."""
    port, monitor = monitored_nats
    url = f"http://127.0.0.1:{monitor}"
    deadline = time.monotonic() + 15
    while "error" in (await read_varz(url)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    client = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        await client.flush()
        varz = await read_varz(url)
    finally:
        await client.close()
    assert varz["connections"] == 1 and varz["totalConnections"] >= 1, varz
    assert varz["memoryBytes"] > 0 and varz["uptime"], varz
    closed = await read_varz(f"http://127.0.0.1:{free_port()}")
    assert set(closed) == {"error"} and "could not be read" in closed["error"]
