"""A fresh trial of warm migration (issue 18): what it found, kept as tests.

The target is the session host (``virtbackup.testing.session_host``: another user's
``qemu:///session`` over SSH, configured as server ``session``), the source this
machine's system libvirt (server ``local``). Where the hosts would share storage (the
same path on both), the session user's folder below ``/var/tmp`` stands for it: both
daemons see the same file there. Real libvirtd/QEMU (two daemons), sshd and services.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
from harness import System, local_config, running_system

from virtbackup.testing.session_host import SESSION_USER, SessionHost
from virtbackup.testing.vms import SmallVm, build_vm_xml, create_vm, remove_vm, vm_directory
from virtbackup.virt import Connection, NotFound, define_domain, get_domain

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PID = os.getpid()
VM = f"vbt-t18-{PID}"
SHARED_VM = f"vbt-t18sh-{PID}"
REMOVED = f"vbt-t18r-{PID}"
REMOVED_MOVED = f"vbt-t18rt-{PID}"
LINKED = f"vbt-t18l-{PID}"
OVERLAID = f"vbt-t18o-{PID}"
HELD = f"vbt-t18h-{PID}"
WITH_CDROM = f"vbt-t18cd-{PID}"
STUCK = f"vbt-t18st-{PID}"
STUCK_MOVED = f"vbt-t18stt-{PID}"
HELD_MOVED = f"vbt-t18ht-{PID}"
#: Seconds the first pass waits between the backup job's begin and its record (debug
#: hold ``migrate:begun``): the orchestrator is stopped there.
BEGUN_HOLD = 3


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("trial18"),
        orchestrators=1,
        VIRTBACKUP_DEBUG="1",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps({"migrate:begun": BEGUN_HOLD}),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def api(
    system: System, repo_dir: Path, session_host: SessionHost
) -> AsyncIterator[httpx.AsyncClient]:
    """The agent API with servers ``local`` and ``session``, once both list their VMs."""
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as client:
        cfg = local_config(repo_dir)
        cfg["servers"].append(session_host.server_config())
        resp = await client.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 60
        while (listed := await client.get("/servers/session/vms")).status_code != 200:
            assert time.monotonic() < deadline, listed.text
            await asyncio.sleep(0.3)
        yield client


@pytest.fixture(scope="module")
async def hs(system: System, api: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A folder both daemons see at the same path, the session user's (writable there)."""
    user = pwd.getpwnam(SESSION_USER)
    path = vm_directory(prefix="vbtest-t18shared-")
    os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
async def vm(conn: Connection, vm_dir: Path) -> AsyncIterator[SmallVm]:
    """A running VM of the system libvirt, its image in a folder of root's."""
    made = await create_vm(conn, VM, vm_dir, [16 * MiB])
    try:
        yield made
    finally:
        await remove_vm(conn, VM)


def submission(source_vm: str, **options: Any) -> dict[str, Any]:
    return {
        "vm_path": f"local/{source_vm}",
        "source": {"type": "libvirt", "server_id": "local"},
        "destination": {"type": "kvm", "server_id": "session"},
        "options": {"shutdown_timeout_seconds": 1, **options},
    }


async def job_count(hs: httpx.AsyncClient) -> int:
    return int((await hs.post("/jobs/query", json={"all": True})).json()["total"])


async def follow(hs: httpx.AsyncClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await hs.get(f"/jobs/{job_id}")).json()
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def power(conn: Connection, name: str) -> str:
    return str((await get_domain(conn, name)).power_state)


async def test_without_a_target_directory_the_source_paths_must_be_writable_there(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, session_host: SessionHost
) -> None:
    """No ``target_directory``: the disks go to their source paths on the target. Where
    the target's user cannot write there, that is a 400 at the submit (it was accepted,
    and the job failed once it had begun on the source)."""
    before = await job_count(hs)
    resp = await hs.post("/jobs/submit", json=submission(VM))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error.startswith("targetDirectory: not given"), error
    assert str(vm.directory) in error and "cannot write" in error, error
    assert await job_count(hs) == before
    assert await power(conn, VM) == "running"


