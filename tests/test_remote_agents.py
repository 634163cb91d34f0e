"""Remote agents (backend-api.md, backupagent-api.md): registration, keys, lease, status,
deactivation, against the real system (NATS, every service, gateway over HTTPS) and a
real VM (libvirtd/QEMU), a filesystem destination.

The agent is ``virtbackup agent`` as its own process, started without any NATS setting
or credential: it reaches only the gateway. Server ``remote`` names it (``agentId``), so
its VMs' backups are leased to it; server ``local`` is the same libvirt seen by the
inventory, used to restore and compare.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, running_system, same, snapshot, wait_job
from nats.aio.msg import Msg

from virtbackup.testing.nats import connect
from virtbackup.testing.sshd import SshdServer
from virtbackup.testing.vms import SmallVm, guest_write, made_vm, vm_directory
from virtbackup.virt import Connection, backup_running, get_domain, list_checkpoints

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-agent-{os.getpid()}"
#: Seconds the agent waits before it asks to commit (``VIRTBACKUP_AGENT_DEBUG_HOLDS``).
HOLD = 3.0
#: The destination's passphrase: the agent gets it in its lease, and no log holds it.
PASSPHRASE = f"agent-pass-{os.getpid()}-7f3a"


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("agents"), workers=1, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(sysm: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as client:
        yield client


async def new_token(api: httpx.AsyncClient, seconds: int = 600) -> str:
    resp = await api.post("/api/v1/agent/registration-tokens", json={"expiresInSeconds": seconds})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["token"] and body["expiresAt"].endswith("Z")
    token: str = body["token"]
    return token


def register_body(token: str) -> dict[str, str]:
    return {
        "registrationToken": token,
        "hostname": "kvm-test",
        "os": "linux",
        "arch": "amd64",
        "agentVersion": "0.1.0",
    }


def start_process(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


@pytest.fixture(scope="module")
async def agent(
    sysm: System, api: httpx.AsyncClient, repo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """The agent process, registered with a one-time token, and the configuration that
    gives it server ``remote`` and destination ``fs``."""
    home = tmp_path_factory.mktemp("agent-home")
    scratch = vm_directory(prefix="vbtest-agent-scratch-")  # QEMU must traverse it
    key_file = home / "keys" / "agent.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTBACKUP_")}
    env.update(
        VIRTBACKUP_DEBUG="1",
        VIRTBACKUP_AGENT_DEBUG_HOLDS=json.dumps(
            {"before:committing": HOLD, "restore:before:committing": HOLD}
        ),
    )
    cmd = [
        sys.executable, "-m", "virtbackup.cli", "agent",
        "--gateway", sysm.url,
        "--ca-file", str(sysm.data_dir / "tls" / "agent.crt"),
        "--key-file", str(key_file),
        "--scratch-dir", str(scratch),
        "--poll-seconds", "0.3",
        "--heartbeat-seconds", "1",
    ]  # fmt: skip
    token = await new_token(api)
    proc = start_process([*cmd, "--registration-token", token], env, home / "agent.log")
    procs = [proc]
    try:
        deadline = time.monotonic() + 30
        while not key_file.exists():
            assert proc.poll() is None, (home / "agent.log").read_text()
            assert time.monotonic() < deadline, "the agent did not register"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)
        keys = json.loads(key_file.read_text())
        assert keys["apiKey"].startswith("bak_")
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.parent.stat().st_mode & 0o777 == 0o700
        other = home / "other"
        other.mkdir()
        cfg = {
            "servers": [
                {"id": "local", "name": "This host", "host": ""},
                {
                    "id": "remote",
                    "name": "Remote site",
                    "host": "",
                    "agentId": keys["agentId"],
                    "agentDestinationIds": ["fs"],
                },
            ],
            "destinations": [
                {
                    "id": "fs",
                    "driverId": "filesystem",
                    "params": {"path": str(repo_dir)},
                    "encryption": {"cipher": "aes-256-gcm", "passphrase": PASSPHRASE},
                },
                {"id": "other", "driverId": "filesystem", "params": {"path": str(other)}},
            ],
            "backupDestinationId": "fs",
        }
        resp = await api.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
        yield {**keys, "procs": procs, "cmd": cmd, "log": home / "agent.log", "env": env}
    finally:
        for each in procs:
            each.send_signal(signal.SIGTERM)
            try:
                each.wait(15)
            except subprocess.TimeoutExpired:
                each.kill()
                each.wait(5)
        shutil.rmtree(scratch, ignore_errors=True)


def key_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_registration_tokens_are_one_time_and_expire(
    sysm: System, api: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as anon:
        # Making tokens is the admin's: no token, or an agent's key, is 401.
        resp = await anon.post("/api/v1/agent/registration-tokens", json={})
        assert resp.status_code == 401
        token = await new_token(api)
        resp = await anon.post("/api/v1/agent/register", json=register_body(token))
        assert resp.status_code == 201, resp.text
        first = resp.json()
        assert first["apiKey"].startswith("bak_") and first["agentId"]
        again = await anon.post("/api/v1/agent/register", json=register_body(token))
        assert again.status_code == 401, again.text
        assert "used or expired" in again.json()["error"]

        expiring = await new_token(api, seconds=1)
        await asyncio.sleep(1.5)
        resp = await anon.post("/api/v1/agent/register", json=register_body(expiring))
        assert resp.status_code == 401, resp.text

        # A body with an unknown field changes nothing (400 naming it).
        fresh = await new_token(api)
        resp = await anon.post(
            "/api/v1/agent/register", json={**register_body(fresh), "hostName": "x"}
        )
        assert resp.status_code == 400 and "hostName" in resp.json()["error"], resp.text
        resp = await anon.post("/api/v1/agent/register", json=register_body(fresh))
        assert resp.status_code == 201, resp.text

        key = key_headers(first["apiKey"])
        # The key opens the agent routes only.
        for method, path in [
            ("GET", "/config"),
            ("GET", "/api/v1/agents"),
            ("GET", "/jobs"),
            ("GET", "/api/v1/jobs"),
            ("GET", "/api/v1/jobs/no-such-job/tests"),
            ("DELETE", "/api/v1/jobs/no-such-job"),
            ("GET", "/api/v1/agent/lease"),
        ]:
            resp = await anon.request(method, path, headers=key)
            assert resp.status_code == 401, (path, resp.text)
        resp = await anon.post("/api/v1/agent/registration-tokens", json={}, headers=key)
        assert resp.status_code == 401
        resp = await anon.post("/api/v1/agent/lease", json={}, headers=key)
        assert resp.status_code == 200 and resp.json()["assigned"] is False, resp.text
        resp = await anon.post("/api/v1/heartbeat", json={"status": "online"}, headers=key)
        assert resp.status_code == 200 and resp.json()["state"] == "active", resp.text
        # A job not leased to this agent is none of its business.
        jobs = (await api.get("/jobs")).json()
        for job_id in [j["id"] for j in jobs[:1]] + ["no-such-job"]:
            resp = await anon.post(
                f"/api/v1/jobs/{job_id}/status", json={"status": "failed"}, headers=key
            )
            assert resp.status_code == 404, resp.text
        # An unknown key, and a revoked one, are 401.
        unknown = key_headers("bak_" + "x" * 43)
        resp = await anon.post("/api/v1/agent/lease", json={}, headers=unknown)
        assert resp.status_code == 401
        resp = await api.delete(f"/api/v1/agents/{first['agentId']}")
        assert resp.status_code == 200, resp.text
        for path in ("/api/v1/agent/lease", "/api/v1/heartbeat"):
            resp = await anon.post(path, json={}, headers=key)
            assert resp.status_code == 401, (path, resp.text)
        # The admin's token is no agent: the agent routes want a key.
        resp = await api.post("/api/v1/agent/lease", json={})
        assert resp.status_code == 403, resp.text


async def wait_agent_seen(api: httpx.AsyncClient, agent_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        resp = await api.get(f"/api/v1/agents/{agent_id}")
        assert resp.status_code == 200, resp.text
        view: dict[str, Any] = resp.json()
        if view["lastHeartbeat"] and any(d["name"] == VM for d in view["discoveredDomains"]):
            return view
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.3)


async def agent_backup(api: httpx.AsyncClient, agent: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post("/servers/remote/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", (job["message"], agent["log"].read_text()[-3000:])
    return job


async def test_agent_backs_up_through_lease_and_status(
    sysm: System,
    api: httpx.AsyncClient,
    agent: dict[str, Any],
    vm: SmallVm,
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert not any(k.startswith("VIRTBACKUP_NATS") for k in agent["env"])
    view = await wait_agent_seen(api, agent["agentId"])
    assert (view["kind"], view["state"], view["version"]) == ("remote", "active", "0.1.0")
    assert len(view["load"]["loadAverage"]) == 3
    listed = (await api.get("/api/v1/agents")).json()
    kinds = {a["kind"] for a in listed}
    assert kinds == {"worker", "remote"}, listed
    assert all("apiKey" not in a and "keySha256" not in a for a in listed)

    # The inventory does not reach an agent's host: it says whose host it is.
    resp = await api.get("/servers/remote/vms")
    assert resp.status_code == 409 and agent["agentId"] in resp.json()["error"], resp.text

    # A destination the admin did not allow for the agent: the job fails, nothing leased.
    resp = await api.post("/servers/remote/backup", json={"vmName": VM, "destinationId": "other"})
    assert resp.status_code == 200, resp.text
    refused = await wait_job(api, resp.json()["jobId"])
    assert refused["state"] == "failure" and "not allowed" in refused["message"], refused

    await guest_write(conn, VM, "vda", 4096, 3 * MiB, pattern=0x5A)
    await guest_write(conn, VM, "vda", 40 * MiB, MiB, pattern=0x6B)
    full = await agent_backup(api, agent)
    assert full["message"].startswith("full backup") and "by agent" in full["message"], full
    assert full["params"]["agentId"] == agent["agentId"]
    assert full["result"]["agent"]["outcome"] == "completed"
    assert full["result"]["parentTimestamp"] is None
    assert full["bytesTransferred"] > 0 and full["physicalBytes"] > 0
    # The agent's final counters, whatever the read's length: all its chunks.
    assert full["completedUnits"] == full["totalUnits"] > 0, full
    # The job has ended: a late report of its agent is a 409 naming the state.
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as anon:
        late = await anon.post(
            f"/api/v1/jobs/{full['id']}/status",
            json={"status": "reading", "output": [{"line": "late", "level": "info"}]},
            headers=key_headers(agent["apiKey"]),
        )
    assert late.status_code == 409 and "has ended (success)" in late.json()["error"], late.text
    names = {c.name for c in await list_checkpoints(conn, VM)}
    assert full["result"]["checkpoint"] in names
    # The agent made the repository, encrypted with the passphrase its lease carried.
    made = json.loads((repo_dir / "VirtBackup" / "repository.json").read_text())
    assert made["encryption"] and made["hash"] == "blake3-keyed", made

    # The next one reads only what changed since (libvirt's checkpoint of the first).
    await guest_write(conn, VM, "vda", 20 * MiB + 512, 2 * MiB, pattern=0x7C)
    snap = snapshot(vm, tmp_path_factory.mktemp("agent-snap"))[0]
    nc = await connect(sysm.nats)
    lines: list[tuple[str, dict[str, Any]]] = []

    async def on_line(msg: Msg) -> None:
        lines.append((msg.subject, json.loads(msg.data)))

    await nc.subscribe("vb.log.job.>", cb=on_line)
    try:
        inc = await agent_backup(api, agent)
    finally:
        await nc.drain()
    # Its output lines went to the job's log, in the shared shape.
    mine = [line for subject, line in lines if subject == f"vb.log.job.{inc['id']}"]
    # The agent's own lines, marked as its, between the orchestrator's (queued first,
    # the result last: the job log's shared lines).
    theirs = [line for line in mine if line["line"].startswith(f"[agent {agent['agentId']}] ")]
    assert theirs and all(line["level"] == "info" for line in theirs), mine
    assert any("incremental" in line["line"] for line in theirs), mine
    assert mine[0]["line"].startswith("queued: ") and mine[0] not in theirs, mine
    assert mine[-1]["line"].startswith("success: incremental backup"), mine
    assert inc["message"].startswith("incremental backup"), inc["message"]
    assert inc["result"]["parentTimestamp"] == full["result"]["timestamp"]
    assert inc["bytesTransferred"] < full["bytesTransferred"], (inc, full)
    assert inc["bytesTransferred"] > 0 and inc["completedUnits"] == inc["totalUnits"] > 0, inc
    timestamp = inc["result"]["timestamp"]

    # The point restores bit-identical (through the inventory and the transfer worker).
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code == 200, off.text
    resp = await api.post(
        "/servers/local/restore/start",
        json={
            "xmlPath": f"vms/{VM}/{timestamp}/domain.xml",
            "decision": "overwrite",
            "destinationId": "fs",
        },
    )
    assert resp.status_code == 200, resp.text
    restored = await wait_job(api, resp.json()["jobId"])
    assert restored["state"] == "success", restored
    assert same(vm.disks[0], snap)
    logs = [*sysm.data_dir.glob("*.log"), agent["log"]]
    assert len(logs) > 5
    for log in logs:
        assert PASSPHRASE not in log.read_text(errors="replace"), log

    # Shut off, the VM is backed up offline by its agent: started paused for the read,
    # shut off again after it (as on the bus path).
    resp = await api.post("/servers/remote/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    offline = await wait_job(api, resp.json()["jobId"])
    assert offline["state"] == "success", (offline["message"], agent["log"].read_text()[-3000:])
    assert "by agent (offline: the VM was shut off)" in offline["message"], offline["message"]
    assert offline["result"]["timestamp"] > timestamp
    assert (await get_domain(conn, VM)).id is None  # shut off again
    on = await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    assert on.status_code == 200, on.text


async def test_deactivating_mid_job_cancels_it(
    sysm: System, api: httpx.AsyncClient, agent: dict[str, Any], vm: SmallVm, conn: Connection
) -> None:
    before = {c.name for c in await list_checkpoints(conn, VM)}
    resp = await api.post("/servers/remote/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 60
    while True:  # leased, reading (the agent holds HOLD seconds before it commits)
        job = (await api.get(f"/jobs/{job_id}")).json()
        if job["phase"] == "transferring":
            break
        assert job["state"] in {"queued", "running"} and time.monotonic() < deadline, job
        await asyncio.sleep(0.1)
    # The agent reports artifacts and tests of its job over HTTPS with its own key, and
    # of no other job (backend-api.md: agent runtime routes).
    gc = await api.post("/api/v1/destinations/other/gc", json={"graceSeconds": 86400})
    assert gc.status_code in (200, 201, 202), gc.text
    foreign = gc.json()["id"]  # a job of no agent
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as as_agent:
        headers = key_headers(agent["apiKey"])
        note = {"name": "agent-note.txt", "content": "from the agent"}
        resp = await as_agent.post(f"/api/v1/jobs/{job_id}/artifacts", json=note, headers=headers)
        assert resp.status_code == 201, resp.text
        check = {"tests": [{"check": "boot", "status": "passed", "disk": "vda"}]}
        resp = await as_agent.post(f"/api/v1/jobs/{job_id}/tests", json=check, headers=headers)
        assert resp.status_code == 201, resp.text
        for path in ("artifacts", "tests"):
            body = note if path == "artifacts" else check
            resp = await as_agent.post(f"/api/v1/jobs/{foreign}/{path}", json=body, headers=headers)
            assert resp.status_code == 404, resp.text
        # backend-api.md shares reading a job and its artifacts with the agent: its own
        # job's, and no other's (404, as for a job that does not exist).
        resp = await as_agent.get(f"/api/v1/jobs/{job_id}", headers=headers)
        assert resp.status_code == 200 and resp.json()["id"] == job_id, resp.text
        resp = await as_agent.get(f"/api/v1/jobs/{job_id}/artifacts", headers=headers)
        assert resp.status_code == 200, resp.text
        assert "agent-note.txt" in [a["name"] for a in resp.json()["artifacts"]]
        resp = await as_agent.get(
            f"/api/v1/jobs/{job_id}/artifacts/agent-note.txt", headers=headers
        )
        assert resp.status_code == 200 and resp.text == "from the agent", resp.text
        for path in ("", "/artifacts", "/artifacts/output.log"):
            resp = await as_agent.get(f"/api/v1/jobs/{foreign}{path}", headers=headers)
            assert resp.status_code == 404, (path, resp.text)
        resp = await as_agent.get(f"/api/v1/jobs/{job_id}/tests", headers=headers)
        assert resp.status_code == 401, resp.text  # not among the agent's routes
    listed = (await api.get(f"/api/v1/jobs/{job_id}/artifacts")).json()["artifacts"]
    assert "agent-note.txt" in [a["name"] for a in listed]
    resp = await api.post(
        f"/api/v1/agents/{agent['agentId']}/actions", json={"action": "deactivate"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "deactivated"
    assert resp.json()["cancelledJobIds"] == [job_id]
    job = await wait_job(api, job_id)
    # The cancel request's terminal mutation (backend-api's view: status=failed,
    # error="cancelled by user").
    assert (job["state"], job["message"]) == ("canceled", "cancelled by user"), job
    # backend-api.md's view of the same job: exactly the documented mutation.
    view = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert (view["status"], view["error"]) == ("failed", "cancelled by user"), view
    log = await api.get(f"/api/v1/jobs/{job_id}/artifacts/output.log")
    assert log.status_code == 200, log.text
    assert "[control] job cancelled by user" in log.text, log.text

    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=30) as anon:
        resp = await anon.post("/api/v1/agent/lease", json={}, headers=key_headers(agent["apiKey"]))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"assigned": False, "message": "agent is deactivated"}
    # The agent saw the cancel: its libvirt job ended, its new checkpoint dropped.
    deadline = time.monotonic() + 30
    while (
        await backup_running(conn, VM)
        or {c.name for c in await list_checkpoints(conn, VM)} != before
    ):
        assert time.monotonic() < deadline, agent["log"].read_text()[-3000:]
        await asyncio.sleep(0.2)
    view = (await api.get(f"/api/v1/agents/{agent['agentId']}")).json()
    assert view["state"] == "deactivated"

    resp = await api.post(f"/api/v1/agents/{agent['agentId']}/actions", json={"action": "wake"})
    assert resp.status_code == 400, resp.text
    resp = await api.post(f"/api/v1/agents/{agent['agentId']}/actions", json={"action": "activate"})
    assert resp.status_code == 200 and resp.json()["state"] == "active", resp.text
    assert (await api.get("/api/v1/agents/nope")).status_code == 404


async def test_an_agent_killed_mid_job_cleans_up_when_it_starts_again(
    api: httpx.AsyncClient, agent: dict[str, Any], vm: SmallVm, conn: Connection
) -> None:
    before = {c.name for c in await list_checkpoints(conn, VM)}
    resp = await api.post("/servers/remote/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 60
    while (await api.get(f"/jobs/{job_id}")).json()["phase"] != "transferring":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    killed = agent["procs"][-1]
    killed.kill()  # SIGKILL: no cleanup of its own
    killed.wait(10)
    assert await backup_running(conn, VM)  # left behind

    again = start_process(agent["cmd"], agent["env"], agent["log"])  # reads its key file
    agent["procs"].append(again)
    job = await wait_job(api, job_id, timeout=60)
    assert job["state"] == "failure", job
    assert "the agent stopped during the backup" in job["message"], job
    assert not await backup_running(conn, VM)
    assert {c.name for c in await list_checkpoints(conn, VM)} == before
    # And it works on: the next backup succeeds (a full read since the restore above
    # redefined the domain, storing nothing new).
    job = await agent_backup(api, agent)
    assert "by agent" in job["message"], job["message"]


async def test_an_sftp_destination_whose_password_is_in_the_vault(
    sysm: System,
    api: httpx.AsyncClient,
    agent: dict[str, Any],
    vm: SmallVm,
    conn: Connection,
    sshd: SshdServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The agent's lease carries the vault's password opened (for that agent only): it
    backs up, the point restores bit-identical, and the password is in no log, neither
    in ``GET /config`` nor in ``agent.yaml``, nor anywhere in the data directory or the
    agent's home."""
    assert sshd.password
    password = sshd.password.encode()
    connection = {
        "id": "agent-sftp",
        "kind": "sftp",
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.username,
        "password": sshd.password,
        "hostKey": "",
    }
    resp = await api.post("/api/v1/vault/connections", json=connection)
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "ok" and resp.json()["password"] == "********"
    params = sshd.params(sshd.make_base("agent-vault"))
    del params["password"]
    cfg = (await api.get("/config")).json()
    cfg["destinations"].append(
        {"id": "sftpv", "driverId": "sftp", "params": params, "vaultConnectionId": "agent-sftp"}
    )
    remote = next(s for s in cfg["servers"] if s["id"] == "remote")
    remote["agentDestinationIds"] = ["fs", "sftpv"]
    resp = await api.post("/config", json=cfg)
    assert resp.status_code == 200, resp.text

    await guest_write(conn, VM, "vda", 8 * MiB, 2 * MiB, pattern=0x3C)
    snap = snapshot(vm, tmp_path_factory.mktemp("agent-vault-snap"))[0]
    resp = await api.post("/servers/remote/backup", json={"vmName": VM, "destinationId": "sftpv"})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", (job["message"], agent["log"].read_text()[-3000:])
    assert "by agent" in job["message"] and job["destinationId"] == "sftpv", job
    timestamp = job["result"]["timestamp"]

    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code == 200, off.text
    resp = await api.post(
        "/servers/local/restore/start",
        json={
            "xmlPath": f"vms/{VM}/{timestamp}/domain.xml",
            "decision": "overwrite",
            "destinationId": "sftpv",
        },
    )
    assert resp.status_code == 200, resp.text
    restored = await wait_job(api, resp.json()["jobId"])
    assert restored["state"] == "success", restored
    assert same(vm.disks[0], snap)
    on = await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    assert on.status_code == 200, on.text

    assert password not in (await api.get("/config")).content
    assert (await api.get("/config")).json()["destinations"][-1]["vaultConnectionId"] == (
        "agent-sftp"
    )
    agent_yaml = sysm.data_dir / "agent.yaml"
    assert agent_yaml.exists() and "agent-sftp" in agent_yaml.read_text()
    logs = [*sysm.data_dir.glob("*.log"), agent["log"]]
    assert len(logs) > 5
    home = agent["log"].parent
    seen = [
        path
        for root in (sysm.data_dir, home)
        for path in root.rglob("*")
        if path.is_file() and password in path.read_bytes()
    ]
    assert seen == []


