"""Each service's own Prometheus metrics, on a small HTTP listener of its own.

Every service process serves prometheus-client's default registry (its process metrics,
``virtbackup_build_info`` and whatever the service registers: the job-orchestrator's job
durations, the transfer worker's bytes read, stored and deduplicated, ...) at
``GET /metrics`` on ``VIRTBACKUP_METRICS_HOST:VIRTBACKUP_METRICS_PORT``. The listener is
off unless ``VIRTBACKUP_METRICS_PORT`` is set (``0``: off), and binds loopback unless
``VIRTBACKUP_METRICS_HOST`` says otherwise: it has no authentication of its own, so it
must never be on a public listener. On Kubernetes it binds the pod's address, reached by
Prometheus over the pod network only (a headless Service and the chart's ServiceMonitor;
no Ingress or LoadBalancer exposes it); no secret is in it, only counts, sizes and
durations.

The same listener answers ``GET /readyz`` for a Kubernetes readiness probe: 200
``ready`` while the process's ``ready`` check holds (the service: its NATS connection
is up), 503 ``not ready`` otherwise (before connecting, while reconnecting, after the
bus went away), so a pod cut off from the bus is taken out of its Service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Info, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from virtbackup.runtime import __version__

log = logging.getLogger(__name__)

# No ``*_created`` samples: they double every series and no alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

BUILD_INFO = Info("virtbackup_build", "The VirtBackup version this process runs")
BUILD_INFO.info({"version": __version__})


@dataclass
class MetricsListener:
    """A running metrics endpoint: where it listens; ``close`` stops it."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _app(ready: Callable[[], bool] | None) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/readyz":
            try:
                ok = ready() if ready is not None else True
            except Exception:  # a check that fails is not ready
                ok = False
            body = b"ready\n" if ok else b"not ready\n"
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
            return [body]
        served: Iterable[bytes] = metrics(environ, start_response)
        return served

    return app


def start_metrics_listener(
    host: str, port: int, *, ready: Callable[[], bool] | None = None
) -> MetricsListener | None:
    """Serve the default registry at ``http://host:port/metrics`` and a readiness check
    at ``/readyz`` (200 while ``ready()`` is true, or always without one; 503 when it is
    false or raises), on a thread of its own so a slow scrape never holds the event loop.
    ``None`` when ``port`` is 0 (off). ``OSError`` when the address cannot be bound."""
    if port == 0:
        return None
    server = make_server(host, port, _app(ready), ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="metrics")
    thread.start()
    bound = server.server_address[1]
    log.info("metrics on http://%s:%s/metrics", host, bound)
    return MetricsListener(host=host, port=int(bound), server=server, thread=thread)
