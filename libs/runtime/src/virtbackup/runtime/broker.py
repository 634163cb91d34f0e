"""The FastStream NATS broker, set up the same way in every service."""

from __future__ import annotations

from fast_depends.msgspec import MsgSpecSerializer
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.runtime.settings import Settings


def make_broker(settings: Settings, service: str, tracer_provider: TracerProvider) -> NatsBroker:
    """A broker that (de)serialises with msgspec and carries W3C trace context in headers."""
    return NatsBroker(
        settings.nats_url,
        name=f"virtbackup-{service}",
        serializer=MsgSpecSerializer(),
        middlewares=(NatsTelemetryMiddleware(tracer_provider=tracer_provider),),
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
    )
