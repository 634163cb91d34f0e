"""What a restore may write over, through the agent API (real libvirtd/QEMU, real
services): where a disk goes comes from the point's saved domain XML (sealed when the
destination is encrypted), never from the plaintext record alone; a file or device another
VM uses is never written; new images are private to root; a replaced domain keeps its
UUID; the VM being restored cannot be started through the API until the restore ends.

The system runs with a debug hold after a job enters ``transferring``, so that a restore
is still running when the tests act on its VM. The tests build on each other, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, api_client, local_config, running_system, wait_job

from virtbackup.testing.images import create_image, images_equal
from virtbackup.testing.vms import build_vm_xml, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection, domain_xml, get_domain

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 64 * MiB
PID = os.getpid()
VM = f"vbt-safe-{PID}"
COPY = f"vbt-safe-copy-{PID}"
USER = f"vbt-safe-user-{PID}"
HOLD = 4.0
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("safety"),
        orchestrators=1,
        VIRTBACKUP_DEBUG="true",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps({"after:transferring": HOLD}),
    ) as system:
        yield system


@pytest.fixture(scope="module")
def vm_dir() -> Iterator[Path]:
    path = vm_directory()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
async def api(system: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system, local_config(repo_dir)) as client:
        yield client


@pytest.fixture(scope="module")
async def disk(conn: Connection, vm_dir: Path) -> AsyncIterator[Path]:
    """VM ``VM`` with one raw 64 MiB image, running; ``COPY`` and ``USER`` are removed
    at the end too."""
    path = create_image(vm_dir / f"{VM}-vda.img", SIZE, fmt="raw")
    await remove_vm(conn, VM)
    dom = await conn.call(conn.raw.defineXML, build_vm_xml(VM, [path], formats=["raw"]))
    await conn.call(dom.create, timeout=60)
    try:
        yield path
    finally:
        for name in (VM, COPY, USER):
            await remove_vm(conn, name)


async def _off(api: httpx.AsyncClient, name: str) -> None:
    resp = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": name})
    assert resp.status_code in {200, 409}, resp.text


async def _start(api: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await api.post("/servers/local/restore/start", json={"decision": "overwrite", **body})


async def _restored(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    resp = await _start(api, body)
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=180)
    assert job["state"] == "success", job
    return job


def _mode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mode & 0o7777, st.st_uid


async def test_the_point(
    api: httpx.AsyncClient, conn: Connection, disk: Path, vm_dir: Path
) -> None:
    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0x6B)
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=120)
    assert job["state"] == "success", job
    [entry] = [e for e in (await api.get("/restore/entries")).json() if e["vmName"] == VM]
    snap = vm_dir / "point.raw"
    subprocess.run(["cp", "--sparse=always", str(disk), str(snap)], check=True)
    STATE.update(point=entry["xmlPath"], snap=snap)
    await _off(api, VM)


async def test_precheck_answers_for_the_name_and_place_the_restore_would_use(
    api: httpx.AsyncClient,
) -> None:
    """precheck takes vmName, targetDirectory and storagePool, checks them as
    restore/start does, and answers for the VM the restore would define."""

    async def precheck(body: dict[str, Any]) -> httpx.Response:
        return await api.post(
            "/servers/local/restore/precheck", json={"xmlPath": STATE["point"], **body}
        )

    resp = await precheck({})
    assert resp.json() == {"vmExists": True, "canDefineOnly": True}, resp.text
    resp = await precheck({"vmName": COPY})
    assert resp.json() == {"vmExists": False, "canDefineOnly": False}, resp.text
    resp = await precheck({"targetDirectory": "/etc/vbt"})
    assert resp.status_code == 400 and "targetDirectory" in resp.text, resp.text
    resp = await precheck({"storagePool": f"no-such-pool-{PID}"})
    assert resp.status_code == 400 and "storagePool" in resp.text, resp.text
    resp = await precheck({"vmName": "a/b"})
    assert resp.status_code == 400 and "vmName" in resp.text, resp.text


async def test_a_changed_record_cannot_choose_where_a_restore_writes(
    api: httpx.AsyncClient, disk: Path, vm_dir: Path, repo_dir: Path
) -> None:
    """backup.json is plaintext: a disk path changed there (pointing at any host file)
    disagrees with the point's saved XML and manifest, and the point is refused (409)
    by precheck and start, with nothing written and no job made."""
    record_file = repo_dir / "VirtBackup" / Path(STATE["point"]).parent / "backup.json"
    saved = record_file.read_text()
    victim = vm_dir / "victim.txt"
    victim.write_text("a host file\n")
    record = json.loads(saved)
    record["disks"][0]["path"] = str(victim)
    record_file.write_text(json.dumps(record))
    jobs_before = len((await api.get("/jobs")).json())
    try:
        for body in ({}, {"vmName": COPY}, {"targetDirectory": str(vm_dir)}):
            resp = await _start(api, {"xmlPath": STATE["point"], **body})
            assert resp.status_code == 409, resp.text
            assert "record" in resp.json()["error"] and str(disk) in resp.json()["error"]
        resp = await api.post("/servers/local/restore/precheck", json={"xmlPath": STATE["point"]})
        assert resp.status_code == 409, resp.text
    finally:
        record_file.write_text(saved)
    assert victim.read_text() == "a host file\n"
    assert len((await api.get("/jobs")).json()) == jobs_before


async def test_a_disk_another_vm_uses_is_never_written(
    api: httpx.AsyncClient, conn: Connection, disk: Path
) -> None:
    """Another defined VM uses the disk the point would be written back to: the restore
    in place (the agent API's plain case) is refused, 409 naming that VM."""
    user_xml = build_vm_xml(USER, [disk], formats=["raw"])
    await conn.call(conn.raw.defineXML, user_xml)
    before = disk.read_bytes()[: 4 * MiB]
    try:
        resp = await _start(api, {"xmlPath": STATE["point"]})
        assert resp.status_code == 409, resp.text
        assert USER in resp.json()["error"], resp.text
    finally:
        await remove_vm(conn, USER)
    assert disk.read_bytes()[: 4 * MiB] == before


async def test_a_restored_image_keeps_the_mode_of_the_file_it_replaces(
    api: httpx.AsyncClient, disk: Path
) -> None:
    disk.chmod(0o640)
    os.chown(disk, 0, 0)
    await _restored(api, {"xmlPath": STATE["point"]})
    assert _mode(disk) == (0o640, 0)
    assert images_equal(disk, STATE["snap"])


async def test_new_images_are_private_to_root(
    api: httpx.AsyncClient, conn: Connection, disk: Path, vm_dir: Path
) -> None:
    """Disaster recovery: the VM and its disk are gone; the restore in place makes the
    image anew, readable by root only (so is a copy's), and the VM starts (libvirt gives
    QEMU access)."""
    uuid = (await get_domain(conn, VM)).uuid
    await remove_vm(conn, VM)
    disk.unlink()
    await _restored(api, {"xmlPath": STATE["point"], "start": True})
    assert _mode(disk)[0] == 0o600
    assert images_equal(disk, STATE["snap"])
    assert (await get_domain(conn, VM)).uuid == uuid
    await _off(api, VM)

    job = await _restored(api, {"xmlPath": STATE["point"], "vmName": COPY})
    copy_disk = vm_dir / f"{COPY}-vda.img"
    assert _mode(copy_disk) == (0o600, 0), job["message"]
    assert images_equal(copy_disk, STATE["snap"])
    assert not [p for p in vm_dir.iterdir() if ".vbrestore-" in p.name]


async def test_overwriting_a_domain_by_name_keeps_its_uuid(
    api: httpx.AsyncClient, conn: Connection
) -> None:
    """``COPY`` exists (the test before made it): restored over by ``vmName`` it keeps its
    UUID; a domain that did not exist got a new one."""
    before = (await get_domain(conn, COPY)).uuid
    assert before != (await get_domain(conn, VM)).uuid
    await _restored(api, {"xmlPath": STATE["point"], "vmName": COPY})
    assert (await get_domain(conn, COPY)).uuid == before


async def test_the_vm_being_restored_cannot_be_started_through_the_api(
    api: httpx.AsyncClient, conn: Connection
) -> None:
    """While the restore job runs, actions on its VM answer 409 naming the job (as
    while an offline backup holds it); once the restore has ended the VM starts."""
    resp = await _start(api, {"xmlPath": STATE["point"]})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 60
    while (await api.get(f"/jobs/{job_id}")).json()["phase"] != "transferring":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    start = {"action": "start", "vmName": VM}
    resp = await api.post("/servers/local/actions", json=start)
    assert resp.status_code == 409, resp.text
    assert job_id in resp.json()["error"]
    assert (await get_domain(conn, VM)).power_state == "shutoff"
    job = await wait_job(api, job_id, timeout=120)
    assert job["state"] == "success", job
    resp = await api.post("/servers/local/actions", json=start)
    assert resp.status_code == 200, resp.text
    await _off(api, VM)
    xml = await domain_xml(conn, VM, inactive=True)
    assert "virtbackup.dev/xmlns/restore" not in xml  # the hold went with the restore
