"""The HyperSDK API's live side on a real system (nats-server, every service, libvirt):
``WS /ws``, ``/metrics`` (the gateway's and each service's own), ``/status`` from real
state.

The system runs with a debug hold after a job's units are done (``after:transferring``),
so a backup is still ``running`` with no transfer unit in progress while the tests look.
The tests build on each other, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any, cast

import httpx
import pytest
import websockets
from harness import System, local_config, running_system, wait_job
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from virtbackup.gateway.hypersdk_ws import Client, Hub, message
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import __version__
from virtbackup.runtime.ports import free_port
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-live-{os.getpid()}"
HOLD = 3.0
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("live"),
        orchestrators=1,
        VIRTBACKUP_METRICS_PORT="auto",
        VIRTBACKUP_DEBUG="true",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps({"after:transferring": HOLD}),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def api(
    system: System, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    repo = tmp_path_factory.mktemp("live-repo")
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as client:
        assert (await client.post("/config", json=local_config(repo))).status_code == 200
        yield client


@pytest.fixture(scope="module")
async def hyper(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    directory = vm_directory()
    small = await create_vm(conn, VM, directory, [64 * MiB])
    # The same 4 MiB chunk twice: the second copy is deduplicated.
    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0x5A)
    await guest_write(conn, VM, "vda", 16 * MiB, 4 * MiB, pattern=0x5A)
    try:
        yield small
    finally:
        await remove_vm(conn, VM, delete_directory=directory)


def ws_url(system: System) -> str:
    return f"ws://127.0.0.1:{system.hypersdk_port}/ws"


def browser_protocols(token: str) -> list[Any]:
    return ["virtbackup.v1", f"virtbackup.bearer.{token}"]


async def next_of(sock: Any, kind: str, timeout: float, **match: Any) -> dict[str, Any]:
    """The next message of type ``kind`` whose data has ``match``'s items."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {kind} {match} within {timeout} s"
        msg = json.loads(await asyncio.wait_for(sock.recv(), remaining))
        assert set(msg) == {"type", "timestamp", "data"}, msg
        if msg["type"] != kind:
            continue
        data = msg["data"]
        if all(_get(data, k) == v for k, v in match.items()):
            found: dict[str, Any] = msg
            return found


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("__"):
        data = data[part]
    return data


async def test_an_upgrade_without_the_token_is_refused(system: System) -> None:
    url = ws_url(system)
    attempts: list[dict[str, Any]] = [
        {},
        {"subprotocols": ["virtbackup.v1", "virtbackup.bearer.wrong-token"]},
        {"subprotocols": ["virtbackup.v1"]},
        # Which one is meant? Two tokens, a wrong one first or last, are refused.
        {
            "subprotocols": [
                "virtbackup.v1",
                "virtbackup.bearer.wrong",
                f"virtbackup.bearer.{system.token}",
            ]
        },
        {
            "subprotocols": [
                "virtbackup.v1",
                f"virtbackup.bearer.{system.token}",
                "virtbackup.bearer.wrong",
            ]
        },
        # The token offered without the protocol the server selects.
        {"subprotocols": [f"virtbackup.bearer.{system.token}"]},
    ]
    for kwargs in attempts:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url, open_timeout=10, **kwargs):
                pass
        assert refused.value.response.status_code == 403
    # A token in the URL (which logs keep) is no way in either, not even beside a good
    # one, and the log does not keep it.
    with pytest.raises(InvalidStatus):
        async with websockets.connect(f"{url}?token={system.token}", open_timeout=10):
            pass
    good = browser_protocols(system.token)
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            f"{url}?access_token={system.token}", subprotocols=good, open_timeout=10
        ):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(url, subprotocols=good, open_timeout=10):
        pass  # the same offer without the URL's token is let in
    log = (system.data_dir / "gateway.log").read_text(errors="replace")
    assert system.token not in log


