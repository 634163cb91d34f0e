"""OpenTelemetry tracing. The W3C ``traceparent`` travels in NATS message headers
(FastStream's telemetry middleware injects and extracts it), so one trace spans
gateway -> orchestrator -> inventory -> workers.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)

from virtbackup.runtime import __version__
from virtbackup.runtime.settings import Settings


def setup_tracing(settings: Settings, service: str) -> TracerProvider:
    """Install the process-wide tracer provider with the configured exporter.

    ``none`` still creates real spans (so trace ids propagate and appear in logs), it
    only does not export them.
    """
    resource = Resource.create(
        {
            "service.name": f"virtbackup-{service}",
            "service.version": __version__,
            "service.instance.id": settings.instance,
        }
    )
    provider = TracerProvider(resource=resource)
    if settings.otel_exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = (
            OTLPSpanExporter(endpoint=settings.otel_endpoint)
            if settings.otel_endpoint
            else OTLPSpanExporter()
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
