"""Command 1 of the README: ``virtbackup up`` runs NATS and five services, and stops them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from virtbackup.runtime.ports import free_port


def _children(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-P", str(pid)], capture_output=True, text=True).stdout
    return [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]


def _up(data: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTBACKUP_")}
    env.update(
        {
            "VIRTBACKUP_DATA_DIR": str(data),
            "VIRTBACKUP_AGENT_PORT": str(port),
            "VIRTBACKUP_HYPERSDK_PORT": str(free_port()),
        }
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("virtbackup")), "up", "--nats-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"VirtBackup is up: (\S+)\s+\(token: (\S+)\)", line)
        if match:
            return proc, match.group(2)
        assert line or proc.poll() is None, f"launcher exited with {proc.returncode}"
    raise TimeoutError("launcher did not come up")


def _stop(proc: subprocess.Popen[str]) -> list[str]:
    children = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    return children


def test_up_runs_nats_and_five_services_and_keeps_state(tmp_path: Path) -> None:
    port = free_port()
    proc, token = _up(tmp_path, port)
    try:
        children = _children(proc.pid)
        modules = sorted(c.split("-m ", 1)[1] for c in children if "-m virtbackup." in c)
        assert modules == [
            "virtbackup.gateway",
            "virtbackup.inventory",
            "virtbackup.job_orchestrator",
            "virtbackup.job_orchestrator",
            "virtbackup.notifier",
            "virtbackup.transfer_worker",
            "virtbackup.transfer_worker",
        ]
        assert any("nats-server" in c for c in children)
        url = f"https://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", headers={"x-agent-token": token}, verify=False)
        assert health.json() == {"ok": True, "nativeSftpAvailable": True}
        assert httpx.get(f"{url}/health", verify=False).status_code == 401
        cfg = {"servers": [{"id": "kept", "name": "Kept"}]}
        post = httpx.post(f"{url}/config", json=cfg, headers={"x-agent-token": token}, verify=False)
        assert post.status_code == 200
    finally:
        children = _stop(proc)
    # Ctrl-C stopped every child.
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
    assert children

    # A restart keeps the token, the certificate and the configuration.
    proc, token2 = _up(tmp_path, port)
    try:
        assert token2 == token
        got = httpx.get(
            f"https://127.0.0.1:{port}/config", headers={"x-agent-token": token}, verify=False
        )
        assert got.json()["servers"][0]["id"] == "kept"
    finally:
        _stop(proc)
