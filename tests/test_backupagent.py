"""backupagent-api.md's agent routes beyond registration and lease: config, jobs/start,
per-stage status, verification, logs, schema-snapshot (definition drift) and anomaly,
against the real system (NATS, every service, the gateway over HTTPS) and a real VM.

The fixtures are test_remote_agents.py's (the ``virtbackup agent`` process, registered
with a one-time token, backing up server ``remote``; server ``local`` is the same
libvirt seen by the inventory). A second agent, ``manual``, is driven by the test over
HTTP with its own key: it reports the stages of jobs it started itself, with sizes of
its choosing (the size rule), and tries what it may not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, wait_job
from test_inventory import _sse_lines
from test_remote_agents import (
    VM,
    agent,
    api,
    key_headers,
    new_token,
    register_body,
    start_process,
    sysm,
    vm,
    wait_agent_seen,
)

from virtbackup.testing.vms import SmallVm
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

__all__ = ["agent", "api", "sysm", "vm"]  # the imported fixtures, used by name

MiB = 1 << 20
MANUAL_VM = f"vbt-manual-{os.getpid()}"


async def _register(sysm: System, api: httpx.AsyncClient) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as anon:
        resp = await anon.post("/api/v1/agent/register", json=register_body(await new_token(api)))
    assert resp.status_code == 201, resp.text
    body: dict[str, str] = resp.json()
    return body


@pytest.fixture(scope="module")
async def manual(sysm: System, api: httpx.AsyncClient, agent: dict[str, Any]) -> dict[str, Any]:
    """A second agent (no process: the test speaks for it), given server ``manual`` and
    destination ``fs``; its heartbeat discovered one VM, ``MANUAL_VM``."""
    keys = await _register(sysm, api)
    cfg = (await api.get("/config")).json()
    cfg["servers"].append(
        {
            "id": "manual",
            "name": "Manual agent",
            "host": "",
            "agentId": keys["agentId"],
            "agentDestinationIds": ["fs"],
        }
    )
    resp = await api.post("/config", json=cfg)
    assert resp.status_code == 200, resp.text
    client = httpx.AsyncClient(
        base_url=sysm.url, verify=False, timeout=30, headers=key_headers(keys["apiKey"])
    )
    beat = {"status": "online", "discoveredDomains": [{"name": MANUAL_VM, "disks": []}]}
    resp = await client.post("/api/v1/agent/heartbeat", json=beat)
    assert resp.status_code == 200 and resp.json()["configChanged"] is True, resp.text
    return {**keys, "client": client}


async def _run_manual_job(
    api: httpx.AsyncClient, client: httpx.AsyncClient, read_size: int
) -> dict[str, Any]:
    """Start a backup as the manual agent, lease it, report it through the stages."""
    resp = await client.post(
        "/api/v1/agent/jobs/start", json={"vmName": MANUAL_VM, "targetId": "fs"}
    )
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 30
    while True:
        lease = (await client.post("/api/v1/agent/lease", json={})).json()
        if lease["assigned"]:
            assert lease["job"]["id"] == job_id, lease
            break
        assert time.monotonic() < deadline, lease
        await asyncio.sleep(0.2)
    path = f"/api/v1/agent/jobs/{job_id}/status"
    for body in (
        {"status": "snapshotting", "parentTimestamp": ""},
        {"status": "reading", "durationMs": 120},
        {"status": "compressing", "readSize": read_size, "durationMs": 300},
        {"status": "uploading", "durationMs": 40, "storedSize": read_size // 3},
        {"status": "committing", "durationMs": 250},
        {"status": "completed", "durationMs": 15, "uploadPath": f"fs:vms/{MANUAL_VM}/",
         "message": f"full backup by the test agent: {read_size} bytes"},
    ):  # fmt: skip
        resp = await client.post(path, json=body)
        assert resp.status_code == 200 and resp.json()["success"] is True, (body, resp.text)
        if body["status"] == "committing":
            assert resp.json()["commit"] is True, resp.text
    job = await wait_job(api, job_id)
    assert job["state"] == "success", job
    return job


async def test_agent_pulls_config_starts_its_backup_and_reports_stages(
    sysm: System, api: httpx.AsyncClient, agent: dict[str, Any], vm: SmallVm
) -> None:
    await wait_agent_seen(api, agent["agentId"])
    key = key_headers(agent["apiKey"])
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as anon:
        resp = await anon.get("/api/v1/agent/config", headers=key)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        # Its server, the one destination it may write, no parameter, no secret.
        assert doc["servers"] == [{"id": "remote", "name": "Remote site", "targetIds": ["fs"]}]
        assert [(t["id"], t["kind"], t["encrypted"]) for t in doc["targets"]] == [
            ("fs", "filesystem", True)
        ]
        assert "passphrase" not in resp.text and "params" not in resp.text
        # Reading it is the agent's: the admin's token is 403, nothing at all 401.
        assert (await api.get("/api/v1/agent/config")).status_code == 403
        assert (await anon.get("/api/v1/agent/config")).status_code == 401

    # A schedule of the agent's VM (disabled: the orchestrator will not run it) and a
    # webhook reach the agent's configuration; the agent pulls it (its heartbeat then
    # carries the new hash).
    hyper = httpx.AsyncClient(base_url=sysm.hypersdk_url, headers=sysm.auth(), timeout=30)
    async with hyper:
        resp = await hyper.post(
            "/schedules",
            json={
                "id": f"agent-{os.getpid()}",
                "name": "nightly",
                "schedule": "0 2 * * *",
                "enabled": False,
                "job_template": {
                    "vm_path": f"remote/{VM}",
                    "source": {"type": "libvirt"},
                    "destination": {"type": "backup", "destination_id": "fs"},
                },
            },
        )
        assert resp.status_code in (200, 201), resp.text
        hook_url = "http://127.0.0.1:9/hook/secret-path?token=hook-secret"
        resp = await hyper.post("/webhooks", json={"url": hook_url, "events": ["job.failed"]})
        assert resp.status_code in (200, 201), resp.text
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as anon:
        doc = (await anon.get("/api/v1/agent/config", headers=key)).json()
    assert [s["id"] for s in doc["schedules"]] == [f"agent-{os.getpid()}"], doc
    assert doc["schedules"][0]["vmName"] == VM and doc["schedules"][0]["targetId"] == "fs"
    assert any(c["kind"] == "webhook" and c["name"] == "127.0.0.1:9" for c in doc["alertChannels"])
    assert "hook-secret" not in json.dumps(doc) and "secret-path" not in json.dumps(doc)
    deadline = time.monotonic() + 30
    while (await api.get(f"/api/v1/agents/{agent['agentId']}")).json()["configHash"] != doc[
        "configHash"
    ]:
        assert time.monotonic() < deadline, agent["log"].read_text()[-3000:]
        await asyncio.sleep(0.3)
    kept = Path(agent["log"]).parent / "keys" / "config.json"
    assert json.loads(kept.read_text())["configHash"] == doc["configHash"]
    assert kept.stat().st_mode & 0o777 == 0o600

    # The agent starts a backup itself (``--backup VM@fs``), leases and runs it.
    old = agent["procs"][-1]
    old.send_signal(signal.SIGTERM)
    old.wait(15)
    logged = len(agent["log"].read_text())
    proc = start_process([*agent["cmd"], "--backup", f"{VM}@fs"], agent["env"], agent["log"])
    agent["procs"].append(proc)
    deadline = time.monotonic() + 60
    while not (
        found := re.search(r"started backup job (\S+) of", agent["log"].read_text()[logged:])
    ):
        assert proc.poll() is None and time.monotonic() < deadline, agent["log"].read_text()[-3000:]
        await asyncio.sleep(0.2)
    job_id = found.group(1)
    job = await wait_job(api, job_id)
    assert job["state"] == "success", (job["message"], agent["log"].read_text()[-3000:])
    assert job["params"]["agentId"] == agent["agentId"] and "by agent" in job["message"]
    stages = job["result"]["agent"]["stages"]
    names = [s["stage"] for s in stages]
    assert names[0] == "leased" and names[-1] == "completed", names
    assert {"snapshotting", "reading", "committing"} <= set(names), names
    assert all(isinstance(s.get("durationMs"), int) for s in stages), stages
    # backend-api's view of the same job names its agent; its log has the stages.
    view = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert (view["status"], view["stage"]) == ("succeeded", "completed"), view
    log = (await api.get(f"/api/v1/jobs/{job_id}/artifacts/output.log")).text
    assert "started by the agent" in log and "stage committing" in log, log


async def test_bad_input_changes_nothing(
    sysm: System, api: httpx.AsyncClient, agent: dict[str, Any], manual: dict[str, Any]
) -> None:
    client: httpx.AsyncClient = manual["client"]
    before = len((await api.get("/jobs")).json())
    start = "/api/v1/agent/jobs/start"
    for body, status, field in (
        ({"vmName": VM, "targetId": "fs"}, 404, "vmName"),  # on another agent's host
        ({"vmName": MANUAL_VM, "targetId": "nowhere"}, 404, "targetId"),
        ({"vmName": MANUAL_VM, "targetId": "other"}, 400, "targetId"),  # not allowed
        ({"vmName": MANUAL_VM, "serverId": "remote"}, 404, "serverId"),  # not its server
        ({"vmName": MANUAL_VM, "scheduleId": "no-such-schedule"}, 404, "scheduleId"),
        ({"vmName": MANUAL_VM, "databaseId": "x"}, 400, "databaseId"),
    ):
        resp = await client.post(start, json=body)
        assert resp.status_code == status and field in resp.json()["error"], (body, resp.text)
    assert len((await api.get("/jobs")).json()) == before

    # Another agent's job is none of its business; stages and batches are checked.
    others = [j for j in (await api.get("/jobs")).json() if j["params"].get("agentId")]
    assert others, "the first test made a job of the process agent"
    theirs = others[0]["id"]
    foreign: tuple[tuple[str, dict[str, Any]], ...] = (
        (f"/api/v1/agent/jobs/{theirs}/status", {"status": "failed"}),
        (f"/api/v1/agent/jobs/{theirs}/logs", {"logs": [{"message": "x"}]}),
        (f"/api/v1/agent/jobs/{theirs}/verification", {"status": "passed"}),
        ("/api/v1/agent/anomaly", {"type": "size_anomaly", "severity": "info", "title": "t",
                                   "jobId": theirs}),
    )  # fmt: skip
    for path, payload in foreign:
        resp = await client.post(path, json=payload)
        assert resp.status_code == 404, (path, resp.text)
    resp = await client.post(f"/api/v1/agent/jobs/{theirs}/status", json={"status": "dumping"})
    assert resp.status_code == 400 and "status" in resp.json()["error"], resp.text
    lines = [{"message": f"line {i}"} for i in range(101)]
    resp = await client.post(f"/api/v1/agent/jobs/{theirs}/logs", json={"logs": lines})
    assert resp.status_code == 400 and "logs" in resp.json()["error"], resp.text
    resp = await client.post(
        "/api/v1/agent/schema-snapshot", json={"vmName": MANUAL_VM, "snapshot": "<not xml"}
    )
    assert resp.status_code == 400 and "snapshot" in resp.json()["error"], resp.text
    resp = await client.post(
        "/api/v1/agent/anomaly", json={"type": "bad", "severity": "info", "title": "t"}
    )
    assert resp.status_code == 400 and "type" in resp.json()["error"], resp.text
    # An anomaly of a VM on another agent's host (found by the #17 trial: it was stored).
    resp = await client.post(
        "/api/v1/agent/anomaly",
        json={"type": "restore_failure", "severity": "critical", "title": "t", "vmName": VM},
    )
    assert resp.status_code == 404 and "vmName" in resp.json()["error"], resp.text
    assert (await api.get("/api/v1/anomalies")).json()["anomalies"] == []

    # An agent no server names has nothing to back up: 409 saying so (the #17 trial got
    # "serverId: required: this agent backs up servers none").
    gone = await _register(sysm, api)
    async with httpx.AsyncClient(
        base_url=sysm.url, verify=False, timeout=30, headers=key_headers(gone["apiKey"])
    ) as idle:
        resp = await idle.post(start, json={"vmName": MANUAL_VM})
        assert resp.status_code == 409 and "no server" in resp.json()["error"], resp.text
    # A revoked key is 401 on every route of the agent.
    assert (await api.delete(f"/api/v1/agents/{gone['agentId']}")).status_code == 200
    async with httpx.AsyncClient(
        base_url=sysm.url, verify=False, timeout=30, headers=key_headers(gone["apiKey"])
    ) as revoked:
        assert (await revoked.get("/api/v1/agent/config")).status_code == 401
        for path in (start, "/api/v1/agent/anomaly", f"/api/v1/agent/jobs/{theirs}/logs"):
            assert (await revoked.post(path, json={})).status_code == 401, path
    # The admin's token is no agent.
    resp = await api.post(start, json={"vmName": MANUAL_VM})
    assert resp.status_code == 403, resp.text


async def test_stages_verification_logs_and_a_size_anomaly(
    sysm: System, api: httpx.AsyncClient, manual: dict[str, Any]
) -> None:
    """Three full backups of about 100 MiB, then one of 45 MiB: an anomaly (the size
    rule: below 50% of the median of the last fulls). Verification and logs join the
    job; the log lines and the anomaly stream on ``/events``."""
    client: httpx.AsyncClient = manual["client"]
    for size in (100 * MiB, 104 * MiB, 98 * MiB):
        await _run_manual_job(api, client, size)
    listed = (await api.get("/api/v1/anomalies", params={"vmName": MANUAL_VM})).json()
    assert listed["anomalies"] == []

    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    reader = asyncio.create_task(_sse_lines(api, events))
    try:
        assert (await asyncio.wait_for(events.get(), 10))["event"] == "ready"
        small = await _run_manual_job(api, client, 45 * MiB)
        stages = small["result"]["agent"]["stages"]
        assert [s["stage"] for s in stages] == [
            "leased", "snapshotting", "reading", "compressing", "uploading", "committing",
            "completed",
        ]  # fmt: skip
        assert [s["durationMs"] for s in stages[1:6]] == [120, 300, 40, 250, 15], stages
        assert small["bytesTransferred"] == 45 * MiB
        assert small["physicalBytes"] == 15 * MiB
        assert small["result"]["agent"]["uploadPath"] == f"fs:vms/{MANUAL_VM}/"
        # A terminal job takes no more reports.
        resp = await client.post(
            f"/api/v1/agent/jobs/{small['id']}/status", json={"status": "failed"}
        )
        assert resp.status_code == 409, resp.text

        resp = await client.post(
            f"/api/v1/agent/jobs/{small['id']}/verification",
            json={
                "status": "passed",
                "restoreDurationMs": 3200,
                "checks": [
                    {"checkType": "boot", "checkName": "guest boots", "status": "passed"},
                    {"checkType": "checksum", "checkName": "vda", "status": "passed",
                     "expectedValue": "abc", "actualValue": "abc", "deltaPct": 0.0},
                ],
            },
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        verification_id = resp.json()["verificationId"]
        resp = await client.post(
            f"/api/v1/agent/jobs/{small['id']}/logs",
            json={
                "logs": [
                    {"level": "info", "message": "restore test begun",
                     "timestamp": "2026-04-09T02:00:01.000Z"},
                    {"level": "warn", "message": "guest slow to boot"},
                ]
            },
        )  # fmt: skip
        assert resp.status_code == 201 and resp.json() == {"inserted": 2}, resp.text
        resp = await client.post(
            "/api/v1/agent/anomaly",
            json={"type": "restore_failure", "severity": "critical", "title": "boot failed",
                  "description": "no login prompt", "jobId": small["id"]},
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        posted = resp.json()["anomalyId"]

        seen: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 20
        while not (
            any("guest slow to boot" in e["data"] for e in seen.get("job.log", []))
            and len(seen.get("anomaly.raised", [])) >= 2
        ):
            event = await asyncio.wait_for(events.get(), max(0.1, deadline - time.monotonic()))
            seen.setdefault(event["event"], []).append(event)
    finally:
        reader.cancel()
    raised = [json.loads(e["data"])["payload"] for e in seen["anomaly.raised"]]
    assert {a["type"] for a in raised} >= {"size_anomaly", "restore_failure"}, raised

    tests = (await api.get(f"/api/v1/jobs/{small['id']}/tests")).json()["tests"]
    mine = [t for t in tests if t["data"].get("verificationId") == verification_id]
    assert [t["check"] for t in mine] == ["verification", "boot", "checksum"], tests
    assert mine[2]["data"]["expectedValue"] == "abc" and mine[2]["status"] == "passed"
    log = (await api.get(f"/api/v1/jobs/{small['id']}/artifacts/output.log")).text
    assert f"[agent {manual['agentId']}] guest slow to boot" in log, log

    listed = (await api.get("/api/v1/anomalies", params={"vmName": MANUAL_VM})).json()
    by_type = {a["type"]: a for a in listed["anomalies"]}
    size = by_type["size_anomaly"]
    assert size["jobId"] == small["id"] and size["source"] == "virtbackup", size
    assert size["details"]["percent"] < 50, size
    assert by_type["restore_failure"]["id"] == posted
    assert by_type["restore_failure"]["agentId"] == manual["agentId"]
    # Reading anomalies is the installation's, not an agent's.
    assert (await client.get("/api/v1/anomalies")).status_code == 401


async def test_a_disk_added_to_a_vm_shows_as_drift(
    sysm: System, api: httpx.AsyncClient, agent: dict[str, Any], vm: SmallVm, conn: Connection
) -> None:
    """Backed up on the bus (server ``local``), then a disk is added to the VM's
    definition: the agent's next definition snapshot and the next backup each raise a
    ``schema_drift`` anomaly and a ``vm.definition_drift`` event naming the disk."""
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    assert (await wait_job(api, resp.json()["jobId"]))["state"] == "success"
    extra = vm.directory / f"{VM}-vdb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "8M"], check=True)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    reader = asyncio.create_task(_sse_lines(api, events))
    try:
        assert (await asyncio.wait_for(events.get(), 10))["event"] == "ready"
        subprocess.run(
            ["virsh", "-q", "attach-disk", VM, str(extra), "vdb", "--config",
             "--subdriver", "qcow2"],
            check=True, capture_output=True,
        )  # fmt: skip
        resp = await api.post("/servers/local/backup", json={"vmName": VM})
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "success", job
        drifts: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while {d.get("source") for d in drifts} != {"agent", "virtbackup"}:
            event = await asyncio.wait_for(events.get(), max(0.1, deadline - time.monotonic()))
            if event["event"] == "vm.definition_drift":
                payload = json.loads(event["data"])["payload"]
                if payload["vmName"] == VM:
                    drifts.append(payload)
    finally:
        reader.cancel()
    for drift in drifts:
        assert "disk vdb added" in drift["changes"], drift
        assert drift["type"] == "schema_drift"
    ours = next(d for d in drifts if d["source"] == "virtbackup")
    assert ours["jobId"] == job["id"] and ours["serverId"] == "local", ours
    theirs = next(d for d in drifts if d["source"] == "agent")
    assert theirs["agentId"] == agent["agentId"] and theirs["serverId"] == "remote", theirs
    listed = (await api.get("/api/v1/anomalies", params={"type": "schema_drift"})).json()
    assert {a["id"] for a in listed["anomalies"]} >= {d["id"] for d in drifts}
