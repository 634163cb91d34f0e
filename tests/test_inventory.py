"""Servers and VMs through the gateway, against a real libvirtd with QEMU.

The VMs have no operating system: they run, stop and take backups, but ignore ACPI.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System

from virtbackup.runtime.ports import free_port
from virtbackup.runtime.settings import Settings
from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.testing.vms import SmallVm, create_vm, remove_vm, vm_directory
from virtbackup.virt import Connection, TcpServer, begin_backup

pytestmark = pytest.mark.libvirt

LOCAL = {"id": "local", "name": "This host", "host": ""}


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    directory = vm_directory()
    small = await create_vm(conn, f"vbt-inv-{os.getpid()}-1", directory, [64 << 20])
    try:
        yield small
    finally:
        await remove_vm(conn, small.name, delete_directory=directory)


async def _configure(api: httpx.AsyncClient, servers: list[dict[str, Any]]) -> None:
    cfg = (await api.get("/config")).json()
    cfg["servers"] = servers
    cfg["destinations"], cfg["backupDestinationId"], cfg["restoreDestinationId"] = [], None, None
    resp = await api.post("/config", json=cfg)
    assert resp.status_code == 200, resp.text


async def _vms(api: httpx.AsyncClient, server: str = "local") -> dict[str, dict[str, Any]]:
    resp = await api.get(f"/servers/{server}/vms")
    assert resp.status_code == 200, resp.text
    return {item["vm"]["name"]: item for item in resp.json()}


async def _wait_state(api: httpx.AsyncClient, name: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        item = (await _vms(api)).get(name)
        if item and item["vm"]["powerState"] == state:
            return item
        assert time.monotonic() < deadline, f"{name} never became {state}: {item}"
        await asyncio.sleep(0.2)


async def test_list_refresh_and_every_action(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    await _configure(api, [LOCAL])
    listed = await _wait_state(api, vm.name, "running")
    assert listed == {
        "vm": {"id": listed["vm"]["id"], "name": vm.name, "powerState": "running"},
        "hasOverlay": False,
    }
    assert len(listed["vm"]["id"]) == 36  # the domain's UUID

    # A domain defined behind the inventory's back appears after a refresh.
    directory = vm_directory()
    other = await create_vm(conn, f"vbt-inv-{os.getpid()}-2", directory, [16 << 20], start=False)
    try:
        assert (await api.post("/servers/local/refresh")).json() == {"success": True}
        assert (await _vms(api))[other.name]["vm"]["powerState"] == "shutoff"
    finally:
        await remove_vm(conn, other.name, delete_directory=directory)

    async def act(action: str) -> httpx.Response:
        return await api.post("/servers/local/actions", json={"action": action, "vmName": vm.name})

    assert (await act("forceOff")).json() == {"success": True}
    await _wait_state(api, vm.name, "shutoff")
    assert (await act("start")).status_code == 200
    await _wait_state(api, vm.name, "running")
    again = await act("start")
    assert again.status_code == 409
    assert "already running" in again.json()["error"]
    assert (await act("reboot")).status_code == 200
    await _wait_state(api, vm.name, "running")
    assert (await act("forceReset")).status_code == 200
    await _wait_state(api, vm.name, "running")
    # No OS answers ACPI: shutdown is accepted and the VM keeps running.
    assert (await act("shutdown")).status_code == 200
    await asyncio.sleep(1)
    assert (await _vms(api))[vm.name]["vm"]["powerState"] == "running"


async def test_bad_requests(api: httpx.AsyncClient, vm: SmallVm) -> None:
    await _configure(api, [LOCAL])
    unknown_vm = await api.post(
        "/servers/local/actions", json={"action": "start", "vmName": "no-such-vm"}
    )
    assert unknown_vm.status_code == 404
    assert "no-such-vm" in unknown_vm.json()["error"]
    unknown_server = await api.get("/servers/nope/vms")
    assert unknown_server.status_code == 404
    assert unknown_server.json() == {"error": "server 'nope' not found"}
    bad_action = await api.post(
        "/servers/local/actions", json={"action": "explode", "vmName": vm.name}
    )
    assert bad_action.status_code == 400
    assert "explode" in bad_action.json()["error"]
    missing = await api.post("/servers/local/actions", json={"action": "start"})
    assert missing.status_code == 400
    assert "vmName" in missing.json()["error"]
    assert (await api.post("/servers/local/cleanup", json={"vmName": "nope"})).status_code == 404


async def _sse_lines(api: httpx.AsyncClient, out: asyncio.Queue[dict[str, Any]]) -> None:
    async with api.stream("GET", "/events", timeout=None) as resp:
        event: dict[str, Any] = {}
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event["event"] = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                event["data"] = line.split(":", 1)[1].strip()
            elif line == "" and event:
                event["at"] = time.monotonic()
                out.put_nowait(event)
                event = {}


async def test_lifecycle_event_on_sse_promptly(api: httpx.AsyncClient, vm: SmallVm) -> None:
    """A VM started outside VirtBackup shows as ``vm.lifecycle`` on ``/events`` from
    libvirt's own event, not a refresh: well under a second on a quiet machine; the bound
    here is 5 s (a refresh is every 300 s), so that a test machine busy with the other test
    worker does not fail it."""
    await _configure(api, [LOCAL])
    await _vms(api)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    reader = asyncio.create_task(_sse_lines(api, queue))
    try:
        assert (await asyncio.wait_for(queue.get(), 10))["event"] == "ready"
        subprocess.run(["virsh", "-q", "destroy", vm.name], check=True, capture_output=True)
        started = time.monotonic()
        subprocess.run(["virsh", "-q", "start", vm.name], check=True, capture_output=True)
        while True:
            event = await asyncio.wait_for(queue.get(), 10)
            if event["event"] != "vm.lifecycle":
                continue
            data = json.loads(event["data"])
            if data["payload"]["vmName"] == vm.name and data["payload"]["event"] == "started":
                break
        assert event["at"] - started < 5.0
        assert data["type"] == "vm.lifecycle"
        assert data["payload"]["serverId"] == "local"
        assert data["payload"]["powerState"] == "running"
    finally:
        reader.cancel()
    # The cache followed the events without a refresh.
    assert (await _vms(api))[vm.name]["vm"]["powerState"] == "running"


async def test_cleanup_after_a_backup_job_left_running(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    await _configure(api, [LOCAL])
    await _wait_state(api, vm.name, "running")
    # A backup job begun by a process that then died (not by this inventory).
    scratch = Path(Settings().scratch_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    job = await begin_backup(
        conn,
        vm.name,
        server=TcpServer(host="127.0.0.1", port=free_port()),
        scratch_dir=str(scratch),
        checkpoint=None,
    )
    assert job.exports[0].target == "vda"
    # The job is left running: the VM has leftovers.
    assert (await api.post("/servers/local/refresh")).status_code == 200
    assert (await _vms(api))[vm.name]["hasOverlay"] is True
    cleaned = await api.post("/servers/local/cleanup", json={"vmName": vm.name})
    assert cleaned.status_code == 200
    assert cleaned.json()["success"] is True
    actions = cleaned.json()["actions"]
    assert "aborted the running backup job" in actions
    assert any(a.startswith(f"removed {scratch}/") for a in actions), actions
    assert (await _vms(api))[vm.name]["hasOverlay"] is False


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshdServer]:
    server = SshdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_ssh_test_with_good_and_bad_password(
    api: httpx.AsyncClient, sshd: SshdServer
) -> None:
    good = {
        "id": "ssh-good",
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.username,
        "password": sshd.password,
    }
    bad = {**good, "id": "ssh-bad", "password": "wrong-password"}
    await _configure(api, [LOCAL, good, bad])
    ok = await api.post("/servers/ssh-good/test", json={})
    assert ok.status_code == 200
    assert ok.json()["success"] is True
    # The SFTP-only test user may log in but has no shell.
    assert ok.json()["message"].startswith("SSH login OK")
    started = time.monotonic()
    refused = await api.post("/servers/ssh-bad/test", json={})
    assert refused.status_code == 200
    assert refused.json()["success"] is False
    assert "authentication failed" in refused.json()["message"]
    assert time.monotonic() - started < 15


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung host)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


async def test_an_unreachable_server_does_not_slow_the_others(
    api: httpx.AsyncClient, vm: SmallVm, silent_port: int
) -> None:
    hung = {
        "id": "hung",
        "host": "127.0.0.1",
        "port": silent_port,
        "username": "root",
        "password": "x",
    }
    await _configure(api, [LOCAL, hung])
    await _vms(api)

    async def timed(path: str) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        resp = await api.get(path)
        return resp, time.monotonic() - started

    (dead, dead_s), (alive, alive_s) = await asyncio.gather(
        timed("/servers/hung/vms"), timed("/servers/local/vms")
    )
    assert alive.status_code == 200
    assert alive_s < 2.0
    assert dead.status_code == 503
    assert "hung" in dead.json()["error"]
    assert dead_s < 15  # bounded by the server timeout, not a hang


async def test_a_remote_server_over_ssh(api: httpx.AsyncClient, vm: SmallVm) -> None:
    """An sshd on loopback reaching the same libvirt counts as a remote host."""
    with sshd_server(root=True) as remote:
        server = {
            "id": "remote",
            "name": "Remote",
            "host": remote.host,
            "port": remote.port,
            "username": remote.username,
            "privateKey": remote.private_key,
        }
        await _configure(api, [LOCAL, server])
        listed = await _vms(api, "remote")
        assert listed[vm.name]["vm"]["powerState"] in {"running", "shutoff"}
        assert (await api.post("/servers/remote/test", json={})).json()["success"] is True


async def test_hypersdk_vm_discovery(
    api: httpx.AsyncClient, vm: SmallVm, system: System, conn: Connection
) -> None:
    await _configure(api, [LOCAL])
    await _wait_state(api, vm.name, "running")
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as hs:
        assert (await hs.get("/health")).json() == {"status": "ok"}
        assert (await hs.get("/health", headers={"Authorization": "Bearer x"})).status_code == 401
        listed = (await hs.get("/vms/list", params={"server_id": "local"})).json()
        mine = [v for v in listed["vms"] if v["name"] == vm.name]
        assert listed["total"] == len(listed["vms"])
        assert mine[0]["path"] == f"local/{vm.name}"
        assert mine[0]["power_state"] == "poweredOn"
        assert mine[0]["memory_mb"] == 64
        assert mine[0]["storage"] == 64 << 20
        info = (await hs.get("/vms/info", params={"vm_path": f"local/{vm.name}"})).json()
        assert info["hardware"]["num_virtual_disks"] == 1
        assert info["disks"][0]["capacity_kb"] == 64 << 10
        vsphere = await hs.get("/vms/list", params={"vcenter_url": "vc.example.com"})
        assert vsphere.status_code == 400
        assert "vSphere" in vsphere.json()["error"]
        missing = await hs.get("/vms/info", params={"vm_path": "local/nope"})
        assert missing.status_code == 404
        # A VM without a CD-ROM: 200 (the document's only status) saying nothing was removed.
        cd = await hs.post("/vms/remove-cdrom", json={"vm_path": f"local/{vm.name}"})
        assert cd.status_code == 200, cd.text
        assert cd.json()["removed"] is False and cd.json()["ejected"] == []
        assert "no CD-ROM" in cd.json()["message"]
        directory = vm_directory()
        with_cd = await create_vm(
            conn, f"vbt-inv-{os.getpid()}-cd", directory, [16 << 20], start=False, with_cdrom=True
        )
        try:
            path = {"vm_path": f"local/{with_cd.name}"}
            cd = await hs.post("/vms/remove-cdrom", json=path)
            assert cd.json() == {
                "message": "CD-ROM devices removed",
                "removed": True,
                "ejected": ["sda"],
            }
            assert (await hs.post("/vms/remove-cdrom", json=path)).json()["removed"] is False
        finally:
            await remove_vm(conn, with_cd.name, delete_directory=directory)
        off = await hs.post("/vms/poweroff", json={"vm_path": f"local/{vm.name}"})
        assert off.json() == {"message": "VM powered off"}
        await _wait_state(api, vm.name, "shutoff")
        # Nothing to do for a VM that is not running: a 409 naming the VM, never a success.
        for route in ("/vms/poweroff", "/vms/shutdown"):
            again = await hs.post(route, json={"vm_path": f"local/{vm.name}"})
            assert again.status_code == 409, (route, again.text)
            assert vm.name in again.json()["error"] and "not running" in again.json()["error"]
        status = (await hs.get("/status")).json()
        assert status["worker_count"] >= 1
        assert set(status) == {
            "total_jobs",
            "running_jobs",
            "completed_jobs",
            "failed_jobs",
            "worker_count",
            "active_workers",
        }
    assert (
        await api.post("/servers/local/actions", json={"action": "start", "vmName": vm.name})
    ).status_code == 200
