"""backend-api.md's job control and system routes (``/api/v1/jobs...``, ``/healthz``,
``/api/v1/runtime-state``, ``/server-info``, ``/update/*``, ``/server/restart``) against
a real system: NATS, gateway, inventory, one job-orchestrator and one transfer worker.

The jobs are real sanity checks of a restore point written with the repository library
(no VM needed). The orchestrator runs in debug mode with holds, so that each job stays
``queued`` for ``HOLD`` seconds and then ``running`` for ``HOLD`` seconds more: clear-queue
and cancel are aimed at those moments. The release feed is a local stand-in HTTP server
(the test's own), since no real feed is reachable from the test machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import JOB_LOGS
from virtbackup.runtime import __version__
from virtbackup.testing.nats import connect
from virtbackup.testing.points import write_point
from virtbackup.testing.vms import create_vm, remove_vm, vm_directory
from virtbackup.virt import Connection

HOLD = 2.0
FEED = {
    "releases": [
        {"version": "0.0.1", "tag": "v0.0.1", "publishedAt": "2026-01-01T00:00:00Z"},
        {"version": "99.1.0", "tag": "v99.1.0", "publishedAt": "2026-11-01T00:00:00Z",
         "notes": "later", "url": "https://example.invalid/99.1.0"},
    ]
}  # fmt: skip


class _Feed(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(FEED).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def feed_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Feed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/releases.json"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, feed_url: str) -> Iterator[System]:
    data = tmp_path_factory.mktemp("backend-jobs")
    holds = json.dumps({"before:preparing": HOLD, "after:transferring": HOLD})
    with running_system(
        data,
        orchestrators=1,
        VIRTBACKUP_DEBUG="true",
        VIRTBACKUP_DEBUG_HOLDS=holds,
        VIRTBACKUP_RELEASE_FEED_URL=feed_url,
    ) as started:
        yield started


@pytest.fixture(scope="module")
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    repo = system.data_dir / "repo"
    repo.mkdir(mode=0o700, exist_ok=True)
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as client:
        resp = await client.post("/config", json=local_config(repo))
        assert resp.status_code == 200, resp.text
        client.headers["x-test-xml-path"] = await write_point(repo, vm="bk1")
        yield client


async def start(api: httpx.AsyncClient) -> str:
    resp = await api.post("/restore/sanity", json={"xmlPath": api.headers["x-test-xml-path"]})
    assert resp.status_code == 200, resp.text
    job_id: str = resp.json()["jobId"]
    return job_id


async def view(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    resp = await api.get(f"/api/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def until(
    api: httpx.AsyncClient, job_id: str, *statuses: str, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = await view(api, job_id)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def artifact(api: httpx.AsyncClient, job_id: str, name: str) -> httpx.Response:
    return await api.get(f"/api/v1/jobs/{job_id}/artifacts/{name}")


async def test_a_job_keeps_its_log_artifacts_and_tests(api: httpx.AsyncClient) -> None:
    job_id = await start(api)
    queued = await view(api, job_id)
    assert (queued["status"], queued["error"], queued["type"]) == ("queued", None, "sanity")
    done = await until(api, job_id, "succeeded", "failed")
    assert (done["status"], done["error"], done["progress"]) == ("succeeded", None, 100.0)

    listed = (await api.get(f"/api/v1/jobs/{job_id}/artifacts")).json()["artifacts"]
    names = {a["name"]: a for a in listed}
    for name in ("output.log", "job.json", "domain.xml", "backup.json", "manifest-vda.json"):
        assert name in names, names
        assert names[name]["size"] > 0 and names[name]["source"] == "job"
    assert names["domain.xml"]["mediaType"] == "application/xml"

    log = await artifact(api, job_id, "output.log")
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
    assert len(log.content) == names["output.log"]["size"]
    text = log.text
    for line in (f"queued: sanity job {job_id}", "preparing", "transferring: checking 3 chunks",
                 "success: all 3 chunks of bk1"):  # fmt: skip
        assert line in text, text
    manifest = (await artifact(api, job_id, "manifest-vda.json")).json()
    assert manifest["target"] == "vda" and len(manifest["chunks"]) == 3
    assert (await artifact(api, job_id, "backup.json")).json()["vmName"] == "bk1"
    assert "<domain" in (await artifact(api, job_id, "domain.xml")).text
    missing = await artifact(api, job_id, "nothing.bin")
    assert missing.status_code == 404 and "nothing.bin" in missing.json()["error"]

    tests = (await api.get(f"/api/v1/jobs/{job_id}/tests")).json()["tests"]
    assert [(t["check"], t["disk"], t["status"]) for t in tests] == [("sanity", "vda", "passed")]


async def test_a_verify_jobs_tests_are_per_point_and_it_reruns(api: httpx.AsyncClient) -> None:
    resp = await api.post("/api/v1/destinations/fs/verify", json={"vmName": "bk1"})
    assert resp.status_code == 202, resp.text
    first = resp.json()["id"]
    assert (await until(api, first, "succeeded", "failed"))["status"] == "succeeded"
    tests = (await api.get(f"/api/v1/jobs/{first}/tests")).json()["tests"]
    assert [(t["check"], t["point"], t["status"]) for t in tests] == [
        ("verify", api.headers["x-test-xml-path"], "passed")
    ]
    assert tests[0]["data"]["chunksChecked"] == 3
    rerun = (await api.post(f"/api/v1/jobs/{first}/rerun")).json()
    again = await until(api, rerun["jobId"], "succeeded", "failed")
    assert (again["type"], again["params"], again["status"]) == (
        "verify", {"mode": "full", "vmName": "bk1"}, "succeeded"
    )  # fmt: skip


async def test_cancel_is_the_documented_terminal_mutation(api: httpx.AsyncClient) -> None:
    job_id = await start(api)
    resp = await api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert (job["status"], job["error"]) == ("failed", "cancelled by user")
    assert job == await view(api, job_id) | {"updatedAt": job["updatedAt"]}
    lines = (await artifact(api, job_id, "output.log")).text.splitlines()
    assert sum(line.endswith("WARN  [control] job cancelled by user") for line in lines) == 1
    # The agent API and the HyperSDK API keep their documented views of the same job.
    agent = (await api.get(f"/jobs/{job_id}")).json()
    assert (agent["state"], agent["message"]) == ("canceled", "cancelled by user")
    again = await api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already finished" in again.json()["error"]


async def test_clear_queue_cancels_queued_jobs_only(api: httpx.AsyncClient) -> None:
    running = await start(api)
    await until(api, running, "running")
    queued = [await start(api), await start(api)]
    resp = await api.post("/api/v1/jobs/clear-queue")
    assert resp.status_code == 200, resp.text
    cleared = resp.json()
    assert set(queued) <= set(cleared["cancelled"]) and running not in cleared["cancelled"]
    assert cleared["count"] == len(cleared["cancelled"])
    for job_id in queued:
        job = await until(api, job_id, "failed")
        assert job["error"] == "cancelled by user"
        assert "[control] job cancelled by user" in (await artifact(api, job_id, "output.log")).text
    assert (await until(api, running, "succeeded", "failed"))["status"] == "succeeded"


async def test_rerun_starts_the_same_definition_again(api: httpx.AsyncClient) -> None:
    first = await start(api)
    await until(api, first, "succeeded")
    resp = await api.post(f"/api/v1/jobs/{first}/rerun")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["rerunOf"] == first and body["jobId"] != first
    old, new = await view(api, first), await until(api, body["jobId"], "succeeded")
    assert (new["type"], new["params"], new["destinationId"]) == (
        old["type"], old["params"], old["destinationId"]
    )  # fmt: skip
    assert (
        f"[control] rerun of job {first}" in (await artifact(api, body["jobId"], "output.log")).text
    )
    assert (await api.post("/api/v1/jobs/no-such-job/rerun")).status_code == 404


async def test_delete_removes_a_finished_job_with_its_log(
    api: httpx.AsyncClient, system: System
) -> None:
    job_id = await start(api)
    busy = await api.delete(f"/api/v1/jobs/{job_id}")
    assert busy.status_code == 409 and "cancel it first" in busy.json()["error"]
    posted = await api.post(
        f"/api/v1/jobs/{job_id}/artifacts", json={"name": "note.txt", "content": "x"}
    )
    assert posted.status_code == 201, posted.text
    await until(api, job_id, "succeeded")
    resp = await api.delete(f"/api/v1/jobs/{job_id}")
    assert resp.status_code == 200 and resp.json() == {"deleted": job_id}
    for path in ("", "/artifacts", "/tests"):
        assert (await api.get(f"/api/v1/jobs/{job_id}{path}")).status_code == 404
    assert (await api.get(f"/jobs/{job_id}")).status_code == 404
    nc = await connect(system.nats)
    try:
        js = nc.jetstream()
        info = await js.stream_info(JOB_LOGS.name, subjects_filter=subjects.job_log(job_id))
        assert not (info.state.subjects or {}).get(subjects.job_log(job_id))
        files = await js.key_value("VB_JOB_FILES")
        with pytest.raises(Exception, match=r"not found|deleted"):
            await files.get(f"art.{job_id}.note.txt")
    finally:
        await nc.drain()
    assert (await api.delete(f"/api/v1/jobs/{job_id}")).status_code == 404


async def test_flush_history_removes_finished_jobs(api: httpx.AsyncClient) -> None:
    bad = await api.post("/api/v1/jobs/flush-history", json={"olderThan": "yesterday"})
    assert bad.status_code == 400 and "`$.olderThan`" in bad.json()["error"]
    unknown = await api.post("/api/v1/jobs/flush-history", json={"before": "2020-01-01"})
    assert unknown.status_code == 400 and "before" in unknown.json()["error"]
    finished = await start(api)
    await until(api, finished, "succeeded")
    none = await api.post("/api/v1/jobs/flush-history", json={"olderThan": "2000-01-01"})
    assert none.json() == {"removed": 0, "ids": []}
    active = await start(api)
    resp = await api.post("/api/v1/jobs/flush-history")
    assert resp.status_code == 200, resp.text
    assert finished in resp.json()["ids"] and active not in resp.json()["ids"]
    assert resp.json()["removed"] == len(resp.json()["ids"])
    assert (await api.get(f"/api/v1/jobs/{finished}")).status_code == 404
    assert (await view(api, active))["status"] in {"queued", "running"}
    listed = (await api.get("/api/v1/jobs", params={"status": "succeeded"})).json()
    assert listed["total"] == 0, listed
    await until(api, active, "succeeded")


async def test_list_filters_and_pages(api: httpx.AsyncClient) -> None:
    ids = [await start(api) for _ in range(3)]
    for job_id in ids:
        await until(api, job_id, "succeeded")
    everything = (await api.get("/api/v1/jobs", params={"type": "sanity", "limit": 1000})).json()
    assert [j["id"] for j in everything["jobs"]][:3] == ids[::-1]
    page1 = (await api.get("/api/v1/jobs", params={"type": "sanity", "limit": 2})).json()
    page2 = (
        await api.get("/api/v1/jobs", params={"type": "sanity", "limit": 2, "offset": 2})
    ).json()
    assert page1["total"] == page2["total"] == everything["total"] >= 3
    assert page1["nextOffset"] == 2 and [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
    assert page2["jobs"][0]["id"] == ids[0]
    created = everything["jobs"][0]["createdAt"]
    later = (await api.get("/api/v1/jobs", params={"since": created})).json()
    assert [j["id"] for j in later["jobs"]] == [ids[-1]]
    earlier = (await api.get("/api/v1/jobs", params={"until": created, "vmName": "bk1"})).json()
    assert ids[-1] not in [j["id"] for j in earlier["jobs"]] and ids[0] in [
        j["id"] for j in earlier["jobs"]
    ]
    assert (await api.get("/api/v1/jobs", params={"vmName": "other"})).json()["total"] == 0
    for name, value in (("since", "2026-13-45"), ("until", "soon"), ("status", "done"),
                        ("limit", "0"), ("type", "nope")):  # fmt: skip
        resp = await api.get("/api/v1/jobs", params={name: value})
        assert resp.status_code == 400 and f"`{name}`" in resp.json()["error"], resp.text
    assert (await api.get("/api/v1/jobs/no-such-job")).status_code == 404


async def _log(system: System, job_id: str, lines: list[str]) -> None:
    """Store output lines of a job as an agent's report does (``vb.log.job.<id>``)."""
    nc = await connect(system.nats)
    try:
        js = nc.jetstream()
        for line in lines:
            entry = {"ts": "2026-01-01T00:00:00Z", "level": "info", "line": line}
            await js.publish(subjects.job_log(job_id), json.dumps(entry).encode())
    finally:
        await nc.drain()


