"""Offline backups, a VM stopped mid-backup, and disks added or grown between backups,
end to end through the agent API: gateway, orchestrator, inventory, a transfer worker,
a real libvirtd/QEMU VM and a filesystem destination. The tests build on each other,
in order (one VM, one repository).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
from harness import System, api_client, local_config, running_system, same, snapshot, wait_job

from virtbackup.repository.format import DEFAULT_CHUNK_SIZE
from virtbackup.testing.images import create_image
from virtbackup.testing.vms import (
    SmallVm,
    build_vm_xml,
    guest_write,
    made_vm,
    remove_vm,
)
from virtbackup.virt import Connection, LocalHost, get_domain, list_checkpoints
from virtbackup.virt.domains import PowerState
from virtbackup.virt.images import image_info

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-off-{os.getpid()}"
OFFLINE = "(offline: the VM was shut off)"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("offline"), orchestrators=1) as started:
        yield started


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [64 * MiB, 64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(system: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system, local_config(repo_dir)) as client:
        yield client


async def submit(api: httpx.AsyncClient) -> str:
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id: str = resp.json()["jobId"]
    return job_id


async def backup(api: httpx.AsyncClient) -> dict[str, Any]:
    job = await wait_job(api, await submit(api))
    assert job["state"] == "success", job
    return job


async def action(api: httpx.AsyncClient, verb: str) -> httpx.Response:
    return await api.post("/servers/local/actions", json={"action": verb, "vmName": VM})


async def power(conn: Connection) -> PowerState:
    return (await get_domain(conn, VM)).power_state


async def shut_off(api: httpx.AsyncClient, conn: Connection) -> None:
    assert (await action(api, "forceOff")).status_code in {200, 409}
    assert await power(conn) == PowerState.SHUTOFF


async def restore_and_compare(
    api: httpx.AsyncClient,
    conn: Connection,
    point: dict[str, Any],
    disks: list[Path],
    snap: list[Path],
) -> None:
    await shut_off(api, conn)
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    for disk, raw in zip(disks, snap, strict=True):
        assert same(disk, raw), f"{disk} differs from {point['timestamp']}"


async def entries(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda e: e["timestamp"])


def qemu_io(image: Path, command: str) -> None:
    """Write to a shut-off VM's image as an offline tool would (through QEMU's block
    layer: the image's enabled persistent bitmaps record the write)."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True
    )


async def wait_transferring(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = (await api.get(f"/jobs/{job_id}")).json()
        if job["totalUnits"] > 0:
            return job
        assert job["state"] in {"queued", "running"}, job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)


STATE: dict[str, Any] = {}


async def test_offline_full_and_incremental_then_online_restore_bit_identical(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0xAB)
    await guest_write(conn, VM, "vdb", 8 * MiB, 2 * MiB, pattern=0xCD)
    await shut_off(api, conn)
    snap1 = snapshot(vm, tmp_path_factory.mktemp("off1"))

    full = await backup(api)
    assert full["message"].startswith("full backup "), full["message"]
    assert OFFLINE in full["message"], full["message"]
    assert "read in full: no earlier restore point" in full["message"], full["message"]
    assert await power(conn) == PowerState.SHUTOFF
    # Its checkpoint is in libvirt and its bitmaps in the images: the chain goes on.
    checkpoint = full["result"]["checkpoint"]
    assert checkpoint in [c.name for c in await list_checkpoints(conn, VM)]
    for disk in vm.disks:
        assert checkpoint in [b.name for b in (await image_info(LocalHost(), str(disk))).bitmaps]

    # Written while shut off: the persistent bitmaps record it, the next backup is
    # incremental and offline again.
    qemu_io(vm.disks[0], "write -P 0x44 20M 1M")
    qemu_io(vm.disks[1], "write -P 0x45 0 64k")
    snap2 = snapshot(vm, tmp_path_factory.mktemp("off2"))
    inc = await backup(api)
    assert inc["message"].startswith("incremental backup"), inc["message"]
    assert OFFLINE in inc["message"], inc["message"]
    assert "read in full" not in inc["message"], inc["message"]
    assert inc["bytesTransferred"] == 1 * MiB + 64 * 1024  # the dirty part of a chunk per disk
    assert await power(conn) == PowerState.SHUTOFF

    # Started again: the next backup is online and incremental from the offline one.
    assert (await action(api, "start")).status_code == 200
    await guest_write(conn, VM, "vda", 40 * MiB, 1 * MiB, pattern=0x55)
    online = await backup(api)
    assert online["message"].startswith("incremental backup"), online["message"]
    assert OFFLINE not in online["message"], online["message"]
    assert online["bytesTransferred"] == 1 * MiB
    assert await power(conn) == PowerState.RUNNING
    snap3 = snapshot(vm, tmp_path_factory.mktemp("off3"))

    points = await entries(api)
    assert len(points) == 3
    for point, snap in zip(points, (snap1, snap2, snap3), strict=True):
        await restore_and_compare(api, conn, point, list(vm.disks), snap)
    assert (await action(api, "start")).status_code == 200