async def test_ws_jobs_then_status_then_job_update(
    system: System, api: httpx.AsyncClient, hyper: httpx.AsyncClient, vm: SmallVm
) -> None:
    async with websockets.connect(
        ws_url(system), subprotocols=browser_protocols(system.token), open_timeout=10
    ) as sock:
        assert sock.subprotocol == "virtbackup.v1"  # the token is never echoed
        first = json.loads(await asyncio.wait_for(sock.recv(), 10))
        assert first["type"] == "jobs" and first["data"] == {"jobs": []}, first
        connected = time.monotonic()
        status = await next_of(sock, "status", 3.0)
        assert time.monotonic() - connected < 3.0
        assert status["data"]["total_jobs"] == 0 and status["data"]["worker_count"] == 1

        await sock.send(json.dumps({"type": "ping"}))
        await next_of(sock, "pong", 5.0)

        resp = await api.post("/servers/local/backup", json={"vmName": VM})
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["jobId"]
        running = await next_of(sock, "job_update", 60.0, definition__id=job_id, status="running")
        assert running["data"]["definition"]["vm_path"] == f"local/{VM}"
        assert set(running["data"]["progress"]) == {
            "stage",
            "percent_complete",
            "current_bytes",
            "total_bytes",
        }
        # Held after its units are done: running, and no worker busy (the old /status
        # said min(workers, running) = 1 here).
        await next_of(
            sock, "job_update", 60.0, definition__id=job_id, progress__stage="transferring"
        )
        busy = await _status_while(
            hyper, lambda s: s["running_jobs"] == 1 and s["active_workers"] == 0
        )
        assert busy["worker_count"] == 1
        done = await next_of(sock, "job_update", 60.0, definition__id=job_id, status="completed")
        assert done["data"]["progress"]["percent_complete"] == 100
        STATE["job_id"] = job_id
    job = await wait_job(api, job_id)
    assert job["state"] == "success", job
    STATE["job"] = job


async def _status_while(hyper: httpx.AsyncClient, ok: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await hyper.get("/status")
        assert resp.status_code == 200, resp.text
        status: dict[str, Any] = resp.json()
        if ok(status):
            return status
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.2)


async def test_status_counts_match_the_job_store(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient
) -> None:
    assert "job" in STATE, "needs the backup of the test before"
    failed = await api.post("/restore/sanity", json={"xmlPath": "/nowhere/none.xml"})
    if failed.status_code == 200:  # a job that fails: the counts must tell it apart
        await wait_job(api, failed.json()["jobId"])
    jobs = (await api.get("/jobs")).json()
    status = await _status_while(hyper, lambda s: s["running_jobs"] == 0)
    assert status == {
        "total_jobs": len(jobs),
        "running_jobs": 0,
        "completed_jobs": sum(1 for j in jobs if j["state"] == "success"),
        "failed_jobs": sum(1 for j in jobs if j["state"] == "failure"),
        "worker_count": 1,
        "active_workers": 0,
    }
    assert status["completed_jobs"] >= 1


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    """The value of the sample named ``sample`` (``..._total``, ``..._count``) with
    ``labels``, from any family."""
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no {sample} {labels} in {sorted(fams)}")


async def test_gateway_metrics(system: System, hyper: httpx.AsyncClient) -> None:
    job = STATE["job"]
    async with httpx.AsyncClient(base_url=system.hypersdk_url) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 401
    await hyper.get("/status")
    resp = await hyper.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    fams = families(resp.text)
    assert value(fams, "hypersdk_jobs_total", status="completed") >= 1
    assert value(fams, "hypersdk_jobs_total", status="running") == 0
    assert value(fams, "hypersdk_workers_active") == 0
    assert (
        value(
            fams,
            "hypersdk_build_info",
            version=__version__,
        )
        == 1
    )
    assert (
        value(fams, "hypersdk_api_requests_total", method="GET", path="/status", status="OK") >= 1
    )
    assert (
        value(
            fams,
            "hypersdk_api_request_duration_seconds_count",
            method="GET",
            path="/status",
        )
        >= 1
    )
    finished = datetime.fromisoformat(job["finishedAt"].replace("Z", "+00:00")).timestamp()
    last = value(fams, "virtbackup_last_successful_backup_timestamp_seconds", server="local", vm=VM)
    assert abs(last - finished) < 1.0
    assert value(fams, "virtbackup_last_backup_success", server="local", vm=VM) == 1