async def test_artifacts_and_tests_from_an_agent(system: System, api: httpx.AsyncClient) -> None:
    job_id = await start(api)
    await _log(system, job_id, ["read vda 1/3", "read vda 2/3"])
    text = {"name": "agent-notes.txt", "mediaType": "text/plain", "content": "héllo"}
    assert (await api.post(f"/api/v1/jobs/{job_id}/artifacts", json=text)).status_code == 201
    raw = {"name": "blob.bin", "contentBase64": "AAEC"}
    assert (await api.post(f"/api/v1/jobs/{job_id}/artifacts", json=raw)).status_code == 201
    refusals: list[tuple[dict[str, str], int]] = [
        ({"name": "job.json", "content": "{}"}, 409),
        ({"name": "x.bin", "contentBase64": "@@"}, 400),
        ({"name": "../x", "content": "a"}, 400),
        ({"name": "big.bin", "content": "a" * (256 * 1024 + 1)}, 400),
        ({"name": "two", "content": "a", "contentBase64": "AA=="}, 400),
    ]
    for refused, status in refusals:
        resp = await api.post(f"/api/v1/jobs/{job_id}/artifacts", json=refused)
        assert resp.status_code == status, (refused["name"], resp.text)
    listed = {a["name"]: a for a in (await api.get(f"/api/v1/jobs/{job_id}/artifacts")).json()[
        "artifacts"]}  # fmt: skip
    assert listed["agent-notes.txt"]["size"] == len("héllo".encode())
    assert listed["agent-notes.txt"]["source"] == "agent"
    assert (await artifact(api, job_id, "agent-notes.txt")).text == "héllo"
    assert (await artifact(api, job_id, "blob.bin")).content == b"\x00\x01\x02"
    # A declared type that a browser would run is served as bytes, sandboxed.
    page = {"name": "page.html", "mediaType": "text/html", "content": "<script>1</script>"}
    assert (await api.post(f"/api/v1/jobs/{job_id}/artifacts", json=page)).status_code == 201
    served = await artifact(api, job_id, "page.html")
    assert served.headers["content-type"] == "application/octet-stream", served.headers
    assert "sandbox" in served.headers["content-security-policy"]
    assert (
        (await artifact(api, job_id, "agent-notes.txt"))
        .headers["content-type"]
        .startswith("text/plain")
    )

    # A name posted once is never replaced silently.
    again = {"name": "agent-notes.txt", "content": "replaced"}
    resp = await api.post(f"/api/v1/jobs/{job_id}/artifacts", json=again)
    assert resp.status_code == 409 and "already" in resp.json()["error"], resp.text
    assert (await artifact(api, job_id, "agent-notes.txt")).text == "héllo"

    check = {"check": "boot", "status": "passed", "disk": "vda", "detail": "booted to login"}
    resp = await api.post(f"/api/v1/jobs/{job_id}/tests", json={"tests": [check]})
    assert resp.status_code == 201, resp.text
    await until(api, job_id, "succeeded")
    # A job that has ended takes no more reports: 409 naming its state.
    late = {"name": "late.txt", "content": "late"}
    resp = await api.post(f"/api/v1/jobs/{job_id}/artifacts", json=late)
    assert resp.status_code == 409 and "has ended (success)" in resp.json()["error"], resp.text
    resp = await api.post(f"/api/v1/jobs/{job_id}/tests", json={"tests": [check]})
    assert resp.status_code == 409 and "has ended (success)" in resp.json()["error"], resp.text
    tests = (await api.get(f"/api/v1/jobs/{job_id}/tests")).json()["tests"]
    assert [(t["check"], t["source"]) for t in tests] == [("sanity", "job"), ("boot", "agent")]
    log = (await artifact(api, job_id, "output.log")).text
    assert "read vda 1/3" in log and "read vda 2/3" in log


