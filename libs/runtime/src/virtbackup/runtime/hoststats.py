"""How the host a service runs on is doing (``contracts.v1.ping.HostStats``), read with
psutil. Answered with a service's ping when the ping asks (``Ping(host=True)``: the
gateway's ``GET /api/v1/admin/monitor/server``)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil

from virtbackup.contracts.v1.ping import HostStats

_process = psutil.Process()
# The first ``cpu_percent(None)`` of a process is 0.0 by definition: prime both
# counters now, so the first monitor request already sees use since the service started.
psutil.cpu_percent(interval=None)
_process.cpu_percent(interval=None)


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the data directory may not exist yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def host_stats(data_dir: Path) -> HostStats:
    """The host now: CPU use since the previous call (non-blocking), load averages,
    memory, the file system holding ``data_dir``, this process's memory and CPU."""
    load1, load5, load15 = os.getloadavg()
    memory = psutil.virtual_memory()
    disk_path = _existing(data_dir)
    disk = psutil.disk_usage(str(disk_path))
    with _process.oneshot():
        rss = _process.memory_info().rss
        process_cpu = _process.cpu_percent(interval=None)
    return HostStats(
        hostname=socket.gethostname(),
        cpu_count=psutil.cpu_count() or 1,
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load1=load1,
        load5=load5,
        load15=load15,
        memory_total=memory.total,
        memory_used=memory.used,
        memory_available=memory.available,
        memory_percent=float(memory.percent),
        disk_path=str(disk_path),
        disk_total=disk.total,
        disk_used=disk.used,
        disk_free=disk.free,
        disk_percent=float(disk.percent),
        process_rss=rss,
        process_cpu_percent=float(process_cpu),
        uptime_seconds=max(0.0, time.time() - psutil.boot_time()),
    )
