"""Restores of every disk kind, and restores elsewhere, through the agent API: a raw file
comes back raw, a block device (a loop device) is written in place, a VM is restored
beside its original under a new name and started, and into a libvirt storage pool; bad
input is refused with a 4xx before anything changes. Real libvirtd/QEMU, real services.
The tests in this module build on each other, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, api_client, local_config, running_system, wait_job

from virtbackup.testing.images import create_image, images_equal
from virtbackup.testing.vms import build_vm_xml, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection, NotFound, domain_xml, get_domain

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 64 * MiB
PID = os.getpid()
RAW_VM = f"vbt-rraw-{PID}"
BLOCK_VM = f"vbt-rblk-{PID}"
COPY_VM = f"vbt-rcopy-{PID}"
POOL_VM = f"vbt-rpool-{PID}"
OTHER_VM = f"vbt-rother-{PID}"
POOL = f"vbt-pool-{PID}"
STATE: dict[str, Any] = {}


def _xml(text: str) -> ET.Element:
    return ET.fromstring(text)


def _vm_xml(name: str, disk: Path | str, *, block: bool = False) -> str:
    """A small VM with one raw virtio disk (a file, or the block device ``disk``) and a
    user-mode network interface (it has a MAC address)."""
    root = _xml(build_vm_xml(name, [Path(disk)], formats=["raw"]))
    element = root.find("./devices/disk")
    assert element is not None
    if block:
        element.set("type", "block")
        source = element.find("source")
        assert source is not None
        del source.attrib["file"]
        source.set("dev", str(disk))
    devices = root.find("devices")
    assert devices is not None
    interface = ET.SubElement(devices, "interface", type="user")
    ET.SubElement(interface, "mac", address=f"52:54:00:{PID % 256:02x}:{len(name) % 256:02x}:01")
    ET.SubElement(interface, "model", type="virtio")
    return ET.tostring(root, encoding="unicode")


async def _define_and_start(conn: Connection, xml: str) -> None:
    dom = await conn.call(conn.raw.defineXML, xml)
    await conn.call(dom.create, timeout=60)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("anywhere"), orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def api(system: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system, local_config(repo_dir)) as client:
        yield client


@pytest.fixture(scope="module")
async def raw_vm(conn: Connection, vm_dir: Path) -> AsyncIterator[Path]:
    """VM ``RAW_VM`` with one raw 64 MiB image file, running; its copies are removed at
    the end too."""
    disk = create_image(vm_dir / f"{RAW_VM}-vda.img", SIZE, fmt="raw")
    await remove_vm(conn, RAW_VM)
    await _define_and_start(conn, _vm_xml(RAW_VM, disk))
    try:
        yield disk
    finally:
        for name in (RAW_VM, COPY_VM, POOL_VM, OTHER_VM):
            await remove_vm(conn, name)


@pytest.fixture(scope="module")
def loop_device(vm_dir: Path) -> Iterator[str]:
    """A loop device over a 64 MiB file (a block device, as an LVM volume would be)."""
    backing = vm_dir / "loop-backing.bin"
    with backing.open("wb") as fh:
        fh.truncate(SIZE)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture(scope="module")
async def block_vm(conn: Connection, loop_device: str) -> AsyncIterator[str]:
    await remove_vm(conn, BLOCK_VM)
    await _define_and_start(conn, _vm_xml(BLOCK_VM, loop_device, block=True))
    try:
        yield loop_device
    finally:
        await remove_vm(conn, BLOCK_VM)


async def _backup(api: httpx.AsyncClient, vm_name: str) -> str:
    """A backup of ``vm_name``; its restore point's xmlPath."""
    resp = await api.post("/servers/local/backup", json={"vmName": vm_name})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    entries = (await api.get("/restore/entries", params={"destinationId": "fs"})).json()
    mine = sorted((e for e in entries if e["vmName"] == vm_name), key=lambda e: e["timestamp"])
    xml_path: str = mine[-1]["xmlPath"]
    return xml_path


