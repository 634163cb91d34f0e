"""A service's readiness follows its NATS connection (the pods' readiness probes), and
its streams are created with the replica count it is told (a JetStream cluster)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from nats.js.errors import APIError
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.contracts.streams import EVENTS
from virtbackup.contracts.subjects import NOTIFIER
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.ports import free_port
from virtbackup.runtime.provision import provision
from virtbackup.runtime.service import ServiceSpec, start_service, stop_service
from virtbackup.runtime.settings import load_settings


async def _status_within(url: str, want: int, seconds: float) -> int:
    """Poll ``url`` until it answers ``want`` or ``seconds`` pass; the last status."""
    deadline = time.monotonic() + seconds
    status = -1
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            try:
                status = (await client.get(url)).status_code
            except httpx.HTTPError:
                status = -1
            if status == want or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.2)


async def test_readyz_is_503_while_nats_is_down_and_200_again_after(
    nats_server: NatsServer,
) -> None:
    port = free_port()
    settings = load_settings(
        **nats_server.client_settings(NOTIFIER),
        metrics_host="127.0.0.1",
        metrics_port=port,
        request_timeout=5.0,
    )
    spec = ServiceSpec(name=NOTIFIER, streams=())
    ctx = await start_service(spec, settings)
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        assert await _status_within(url, 200, 5) == 200
        # The metrics are still served on the same listener.
        async with httpx.AsyncClient() as client:
            assert (
                "virtbackup_build_info"
                in (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            )
        nats_server.stop()
        assert await _status_within(url, 503, 15) == 503
        nats_server.restart()
        assert await _status_within(url, 200, 20) == 200
    finally:
        await stop_service(spec, ctx)


async def test_streams_are_created_with_the_replicas_asked_for(nats_server: NatsServer) -> None:
    settings = load_settings(**nats_server.client_settings(), request_timeout=5.0)
    broker = make_broker(settings, "test", TracerProvider())
    bus = Bus(broker, "test", request_timeout=5.0)
    await broker.connect()
    try:
        await provision(bus.js, streams=(EVENTS,), replicas=1)
        info = await bus.js.stream_info(EVENTS.name)
        assert info.config.num_replicas == 1
        # A single server cannot keep 3 copies: JetStream refuses, so the count reached it.
        with pytest.raises(APIError, match="replicas"):
            await provision(bus.js, streams=(EVENTS,), replicas=3)
    finally:
        await broker.stop()


def test_the_replica_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTBACKUP_STREAM_REPLICAS", "3")
    assert load_settings().stream_replicas == 3
    monkeypatch.setenv("VIRTBACKUP_STREAM_REPLICAS", "0")
    with pytest.raises(ValueError, match="stream_replicas"):
        load_settings()