PLANS = f"""\
id: agents{os.getpid()}
pipelines:
  - id: remote
    vms:
      - server: remote
        vm: {VM}
    destination: fs
  - id: local
    vms:
      - server: local
        vm: {VM}
    destination: fs
"""


async def test_plans_pin_only_the_agent_of_their_servers(
    api: httpx.AsyncClient, agent: dict[str, Any], vm: SmallVm
) -> None:
    """``eligible-agents`` names the workers ``worker:<name>`` and the remote agents the
    servers name, each eligible only for a plan of servers it backs up; pinning another
    is a 400 naming ``agent_id`` that creates nothing, and a plan of the agent's server
    pinned to it is backed up by it."""
    project = f"agents{os.getpid()}"
    glob = PLANS.replace(f"vm: {VM}", 'vm: "vbt-*"', 1)
    resp = await api.post("/api/v1/projects/import", json={"yaml": glob})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("line 6:") and "remote agent" in resp.text
    # A remote agent writes one destination per backup: a chain of two is refused.
    chain = PLANS + "chains:\n  - id: two\n    steps:\n      - type: backup\n"
    chain += "        pipeline: remote\n        destinations: [fs, other]\n"
    resp = await api.post("/api/v1/projects/import", json={"yaml": chain})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("line 18:") and "one destination" in resp.text
    assert (await api.get(f"/api/v1/projects/{project}")).status_code == 404
    resp = await api.post("/api/v1/projects/import", json={"yaml": PLANS})
    assert resp.status_code == 201, resp.text

    async def eligible(plan: str) -> dict[str, dict[str, Any]]:
        resp = await api.post(f"/api/v1/pipelines/{project}.{plan}/eligible-agents")
        assert resp.status_code == 200, resp.text
        return {a["id"]: a for a in resp.json()["agents"]}

    on_remote, on_local = await eligible("remote"), await eligible("local")
    assert set(on_remote) == set(on_local)
    workers = [a for a in on_local if a.startswith("worker:")]
    assert workers and all(on_local[w]["kind"] == "transfer-worker" for w in workers)
    assert on_remote[agent["agentId"]]["kind"] == "remote"
    assert on_remote[agent["agentId"]]["eligible"] is True
    assert on_local[agent["agentId"]]["eligible"] is False
    assert "local" in on_local[agent["agentId"]]["reason"]
    assert all(on_local[w]["eligible"] for w in workers)
    assert not any(on_remote[w]["eligible"] for w in workers)

    # The preview of the agent's server asks nothing of the inventory: from the VM's
    # points in the destination, sizes unknown, saying whose host it is.
    pre = await api.post(f"/api/v1/pipelines/{project}.remote/dry-run-preview", json={})
    assert pre.status_code == 200, pre.text
    (vm_view,) = pre.json()["vms"]
    assert vm_view["estimated_bytes"] is None and not vm_view["cached"], vm_view
    query = {"destinationId": "fs", "vmName": VM, "serverId": "remote"}
    mine = sorted(
        p["timestamp"] for p in (await api.get("/api/v1/restore-points", params=query)).json()
    )
    assert vm_view["parent_timestamp"] == (mine[-1] if mine else None), (vm_view, mine)
    assert agent["agentId"] in vm_view["problems"][0], vm_view

    before = len((await api.get("/jobs")).json())
    for plan, agent_id in (("local", agent["agentId"]), ("remote", workers[0])):
        refused = await api.post(
            f"/api/v1/pipelines/{project}.{plan}/run-selection", json={"agent_id": agent_id}
        )
        assert refused.status_code == 400, refused.text
        assert "$.agent_id" in refused.json()["error"], refused.text
    assert len((await api.get("/jobs")).json()) == before  # nothing created

    # Deactivated, the agent leases nothing: listed as not eligible, and pinning it is
    # refused (the orchestrator cannot see VB_AGENTS; the gateway says so).
    actions = f"/api/v1/agents/{agent['agentId']}/actions"
    assert (await api.post(actions, json={"action": "deactivate"})).status_code == 200
    try:
        off = (await eligible("remote"))[agent["agentId"]]
        assert off["eligible"] is False and "deactivated" in off["reason"], off
        refused = await api.post(
            f"/api/v1/pipelines/{project}.remote/run-selection", json={"agent_id": agent["agentId"]}
        )
        assert refused.status_code == 400, refused.text
        assert "deactivated" in refused.text and "$.agent_id" in refused.text
        assert len((await api.get("/jobs")).json()) == before
    finally:
        assert (await api.post(actions, json={"action": "activate"})).status_code == 200
    assert (await eligible("remote"))[agent["agentId"]]["eligible"] is True

    resp = await api.post(
        f"/api/v1/pipelines/{project}.remote/run-selection", json={"agent_id": agent["agentId"]}
    )
    assert resp.status_code == 200, resp.text
    (job_id,) = resp.json()["job_ids"]
    job = await wait_job(api, job_id)
    assert job["state"] == "success", (job["message"], agent["log"].read_text()[-3000:])
    assert job["params"]["agentId"] == job["params"]["pinnedAgentId"] == agent["agentId"]
    assert "by agent" in job["message"], job["message"]
    assert (await api.delete(f"/api/v1/projects/{project}")).status_code == 200


