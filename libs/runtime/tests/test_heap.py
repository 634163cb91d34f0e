"""A service's start-up heap is frozen out of the cyclic garbage collector once it has
started (runtime.heap), in its own process, and what is made later is still collected."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from virtbackup.runtime.nats_server import NatsServer

SERVICE = """
import asyncio, gc
from virtbackup.runtime.service import ServiceSpec, main

async def report():
    await asyncio.sleep(0)  # serve() freezes once start() has returned
    frozen = gc.get_freeze_count()
    class Node:
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after start-up
    del a, b
    print("frozen", frozen, "collected", gc.collect(), flush=True)

async def started(ctx):
    ctx.spawn(report(), "report")

main(ServiceSpec(name="heap-check", start=started))
"""


def test_a_services_start_up_heap_is_frozen_and_later_cycles_are_collected(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {
        "VIRTBACKUP_NATS_URL": nats_server.url,
        **nats_server.credentials().env(),  # type: ignore[union-attr]
        "VIRTBACKUP_LOG_FORMAT": "text",
        "VIRTBACKUP_DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 30
        line = ""
        while not line.startswith("frozen"):
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stdout.readline()
        _, frozen, _, collected = line.split()
        assert int(frozen) > 10_000  # the modules, settings and clients of start-up
        assert int(collected) >= 2  # the two nodes' cycle, made after the freeze
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
