"""A command whose answer is larger than the server carries: the requester is told so at
once, not left to wait out its timeout and report that nobody answered (real
nats-server, its default ``max_payload`` of 1 MiB)."""

from __future__ import annotations

import time

import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.errors import ServiceError
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.settings import load_settings


class Ask(msgspec.Struct, frozen=True, kw_only=True):
    size: int


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    text: str


async def test_an_answer_over_max_payload_is_a_fault_saying_so(nats_server: NatsServer) -> None:
    settings = load_settings(**nats_server.client_settings(), request_timeout=8.0)
    broker = make_broker(settings, "test", TracerProvider())
    bus = Bus(broker, "test", request_timeout=8.0)

    @bus.handle("vb.cmd.test.big", Ask)
    async def big(req: Ask) -> Answer:
        return Answer(text="x" * req.size)

    await broker.start()
    try:
        small = await bus.request("vb.cmd.test.big", Ask(size=1000), Answer)
        assert len(small.text) == 1000
        started = time.monotonic()
        with pytest.raises(ServiceError) as refused:
            await bus.request("vb.cmd.test.big", Ask(size=2 << 20), Answer)
        assert time.monotonic() - started < 4, "the requester waited for its timeout"
        assert refused.value.code == "unavailable"
        assert "larger than the bus carries" in refused.value.message
        assert "ask for less" in refused.value.message
    finally:
        await broker.stop()
