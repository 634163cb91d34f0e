"""The gateway reaches the job-orchestrator over NATS and back; SSE streams events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from nats.aio.client import Client


async def submit_job(nc: Client, vm_name: str = "vm1") -> dict[str, Any]:
    """Submit a job on the bus, as another service would."""
    body = json.dumps({"type": "backup", "vmName": vm_name, "serverId": "local"}).encode()
    reply = await nc.request("vb.cmd.job.submit", body, timeout=10)
    decoded: dict[str, Any] = json.loads(reply.data)
    assert "error" not in decoded, decoded
    result: dict[str, Any] = decoded["result"]
    return result


async def test_jobs_round_trip_through_the_orchestrator(api: httpx.AsyncClient, nc: Client) -> None:
    job = await submit_job(nc, "vm-roundtrip")

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
    assert body["state"] == "queued"
    assert body["vmName"] == "vm-roundtrip"

    cancel = await api.post(f"/jobs/{job['id']}/cancel")
    assert cancel.status_code == 200
    assert cancel.json() == {"success": True}
    assert (await api.get(f"/jobs/{job['id']}")).json()["state"] == "canceled"

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
    api: httpx.AsyncClient, nc: Client
) -> None:
    job = await submit_job(nc, "vm-sse")
    ready = asyncio.Event()
    events: list[dict[str, Any]] = []
    reader = asyncio.create_task(_read_sse(api, ready, "job.canceled", events))
    await asyncio.wait_for(ready.wait(), 10)
    assert events[0] == {"event": "ready", "data": "ok"}

    # The job-orchestrator (another process) publishes job.canceled to VB_EVENTS.
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
    first = await submit_job(nc, "vm-resume-1")
    second = await submit_job(nc, "vm-resume-2")
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