async def test_a_new_disk_and_a_grown_disk_alone_are_read_in_full(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if await power(conn) != PowerState.RUNNING:
        assert (await action(api, "start")).status_code == 200
    await backup(api)  # the restores started a new chain: a point to be incremental from
    vdc = create_image(vm.directory / f"{VM}-vdc.qcow2", 32 * MiB)
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{vdc}'/><target dev='vdc' bus='virtio'/></disk>"
    )
    dom = await conn.lookup(VM)
    both = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    await conn.call(dom.attachDeviceFlags, disk, both)
    await conn.call(dom.blockResize, "vdb", 96 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    await guest_write(conn, VM, "vda", 48 * MiB, 1 * MiB, pattern=0x61)
    await guest_write(conn, VM, "vdb", 80 * MiB, 1 * MiB, pattern=0x62)
    await guest_write(conn, VM, "vdc", 0, 1 * MiB, pattern=0x63)
    grown = dataclasses.replace(vm, disks=(*vm.disks, vdc))
    snap = snapshot(grown, tmp_path_factory.mktemp("grown"))

    job = await backup(api)
    message = job["message"]
    assert message.startswith("incremental backup"), message
    assert message.endswith(
        f"; read in full: vdb: grown from {64 * MiB} to {96 * MiB} bytes; vdc: new disk"
    ), message
    # vda stayed incremental: the dirty part of its one dirty chunk; vdb and vdc: every
    # chunk with data (vdb: the chunks at 0, 8 and 80 MiB; vdc: its first).
    assert job["bytesTransferred"] == 1 * MiB + (3 + 1) * DEFAULT_CHUNK_SIZE, job

    point = (await entries(api))[-1]
    await restore_and_compare(api, conn, point, list(grown.disks), snap)
    assert (await action(api, "start")).status_code == 200
    STATE["disks"] = list(grown.disks)


async def test_a_vm_stopped_mid_backup_says_so_and_leaves_no_checkpoint(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    system: System,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    disks: list[Path] = STATE.get("disks", list(vm.disks))
    if await power(conn) != PowerState.RUNNING:
        assert (await action(api, "start")).status_code == 200
    await backup(api)
    await guest_write(conn, VM, "vda", 8 * MiB, 1 * MiB, pattern=0x71)
    workers = [n for n in list(system.procs) if n.startswith("transfer-worker")]
    for name in workers:  # no worker takes the units: the job waits in transferring
        system.stop(name)
    try:
        job_id = await submit(api)
        checkpoint = (await wait_transferring(api, job_id))["result"]["checkpoint"]
        await conn.call((await conn.lookup(VM)).destroy)
    finally:
        for name in workers:
            system.start(name)
        system.wait_ready()
    job = await wait_job(api, job_id)
    assert job["state"] == "failure", job
    assert job["message"].startswith("the VM stopped during the backup"), job["message"]
    # The failed backup's checkpoint is gone from libvirt and from the images.
    assert checkpoint not in [c.name for c in await list_checkpoints(conn, VM)]
    for disk in disks:
        assert checkpoint not in [
            b.name for b in (await image_info(LocalHost(), str(disk))).bitmaps
        ]
    vms = {v["vm"]["name"]: v for v in (await api.get("/servers/local/vms")).json()}
    assert not vms[VM]["hasOverlay"], vms[VM]

    # The next backup (offline: the VM is shut off) works, from the previous checkpoint:
    # it has the write made before the failed one.
    snap = snapshot(dataclasses.replace(vm, disks=tuple(disks)), tmp_path_factory.mktemp("stop"))
    after = await backup(api)
    assert after["message"].startswith("incremental backup"), after["message"]
    assert OFFLINE in after["message"], after["message"]
    point = (await entries(api))[-1]
    await restore_and_compare(api, conn, point, disks, snap)


async def test_vm_actions_are_refused_while_an_offline_backup_holds_the_vm(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, system: System
) -> None:
    await shut_off(api, conn)
    workers = [n for n in list(system.procs) if n.startswith("transfer-worker")]
    for name in workers:
        system.stop(name)
    try:
        job_id = await submit(api)
        await wait_transferring(api, job_id)
        assert await power(conn) == PowerState.PAUSED
        for verb in ("start", "forceOff", "reboot"):
            resp = await action(api, verb)
            assert resp.status_code == 409, (verb, resp.text)
            assert f"{VM} is held by an offline backup (job {job_id})" in resp.json()["error"]
        # Cleanup is for leftovers: it neither aborts the backup nor releases the VM.
        resp = await api.post("/servers/local/cleanup", json={"vmName": VM})
        assert resp.status_code == 409, resp.text
        assert job_id in resp.json()["error"]
        assert await power(conn) == PowerState.PAUSED
    finally:
        for name in workers:
            system.start(name)
        system.wait_ready()
    job = await wait_job(api, job_id)
    assert job["state"] == "success", job
    assert OFFLINE in job["message"], job["message"]
    assert await power(conn) == PowerState.SHUTOFF
    assert (await action(api, "start")).status_code == 200


async def test_a_shut_off_vm_that_cannot_start_fails_naming_why(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    name = f"{VM}-nonet"
    image = create_image(vm.directory / f"{name}-vda.qcow2", 16 * MiB)
    root = ET.fromstring(build_vm_xml(name, [image]))
    devices = root.find("devices")
    assert devices is not None
    interface = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(interface, "source", network=f"vbt-missing-{os.getpid()}")
    await conn.call(conn.raw.defineXML, ET.tostring(root, encoding="unicode"))
    try:
        resp = await api.post("/servers/local/backup", json={"vmName": name})
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "failure", job
        assert "is shut off and could not be started paused" in job["message"], job
        assert f"vbt-missing-{os.getpid()}" in job["message"], job
        assert (await get_domain(conn, name)).power_state == PowerState.SHUTOFF
    finally:
        await remove_vm(conn, name)