async def _restore(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post("/servers/local/restore/start", json={"decision": "overwrite", **body})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    return job


async def _force_off(api: httpx.AsyncClient, vm_name: str) -> None:
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": vm_name})
    assert off.status_code in {200, 409}, off.text


async def _ensure_running(api: httpx.AsyncClient, vm_name: str) -> None:
    on = await api.post("/servers/local/actions", json={"action": "start", "vmName": vm_name})
    assert on.status_code in {200, 409}, on.text


def _image_format(path: Path | str) -> str:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    fmt: str = json.loads(info.stdout)["format"]
    return fmt


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def _read_device(device: str) -> bytes:
    with open(device, "rb") as fh:
        return fh.read(SIZE)


def _fill_device(device: str, byte: int) -> None:
    with open(device, "r+b") as fh:
        fh.write(bytes([byte]) * SIZE)
        fh.flush()
        os.fsync(fh.fileno())


def _disks_and_macs(xml: str) -> tuple[list[tuple[str | None, str | None]], list[str]]:
    root = _xml(xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        path = None if source is None else source.get("file") or source.get("dev")
        disks.append((path, None if driver is None else driver.get("type")))
    macs = [m.get("address", "") for m in root.findall("./devices/interface/mac")]
    return disks, macs


async def test_a_raw_disk_comes_back_raw_and_bit_identical(
    api: httpx.AsyncClient, conn: Connection, raw_vm: Path, vm_dir: Path
) -> None:
    await guest_write(conn, RAW_VM, "vda", 0, 4 * MiB, pattern=0xAB)
    await guest_write(conn, RAW_VM, "vda", 20 * MiB, 1 * MiB, pattern=0x5A)
    xml_path = await _backup(api, RAW_VM)
    snap = vm_dir / "raw-snap.raw"
    subprocess.run(["cp", "--sparse=always", str(raw_vm), str(snap)], check=True)
    STATE.update(raw_point=xml_path, raw_snap=snap)

    await _force_off(api, RAW_VM)
    subprocess.run(  # a change since the point, which the restore must undo
        ["qemu-io", "-f", "raw", "-c", "write -P 0xee 40M 1M", str(raw_vm)],
        check=True,
        capture_output=True,
    )
    assert not images_equal(raw_vm, snap)
    await _restore(api, {"xmlPath": xml_path})

    assert _image_format(raw_vm) == "raw"
    assert raw_vm.stat().st_size == SIZE
    assert images_equal(raw_vm, snap)
    disks, _ = _disks_and_macs(await domain_xml(conn, RAW_VM, inactive=True))
    assert disks == [(str(raw_vm), "raw")]
    await _ensure_running(api, RAW_VM)


async def test_a_block_device_is_written_in_place_zeros_included(
    api: httpx.AsyncClient, conn: Connection, block_vm: str, vm_dir: Path
) -> None:
    device = block_vm
    await guest_write(conn, BLOCK_VM, "vda", 0, 4 * MiB, pattern=0xC3)
    await guest_write(conn, BLOCK_VM, "vda", 33 * MiB, 64 * 1024, pattern=0x3C)
    xml_path = await _backup(api, BLOCK_VM)
    point = _read_device(device)
    assert len(point) == SIZE and point.count(0) > SIZE // 2  # mostly zero chunks

    await _force_off(api, BLOCK_VM)
    _fill_device(device, 0xEE)  # stale data everywhere, zero chunks of the point too
    job = await _restore(api, {"xmlPath": xml_path})
    assert job["bytesTransferred"] == SIZE  # every chunk written, zero ones as zeros

    assert stat.S_ISBLK(os.stat(device).st_mode), "the device node was replaced"
    assert _read_device(device) == point
    assert not list(vm_dir.glob("*.vbrestore-*"))
    root = _xml(await domain_xml(conn, BLOCK_VM, inactive=True))
    disk = root.find("./devices/disk")
    assert disk is not None and disk.get("type") == "block"
    source = disk.find("source")
    assert source is not None and source.get("dev") == device
    await _ensure_running(api, BLOCK_VM)
    assert (await get_domain(conn, BLOCK_VM)).power_state == "running"


async def test_a_copy_beside_the_original_starts_and_leaves_the_original_alone(
    api: httpx.AsyncClient, conn: Connection, raw_vm: Path, vm_dir: Path
) -> None:
    await _ensure_running(api, RAW_VM)
    original_xml = await domain_xml(conn, RAW_VM, inactive=True)
    original_disk = _sha256(raw_vm)

    job = await _restore(api, {"xmlPath": STATE["raw_point"], "vmName": COPY_VM, "start": True})
    assert f"started {COPY_VM}" in job["message"], job["message"]

    copy_disk = vm_dir / f"{COPY_VM}-vda.img"
    original, copy = await get_domain(conn, RAW_VM), await get_domain(conn, COPY_VM)
    assert original.power_state == copy.power_state == "running"
    assert original.uuid != copy.uuid
    copy_disks, copy_macs = _disks_and_macs(await domain_xml(conn, COPY_VM, inactive=True))
    original_disks, original_macs = _disks_and_macs(original_xml)
    assert copy_disks == [(str(copy_disk), "raw")]
    assert len(copy_macs) == len(original_macs) == 1 and copy_macs != original_macs
    assert _image_format(copy_disk) == "raw"
    assert images_equal(copy_disk, STATE["raw_snap"])
    # The original: same definition, same bytes.
    assert await domain_xml(conn, RAW_VM, inactive=True) == original_xml
    assert original_disks == [(str(raw_vm), "raw")]
    assert _sha256(raw_vm) == original_disk


@pytest.fixture
async def pool(conn: Connection) -> AsyncIterator[Path]:
    """A directory storage pool ``POOL``, started, removed afterwards."""
    path = vm_directory(prefix="vbtest-pool-")
    xml = f"<pool type='dir'><name>{POOL}</name><target><path>{path}</path></target></pool>"
    handle = await conn.call(conn.raw.storagePoolDefineXML, xml, 0)
    await conn.call(handle.create, 0)
    try:
        yield path
    finally:
        await conn.call(handle.destroy)
        await conn.call(handle.undefine)
        subprocess.run(["rm", "-rf", str(path)], check=False)


async def test_a_restore_into_a_storage_pool_makes_a_volume_there(
    api: httpx.AsyncClient, conn: Connection, raw_vm: Path, pool: Path
) -> None:
    await _restore(api, {"xmlPath": STATE["raw_point"], "vmName": POOL_VM, "storagePool": POOL})
    volume = pool / f"{POOL_VM}-vda.img"
    disks, _ = _disks_and_macs(await domain_xml(conn, POOL_VM, inactive=True))
    assert disks == [(str(volume), "raw")]
    assert images_equal(volume, STATE["raw_snap"])
    handle = await conn.call(conn.raw.storagePoolLookupByName, POOL)
    assert volume.name in await conn.call(handle.listVolumes)
    await remove_vm(conn, POOL_VM)


async def _refused(
    api: httpx.AsyncClient, body: dict[str, Any], status: int, server: str = "local"
) -> str:
    resp = await api.post(
        f"/servers/{server}/restore/start", json={"decision": "overwrite", **body}
    )
    assert resp.status_code == status, resp.text
    message: str = resp.json()["error"]
    return message


async def test_bad_input_is_refused_before_anything_changes(
    api: httpx.AsyncClient,
    conn: Connection,
    raw_vm: Path,
    block_vm: str,
    vm_dir: Path,
    repo_dir: Path,
) -> None:
    point = STATE["raw_point"]
    jobs_before = len((await api.get("/jobs")).json())
    files_before = sorted(p.name for p in vm_dir.iterdir())

    assert "nowhere" in await _refused(api, {"xmlPath": point}, 404, server="nowhere")
    missing = f"vms/{RAW_VM}/2001-01-01T00-00-00/domain.xml"
    await _refused(api, {"xmlPath": missing}, 404)
    text = await _refused(api, {"xmlPath": point, "targetDirectory": "/etc/vbt"}, 400)
    assert "targetDirectory" in text and "restoreDirectories" in text
    assert "targetDirectory" in await _refused(
        api, {"xmlPath": point, "targetDirectory": "relative/dir"}, 400
    )
    assert "storagePool" in await _refused(
        api, {"xmlPath": point, "storagePool": f"no-such-pool-{PID}"}, 400
    )
    # A name that exists on the target: only overwrite replaces it, and only shut off.
    await _ensure_running(api, BLOCK_VM)
    text = await _refused(api, {"xmlPath": point, "vmName": BLOCK_VM, "decision": "define"}, 409)
    assert "already exists" in text
    assert "running" in await _refused(api, {"xmlPath": point, "vmName": BLOCK_VM}, 409)
    # Beside the original, a file at the copy's path that is not the copy's own disk.
    squatter = vm_dir / f"{OTHER_VM}-vda.img"
    squatter.write_bytes(b"not ours")
    files_before.append(squatter.name)
    text = await _refused(api, {"xmlPath": point, "vmName": OTHER_VM}, 409)
    assert str(squatter) in text and "not a disk of" in text
    assert squatter.read_bytes() == b"not ours"

    # The block VM's device is refused as the target of a copy without a directory.
    block_point = await _backup(api, BLOCK_VM)
    jobs_before += 1
    text = await _refused(api, {"xmlPath": block_point, "vmName": OTHER_VM}, 400)
    assert "block device" in text and "targetDirectory" in text

    assert len((await api.get("/jobs")).json()) == jobs_before
    assert sorted(p.name for p in vm_dir.iterdir()) == sorted(files_before)
    with pytest.raises(NotFound):
        await get_domain(conn, OTHER_VM)


async def test_a_target_directory_must_be_one_the_server_allows(
    api: httpx.AsyncClient, conn: Connection, raw_vm: Path, repo_dir: Path, vm_dir: Path
) -> None:
    allowed = vm_directory(prefix="vbtest-allowed-")
    try:
        cfg = local_config(repo_dir)
        cfg["servers"][0]["restoreDirectories"] = [str(allowed)]
        assert (await api.post("/config", json=cfg)).status_code == 200
        # The inventory applies a changed server a moment later: until then it answers
        # with the old list, never "server not found" (the connection is kept: only
        # what it depends on reopens it).
        deadline = time.monotonic() + 30
        while True:
            resp = await api.post(
                "/servers/local/restore/start",
                json={"xmlPath": STATE["raw_point"], "decision": "overwrite",
                      "targetDirectory": "/etc/vbt"},
            )  # fmt: skip
            assert resp.status_code == 400, resp.text
            vms = await api.get("/servers/local/vms")
            assert vms.status_code == 200 and vms.json(), vms.text
            if str(allowed) in resp.text:
                break
            assert time.monotonic() < deadline, resp.text
            await asyncio.sleep(0.05)
        # The default directories are no longer allowed once the list is set.
        text = await _refused(
            api, {"xmlPath": STATE["raw_point"], "targetDirectory": "/var/lib/libvirt/images"}, 400
        )
        assert str(allowed) in text
        # A subdirectory of an allowed one is (made if missing).
        target = allowed / "sub"
        await _restore(
            api, {"xmlPath": STATE["raw_point"], "vmName": OTHER_VM, "targetDirectory": str(target)}
        )
        disk = target / f"{OTHER_VM}-vda.img"
        assert images_equal(disk, STATE["raw_snap"])
        disks, _ = _disks_and_macs(await domain_xml(conn, OTHER_VM, inactive=True))
        assert disks == [(str(disk), "raw")]
    finally:
        await remove_vm(conn, OTHER_VM)
        subprocess.run(["rm", "-rf", str(allowed)], check=False)
