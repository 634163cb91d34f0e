"""``GET /metrics`` of the HyperSDK API: Prometheus text, behind the API's token.

The document's metrics:

* ``hypersdk_api_requests_total{method,path,status}``: requests to this listener
  (``path`` is the route's template, e.g. ``/jobs/{id}``; ``unmatched`` for unknown paths,
  so a scan cannot blow up the label set; ``status`` is the HTTP reason phrase, ``OK``);
* ``hypersdk_api_request_duration_seconds{method,path}``: their durations (histogram);
* ``hypersdk_jobs_total{status}``: jobs in the job store by the document's status
  (``pending``, ``running``, ``completed``, ``failed``, ``cancelled``), read at each scrape;
* ``hypersdk_workers_active``: transfer workers working on a unit now (and
  ``hypersdk_workers_live``: live transfer workers);
* ``hypersdk_build_info{version}``: 1.

And VirtBackup's own, from the job store at each scrape (so every gateway replica
answers the same, and a restart loses nothing):

* ``virtbackup_last_successful_backup_timestamp_seconds{server,vm}``: when the last
  successful backup of each VM finished (Unix seconds). Alert on
  ``time() - virtbackup_last_successful_backup_timestamp_seconds > 26 * 3600``;
* ``virtbackup_last_backup_success{server,vm}``: 1 when the VM's latest finished backup
  succeeded, 0 when it failed or was cancelled.

The services' own metrics (job durations, bytes read, stored and deduplicated) are on
each service's metrics endpoint (``virtbackup.runtime.metrics``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from http import HTTPStatus

import msgspec
from litestar import Controller, Response, get
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from virtbackup.contracts.v1.jobs import Job
from virtbackup.gateway.auth import ASGIApp, Message, Receive, Scope, Send
from virtbackup.gateway.errors import responses
from virtbackup.gateway.hypersdk_status import STATUS_OF, WorkerCounts, all_jobs, worker_counts
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import __version__
from virtbackup.runtime.errors import Unavailable
from virtbackup.runtime.metrics import BUILD_INFO as _BUILD_INFO  # noqa: F401 (no _created)

#: Prometheus' text format 0.0.4; Litestar adds ``; charset=utf-8`` to every ``text/``
#: media type, so naming the charset here too would send it twice.
CONTENT_TYPE = "text/plain; version=0.0.4"

#: The listener's own metrics (requests), kept for the life of the process.
API_REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "hypersdk_api_requests_total",
    "Total API requests",
    ["method", "path", "status"],
    registry=API_REGISTRY,
)
DURATION = Histogram(
    "hypersdk_api_request_duration_seconds",
    "API request duration",
    ["method", "path"],
    registry=API_REGISTRY,
)
BUILD = Gauge("hypersdk_build_info", "Build information", ["version"], registry=API_REGISTRY)
BUILD.labels(__version__).set(1)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


class RequestMetrics:
    """ASGI middleware counting every HTTP request of the listener (401s included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = str(scope.get("path_template") or "unmatched")
            method = str(scope.get("method", ""))
            REQUESTS.labels(method, path, _phrase(status)).inc()
            DURATION.labels(method, path).observe(time.perf_counter() - started)


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class StateCollector(Collector):
    """The metrics read from real state at one scrape."""

    def __init__(self, jobs: list[Job], workers: WorkerCounts) -> None:
        self.jobs = jobs
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_status = GaugeMetricFamily(
            "hypersdk_jobs_total", "Total jobs by status", labels=["status"]
        )
        counts = dict.fromkeys(STATUS_OF.values(), 0)
        for job in self.jobs:
            counts[STATUS_OF[job.state]] += 1
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily(
            "hypersdk_workers_active", "Active workers", value=self.workers.busy
        )
        yield GaugeMetricFamily(
            "hypersdk_workers_live", "Live transfer workers", value=self.workers.live
        )
        last_ok = GaugeMetricFamily(
            "virtbackup_last_successful_backup_timestamp_seconds",
            "When the last successful backup of a VM finished (Unix seconds)",
            labels=["server", "vm"],
        )
        latest_ok = GaugeMetricFamily(
            "virtbackup_last_backup_success",
            "1 when the latest finished backup of a VM succeeded, else 0",
            labels=["server", "vm"],
        )
        newest_ok: dict[tuple[str, str], float] = {}
        newest: dict[tuple[str, str], tuple[float, bool]] = {}
        for job in self.jobs:
            if job.type != "backup" or not job.finished_at or not job.server_id:
                continue
            if not job.vm_name:
                continue
            vm = (job.server_id, job.vm_name)
            at = _timestamp(job.finished_at)
            if job.state == "success" and at > newest_ok.get(vm, 0.0):
                newest_ok[vm] = at
            if vm not in newest or at > newest[vm][0]:
                newest[vm] = (at, job.state == "success")
        for vm, at in sorted(newest_ok.items()):
            last_ok.add_metric(list(vm), at)
        for vm, (_, ok) in sorted(newest.items()):
            latest_ok.add_metric(list(vm), 1.0 if ok else 0.0)
        yield last_ok
        yield latest_ok


async def render(gw: Gateway) -> bytes:
    """The whole exposition: the listener's request metrics, then those read from state
    now. ``Unavailable`` when the job-orchestrator does not answer."""
    jobs = await all_jobs(gw)
    workers = await worker_counts(gw)
    state = CollectorRegistry(auto_describe=False)
    state.register(StateCollector(jobs, workers))
    return generate_latest(API_REGISTRY) + generate_latest(state)


def _error(status: int, message: str) -> Response[bytes]:
    body = msgspec.json.encode({"error": message})
    return Response(body, status_code=status, media_type="application/json")


async def metrics_response(gw: Gateway, *, dedicated: bool) -> Response[bytes]:
    """``/metrics`` as the configuration says: 503 when ``metrics.enabled`` is false,
    404 on the HyperSDK listener when ``metrics.port`` names another port, 503 there
    naming the port and the reason when that port's listener could not start."""
    cfg, _ = await gw.config.load()
    if not cfg.metrics.enabled:
        return _error(503, "metrics are not enabled (metrics.enabled is false)")
    port = cfg.metrics.port
    elsewhere = port is not None and port != gw.settings.hypersdk_port
    if elsewhere and not dedicated and gw.metrics_failure and port == gw.metrics_failed_port:
        return _error(503, gw.metrics_failure)
    if elsewhere and not dedicated:
        return _error(404, f"metrics are served on port {port} (metrics.port)")
    try:
        body = await render(gw)
    except Unavailable as exc:
        return _error(503, str(exc))
    return Response(body, media_type=CONTENT_TYPE)


class MetricsController(Controller):
    @get("/metrics", media_type=CONTENT_TYPE, responses=responses(404, 503))
    async def metrics(self, gw: Gateway) -> Response[bytes]:
        """Prometheus text format (see the module docstring for the metrics); 503
        ``{"error": ...}`` when ``metrics.enabled`` is false or the job store does not
        answer, 404 when ``metrics.port`` puts them on a listener of their own."""
        return await metrics_response(gw, dedicated=False)


class DedicatedMetricsController(Controller):
    @get("/metrics", media_type=CONTENT_TYPE, responses=responses(503))
    async def metrics(self, gw: Gateway) -> Response[bytes]:
        """The same metrics on the listener of ``metrics.port``."""
        return await metrics_response(gw, dedicated=True)


def dedicated_port(gw: Gateway, metrics_port: int | None) -> int | None:
    """The port of a listener of its own for ``/metrics``, or None when the HyperSDK
    listener serves them."""
    if metrics_port is None or metrics_port == gw.settings.hypersdk_port:
        return None
    return metrics_port
