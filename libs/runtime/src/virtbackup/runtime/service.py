"""The process runner every service uses.

A service declares what it owns (streams, consumers, buckets), registers its command
handlers before the broker starts, and may run background tasks. The runner connects,
provisions idempotently, answers ``vb.cmd.<service>.ping``, and on SIGTERM or SIGINT
stops taking messages, lets its tasks finish, and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.contracts import subjects
from virtbackup.contracts.buckets import CONFIG, BucketSpec
from virtbackup.contracts.streams import EVENTS, ConsumerSpec, StreamSpec
from virtbackup.contracts.v1.ping import Ping, Pong
from virtbackup.runtime import __version__
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.heap import freeze_heap
from virtbackup.runtime.hoststats import host_stats
from virtbackup.runtime.logging import setup_logging
from virtbackup.runtime.metrics import MetricsListener, start_metrics_listener
from virtbackup.runtime.provision import provision
from virtbackup.runtime.sealing import SealedConfigBucket, SecretBox
from virtbackup.runtime.settings import Settings, load_settings
from virtbackup.runtime.telemetry import current_trace_id, setup_tracing

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """What a running service has: its settings, the bus, its buckets, a stop signal."""

    name: str
    settings: Settings
    bus: Bus
    tracer_provider: TracerProvider
    buckets: dict[str, KeyValue] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started_at: str = field(default_factory=utcnow_iso)
    metrics: MetricsListener | None = None

    def bucket(self, spec: BucketSpec) -> KeyValue:
        return self.buckets[spec.name]

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run a background task for the life of the service."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s crashed", name)

        self.tasks.append(asyncio.create_task(guarded(), name=name))


Hook = Callable[[ServiceContext], Awaitable[None]]


@dataclass
class ServiceSpec:
    """A service: its name, what it owns, and its hooks.

    ``register`` declares subscribers (before the broker starts); ``start`` runs after
    provisioning with the broker started; ``stop`` runs before the connection closes.
    """

    name: str
    streams: Iterable[StreamSpec] = (EVENTS,)
    consumers: Iterable[ConsumerSpec] = ()
    buckets: Iterable[BucketSpec] = ()
    register: Hook | None = None
    start: Hook | None = None
    stop: Hook | None = None


def register_ping(ctx: ServiceContext) -> None:
    @ctx.bus.handle(subjects.ping(ctx.name), Ping, queue=f"{ctx.name}-ping-{ctx.settings.instance}")
    async def ping(request: Ping) -> Pong:
        host = host_stats(ctx.settings.data_dir) if request.host else None
        return Pong(
            service=ctx.name,
            instance=ctx.settings.instance,
            version=__version__,
            pid=os.getpid(),
            started_at=ctx.started_at,
            trace_id=current_trace_id(),
            host=host,
        )


async def start_service(spec: ServiceSpec, settings: Settings) -> ServiceContext:
    """Connect, provision and start a service; returns its running context."""
    provider = setup_tracing(settings, spec.name)
    broker = make_broker(settings, spec.name, provider)
    ctx = ServiceContext(
        name=spec.name,
        settings=settings,
        bus=Bus(broker, spec.name, request_timeout=settings.request_timeout),
        tracer_provider=provider,
    )
    register_ping(ctx)
    if spec.register:
        await spec.register(ctx)
    await broker.connect()
    ctx.buckets = await provision(
        ctx.bus.js,
        streams=spec.streams,
        consumers=spec.consumers,
        buckets=spec.buckets,
        replicas=settings.stream_replicas,
    )
    if CONFIG.name in ctx.buckets:  # its secrets are sealed at rest (runtime.sealing)
        box = SecretBox.from_settings(settings)
        ctx.buckets[CONFIG.name] = SealedConfigBucket(ctx.buckets[CONFIG.name], box)
    await broker.start()
    try:
        ctx.metrics = start_metrics_listener(
            settings.metrics_host, settings.metrics_port, ready=lambda: ctx.bus.connected
        )
    except OSError as exc:  # a metrics endpoint that cannot bind never stops the service
        log.error(
            "metrics endpoint not started: %s:%s cannot be bound (%s);"
            " set another VIRTBACKUP_METRICS_PORT",
            settings.metrics_host,
            settings.metrics_port,
            exc,
        )
    if spec.start:
        await spec.start(ctx)
    log.info("service started", extra={"nats": settings.nats_url, "version": __version__})
    return ctx


async def stop_service(spec: ServiceSpec, ctx: ServiceContext) -> None:
    ctx.stopping.set()
    if spec.stop:
        await spec.stop(ctx)
    for task in ctx.tasks:
        task.cancel()
    for task in ctx.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await ctx.bus.broker.stop()
    if ctx.metrics is not None:
        ctx.metrics.close()
    ctx.tracer_provider.shutdown()
    log.info("service stopped")


async def serve(spec: ServiceSpec, settings: Settings | None = None) -> None:
    """Run ``spec`` until SIGTERM or SIGINT."""
    settings = settings or load_settings()
    setup_logging(spec.name, settings.log_level, settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctx = await start_service(spec, settings)
    # Once per process, here and not in start_service (tests start many systems in one
    # process): what start-up made lives as long as the process (runtime.heap).
    freeze_heap()
    try:
        await stop.wait()
    finally:
        try:
            await asyncio.wait_for(stop_service(spec, ctx), settings.stop_timeout)
        except TimeoutError:
            # A service must always exit when told to: name what hung, then go. Work it
            # held is redelivered (units) or taken over (jobs) by the other instances.
            for task in asyncio.all_tasks():
                frames = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack()]
                log.error("still running at stop: %s %s", task.get_name(), frames)
            log.error("did not stop within %s s; exiting", settings.stop_timeout)
            logging.shutdown()
            os._exit(1)


def main(spec: ServiceSpec) -> None:
    """Console-script entry point."""
    asyncio.run(serve(spec))
