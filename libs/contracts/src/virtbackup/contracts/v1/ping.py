"""Liveness ping answered by every service instance."""

from __future__ import annotations

from virtbackup.contracts.v1.common import Message


class Ping(Message, frozen=True, kw_only=True):
    """Ask a service to identify itself; ``host``: and to say how its host is
    (``Pong.host``: the monitor's question; a plain ping stays cheap)."""

    host: bool = False


class HostStats(Message, frozen=True, kw_only=True):
    """The host a service instance runs on, as that instance sees it (psutil).

    ``hostname``; ``cpuCount`` (logical CPUs) and ``cpuPercent`` (use of all of them
    since the previous sample, 0-100); ``load1``/``load5``/``load15`` (load averages);
    ``memoryTotal``/``memoryUsed``/``memoryAvailable`` and ``diskTotal``/``diskUsed``/
    ``diskFree`` in bytes (the disk: the file system of the service's data directory,
    ``diskPath``); ``processRss`` (bytes) and ``processCpuPercent`` of the instance
    itself; ``uptimeSeconds`` of the host."""

    hostname: str
    cpu_count: int
    cpu_percent: float
    load1: float
    load5: float
    load15: float
    memory_total: int
    memory_used: int
    memory_available: int
    memory_percent: float
    disk_path: str
    disk_total: int
    disk_used: int
    disk_free: int
    disk_percent: float
    process_rss: int
    process_cpu_percent: float
    uptime_seconds: float


class Pong(Message, frozen=True, kw_only=True):
    """A service instance's answer. ``trace_id`` is the trace the handler ran in."""

    service: str
    instance: str
    version: str
    pid: int
    started_at: str
    trace_id: str = ""
    #: The host's CPU, memory, disk and load (``HostStats``), asked with
    #: ``Ping(host=True)``; None otherwise, and from an instance that predates it.
    host: HostStats | None = None
