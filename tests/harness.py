"""The system under test: NATS plus every service as a real process, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from virtbackup.cli.services import MODULES as MODULES  # re-exported for the tests
from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.runtime.ports import free_port
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.testing.vms import SmallVm


@dataclass
class System:
    """NATS plus every service, each its own process, all on loopback."""

    data_dir: Path
    nats: NatsServer
    agent_port: int
    hypersdk_port: int = field(default_factory=free_port)
    token: str = "test-token-0123456789"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Each process's own metrics port, by process name: with ``VIRTBACKUP_METRICS_PORT``
    #: ``auto`` in ``extra_env``, every process started gets a free one.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def hypersdk_url(self) -> str:
        return f"http://127.0.0.1:{self.hypersdk_port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.agent_port}"

    def env(self, service: str | None = None) -> dict[str, str]:
        """The environment of a process of ``service`` (its own NATS credentials)."""
        env = dict(os.environ)
        env.update(
            {
                "VIRTBACKUP_DATA_DIR": str(self.data_dir),
                "VIRTBACKUP_NATS_URL": self.nats.url,
                "VIRTBACKUP_AGENT_PORT": str(self.agent_port),
                "VIRTBACKUP_HYPERSDK_PORT": str(self.hypersdk_port),
                "VIRTBACKUP_LOG_LEVEL": "INFO",
                # One NBD CA for every test system: see virtbackup.testing.pki.
                "VIRTBACKUP_PKI_DIR": str(shared_pki_dir()),
            }
        )
        creds = self.nats.credentials(service) if service else None
        if creds:
            env.update(creds.env())
        if self.token:
            env["VIRTBACKUP_TOKEN"] = self.token
        else:
            env.pop("VIRTBACKUP_TOKEN", None)
        env.update(self.extra_env)
        return env

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """Start service ``name`` (``transfer-worker-2`` etc. start more workers)."""
        service = name if name in MODULES else name.rsplit("-", 1)[0]
        module = MODULES[service]
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115
        env = self.env(service)
        if env.get("VIRTBACKUP_METRICS_PORT") == "auto":
            port = self.metrics_ports.setdefault(name, free_port())
            env["VIRTBACKUP_METRICS_PORT"] = str(port)
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15.0) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def start_all(self) -> None:
        for name in MODULES:
            self.start(name)
        self.wait_ready()

    def wait_ready(self, timeout: float = 45.0) -> None:
        """Until the gateway answers and every service started answers its ping."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    log = (self.data_dir / f"{name}.log").read_text()[-3000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log}")
            try:
                resp = httpx.get(
                    f"{self.url}/api/v1/services", headers=self.auth(), verify=False, timeout=5
                )
                last = resp.text
                started = {n if n in MODULES else n.rsplit("-", 1)[0] for n in self.procs}
                if resp.status_code == 200 and all(
                    s["ok"] for s in resp.json() if s["service"] in started
                ):
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"system not ready: {last}")

    def restart_nats(self) -> None:
        self.nats.restart()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:  # never leave a process behind
                proc.kill()
                proc.wait(5)

    def start_all_with_own_token(self) -> None:
        """Start every service without ``VIRTBACKUP_TOKEN``: the gateway keeps its own."""
        self.token = ""
        for name in MODULES:
            self.start(name)
        token_file = self.data_dir / "agent-token"
        deadline = time.monotonic() + 30
        while not token_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.token = token_file.read_text().strip()
        self.wait_ready()


def local_config(repo: Path) -> dict[str, Any]:
    """The configuration most tests post: this host as server ``local`` and a filesystem
    destination ``fs`` at ``repo`` (which must exist) as the backup destination."""
    return {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": "fs", "name": "Local", "driverId": "filesystem", "params": {"path": str(repo)}}
        ],
        "backupDestinationId": "fs",
    }


async def wait_job(api: httpx.AsyncClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await api.get(f"/jobs/{job_id}")
        if resp.status_code == 503:  # e.g. a replica just died: retry, as a client would
            assert time.monotonic() < deadline, resp.text
            await asyncio.sleep(0.2)
            continue
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        if job["state"] in {"success", "failure", "canceled"}:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def backup_ok(api: httpx.AsyncClient, vm_name: str) -> dict[str, Any]:
    """Back up ``vm_name`` on the server ``local`` into the default destination (full or
    incremental, as VirtBackup decides) and wait for it; the job, asserted to succeed."""
    resp = await api.post("/servers/local/backup", json={"vmName": vm_name})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    return job


def snapshot(vm: SmallVm, dest: Path) -> list[Path]:
    """Raw copies of the VM's disks as they are now (the guest is idle)."""
    out = []
    for disk in vm.disks:
        copy = dest / f"{disk.stem}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(copy)], check=True)
        out.append(copy)
    return out


def same(image: Path, raw: Path) -> bool:
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


@contextlib.contextmanager
def running_system(
    data: Path, *, workers: int = 1, orchestrators: int = 2, **env: str
) -> Iterator[System]:
    """A started system of its own (NATS in ``data``, ``workers`` transfer workers,
    ``orchestrators`` job-orchestrator replicas, extra ``VIRTBACKUP_*`` settings in
    ``env``; ``VIRTBACKUP_METRICS_PORT="auto"`` gives each process a metrics port of its
    own, ``System.metrics_ports``), stopped on exit."""
    system = System(
        data_dir=data,
        nats=start_nats_server(data / "nats", auth=True),
        agent_port=free_port(),
        extra_env=dict(env),
    )
    try:
        system.start_all()
        for index in range(2, workers + 1):
            system.start(f"transfer-worker-{index}")
        for index in range(2, orchestrators + 1):
            system.start(f"job-orchestrator-{index}")
        system.wait_ready()
        yield system
    finally:
        system.stop_all()
        for proc in system.procs.values():
            proc.kill()
        system.nats.stop()


@contextlib.asynccontextmanager
async def api_client(
    system: System, config: dict[str, Any] | None = None, *, timeout: float = 60
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``system``'s HTTPS API (agent API and ``/api/v1``) with its token (the
    gateway's self-signed certificate is not checked); ``config``, when given, is posted
    as the configuration first (a 200 asserted)."""
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=timeout
    ) as client:
        if config is not None:
            resp = await client.post("/config", json=config)
            assert resp.status_code == 200, resp.text
        yield client


def ssh_server(
    server_id: str, host: str, port: int, username: str, private_key: str, *dirs: Path
) -> dict[str, Any]:
    """A configuration's entry for a libvirt server reached over SSH with a key (the test
    sshd's), with ``dirs`` as its ``restoreDirectories`` when given."""
    entry: dict[str, Any] = {
        "id": server_id, "name": server_id.capitalize(), "host": host, "port": port,
        "username": username, "privateKey": private_key,
    }  # fmt: skip
    if dirs:
        entry["restoreDirectories"] = [str(d) for d in dirs]
    return entry


async def wait_listed(api: httpx.AsyncClient, server_id: str, timeout: float = 90) -> None:
    """Wait (bounded) until the inventory lists ``server_id``'s VMs: its first look at a
    new server (the SSH login, its leftovers) comes first."""
    deadline = time.monotonic() + timeout
    while (await api.get(f"/servers/{server_id}/vms")).status_code != 200:
        assert time.monotonic() < deadline, f"server {server_id} never listed its VMs"
        await asyncio.sleep(0.5)
