"""VirtBackup for the benchmark: ``virtbackup up`` in a temporary data directory, driven
over its agent API (HTTPS, token), with local filesystem destinations."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

from virtbackup.repository.format import DEFAULT_CHUNK_SIZE
from virtbackup.repository.repository import Repository
from virtbackup.runtime.ports import free_port
from virtbackup.storage.filesystem import FilesystemDriver

#: Where a filesystem destination keeps its repository, below its ``path``.
REPOSITORY_FOLDER = "VirtBackup"


class JobFailed(RuntimeError):
    """A VirtBackup job ended in ``failure`` or ``canceled``; the message is the job's."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job['id']} {job['state']}: {job['message']}")
        self.job = job

    @property
    def tls(self) -> bool:
        """Whether it failed on the NBD export's TLS: its handshake, or writing the
        certificates. On a machine where other VirtBackup installations run too (other
        engineers' tests), each rewrites the host's one NBD certificate folder
        (``/etc/pki/qemu``) with its own CA, so a backup can meet another installation's
        server certificate; and jobs that start at once all rewrite the folder then, racing
        on the same temporary file names (``nbd_tls._write``). A retry is fair."""
        text = str(self.job.get("message", ""))
        return any(
            sign in text
            for sign in ("TLS handshake", "CERTIFICATE_VERIFY_FAILED", "NBD exports cannot use TLS")
        )


class VirtBackup:
    """``virtbackup up --workers N`` in a temporary data directory, driven over its API."""

    def __init__(self, workers: int, workdir: Path) -> None:
        self.workers = workers
        self.data = workdir / f"vb-data-{workers}-{os.getpid()}"
        self.port = free_port()
        self.nats_port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.token = ""

    def __enter__(self) -> VirtBackup:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTBACKUP_")}
        env.update(
            VIRTBACKUP_DATA_DIR=str(self.data),
            VIRTBACKUP_AGENT_PORT=str(self.port),
            VIRTBACKUP_HYPERSDK_PORT=str(free_port()),
            VIRTBACKUP_LOG_LEVEL="WARNING",
        )
        launcher = Path(sys.executable).with_name("virtbackup")
        self.proc = subprocess.Popen(
            [
                str(launcher),
                "up",
                "--workers",
                str(self.workers),
                "--nats-port",
                str(self.nats_port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            found = re.search(r"VirtBackup is up: \S+\s+\(token: (\S+)\)", line)
            if found:
                self.token = found.group(1)
                return self
            if not line and self.proc.poll() is not None:
                break
        self.__exit__()
        raise RuntimeError("VirtBackup did not start")

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def nats_options(self) -> dict[str, str]:
        """``nats.connect`` arguments: its NATS as ``admin`` (the launcher's credentials)."""
        users = json.loads((self.data / "secrets" / "nats-users.json").read_text())
        return {"servers": self.nats_url, "user": "admin", "password": users["admin"]}

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{self.port}",
            headers={"x-agent-token": self.token},
            verify=False,
            timeout=120,
        )


async def create_repository(
    path: Path, chunk_size: int | None, compression_level: int | None = None
) -> None:
    """Create the repository of a filesystem destination at ``path`` before its first
    backup, with ``chunk_size`` bytes per chunk and zstd at ``compression_level`` (None:
    the defaults). The destination configuration has neither: a repository takes them
    from ``repository.json``, made here with the library the services use."""
    path.mkdir(parents=True, exist_ok=True)
    repo = await Repository.open_or_create(
        FilesystemDriver(path / REPOSITORY_FOLDER),
        chunk_size=chunk_size,
        compression_level=compression_level,
    )
    await repo.close()


async def configure(api: httpx.AsyncClient, repositories: dict[str, Path]) -> None:
    """One local server and a filesystem destination per ``id -> path`` (the first is the
    default)."""
    first = next(iter(repositories))
    cfg = {
        "servers": [{"id": "local", "name": "bench", "host": ""}],
        "destinations": [
            {"id": dest, "driverId": "filesystem", "params": {"path": str(path)}}
            for dest, path in repositories.items()
        ],
        "backupDestinationId": first,
        "hashblocksLimitBufferMb": 1024,
    }
    (await api.post("/config", json=cfg)).raise_for_status()


#: How often a job is polled. The time of a job is taken from its ``finishedAt``, not from
#: when the poll sees it, so polling slowly costs no precision and spares the gateway and
#: the orchestrators (polling every 50 ms cost them 0.5-4 CPU seconds per step).
POLL: Final = 0.25


async def wait_job(api: httpx.AsyncClient, job_id: str, poll: float = POLL) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until it ends; the job, or :class:`JobFailed` unless it
    succeeded."""
    while True:
        job: dict[str, Any] = (await api.get(f"/jobs/{job_id}")).json()
        if job["state"] in {"success", "failure", "canceled"}:
            if job["state"] != "success":
                raise JobFailed(job)
            return job
        await asyncio.sleep(poll)


async def timed_job(
    api: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Submit a job and wait for it: (seconds, job). The seconds run from the request to
    the job's ``finishedAt`` (milliseconds, the orchestrator's clock on this same host);
    to when the poll saw it end if that is missing or out of bounds (``seenSeconds`` in the
    returned job either way)."""
    wall, started = time.time(), time.monotonic()
    resp = await api.post(path, json=body)
    resp.raise_for_status()
    job = await wait_job(api, resp.json()["jobId"])
    seen = time.monotonic() - started
    job["seenSeconds"] = seen
    finished = _epoch(job.get("finishedAt"))
    if finished is not None and 0 < finished - wall <= seen + 0.05:
        return finished - wall, job
    return seen, job


def _epoch(stamp: object) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def backup(api: httpx.AsyncClient, vm: str, destination: str) -> tuple[float, dict[str, Any]]:
    """A backup of ``vm`` (full or incremental, as VirtBackup decides) into ``destination``."""
    return await timed_job(
        api, "/servers/local/backup", {"vmName": vm, "destinationId": destination}
    )


async def backups_at_once(
    api: httpx.AsyncClient, vms: Sequence[str], destination: str
) -> list[float]:
    """Back up ``vms`` at once (submitted together); each job's seconds, in order. Waits
    for every job, then raises the first failure if any."""
    results = await asyncio.gather(
        *(backup(api, vm, destination) for vm in vms), return_exceptions=True
    )
    seconds = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        seconds.append(result[0])
    return seconds


async def vm_action(api: httpx.AsyncClient, vm: str, action: str) -> None:
    """``POST /servers/local/actions`` (``forceOff``, ``start``, ...)."""
    resp = await api.post("/servers/local/actions", json={"action": action, "vmName": vm})
    resp.raise_for_status()


async def latest_point(api: httpx.AsyncClient, vm: str, destination: str) -> dict[str, Any]:
    """The newest restore entry of ``vm`` in ``destination``."""
    resp = await api.get("/restore/entries", params={"destinationId": destination})
    resp.raise_for_status()
    entries = [e for e in resp.json() if e["vmName"] == vm]
    return max(entries, key=lambda e: e["timestamp"])


async def restore(
    api: httpx.AsyncClient, entry: dict[str, Any], destination: str
) -> tuple[float, dict[str, Any]]:
    """Restore ``entry`` over its VM (``decision: overwrite``)."""
    body = {"xmlPath": entry["xmlPath"], "decision": "overwrite", "destinationId": destination}
    return await timed_job(api, "/servers/local/restore/start", body)


def default_chunk_size() -> int:
    """The chunk size of a repository created without one."""
    return DEFAULT_CHUNK_SIZE
