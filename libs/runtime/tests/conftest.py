"""A real nats-server per test, and a ``Bus`` on it whose spans are kept in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from virtbackup.contracts.streams import EVENTS, WORK
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import provision
from virtbackup.runtime.settings import load_settings


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """Where the spans of ``provider`` end up."""
    return InMemorySpanExporter()


@pytest.fixture
def provider(spans: InMemorySpanExporter) -> TracerProvider:
    """A tracer provider (not the global one) that keeps every finished span in ``spans``."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    return tracer_provider


@pytest.fixture
async def bus(nats_server: NatsServer, provider: TracerProvider) -> AsyncIterator[Bus]:
    """A connected bus (FastStream broker with the telemetry middleware), with
    ``VB_EVENTS`` and ``VB_WORK`` provisioned."""
    settings = load_settings(**nats_server.client_settings(), request_timeout=5.0)
    broker = make_broker(settings, "test", provider)
    the_bus = Bus(broker, "test", request_timeout=5.0)
    await broker.connect()
    await provision(the_bus.js, streams=(EVENTS, WORK))
    try:
        yield the_bus
    finally:
        await broker.stop()