async def test_a_log_larger_than_one_bus_message_downloads_whole(
    system: System, api: httpx.AsyncClient
) -> None:
    job_id = await start(api)
    # 200 lines of 4000 characters: 800 kB, more than a piece
    await _log(system, job_id, [f"{n:04d}" + "x" * 3996 for n in range(200)])
    await until(api, job_id, "succeeded")
    listed = (await api.get(f"/api/v1/jobs/{job_id}/artifacts")).json()["artifacts"]
    size = next(a["size"] for a in listed if a["name"] == "output.log")
    assert size > 800_000
    log = await artifact(api, job_id, "output.log")
    assert len(log.content) == size == int(log.headers["content-length"])
    body = log.text.splitlines()
    assert sum(line.endswith("x" * 3996) for line in body) == 200
    assert "INFO  success: all 3 chunks" in body[-1], body[-1]


async def test_log_lines_are_streamed_on_events(system: System, api: httpx.AsyncClient) -> None:
    seen: list[dict[str, Any]] = []
    job_id = ""

    async def follow() -> None:
        url = f"{system.url}/events"
        async with (
            httpx.AsyncClient(verify=False, timeout=None) as client,
            client.stream("GET", url, headers=system.auth()) as resp,
        ):
            fields: dict[str, str] = {}
            async for line in resp.aiter_lines():
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                    continue
                message, fields = fields, {}
                if message.get("event") == "job.log":
                    assert "id" not in message, message  # log lines carry no id
                    seen.append(json.loads(message["data"])["payload"])
                    if job_id and any(
                        p["jobId"] == job_id and p["line"].startswith("success") for p in seen
                    ):
                        return

    reader = asyncio.create_task(follow())
    await asyncio.sleep(1.0)
    job_id = await start(api)
    await asyncio.wait_for(reader, 60)
    mine = [p["line"] for p in seen if p["jobId"] == job_id]
    assert mine[0].startswith(f"queued: sanity job {job_id}") and mine[-1].startswith("success")
    assert {p["level"] for p in seen if p["jobId"] == job_id} == {"info"}


