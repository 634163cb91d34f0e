"""Findings of a fresh look at issues 14 and 15 (restore point lifecycle, the HyperSDK
API), each a test that failed before its fix. One system for the module, no VM.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, running_system, wait_job

from virtbackup.contracts.v1.points import point_id
from virtbackup.repository.format import point_prefix, record_key
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.points import write_point
from virtbackup.testing.vms import create_vm, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    ensure_libvirtd()
    data = tmp_path_factory.mktemp("hardening")
    repo = data / "repo"
    repo.mkdir(mode=0o700)
    with running_system(data, orchestrators=1) as system:
        system.extra_env["TEST_REPO"] = str(repo)
        cfg = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": [
                {"id": "fs", "name": "fs", "driverId": "filesystem", "params": {"path": str(repo)}}
            ],
            "backupDestinationId": "fs",
        }
        resp = httpx.post(
            f"{system.url}/config", json=cfg, headers=system.auth(), verify=False, timeout=15
        )
        assert resp.status_code == 200, resp.text
        yield system


@pytest.fixture
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as client:
        yield client


@pytest.fixture
async def hyper(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as client:
        yield client


def refused(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    # agents-backend-api.md's routes (/api/v1/admin, /api/v1/task) answer {detail, code}
    message = body["detail"] if set(body) == {"detail", "code"} else body["error"]
    for word in words:
        assert word in message, (word, body)
    return body


def _concrete(path: str) -> str:
    for name, value in (
        ("{server_id}", "local"),
        ("{destination_id}", "fs"),
        ("{point_id}", "fs~eA~2026-01-01T00-00-00"),
        ("{name}", "log"),
    ):
        path = path.replace(name, value)
    return re.sub(r"\{[a-z_]+\}", "no-such-thing", path)


async def test_unknown_query_parameters_are_400_naming_them(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient
) -> None:
    """Every GET of /api/v1 and of the HyperSDK listener: a query parameter the route
    does not declare, or one given twice, is a 400 naming it, never a listing of
    everything or of what one of the two values says."""
    resp = await api.get("/api/v1/restore-points", params={"vmname": "x"})
    refused(resp, 400, "vmname", "vmName")
    assert (await api.get("/api/v1/restore-points", params={"vmName": "x"})).status_code == 200
    checked = doubled = 0
    for client, prefix in ((api, "/api/v1/"), (hyper, "/")):
        doc = (await client.get("/schema/openapi.json")).json()
        for path, item in doc["paths"].items():
            if not path.startswith(prefix):
                continue
            for method in ("get", "delete"):
                if method not in item:
                    continue
                url = path
                for param in item[method].get("parameters", []):
                    if param["in"] == "path" and param["schema"].get("type") == "integer":
                        url = url.replace("{" + param["name"] + "}", "999999")
                url = _concrete(url)
                resp = await client.request(method.upper(), url, params={"bogusFilter": "1"})
                refused(resp, 400, "bogusFilter")
                checked += 1
                # A declared parameter given twice: no route takes a list, so a 400 naming
                # it (one of the values would be dropped without a word otherwise).
                for param in item[method].get("parameters", []):
                    if param["in"] == "query":
                        twice = {str(param["name"]): ["1", "2"]}
                        resp = await client.request(method.upper(), url, params=twice)
                        refused(resp, 400, param["name"], "more than once")
                        doubled += 1
    assert checked > 30 and doubled > 10
    refused(await hyper.get("/jobs/x", params={"jobid": "1"}), 400, "jobid")


async def test_a_metrics_port_of_a_gateway_listener_is_refused(
    api: httpx.AsyncClient, system: System
) -> None:
    cfg = (await api.get("/config")).json()
    bad = {**cfg, "metrics": {"enabled": True, "port": system.agent_port}}
    refused(await api.post("/config", json=bad), 400, "metrics.port", "agent API")
    assert (await api.get("/config")).json() == cfg


async def test_a_metrics_port_that_cannot_bind_never_stops_the_gateway(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient, system: System
) -> None:
    """A port taken by another process: the gateway starts without that listener and
    the HyperSDK listener's /metrics says why (503 naming the port)."""
    cfg = (await api.get("/config")).json()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        posted = {**cfg, "metrics": {"enabled": True, "port": port}}
        assert (await api.post("/config", json=posted)).status_code == 200
        system.stop("gateway")
        system.start("gateway")
        system.wait_ready()
        resp = await hyper.get("/metrics")
        refused(resp, 503, str(port), "metrics.port")
        assert (await hyper.get("/status")).status_code == 200
        log = (system.data_dir / "gateway.log").read_text()
        assert "could not start" in log
    finally:
        taken.close()
        assert (await api.post("/config", json=cfg)).status_code == 200
    assert (await hyper.get("/metrics")).status_code == 200