async def test_the_in_flight_record_is_written_before_the_backup_begins(
    vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An agent killed between libvirt's backup begin and its next write must find the
    backup job and its checkpoint named at restart: the record comes first."""
    from virtbackup.cli.agent import backup as agent_backup_mod
    from virtbackup.cli.agent.inflight import InFlight, recover
    from virtbackup.contracts.v1.config import Destination

    home = tmp_path_factory.mktemp("inflight")
    home.chmod(0o700)
    (home / "r").mkdir(mode=0o700)
    scratch = vm_directory(prefix="vbtest-inflight-scratch-")  # QEMU must traverse it
    inflight = InFlight(home / "inflight.json")
    dest = Destination(id="inflight", driver_id="filesystem", params={"path": str(home / "r")})
    seen: list[dict[str, Any] | None] = []
    before = {c.name for c in await list_checkpoints(conn, VM)}

    async def report(body: dict[str, Any]) -> dict[str, Any]:
        if body["status"] == "snapshotting":
            # The last word before the begin: the record must name it already.
            seen.append(await inflight.read())
            return {"cancel": True, "state": "canceled"}
        return {"cancel": False}

    job = {"id": f"inflight-{os.getpid()}", "vmName": VM, "serverId": "remote", "fresh": True}
    with pytest.raises(agent_backup_mod.Cancelled):
        await agent_backup_mod.run_backup(
            job, dest, report, scratch_dir=str(scratch), inflight=inflight
        )
    assert seen and seen[0] is not None, seen
    assert seen[0]["jobId"] == job["id"] and seen[0]["vm"] == VM
    assert str(seen[0]["checkpoint"]).startswith("vb-")
    assert await inflight.read() is None  # stopped cleanly: nothing left to recover

    # The restart path: a record written before a begin that then happened (the agent
    # died right after it) ends the job and drops the checkpoint it names.
    checkpoint = agent_backup_mod.new_checkpoint_name()
    await inflight.record(jobId=job["id"], vm=VM, checkpoint=checkpoint, uri="qemu:///system")
    try:
        await agent_backup_mod._begin(conn, VM, None, str(scratch), checkpoint)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    assert await backup_running(conn, VM)
    assert checkpoint in {c.name for c in await list_checkpoints(conn, VM)}
    reports: list[tuple[str, dict[str, Any]]] = []

    async def restarted(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        reports.append((job_id, body))
        return {"cancel": True}

    assert await recover(inflight, restarted) == job["id"]
    assert not await backup_running(conn, VM)
    assert {c.name for c in await list_checkpoints(conn, VM)} == before
    assert reports and reports[0][1]["status"] == "failed"
    assert await inflight.read() is None
    shutil.rmtree(scratch, ignore_errors=True)
