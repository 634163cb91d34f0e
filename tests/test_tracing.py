"""A trace started by an HTTP client reaches the transfer workers and comes back with
their results: every service runs as its own process and prints its spans (console
exporter) into its log.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from harness import System

from virtbackup.testing.nats import connect
from virtbackup.testing.points import write_point

VM = "traced-vm"


def spans_in(log: Path) -> list[dict[str, Any]]:
    """Every span the console exporter printed into ``log`` (indented JSON objects)."""
    text = log.read_text(errors="replace")
    decoder = json.JSONDecoder()
    spans = []
    start = text.find('{\n    "name": ')
    while start != -1:
        span, end = decoder.raw_decode(text, start)
        spans.append(span)
        start = text.find('{\n    "name": ', end)
    return spans


def of_trace(spans: list[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["context"]["trace_id"] == f"0x{trace_id}"]


async def test_a_trace_started_by_the_client_reaches_the_workers_and_back(
    make_system: Callable[..., System], tmp_path: Path
) -> None:
    system = make_system(VIRTBACKUP_OTEL_EXPORTER="console")
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    xml_path = await write_point(repo_dir, VM, chunks=2)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        cfg = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": [
                {"id": "fs", "driverId": "filesystem", "params": {"path": str(repo_dir)}}
            ],
            "backupDestinationId": "fs",
        }
        assert (await api.post("/config", json=cfg)).status_code == 200
        resp = await api.post(
            "/restore/sanity",
            json={"xmlPath": xml_path},
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["jobId"]
        deadline = time.monotonic() + 60
        while (job := (await api.get(f"/jobs/{job_id}")).json())["state"] in {"queued", "running"}:
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.2)
    assert job["state"] == "success", job
    assert job["result"]["checkedChunks"] == 2

    # The worker worked the unit inside the client's trace ...
    worker = of_trace(spans_in(system.data_dir / "transfer-worker.log"), trace_id)
    process = [s for s in worker if s["name"] == f"vb.work.transfer.{job_id} process"]
    assert process, [s["name"] for s in worker]
    assert all(s["kind"] == "SpanKind.CONSUMER" for s in process)
    assert process[0]["resource"]["attributes"]["service.name"] == "virtbackup-transfer-worker"
    # ... and the orchestrator published it inside that trace.
    orchestrator = of_trace(spans_in(system.data_dir / "job-orchestrator.log"), trace_id)
    published = {s["context"]["span_id"] for s in orchestrator}
    assert {s["parent_id"] for s in process} <= published

    # The unit's result goes back in the same trace.
    nc = await connect(system.nats)
    try:
        msg = await nc.jetstream().get_last_msg("VB_EVENTS", f"vb.evt.unit.done.{job_id}")
    finally:
        await nc.drain()
    assert msg.headers is not None
    assert msg.headers["traceparent"].split("-")[1] == trace_id