def _repo(system: System) -> Path:
    return Path(system.extra_env["TEST_REPO"])


async def test_prune_and_verify_of_an_unknown_vm_or_server_are_404(
    api: httpx.AsyncClient, system: System
) -> None:
    vm = f"vbt-hard-known-{os.getpid()}"
    await write_point(_repo(system), vm)
    jobs_before = len((await api.get("/jobs")).json())
    prune = "/api/v1/destinations/fs/prune"
    verify = "/api/v1/destinations/fs/verify"
    for url, body, field in (
        (prune, {"vmName": "nope", "keepLast": 1, "dryRun": True}, "vmName"),
        (prune, {"vmName": "nope", "keepLast": 1}, "vmName"),
        (prune, {"serverId": "nope", "keepLast": 1, "dryRun": True}, "serverId"),
        (verify, {"vmName": "nope"}, "vmName"),
        (verify, {"serverId": "nope"}, "serverId"),
        (verify, {"serverId": "local", "vmName": "nope"}, "vmName"),
    ):
        refused(await api.post(url, json=body), 404, f"`$.{field}`", "nope")
    assert len((await api.get("/jobs")).json()) == jobs_before
    # A VM with points and a configured server are found.
    plan = await api.post(prune, json={"vmName": vm, "keepLast": 1, "dryRun": True})
    assert plan.status_code == 200 and len(plan.json()["keep"]) == 1, plan.text
    resp = await api.post(verify, json={"serverId": "local", "vmName": vm})
    assert resp.status_code == 202, resp.text
    assert (await wait_job(api, resp.json()["id"]))["state"] == "success"
    # The HyperSDK view of these jobs names the VM their params select.
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as hyper:
        view = (await hyper.get(f"/jobs/{resp.json()['id']}")).json()["definition"]
        assert (view["vm_path"], view["source"]["server_id"]) == (f"local/{vm}", "local")
        pruned = await api.post(prune, json={"vmName": vm, "keepLast": 1})
        assert pruned.status_code == 200, pruned.text
        view = (await hyper.get(f"/jobs/{pruned.json()['jobId']}")).json()["definition"]
        assert (view["vm_path"], view["source"]["server_id"]) == (f"*/{vm}", None)
        await wait_job(api, pruned.json()["jobId"])


async def test_the_prune_dry_run_says_a_point_in_use_is_skipped(
    api: httpx.AsyncClient, system: System
) -> None:
    """A verify job of the VM that waits (no transfer worker) uses every point of it:
    the dry run lists the point the rules drop under ``skipped`` with the reason, and
    the prune then does exactly that."""
    vm = f"vbt-hard-inuse-{os.getpid()}"
    old = await write_point(_repo(system), vm)
    await write_point(_repo(system), vm)
    old_id = point_id("fs", vm, old.split("/")[2])
    system.stop("transfer-worker")
    verify_id = None
    try:
        resp = await api.post("/api/v1/destinations/fs/verify", json={"vmName": vm})
        assert resp.status_code == 202, resp.text
        verify_id = resp.json()["id"]
        body = {"vmName": vm, "keepLast": 1}
        plan = await api.post("/api/v1/destinations/fs/prune", json={**body, "dryRun": True})
        assert plan.status_code == 200, plan.text
        shown = plan.json()
        assert shown["remove"] == [], shown
        [skipped] = shown["skipped"]
        assert skipped["id"] == old_id and verify_id in skipped["reason"], skipped
        assert skipped["reason"].startswith("in use:"), skipped
        resp = await api.post("/api/v1/destinations/fs/prune", json=body)
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "success", job
        assert job["result"]["removed"] == [], job
        assert [s["id"] for s in job["result"]["skipped"]] == [old_id], job
    finally:
        if verify_id:
            await api.post(f"/jobs/{verify_id}/cancel")
        system.start("transfer-worker")
        system.wait_ready()
    got = await api.get(f"/api/v1/restore-points/{old_id}")
    assert got.status_code == 200, got.text


