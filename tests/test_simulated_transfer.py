"""The simulated transfer (``VIRTBACKUP_SIMULATE_TRANSFER_SECONDS``, for benchmarks
only): a backup of a VM on a simulated server goes through the orchestrator's real path
(queue, admission slots, phases, final state) but waits instead of transferring, and
ends ``success`` marked simulated, with no restore point and nothing written. With the
setting unset the backup is refused (``test_simulated_servers.py``)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from harness import System, api_client, running_system, wait_job
from test_simulated_servers import driver_xml

VMS = [f"simx-{os.getpid()}-{i}" for i in range(3)]
SECONDS = 2.0


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("simx"),
        workers=1,
        orchestrators=1,
        VIRTBACKUP_SIMULATE_TRANSFER_SECONDS=str(SECONDS),
        VIRTBACKUP_MAX_JOBS_PER_SERVER="1",
    ) as system:
        yield system


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simx-repo")


@pytest.fixture(scope="module")
async def api(
    system: System, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    xml = tmp_path_factory.mktemp("simx-driver") / "sim.xml"
    driver_xml(xml, VMS)
    config = {
        "servers": [{"id": "sim", "name": "Simulated", "uri": f"test://{xml}"}],
        "destinations": [{"id": "fs", "driverId": "filesystem", "params": {"path": str(repo)}}],
        "backupDestinationId": "fs",
    }
    async with api_client(system, config) as client:
        yield client


async def backup(api: httpx.AsyncClient, vm: str) -> str:
    resp = await api.post("/servers/sim/backup", json={"vmName": vm, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["jobId"])


async def test_simulated_backups_succeed_one_at_a_time_writing_nothing(
    api: httpx.AsyncClient, repo: Path
) -> None:
    ids = await asyncio.gather(*(backup(api, vm) for vm in VMS))
    jobs = [await wait_job(api, job_id, timeout=60) for job_id in ids]
    for job in jobs:
        assert job["state"] == "success", job
        assert job["result"]["simulated"] is True, job
        assert "simulated backup" in job["message"] and "no restore point" in job["message"]
        assert "timestamp" not in job["result"] and job["bytesTransferred"] == 0, job
    # VIRTBACKUP_MAX_JOBS_PER_SERVER=1: each ran alone, for the simulated time.
    ran = sorted(jobs, key=lambda j: j["startedAt"])
    for before, after in itertools.pairwise(ran):
        assert after["startedAt"] >= before["finishedAt"], (before, after)
    # No restore point, no chunk: the destination holds only its repository's header.
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["VirtBackup/repository.json"], files


async def test_a_simulated_transfer_is_cancelled_at_once(api: httpx.AsyncClient) -> None:
    job_id = await backup(api, VMS[0])
    deadline = time.monotonic() + 30
    while (job := (await api.get(f"/jobs/{job_id}")).json())["phase"] != "transferring":
        assert job["state"] in {"queued", "running"} and time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    asked = time.monotonic()
    resp = await api.post(f"/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, job_id, timeout=30)
    assert job["state"] == "canceled" and job["message"] == "cancelled by user", job
    assert time.monotonic() - asked < SECONDS, job  # the wait ends at the cancel