async def test_a_migration_never_replaces_a_file_at_the_source_path_on_the_target(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    conn: Connection,
    shared_dir: Path,
    session_host: SessionHost,
) -> None:
    """The target sees a file at the source disk's path (storage both hosts share): it
    is no disk of the VM there, so the migration is a 409 and changes nothing. It was
    accepted: the cut-over moved the copy over the source's own image, and with
    ``remove_source_disks`` then deleted the image the VM ran on on the target."""
    made = await create_vm(conn, SHARED_VM, shared_dir, [16 * MiB])
    try:
        await api.post("/servers/local/refresh")
        before = await job_count(hs)
        owner = made.disks[0].stat().st_uid
        body = submission(SHARED_VM, remove_source=True, remove_source_disks=True)
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert f"{made.disks[0]} on server session exists and is not a disk of" in error, error
        assert await job_count(hs) == before
        assert await power(conn, SHARED_VM) == "running"
        assert made.disks[0].stat().st_uid == owner
        async with await session_host.connect() as session:
            with pytest.raises(NotFound):
                await get_domain(session, SHARED_VM)
        assert sorted(p.name for p in shared_dir.iterdir()) == [made.disks[0].name]
    finally:
        await remove_vm(conn, SHARED_VM)


async def test_remove_source_disks_keeps_images_other_vms_name_through_links(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    conn: Connection,
    vm_dir: Path,
    session_host: SessionHost,
) -> None:
    """Another VM names the source's first image through a symbolic link, and another's
    image is built on the second one through a link: both stay (they were deleted)."""
    source = await create_vm(conn, REMOVED, vm_dir, [16 * MiB, 16 * MiB])
    first, second = (vm_dir / f"{REMOVED}-link{i}.qcow2" for i in (0, 1))
    first.symlink_to(source.disks[0])
    second.symlink_to(source.disks[1])
    await define_domain(conn, build_vm_xml(LINKED, [first]))
    overlay = vm_dir / f"{OVERLAID}-vda.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(second), str(overlay)],
        check=True, capture_output=True,
    )  # fmt: skip
    await define_domain(conn, build_vm_xml(OVERLAID, [overlay]))
    try:
        await api.post("/servers/local/refresh")
        body = submission(
            REMOVED, vm_name=REMOVED_MOVED, target_directory=str(session_host.images),
            remove_source=True, remove_source_disks=True,
        )  # fmt: skip
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 201, resp.text
        job = await follow(hs, resp.json()["job_id"])
        assert job["status"] == "completed", job
        assert f"the source vm {REMOVED} was undefined" in job["message"], job
        assert source.disks[0].exists() and source.disks[1].exists(), job["message"]
        assert f"{source.disks[0]}: vm {LINKED} uses it too" in job["message"], job
        assert f"{source.disks[1]}: vm {OVERLAID} uses it too" in job["message"], job
        assert "0 disk image(s) deleted" in job["message"], job
    finally:
        for name in (REMOVED, LINKED, OVERLAID):
            await remove_vm(conn, name)


async def checkpoints_of(conn: Connection, name: str) -> list[str]:
    dom = await conn.lookup(name)
    return [c.getName() for c in await conn.call(dom.listAllCheckpoints)]


async def test_an_orchestrator_stopped_before_it_recorded_the_checkpoint_ends_the_backup_job(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    system: System,
    conn: Connection,
    vm_dir: Path,
    session_host: SessionHost,
) -> None:
    """The orchestrator stops between the first pass's begin (a libvirt backup job and a
    new checkpoint on the source) and its record of the checkpoint. The one started again
    ends the job from its record: the backup job is ended and its checkpoint dropped too
    (they were left: the job's scratch image kept growing, and every later backup or
    migration of the VM failed with "already has a backup job")."""
    await create_vm(conn, HELD, vm_dir, [16 * MiB])
    try:
        await api.post("/servers/local/refresh")
        body = submission(HELD, vm_name=HELD_MOVED, target_directory=str(session_host.images))
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["job_id"]
        deadline = time.monotonic() + 60
        while not await checkpoints_of(conn, HELD):
            assert time.monotonic() < deadline, "the migration never began on the source"
            await asyncio.sleep(0.1)
        result = (await api.get(f"/jobs/{job_id}")).json()["result"]
        assert "checkpoints" not in result, result  # in the hold: not recorded yet
        system.stop("job-orchestrator")
        system.start("job-orchestrator")
        deadline = time.monotonic() + 90
        while True:
            resp = await hs.get(f"/jobs/{job_id}")
            if resp.status_code == 200 and resp.json()["status"] in {"failed", "cancelled"}:
                job = resp.json()
                break
            assert time.monotonic() < deadline, resp.text
            await asyncio.sleep(0.3)
        assert job["status"] == "failed" and "stopped while" in job["error"], job
        assert await power(conn, HELD) == "running"
        dom = await conn.lookup(HELD)
        with pytest.raises(libvirt.libvirtError, match="no domain backup job"):
            dom.backupGetXMLDesc(0)
        assert await checkpoints_of(conn, HELD) == []
        assert [p for p in session_host.images.iterdir() if HELD_MOVED in p.name] == []
    finally:
        await remove_vm(conn, HELD)


