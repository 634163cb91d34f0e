"""Backups, restores and sanity checks end to end: gateway, orchestrator, inventory and
two transfer-worker processes, a real libvirtd/QEMU VM with two disks, NBD, and a
filesystem destination. The tests in this module build on each other, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, same, snapshot, wait_job

from virtbackup.repository.format import chunk_key
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.nats import connect
from virtbackup.testing.vms import SmallVm, guest_write, made_vm
from virtbackup.virt import Connection, VirtError
from virtbackup.virt.backup import UnixServer, parse_backup_xml

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-data-{os.getpid()}"


@pytest.fixture(scope="module")
def dp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A system of its own: two workers, short ack wait, debug mode (for ``fresh``)."""
    with running_system(
        tmp_path_factory.mktemp("dp"),
        workers=2,
        VIRTBACKUP_WORK_ACK_WAIT="4",
        VIRTBACKUP_WORKER_UNITS="1",
        VIRTBACKUP_DEBUG="true",
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [512 * MiB, 64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(dp: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=dp.url, headers=dp.auth(), verify=False, timeout=60
    ) as client:
        cfg = local_config(repo_dir)
        assert (await client.post("/config", json=cfg)).status_code == 200
        yield client


async def backup(api: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    resp = await api.post("/servers/local/backup", json={"vmName": VM, **extra})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    return job


async def entries(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda e: e["timestamp"])


async def restore(api: httpx.AsyncClient, xml_path: str) -> dict[str, Any]:
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code in {200, 409}
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    return job


async def start_vm(api: httpx.AsyncClient) -> None:
    resp = await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    assert resp.status_code in {200, 409}, resp.text


@contextlib.asynccontextmanager
async def exports_seen(conn: Connection) -> AsyncIterator[set[str]]:
    """The NBD servers (``unix:<socket>``, ``tcp:<host>:<port>:tls``) of the VM's backup
    jobs while the block runs: libvirt's job XML, read every 10 ms."""
    seen: set[str] = set()
    dom = await conn.lookup(VM)

    async def watch() -> None:
        while True:
            with contextlib.suppress(VirtError):
                server, _, _ = parse_backup_xml(str(await conn.call(dom.backupGetXMLDesc, 0)))
                seen.add(
                    f"unix:{server.socket}"
                    if isinstance(server, UnixServer)
                    else f"tcp:{server.host}:{server.port}:{'tls' if server.tls else ''}"
                )
            await asyncio.sleep(0.01)

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


STATE: dict[str, Any] = {}


async def test_full_then_incremental_then_restore_each_point(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0xAB)
    await guest_write(conn, VM, "vda", 100 * MiB, 40 * MiB, pattern=0x5A)
    await guest_write(conn, VM, "vdb", 8 * MiB, 2 * MiB, pattern=0xCD)
    async with exports_seen(conn) as seen:
        full = await backup(api)
    # A local server: the disks are read over a Unix socket, without TLS (issue 13).
    assert len(seen) == 1 and next(iter(seen)).startswith("unix:"), seen
    assert full["totalUnits"] >= 2
    assert full["completedUnits"] == full["totalUnits"]
    assert full["bytesTransferred"] >= 46 * MiB
    assert full["message"].startswith("full backup")
    snap1 = snapshot(vm, tmp_path_factory.mktemp("snap1"))

    await guest_write(conn, VM, "vda", 300 * MiB, 1 * MiB, pattern=0x11)
    await guest_write(conn, VM, "vdb", 0, 64 * 1024, pattern=0x22)
    async with exports_seen(conn) as seen:
        inc = await backup(api)
    assert len(seen) == 1 and next(iter(seen)).startswith("unix:"), seen
    assert inc["message"].startswith("incremental backup"), inc["message"]
    # Only the two dirty chunks (one per disk) were read, and of them only what was
    # written: the rest of each comes from the parent point's chunk.
    assert inc["bytesTransferred"] == 1 * MiB + 64 * 1024
    snap2 = snapshot(vm, tmp_path_factory.mktemp("snap2"))

    points = await entries(api)
    assert [p["vmName"] for p in points] == [VM, VM]
    assert points[0]["diskBasenames"] == [d.name for d in vm.disks]
    assert points[0]["missingDiskBasenames"] == []
    assert points[0]["sourceServerId"] == "local"
    assert points[0]["sourceServerName"] == "This host"
    STATE["points"] = points

    precheck = await api.post(
        "/servers/local/restore/precheck", json={"xmlPath": points[0]["xmlPath"]}
    )
    assert precheck.json() == {"vmExists": True, "canDefineOnly": True}

    for point, snap in ((points[0], snap1), (points[1], snap2)):
        await restore(api, point["xmlPath"])
        for disk, raw in zip(vm.disks, snap, strict=True):
            assert same(disk, raw), f"{disk} differs from {point['timestamp']}"
    await start_vm(api)


async def test_units_are_shared_by_the_workers_and_survive_a_killed_worker(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    dp: System,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await start_vm(api)
    # Enough distinct data for many units: 24 regions of 16 MiB, each its own pattern.
    for i in range(24):
        await guest_write(
            conn, VM, "vda", 16 * MiB * i + 8 * MiB, 16 * MiB, pattern=0x30 + i, flush=i == 23
        )
    nc = await connect(dp.nats)
    try:
        resp = await api.post("/servers/local/backup", json={"vmName": VM, "fresh": True})
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["jobId"]
        # Kill a worker as soon as the first unit is done: it is then in the middle of one.
        deadline = time.monotonic() + 60
        while (await api.get(f"/jobs/{job_id}")).json()["completedUnits"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        victim = dp.procs.pop("transfer-worker-2")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        job = await wait_job(api, job_id)
        assert job["state"] == "success", job
        assert job["message"].startswith("full backup")
        assert job["completedUnits"] == job["totalUnits"] >= 6

        js = nc.jetstream()
        sub = await js.subscribe(f"vb.evt.unit.done.{job_id}", ordered_consumer=True)
        workers = set()
        units = set()
        for _ in range(job["totalUnits"]):
            msg = await sub.next_msg(timeout=5)
            payload = json.loads(msg.data)["payload"]
            workers.add(payload["worker"])
            units.add(payload["unit"])
        await sub.unsubscribe()
        assert len(workers) == 2, workers
        assert len(units) == job["totalUnits"]
    finally:
        await nc.drain()
        dp.start("transfer-worker-2")
        dp.wait_ready()

    snap = snapshot(vm, tmp_path_factory.mktemp("snap3"))
    latest = (await entries(api))[-1]
    await restore(api, latest["xmlPath"])
    for disk, raw in zip(vm.disks, snap, strict=True):
        assert same(disk, raw)
    await start_vm(api)


async def test_a_deleted_checkpoint_means_a_correct_full_read(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await start_vm(api)
    await backup(api)  # a fresh chain
    listed = subprocess.run(
        ["virsh", "-q", "checkpoint-list", VM, "--name"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed
    for name in listed:
        subprocess.run(
            ["virsh", "-q", "checkpoint-delete", VM, name], check=True, capture_output=True
        )
    await guest_write(conn, VM, "vdb", 40 * MiB, 1 * MiB, pattern=0x77)
    job = await backup(api)
    assert job["message"].startswith("full backup"), job["message"]
    # A full read that still uploads only the one new chunk.
    assert ", 1 stored," in job["message"], job["message"]
    snap = snapshot(vm, tmp_path_factory.mktemp("snap4"))
    latest = (await entries(api))[-1]
    await restore(api, latest["xmlPath"])
    for disk, raw in zip(vm.disks, snap, strict=True):
        assert same(disk, raw)
    await start_vm(api)


async def test_cancel_leaves_no_restore_point_and_the_next_backup_works(
    api: httpx.AsyncClient, vm: SmallVm, dp: System
) -> None:
    await start_vm(api)
    before = await entries(api)
    workers = [n for n in list(dp.procs) if n.startswith("transfer-worker")]
    for name in workers:  # no worker takes the units: the job waits
        dp.stop(name)
    try:
        resp = await api.post("/servers/local/backup", json={"vmName": VM})
        job_id = resp.json()["jobId"]
        deadline = time.monotonic() + 30
        while (await api.get(f"/jobs/{job_id}")).json()["totalUnits"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        second = await api.post("/servers/local/backup", json={"vmName": VM})
        assert second.status_code == 409
        assert f"has a backup job running ({job_id})" in second.json()["error"]
        assert (await api.post(f"/jobs/{job_id}/cancel")).json() == {"success": True}
        job = await wait_job(api, job_id)
        assert job["state"] == "canceled"
    finally:
        for name in workers:
            dp.start(name)
        dp.wait_ready()
    assert await entries(api) == before
    # The libvirt job was ended: nothing is left behind, and the next backup works.
    deadline = time.monotonic() + 10
    while True:
        vms = {v["vm"]["name"]: v for v in (await api.get("/servers/local/vms")).json()}
        if not vms[VM]["hasOverlay"]:
            break
        assert time.monotonic() < deadline, vms[VM]
        await asyncio.sleep(0.3)
    await backup(api)
    assert len(await entries(api)) == len(before) + 1


async def test_sanity_finds_a_flipped_chunk(api: httpx.AsyncClient, repo_dir: Path) -> None:
    point = (await entries(api))[-1]
    ok = await api.post(
        "/restore/sanity", json={"xmlPath": point["xmlPath"], "timestamp": point["timestamp"]}
    )
    assert ok.status_code == 200
    job = await wait_job(api, ok.json()["jobId"])
    assert job["state"] == "success", job
    assert job["message"].startswith("all ")

    # Flip one byte of a chunk this restore point uses.
    repo = await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))
    record = await repo.restore_point(point["xmlPath"])
    manifest = await repo.manifest(record, "vda")
    used = next(c for c in manifest.chunks if c is not None)
    chunk = repo_dir / "VirtBackup" / chunk_key(used)
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    chunk.write_bytes(bytes(blob))
    bad = await api.post("/restore/sanity", json={"xmlPath": point["xmlPath"]})
    job = await wait_job(api, bad.json()["jobId"])
    assert job["state"] == "failure"
    assert f"corrupt chunk {chunk.name}" in job["message"], job["message"]
    assert job["result"]["damaged"][0]["id"] == chunk.name


async def test_a_restore_with_a_corrupt_chunk_fails_naming_it_and_changes_nothing(
    api: httpx.AsyncClient,
    vm: SmallVm,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The chunk flipped by the test before fails its check on restore (BLAKE3 of the
    plaintext against its id, see docs/repository-format.md): the job fails naming
    it, and the disks and the folder beside them are as they were."""
    point = (await entries(api))[-1]
    repo = await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))
    record = await repo.restore_point(point["xmlPath"])
    flipped = next(c for c in (await repo.manifest(record, "vda")).chunks if c is not None)
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code in {200, 409}
    before = snapshot(vm, tmp_path_factory.mktemp("untouched"))
    beside = sorted(os.listdir(vm.disks[0].parent))
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "failure", job
    assert f"chunk {flipped}" in job["message"], job["message"]
    for disk, raw in zip(vm.disks, before, strict=True):
        assert same(disk, raw)
    assert sorted(os.listdir(vm.disks[0].parent)) == beside
    await start_vm(api)


async def test_bad_input(api: httpx.AsyncClient) -> None:
    point = (await entries(api))[-1]
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("post", "/servers/local/backup", {"vmName": "no-such-vm"}, 404, "no-such-vm"),
        ("post", "/servers/nope/backup", {"vmName": VM}, 404, "server 'nope' not found"),
        (
            "post",
            "/servers/local/backup",
            {"vmName": VM, "destinationId": "nope"},
            404,
            "destination 'nope' not found",
        ),
        ("post", "/servers/local/backup", {}, 400, "vmName"),
        (
            "post",
            "/servers/local/restore/start",
            {"xmlPath": "../../etc/passwd", "decision": "overwrite"},
            400,
            "not the key of a restore point",
        ),
        (
            "post",
            "/servers/local/restore/start",
            {"xmlPath": "/etc/domain.xml", "decision": "overwrite"},
            400,
            "not the key of a restore point",
        ),
        (
            "post",
            "/servers/local/restore/start",
            {"xmlPath": point["xmlPath"], "decision": "explode"},
            400,
            "decision",
        ),
        (
            "post",
            "/servers/local/restore/start",
            {"xmlPath": f"vms/{VM}/2001-01-01T00-00-00/domain.xml", "decision": "define"},
            404,
            "no restore point",
        ),
        (
            "post",
            "/servers/local/restore/start",
            {"xmlPath": point["xmlPath"], "decision": "overwrite"},
            409,
            "running",
        ),
        ("post", "/restore/sanity", {"xmlPath": "vms/../x/domain.xml"}, 400, "invalid"),
        (
            "post",
            "/restore/sanity",
            {"xmlPath": point["xmlPath"], "timestamp": "2001-01-01T00-00-00"},
            400,
            "timestamp",
        ),
        ("get", "/restore/entries?destinationId=nope", {}, 404, "destination 'nope'"),
    ]
    for method, path, body, status, message in cases:
        if method == "post":
            resp = await api.post(path, json=body)
        else:
            resp = await api.get(path)
        assert resp.status_code == status, (path, body, resp.text)
        assert message in resp.json()["error"], (path, body, resp.json())


async def test_a_plan_run_pinned_to_a_worker_is_read_by_that_worker_only(
    api: httpx.AsyncClient, dp: System, vm: SmallVm, conn: Connection
) -> None:
    """backend-api.md's ``agent_id`` pins a run to one eligible agent: pinned to
    ``worker:<name>``, every unit of the backup is read by that worker (its own
    consumer of ``vb.work.pinned.<name>.>``), for each of the two workers in turn, while
    an unpinned backup spreads over both (test above). A worker that is not running
    cannot be pinned (400 naming ``$.agent_id``)."""
    project = f"pin{os.getpid()}"
    plan_yaml = (
        f"id: {project}\npipelines:\n  - id: one\n    vms:\n      - server: local\n"
        f"        vm: {VM}\n    destination: fs\n"
    )
    resp = await api.post("/api/v1/projects/import", json={"yaml": plan_yaml})
    assert resp.status_code == 201, resp.text
    agents = (await api.post(f"/api/v1/pipelines/{project}.one/eligible-agents")).json()
    # The worker killed above keeps its record until VB_WORKERS' TTL (30 s) ends it:
    # the live ones are those that beat within a heartbeat period (10 s) of the newest.
    beats = {
        a["id"]: datetime.fromisoformat(a["last_seen"])
        for a in agents["agents"]
        if a["kind"] == "transfer-worker"
    }
    newest = max(beats.values())
    workers = sorted(w for w, seen in beats.items() if (newest - seen).total_seconds() < 12)
    assert len(workers) == 2, agents
    refused = await api.post(
        f"/api/v1/pipelines/{project}.one/run-selection", json={"agent_id": "worker:gone-1"}
    )
    assert refused.status_code == 400 and "$.agent_id" in refused.text, refused.text
    nc = await connect(dp.nats)
    try:
        js = nc.jetstream()
        for pinned in workers:
            resp = await api.post(
                f"/api/v1/pipelines/{project}.one/run-selection",
                json={"agent_id": pinned, "source_ref": "full"},
            )
            assert resp.status_code == 200, resp.text
            (job_id,) = resp.json()["job_ids"]
            job = await wait_job(api, job_id)
            assert job["state"] == "success", job
            assert job["params"]["pinnedAgentId"] == pinned
            assert job["totalUnits"] >= 2, job
            sub = await js.subscribe(f"vb.evt.unit.done.{job_id}", ordered_consumer=True)
            readers = set()
            for _ in range(job["totalUnits"]):
                msg = await sub.next_msg(timeout=5)
                name = json.loads(msg.data)["payload"]["worker"]
                readers.add("".join(c if c.isalnum() or c in "-_" else "_" for c in name))
            await sub.unsubscribe()
            assert readers == {pinned.removeprefix("worker:")}, (pinned, readers)
    finally:
        await nc.drain()
        assert (await api.delete(f"/api/v1/projects/{project}")).status_code == 200
