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
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Info, disable_created_metrics, start_http_server

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


def start_metrics_listener(host: str, port: int) -> MetricsListener | None:
    """Serve the default registry at ``http://host:port/metrics`` (a thread of its own,
    so a slow scrape never holds the event loop). ``None`` when ``port`` is 0 (off).
    ``OSError`` when the address cannot be bound."""
    if port == 0:
        return None
    server, thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%s/metrics", host, bound)
    return MetricsListener(host=host, port=int(bound), server=server, thread=thread)