async def test_each_service_has_its_own_metrics(system: System) -> None:
    async with httpx.AsyncClient(timeout=10) as client:

        async def scrape(name: str) -> dict[str, Any]:
            port = system.metrics_ports[name]
            resp = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert resp.status_code == 200, resp.text
            return families(resp.text)

        orch = await scrape("job-orchestrator")
        assert value(orch, "virtbackup_jobs_finished_total", type="backup", state="success") >= 1
        assert (
            value(
                orch,
                "virtbackup_job_duration_seconds_count",
                type="backup",
                state="success",
            )
            >= 1
        )
        # The hold alone keeps the job running HOLD seconds.
        assert (
            value(
                orch,
                "virtbackup_job_duration_seconds_sum",
                type="backup",
                state="success",
            )
            >= HOLD
        )
        worker = await scrape("transfer-worker")
        assert value(worker, "virtbackup_backup_read_bytes_total") >= 8 * MiB
        assert value(worker, "virtbackup_backup_stored_bytes_total") > 0
        assert value(worker, "virtbackup_backup_deduplicated_bytes_total") >= 4 * MiB
        for name in ("gateway", "inventory", "notifier"):
            fams = await scrape(name)
            assert value(fams, "virtbackup_build_info", version=__version__) == 1


async def test_metrics_enabled_and_port_are_honoured(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient, system: System
) -> None:
    cfg = (await api.get("/config")).json()
    port = free_port()
    try:
        off = {**cfg, "metrics": {"enabled": False}}
        assert (await api.post("/config", json=off)).status_code == 200, off
        resp = await hyper.get("/metrics")
        assert resp.status_code == 503 and "metrics.enabled" in resp.json()["error"]
        bad = await api.post("/config", json={**cfg, "metrics": {"port": 0}})
        assert bad.status_code == 400 and "metrics" in bad.text, bad.text
        elsewhere = {**cfg, "metrics": {"enabled": True, "port": port}}
        assert (await api.post("/config", json=elsewhere)).status_code == 200
        resp = await hyper.get("/metrics")
        assert resp.status_code == 404 and str(port) in resp.json()["error"]
        # The port is taken at the gateway's start: restart it, then /metrics is there,
        # behind the same token.
        system.stop("gateway")
        system.start("gateway")
        system.wait_ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as own:
            assert (await own.get("/metrics")).status_code == 401
            resp = await own.get("/metrics", headers=system.auth())
            assert resp.status_code == 200, resp.text
            assert value(families(resp.text), "hypersdk_jobs_total", status="completed") >= 1
    finally:
        assert (await api.post("/config", json=cfg)).status_code == 200
    assert (await hyper.get("/metrics")).status_code == 200


async def test_a_slow_client_is_dropped_and_never_slows_the_others() -> None:
    """The hub's fan-out never waits: a client whose queue is full is marked too slow
    (its connection is then closed with 1013) while the others get every message."""
    hub = Hub(cast(Gateway, None))
    slow, fast = Client(size=3), Client(size=100)
    hub.clients.update({slow, fast})
    started = time.monotonic()
    for i in range(50):
        hub.broadcast(message("status", {"n": i}))
    assert time.monotonic() - started < 1.0
    assert slow.too_slow.is_set() and slow.queue.qsize() == 3
    assert not fast.too_slow.is_set() and fast.queue.qsize() == 50
    assert json.loads(fast.queue.get_nowait())["data"] == {"n": 0}
