"""Jobs through the gateway and two job-orchestrator replicas; SSE streams their events.

The jobs are real sanity checks of a restore point written with the repository library.
This system runs no transfer worker, so a job stays in ``transferring`` until it is
cancelled: the cancel path is exercised without a race against the workers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from harness import System, local_config, wait_job
from nats.aio.client import Client

from virtbackup.runtime.nats_server import start_nats_server
from virtbackup.runtime.ports import free_port
from virtbackup.testing.nats import connect
from virtbackup.testing.points import write_point

MODULE_SERVICES = ("gateway", "inventory", "job-orchestrator", "job-orchestrator-2", "notifier")


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Gateway, inventory, notifier and two orchestrators; no transfer worker."""
    data = tmp_path_factory.mktemp("idle")
    system = System(
        data_dir=data, nats=start_nats_server(data / "nats", auth=True), agent_port=free_port()
    )
    try:
        for name in MODULE_SERVICES:
            system.start(name)
        system.wait_ready()
        yield system
    finally:
        system.stop_all()
        system.nats.stop()


@pytest.fixture(scope="module")
async def api(idle: System) -> AsyncIterator[httpx.AsyncClient]:
    repo = idle.data_dir / "repo"
    repo.mkdir(mode=0o700)
    async with httpx.AsyncClient(
        base_url=idle.url, headers=idle.auth(), verify=False, timeout=30
    ) as client:
        cfg = local_config(repo)
        assert (await client.post("/config", json=cfg)).status_code == 200
        client.headers["x-test-xml-path"] = await write_point(repo)
        yield client


@pytest.fixture
async def nc(idle: System) -> AsyncIterator[Client]:
    client = await connect(idle.nats)
    try:
        yield client
    finally:
        await client.drain()


async def start_job(api: httpx.AsyncClient) -> dict[str, Any]:
    """Start a sanity job (it waits for a worker that never comes)."""
    resp = await api.post("/restore/sanity", json={"xmlPath": api.headers["x-test-xml-path"]})
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = (await api.get(f"/jobs/{resp.json()['jobId']}")).json()
    return job


async def test_jobs_round_trip_through_the_orchestrator(api: httpx.AsyncClient) -> None:
    job = await start_job(api)

    listed = (await api.get("/jobs")).json()
    assert job["id"] in [j["id"] for j in listed]

    got = await api.get(f"/jobs/{job['id']}")
    assert got.status_code == 200
    body = got.json()
    for key in (
        "id",
        "type",
        "state",
        "message",
        "totalUnits",
        "completedUnits",
        "bytesTransferred",
        "speedBytesPerSec",
    ):
        assert key in body, key
    assert body["state"] in {"queued", "running"}
    assert body["vmName"] == "vm1"

    cancel = await api.post(f"/jobs/{job['id']}/cancel")
    assert cancel.status_code == 200
    assert cancel.json() == {"success": True}
    final = await wait_job(api, job["id"], timeout=20)
    assert final["state"] == "canceled"
    assert final["message"] == "cancelled by user"

    again = await api.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert "already finished" in again.json()["error"]


async def test_unknown_job_is_404_with_a_message(api: httpx.AsyncClient) -> None:
    for path in ("/jobs/does-not-exist", "/jobs/..%2F..%2Fetc", "/jobs/a.b.c"):
        resp = await api.get(path)
        assert resp.status_code == 404, path
        assert "not found" in resp.json()["error"]
    resp = await api.post("/jobs/nope/cancel")
    assert resp.status_code == 404
    assert resp.json()["error"] == "job 'nope' not found"


async def _read_sse(
    api: httpx.AsyncClient, ready: asyncio.Event, want: str, out: list[dict[str, Any]]
) -> None:
    async with api.stream("GET", "/events", timeout=None) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event["event"] = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                event["data"] = line.split(":", 1)[1].strip()
            elif line.startswith("id:"):
                event["id"] = line.split(":", 1)[1].strip()
            elif line == "" and event:
                out.append(event)
                if event.get("event") == "ready":
                    ready.set()
                if event.get("event") == want:
                    return
                event = {}


async def test_sse_gives_ready_then_an_event_from_another_service(
    api: httpx.AsyncClient,
) -> None:
    job = await start_job(api)
    ready = asyncio.Event()
    events: list[dict[str, Any]] = []
    reader = asyncio.create_task(_read_sse(api, ready, "job.canceled", events))
    await asyncio.wait_for(ready.wait(), 10)
    assert events[0] == {"event": "ready", "data": "ok"}

    # The job-orchestrator (another process) publishes job.canceled to VB_EVENTS when the
    # job has stopped.
    assert (await api.post(f"/jobs/{job['id']}/cancel")).status_code == 200
    await asyncio.wait_for(reader, 10)
    last = events[-1]
    assert last["event"] == "job.canceled"
    data = json.loads(last["data"])
    assert set(data) == {"type", "payload"}
    assert data["type"] == "job.canceled"
    assert data["payload"]["id"] == job["id"]
    assert data["payload"]["state"] == "canceled"
    assert int(last["id"]) > 0


async def test_sse_resumes_after_last_event_id(api: httpx.AsyncClient, nc: Client) -> None:
    first = await start_job(api)
    second = await start_job(api)
    # Find the stream sequence of the first job's creation, then resume after it.
    js = nc.jetstream()
    msg = await js.get_last_msg("VB_EVENTS", f"vb.evt.job.created.{first['id']}")
    ready = asyncio.Event()
    events: list[dict[str, Any]] = []
    api.headers["Last-Event-ID"] = str(msg.seq)
    try:
        reader = asyncio.create_task(_read_sse(api, ready, "job.created", events))
        await asyncio.wait_for(reader, 10)
    finally:
        del api.headers["Last-Event-ID"]
    created = json.loads(events[-1]["data"])["payload"]
    assert created["id"] == second["id"]