async def test_system_routes(api: httpx.AsyncClient, feed_url: str) -> None:
    health = await api.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["ok"] is True and health.json()["services"]["job-orchestrator"] is True
    async with httpx.AsyncClient(base_url=str(api.base_url), verify=False) as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 401
        assert (await anonymous.get("/api/v1/runtime-state")).status_code == 401

    state = (await api.get("/api/v1/runtime-state")).json()
    services = {s["service"]: s for s in state["services"]}
    assert services["transfer-worker"]["replicas"] == 1 and services["gateway"]["replicas"] == 1
    assert services["job-orchestrator"]["instances"][0]["version"] == __version__
    assert len(state["workers"]) == 1
    assert state["queue"]["stream"] == "VB_WORK" and state["queue"]["consumer"]["exists"]
    assert state["queue"]["consumer"]["pending"] == 0
    assert state["nats"]["connected"] and state["nats"]["jetstream"]
    assert state["nats"]["account"]["streams"] >= 4

    info = (await api.get("/api/v1/server-info")).json()
    assert info["version"] == __version__ and info["mode"] == "deployment"
    assert {a["document"] for a in info["apis"]} >= {"agent-api.md", "backend-api.md"}
    assert info["listeners"]["agent"].endswith(f":{api.base_url.port}")

    check = (await api.post("/api/v1/update/check")).json()
    assert check["feedUrl"] == feed_url and check["error"] is None
    assert (check["latestVersion"], check["updateAvailable"]) == ("99.1.0", True)
    tags = (await api.get("/api/v1/update/tags")).json()
    assert tags["tags"] == ["v99.1.0", "v0.0.1"]
    status = (await api.get("/api/v1/update/status")).json()
    assert status["services"]["gateway"] == [__version__] and status["consistent"] is True
    for path in ("/api/v1/update/apply", "/api/v1/update/rollback"):
        resp = await api.post(path)
        assert resp.status_code == 501 and "Helm" in resp.json()["error"]
        assert "compose" in resp.json()["error"]
    restart = await api.post("/api/v1/server/restart")
    assert restart.status_code == 501 and "virtbackup up" in restart.json()["error"]