async def test_a_medium_the_target_cannot_read_is_refused_before_anything(
    hs: httpx.AsyncClient, api: httpx.AsyncClient, conn: Connection, session_host: SessionHost
) -> None:
    """A CD-ROM medium is not copied: the VM keeps its path. One the target's user cannot
    read is a 400 naming the drive (the migration ran, stopped the source, and failed to
    start the VM on the target, leaving it defined there)."""
    private = vm_directory(prefix="vbtest-t18cd-")
    private.chmod(0o711)
    try:
        made = await create_vm(conn, WITH_CDROM, private, [16 * MiB], with_cdrom=True, start=False)
        assert made.cdrom is not None
        made.cdrom.chmod(0o600)  # root's: the system QEMU gets it, the session user cannot
        await conn.call((await conn.lookup(WITH_CDROM)).create, timeout=60)
        await api.post("/servers/local/refresh")
        before = await job_count(hs)
        body = submission(WITH_CDROM, target_directory=str(session_host.images))
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error.startswith(f"disk sda: the cdrom '{made.cdrom}'"), error
        assert "remove-cdrom" in error, error
        assert await job_count(hs) == before
        assert await power(conn, WITH_CDROM) == "running"
        assert [p for p in session_host.images.iterdir() if WITH_CDROM in p.name] == []
    finally:
        await remove_vm(conn, WITH_CDROM)
        shutil.rmtree(private, ignore_errors=True)


async def test_images_a_failed_cutover_cannot_remove_are_said(
    hs: httpx.AsyncClient, api: httpx.AsyncClient, conn: Connection, vm_dir: Path,
    session_host: SessionHost,
) -> None:  # fmt: skip
    """The target directory cannot be written once the cut-over has begun (a full or
    remounted filesystem, changed permissions), and the cut-over fails (debug fault
    ``cutover``): the source is started again, and the images left on the target are
    named in the message (they were left silently)."""
    await create_vm(conn, STUCK, vm_dir, [16 * MiB])
    images = session_host.images
    try:
        await api.post("/servers/local/refresh")
        body = submission(
            STUCK, vm_name=STUCK_MOVED, target_directory=str(images), debug_fault="cutover"
        )
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["job_id"]
        deadline = time.monotonic() + 90
        while (await hs.get(f"/jobs/{job_id}")).json()["progress"]["stage"] != "cutover":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        images.chmod(0o500)  # the source shuts down for a second (shutdown_timeout 1)
        job = await follow(hs, job_id)
        images.chmod(0o700)
        assert job["status"] == "failed", job
        assert f"the source vm {STUCK} was started again" in job["error"], job
        left = images / f"{STUCK_MOVED}-vda.qcow2.vbrestore-{job_id}"
        assert left.exists()
        assert f"on server session: could not remove {left}: remove them there" in job["error"]
        assert await power(conn, STUCK) == "running"
    finally:
        images.chmod(0o700)
        for path in images.glob(f"{STUCK_MOVED}-*"):
            path.unlink()
        await remove_vm(conn, STUCK)


async def test_the_native_api_names_its_own_fields(
    api: httpx.AsyncClient, hs: httpx.AsyncClient
) -> None:
    """``POST /api/v1/migrations`` is refused naming the field as its body does (it named
    the HyperSDK definition's ``options.max_passes``, a field the client never sent)."""
    before = await job_count(hs)
    body = {"serverId": "local", "vmName": VM, "targetServerId": "session", "maxPasses": 0}
    resp = await api.post("/api/v1/migrations", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("maxPasses (options.max_passes): "), resp.text
    body = {"serverId": "local", "vmName": VM, "targetServerId": "no-such-server"}
    resp = await api.post("/api/v1/migrations", json=body)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"].startswith("targetServerId (destination.server_id): "), resp.text
    assert await job_count(hs) == before
