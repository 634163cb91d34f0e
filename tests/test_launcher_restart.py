"""``POST /api/v1/server/restart`` in the single-machine mode: the gateway sends the
``virtbackup up`` launcher SIGHUP, and the launcher restarts every child it supervises
(``restart_children``). The children here are small processes of the test's own, since
``virtbackup up`` itself must not run beside other tests (it rewrites QEMU's TLS CA)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import MODULES, System

from virtbackup.cli.__main__ import Child, restart_children
from virtbackup.runtime.nats_server import start_nats_server
from virtbackup.runtime.ports import free_port


def test_restart_children_stops_and_starts_each_child(tmp_path: Path) -> None:
    (tmp_path / "vbt_sleeper.py").write_text("import time\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    children = [
        Child(f"child-{i}", "vbt_sleeper", tmp_path / f"child-{i}.log", env) for i in range(2)
    ]
    for child in children:
        child.start()
    before = [child.process for child in children]
    try:
        restart_children(children)
        for old, child in zip(before, children, strict=True):
            assert old is not None and old.poll() is not None  # stopped
            assert child.process is not None and child.process is not old
            assert child.process.poll() is None  # started again, running
            assert child.restarts == 0
    finally:
        for child in children:
            if child.process is not None:
                child.process.kill()
                child.process.wait(5)


#: A stand-in for the launcher: runs the gateway as its child with
#: ``VIRTBACKUP_LAUNCHER_PID`` naming itself, writes ``hup`` to a file on SIGHUP and stops
#: its child on SIGTERM.
LAUNCHER = """
import os, pathlib, signal, subprocess, sys
out = pathlib.Path(sys.argv[1])
env = dict(os.environ, VIRTBACKUP_LAUNCHER_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-m", sys.argv[2]], env=env)
signal.signal(signal.SIGHUP, lambda *_: out.write_text("hup"))
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
sys.exit(child.wait())
"""


def test_restart_signals_the_launcher_the_gateway_runs_under(tmp_path: Path) -> None:
    system = System(
        data_dir=tmp_path,
        nats=start_nats_server(tmp_path / "nats", auth=True),
        agent_port=free_port(),
    )
    marker = tmp_path / "signalled"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(marker), MODULES["gateway"]],
        env=system.env("gateway"),
    )
    try:
        url = f"{system.url}/api/v1/server-info"
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(url, headers=system.auth(), verify=False, timeout=5)
                if info.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.2)
        assert info.json()["mode"] == "single-machine"
        resp = httpx.post(
            f"{system.url}/api/v1/server/restart", headers=system.auth(), verify=False, timeout=10
        )
        assert resp.status_code == 202, resp.text
        assert resp.json()["restarting"] is True
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the launcher got no SIGHUP"
            time.sleep(0.1)
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(20)
        except subprocess.TimeoutExpired:
            launcher.kill()
        system.nats.stop()
