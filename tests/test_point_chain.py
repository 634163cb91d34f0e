"""Deleting the newest restore point does not poison the chain, and a retention policy
prunes after each backup: a real VM (libvirtd/QEMU) through the API, a filesystem
destination.

full P1, writes, incremental P2; P2 deleted; writes, backup P3 (incremental from P1's
checkpoint, whose point exists), writes, backup P4; the prune after P4 (keepLast 2)
removes P1; P3 restores bit-identical to the disk as it was when P3 was made. While P3's
backup runs, its parent P1 cannot be deleted (409 naming the backup): every backup waits
``HOLD`` seconds before it commits (``VIRTBACKUP_DEBUG_HOLDS``) to leave the time to try.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, same, snapshot, wait_job

from virtbackup.testing.vms import SmallVm, guest_write, made_vm
from virtbackup.virt import Connection, list_checkpoints

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-chain-{os.getpid()}"
HOLD = 2.0


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    holds = json.dumps({"before:committing": HOLD})
    with running_system(
        tmp_path_factory.mktemp("chain"),
        workers=1,
        orchestrators=1,
        VIRTBACKUP_DEBUG="1",
        VIRTBACKUP_DEBUG_HOLDS=holds,
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(sysm: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as client:
        cfg = local_config(repo_dir)
        cfg["destinations"][0]["retention"] = {"keepLast": 2}
        assert (await client.post("/config", json=cfg)).status_code == 200
        yield client


async def start_backup(api: httpx.AsyncClient) -> str:
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id: str = resp.json()["jobId"]
    return job_id


async def backup(api: httpx.AsyncClient, job_id: str | None = None) -> dict[str, Any]:
    """Back up the VM (or wait for backup ``job_id``), and for the prune that follows it."""
    job = await wait_job(api, job_id or await start_backup(api))
    assert job["state"] == "success", job
    # The prune is submitted just after the backup's final state is written (runner.run
    # ends the job, then calls points.auto_prune): poll for it, bounded.
    prunes: list[dict[str, Any]] = []
    for _ in range(100):
        prunes = [
            j
            for j in (await api.get("/jobs")).json()
            if j["type"] == "prune" and j["vmName"] == VM and j["createdAt"] >= job["finishedAt"]
        ]
        if prunes:
            break
        await asyncio.sleep(0.1)
    assert len(prunes) == 1, (prunes, job["message"])
    prune = await wait_job(api, prunes[0]["id"])
    assert prune["state"] == "success", prune
    assert prune["params"]["automatic"] is True
    return job


async def points(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await api.get("/api/v1/restore-points", params={"vmName": VM, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda p: p["timestamp"])


async def test_deleting_the_newest_point_keeps_the_chain_whole(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for index in range(4):
        await guest_write(conn, VM, "vda", index * 16 * MiB + 4096, MiB, pattern=index + 1)
    full = await backup(api)
    assert full["message"].startswith("full backup"), full["message"]
    await guest_write(conn, VM, "vda", 5 * MiB + 512, 3 * MiB, pattern=0x51)
    second = await backup(api)
    assert second["message"].startswith("incremental backup"), second["message"]
    p1, p2 = await points(api)
    assert p2["parent"] == p1["id"]

    resp = await api.delete(f"/api/v1/restore-points/{p2['id']}")
    assert resp.status_code == 200, resp.text
    assert [p["id"] for p in await points(api)] == [p1["id"]]
    # P2's checkpoint (a bitmap QEMU updates on every write) went with it; P1's stays.
    names = {c.name for c in await list_checkpoints(conn, VM)}
    assert second["result"]["checkpoint"] not in names, names
    assert full["result"]["checkpoint"] in names, names

    # The writes since P1 (P2's included) must all be in P3: built on P1's checkpoint.
    await guest_write(conn, VM, "vda", 40 * MiB + 1000, 2 * MiB, pattern=0x52)
    snap = snapshot(vm, tmp_path_factory.mktemp("p3"))[0]
    job_id = await start_backup(api)
    for _ in range(200):
        job = (await api.get(f"/jobs/{job_id}")).json()
        if job["phase"] in {"transferring", "committing", "finished"}:
            break
        await asyncio.sleep(0.05)
    assert job["phase"] == "transferring", job
    # P1 is what this backup builds on: it cannot be deleted now.
    resp = await api.delete(f"/api/v1/restore-points/{p1['id']}")
    assert resp.status_code == 409, resp.text
    assert job_id in resp.json()["error"]
    third = await backup(api, job_id)
    assert third["message"].startswith("incremental backup"), third["message"]
    assert third["result"]["parentTimestamp"] == p1["timestamp"]
    listed = await points(api)
    assert [p["id"] for p in listed[:1]] == [p1["id"]]
    p3 = listed[1]
    assert (p3["kind"], p3["parent"]) == ("incremental", p1["id"])

    # keepLast 2: the prune after P4 removes P1, P3's parent.
    await guest_write(conn, VM, "vda", 60 * MiB, MiB, pattern=0x53)
    await backup(api)
    listed = await points(api)
    assert listed[0]["timestamp"] == p3["timestamp"]
    assert len(listed) == 2
    # The prune deleted P1 and its checkpoint: the VM keeps only its points' checkpoints.
    names = {c.name for c in await list_checkpoints(conn, VM)}
    assert full["result"]["checkpoint"] not in names, names
    assert third["result"]["checkpoint"] in names, names

    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code in {200, 409}
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": p3["xmlPath"], "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    assert same(vm.disks[0], snap)


async def test_a_checkpoint_left_while_a_backup_runs_is_forgotten_when_it_ends(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    """Deleting a point while a backup of its VM runs (built on another point) leaves the
    point's checkpoint: the inventory does not touch a VM a job holds. It is remembered
    and forgotten once that backup has ended (``checkpoints_left``)."""
    first = await backup(api)
    second = await backup(api)
    job_id = await start_backup(api)
    for _ in range(200):
        job = (await api.get(f"/jobs/{job_id}")).json()
        if job["phase"] in {"transferring", "committing", "finished"}:
            break
        await asyncio.sleep(0.05)
    assert job["phase"] == "transferring", job
    old = [p for p in await points(api) if p["timestamp"] == first["result"]["timestamp"]]
    assert len(old) == 1, old
    resp = await api.delete(f"/api/v1/restore-points/{old[0]['id']}")
    assert resp.status_code == 200, resp.text
    names = {c.name for c in await list_checkpoints(conn, VM)}
    assert first["result"]["checkpoint"] in names, names  # left: the backup holds the VM
    third = await backup(api, job_id)
    assert third["result"]["parentTimestamp"] == second["result"]["timestamp"]
    # Forgotten just after the backup's final state is written: poll, bounded.
    for _ in range(100):
        names = {c.name for c in await list_checkpoints(conn, VM)}
        if first["result"]["checkpoint"] not in names:
            break
        await asyncio.sleep(0.1)
    assert first["result"]["checkpoint"] not in names, names
    assert {second["result"]["checkpoint"], third["result"]["checkpoint"]} <= names, names