@pytest.mark.libvirt
async def test_backup_and_restore_logs_name_each_disk_and_a_rerun_builds_on_it(
    api: httpx.AsyncClient, conn: Connection
) -> None:
    name = f"vbt-bkj-{os.getpid()}"
    directory = vm_directory()
    await create_vm(conn, name, directory, [64 << 20])
    try:
        resp = await api.post("/servers/local/backup", json={"vmName": name})
        assert resp.status_code == 200, resp.text
        first = resp.json()["jobId"]
        assert (await until(api, first, "succeeded", "failed", timeout=120))[
            "status"
        ] == "succeeded"
        log = (await artifact(api, first, "output.log")).text
        assert f"disk vda ({directory}/{name}-vda.qcow2, qcow2, {64 << 20} bytes): full" in log
        listed = {a["name"] for a in (await api.get(f"/api/v1/jobs/{first}/artifacts")).json()[
            "artifacts"]}  # fmt: skip
        assert {"domain.xml", "backup.json", "manifest-vda.json"} <= listed
        assert f"<name>{name}</name>" in (await artifact(api, first, "domain.xml")).text
        first_point = (await artifact(api, first, "backup.json")).json()
        first_point = f"vms/{name}/{first_point['timestamp']}/domain.xml"

        rerun = await api.post(f"/api/v1/jobs/{first}/rerun")
        assert rerun.status_code == 202, rerun.text
        second = await until(api, rerun.json()["jobId"], "succeeded", "failed", timeout=120)
        assert second["status"] == "succeeded" and second["message"].startswith("incremental")
        assert (second["vmName"], second["serverId"]) == (name, "local")
        assert "disk vda" in (await artifact(api, second["id"], "output.log")).text

        restore = {"xmlPath": first_point, "decision": "overwrite",
                   "vmName": f"{name}-r"}  # fmt: skip
        resp = await api.post("/servers/local/restore/start", json=restore)
        assert resp.status_code == 200, resp.text
        restored = await until(api, resp.json()["jobId"], "succeeded", "failed", timeout=120)
        assert restored["status"] == "succeeded", restored
        log = (await artifact(api, restored["id"], "output.log")).text
        assert f"disk vda: {directory}/{name}-r-vda.qcow2 written to " in log, log
    finally:
        await remove_vm(conn, f"{name}-r")
        await remove_vm(conn, name, delete_directory=directory)
