"""Command 1 of the README: ``virtbackup up`` runs NATS and five services, and stops them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest

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


def _nats_pid(launcher: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(launcher), "nats-server"], capture_output=True)
    return int(out.stdout.split()[0])


def test_up_secures_the_bus_and_brings_nats_back_after_a_kill(tmp_path: Path) -> None:
    port = free_port()
    proc, token = _up(tmp_path, port)
    try:
        # Generated at first start, readable by the owner only.
        secrets = tmp_path / "secrets"
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
        for name in ("nats-users.json", "nats-server.conf", "secret-key", "vault-key"):
            assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name
        # The data directory and the logs are the owner's only, and no log holds the token.
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
        logs = sorted((tmp_path / "logs").glob("*.log"))
        assert {p.name for p in logs} >= {"gateway.log", "inventory.log"}, logs
        for log in logs:
            assert stat.S_IMODE(log.stat().st_mode) == 0o600, log
            assert token not in log.read_text(errors="replace"), f"{log} holds the token"
        conf = json.loads((secrets / "nats-server.conf").read_text())
        nats_url = f"nats://127.0.0.1:{conf['port']}"

        async def anonymous() -> None:
            await nats.connect(nats_url, allow_reconnect=False, max_reconnect_attempts=0)

        with pytest.raises(Exception, match=r"(?i)authorization violation"):
            asyncio.run(anonymous())

        # nats-server killed: the launcher starts it again, the services reconnect.
        url = f"https://127.0.0.1:{port}"
        headers = {"x-agent-token": token}
        assert httpx.get(f"{url}/jobs", headers=headers, verify=False).status_code == 200
        first = _nats_pid(proc.pid)
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            assert time.monotonic() - killed < 45, "the system did not recover from a NATS kill"
            try:
                resp = httpx.get(f"{url}/jobs", headers=headers, verify=False, timeout=5)
                if resp.status_code == 200 and _nats_pid(proc.pid) != first:
                    break
            except (httpx.HTTPError, IndexError):
                pass
            time.sleep(0.5)
        # Every service answers its ping again.
        services = httpx.get(f"{url}/api/v1/services", headers=headers, verify=False, timeout=10)
        deadline = time.monotonic() + 30
        while not all(s["ok"] for s in services.json()):
            assert time.monotonic() < deadline, services.text
            time.sleep(0.5)
            services = httpx.get(
                f"{url}/api/v1/services", headers=headers, verify=False, timeout=10
            )
    finally:
        _stop(proc)
