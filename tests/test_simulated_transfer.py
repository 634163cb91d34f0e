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
import msgspec
import nats
import pytest
from harness import System, api_client, running_system, wait_job
from prometheus_client.parser import text_string_to_metric_families
from test_simulated_servers import driver_xml

from virtbackup.contracts.v1.jobs import Job
from virtbackup.runtime.bus import new_id

VMS = [f"simx-{os.getpid()}-{i}" for i in range(3)]
SECONDS = 2.0
HISTORY = 3000


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("simx"),
        workers=1,
        orchestrators=1,
        VIRTBACKUP_SIMULATE_TRANSFER_SECONDS=str(SECONDS),
        VIRTBACKUP_MAX_JOBS_PER_SERVER="1",
        VIRTBACKUP_METRICS_PORT="auto",
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
    # No restore point, no chunk, no lock object: the repository is not even opened.
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == [], files


async def slot_line_counts(system: System) -> tuple[float, float]:
    """The orchestrator's ``virtbackup_slot_lines_total`` and ``..._line_jobs_total``."""
    port = system.metrics_ports["job-orchestrator"]
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert resp.status_code == 200, resp.text
    found = {
        sample.name: sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
    }
    return found["virtbackup_slot_lines_total"], found["virtbackup_slot_line_jobs_total"]


async def test_the_line_of_waiting_jobs_does_not_walk_the_finished_history(
    system: System, api: httpx.AsyncClient
) -> None:
    """A nightly run looks at the admission line many times a second: each look walks
    the queued and running jobs only, not the thousands of finished ones (it walked them
    all, for every job admitted, and a run of 10,000 jobs did not end)."""
    nc = await nats.connect(**system.nats.connect_options())
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        stamp = "2026-01-01T00:00:00Z"
        history = [
            Job(id=new_id(), type="backup", state="success", phase="finished",
                server_id="sim", vm_name=VMS[n % len(VMS)], destination_id="fs",
                created_at=stamp, updated_at=stamp, finished_at=stamp)
            for n in range(HISTORY)
        ]  # fmt: skip
        await asyncio.gather(*(kv.put(j.id, msgspec.json.encode(j)) for j in history))
        last = msgspec.structs.replace(history[0], id=new_id())  # written after them all
        await kv.put(last.id, msgspec.json.encode(last))
    finally:
        await nc.drain()
    deadline = time.monotonic() + 30
    while (await api.get("/jobs")).json()[0]["id"] != last.id:  # the index has them all
        assert time.monotonic() < deadline, "the orchestrator's index did not fill"
        await asyncio.sleep(0.1)
    lines, walked = await slot_line_counts(system)
    ids = await asyncio.gather(*(backup(api, vm) for vm in VMS))  # 1 per server: 2 wait
    jobs = [await wait_job(api, job_id, timeout=60) for job_id in ids]
    assert all(job["state"] == "success" for job in jobs), jobs
    lines_after, walked_after = await slot_line_counts(system)
    assert lines_after > lines, "the waiting jobs looked at the line"
    # At most the run's 3 jobs in each look, and each once more when it joins the line
    # (the history has 3,000: walking it in every look, as before, is 1,000 times this).
    assert walked_after - walked <= len(VMS) * (lines_after - lines + 1), (lines, walked)


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