async def test_an_unreadable_point_is_deleted_only_with_force(
    api: httpx.AsyncClient, system: System
) -> None:
    vm = f"vbt-hard-unreadable-{os.getpid()}"
    repo = _repo(system)
    xml = await write_point(repo, vm)
    ts = xml.split("/")[2]
    pid = point_id("fs", vm, ts)
    record = repo / "VirtBackup" / record_key(vm, ts)
    record.write_bytes(b'{"vmName":')
    chunks_before = sorted((repo / "VirtBackup" / "chunks").rglob("*"))
    resp = await api.delete(f"/api/v1/restore-points/{pid}")
    refused(resp, 409, "cannot be read", "force=true")
    assert record.exists()
    resp = await api.post("/api/v1/destinations/fs/gc", json={"graceSeconds": 0, "dryRun": True})
    assert resp.status_code == 202, resp.text
    assert (await wait_job(api, resp.json()["id"]))["state"] == "failure"
    resp = await api.delete(f"/api/v1/restore-points/{pid}", params={"force": "true"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["point"]["state"] == "unreadable"
    assert not (repo / "VirtBackup" / point_prefix(vm, ts)).exists() or not any(
        (repo / "VirtBackup" / point_prefix(vm, ts)).iterdir()
    )
    # Its chunks are left to garbage collection, which can run again.
    assert sorted((repo / "VirtBackup" / "chunks").rglob("*")) == chunks_before
    resp = await api.post("/api/v1/destinations/fs/gc", json={"graceSeconds": 0, "dryRun": True})
    assert (await wait_job(api, resp.json()["id"]))["state"] == "success"
    refused(await api.delete(f"/api/v1/restore-points/{pid}", params={"force": "true"}), 404)


def _template(vm_path: str, **options: Any) -> dict[str, Any]:
    return {
        "vm_path": vm_path,
        "source": {"type": "libvirt", "server_id": "local"},
        "destination": {"type": "backup", "destination_id": "fs"},
        "options": options,
    }


async def test_schedule_fields_and_trigger_of_a_disabled_schedule(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient, conn: Connection
) -> None:
    vm = f"vbt-hard-sched-{os.getpid()}"
    directory = vm_directory()
    await create_vm(conn, vm, directory, [16 * MiB], start=False)
    try:
        base = {"name": "n", "schedule": "0 2 * * *", "job_template": _template(f"local/{vm}")}
        for field, value, words in (
            ("schedule", "0 2 * * *\n", ("schedule", "whitespace")),
            ("timezone", "utc", ("timezone", "'UTC'")),
            ("timezone", "localtime", ("timezone",)),
            ("timezone", "right/UTC", ("timezone",)),
        ):
            resp = await hyper.post("/schedules", json={**base, field: value})
            refused(resp, 400, *words)
        assert (await hyper.get("/schedules")).json()["schedules"] == []
        sid = f"hard-{os.getpid()}"
        created = await hyper.post(
            "/schedules",
            json={**base, "id": sid, "schedule": "0 2 * * 7", "timezone": "UTC", "enabled": False},
        )
        assert created.status_code == 201, created.text
        jobs_before = len((await api.get("/jobs")).json())
        refused(await hyper.post(f"/schedules/{sid}/trigger"), 409, "disabled", "enable")
        shown = (await hyper.get(f"/schedules/{sid}")).json()
        assert shown["run_count"] == 0 and shown["last_run"] is None, shown
        assert len((await api.get("/jobs")).json()) == jobs_before
        assert (await hyper.delete(f"/schedules/{sid}")).status_code == 200
    finally:
        await remove_vm(conn, vm, delete_directory=directory)


async def test_cancel_by_status_says_what_happened(hyper: httpx.AsyncClient) -> None:
    resp = await hyper.post("/jobs/cancel", json={"status": "running"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["count"] == 0 and body["message"] == "no job matched: nothing cancelled", body


async def test_fresh_outside_debug_mode_is_refused(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient
) -> None:
    jobs_before = len((await api.get("/jobs")).json())
    resp = await hyper.post("/jobs/submit", json=_template("local/anything", fresh=True))
    refused(resp, 400, "options.fresh", "debug")
    assert len((await api.get("/jobs")).json()) == jobs_before


async def test_an_ntfy_url_with_credentials_is_refused(api: httpx.AsyncClient) -> None:
    cfg = (await api.get("/config")).json()
    bad = {**cfg, "ntfy": {"serverUrl": "https://user:secret@ntfy.example.com", "topic": "t"}}
    body = refused(await api.post("/config", json=bad), 400, "ntfy.serverUrl", "ntfymeToken")
    assert "secret" not in body["error"]
    assert (await api.get("/config")).json() == cfg
