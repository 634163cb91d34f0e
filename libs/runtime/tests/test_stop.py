"""A service always exits on SIGTERM, even when something in it hangs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from virtbackup.runtime.nats_server import NatsServer

HANGING_SERVICE = """
import asyncio
from virtbackup.runtime.service import ServiceSpec, main

async def hang(ctx):
    print("stopping", flush=True)
    await asyncio.Event().wait()

async def started(ctx):
    print("started", flush=True)

main(ServiceSpec(name="hangs-on-stop", start=started, stop=hang))
"""


def test_a_service_whose_stop_hangs_exits_and_names_what_hung(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {
        "VIRTBACKUP_NATS_URL": nats_server.url,
        **nats_server.credentials().env(),  # type: ignore[union-attr]
        "VIRTBACKUP_STOP_TIMEOUT": "1.5",
        "VIRTBACKUP_LOG_FORMAT": "text",
        "VIRTBACKUP_DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_SERVICE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while "started" not in proc.stdout.readline():
        assert time.monotonic() < deadline and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert time.monotonic() - sent < 10
    assert "did not stop within 1.5 s" in out
    assert "still running at stop" in out
