"""Warm migration through the HyperSDK API: a running VM is copied to another server
while its guest writes, synced from its dirty bitmap, stopped, and started there.

The second host is the system libvirt reached over SSH on loopback (a root sshd of its
own: ``sshd_server(root=True)``), configured as server ``remote``: the target images
are written through the inventory's TLS ``qemu-nbd`` exports on that "host" into a
directory of its own, under another VM name (the source's name exists there: it is
the same libvirt). Real libvirtd/QEMU, sshd and services; the tests build on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from harness import System, local_config, running_system, ssh_server, wait_listed

from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.testing.vms import (
    SmallVm,
    build_vm_xml,
    create_uefi_vm,
    create_vm,
    guest_write,
    remove_vm,
    vm_directory,
)
from virtbackup.virt import Connection, NotFound, define_domain, domain_xml, get_domain

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
#: The migrated VM's disk: 1 GiB, so that its copy takes longer than the cut-over.
DISK = 1024 * MiB
PID = os.getpid()
VM = f"vbt-mig-{PID}"
MOVED = f"vbt-migt-{PID}"
CANCELED = f"vbt-migc-{PID}"
FAILED = f"vbt-migf-{PID}"
ORPHANED = f"vbt-migo-{PID}"
STALLED = f"vbt-migs-{PID}"
UEFI = f"vbt-migu-{PID}"
UEFI_MOVED = f"vbt-migut-{PID}"
REMOVED = f"vbt-migr-{PID}"
REMOVED_MOVED = f"vbt-migrt-{PID}"
SHARER = f"vbt-migsh-{PID}"
OVERLAID = f"vbt-migov-{PID}"
URI_MOVED = f"vbt-migl-{PID}"
START_FAILED = f"vbt-migsf-{PID}"
OTHER = f"vbt-migot-{PID}"
TWIN = f"vbt-migtw-{PID}"
#: Seconds each sync pass waits before it copies (debug hold): a cancel lands there.
SYNC_HOLD = 3


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    holds = json.dumps({"migrate:syncing": SYNC_HOLD})
    with running_system(
        tmp_path_factory.mktemp("migrate"),
        orchestrators=1,
        workers=2,
        VIRTBACKUP_DEBUG="1",
        VIRTBACKUP_DEBUG_HOLDS=holds,
    ) as system:
        yield system


@pytest.fixture(scope="module")
def remote() -> Iterator[SshdServer]:
    with sshd_server(root=True) as server:
        yield server


@pytest.fixture(scope="module")
def target_dir() -> Iterator[Path]:
    path = vm_directory(prefix="vbtest-migt-")
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    """The agent API (a job's full record, with its ``result``)."""
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def hs(
    system: System, api: httpx.AsyncClient, repo_dir: Path, remote: SshdServer, target_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The HyperSDK listener, with servers ``local`` and ``remote`` configured."""
    cfg = local_config(repo_dir)
    cfg["servers"].append(
        ssh_server("remote", remote.host, remote.port, remote.username, remote.private_key,
                   target_dir)
    )  # fmt: skip
    resp = await api.post("/config", json=cfg)
    assert resp.status_code == 200, resp.text
    await wait_listed(api, "remote")
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def vm(conn: Connection, vm_dir: Path) -> AsyncIterator[SmallVm]:
    """A running VM with one 1 GiB qcow2 disk (sparse), 672 MiB of it written: six
    segments of 112 MiB with 56 MiB gaps: far more than the last delta a guest writing
    1 MiB at a time leaves for the cut-over."""
    made = await create_vm(conn, VM, vm_dir, [DISK], start=False)
    writes = [f"write -P {0x5A + i} {i * 168}M 112M" for i in range(6)]
    subprocess.run(
        ["qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), str(made.disks[0])],
        check=True,
        capture_output=True,
    )
    dom = await conn.lookup(VM)
    await conn.call(dom.create, timeout=60)
    try:
        yield made
    finally:
        for name in (VM, MOVED, CANCELED, FAILED, ORPHANED, STALLED, START_FAILED, OTHER, TWIN):
            await remove_vm(conn, name)


def submission(vm_name: str, target_vm: str, target_dir: Path, **options: Any) -> dict[str, Any]:
    return {
        "vm_path": f"local/{vm_name}",
        "source": {"type": "libvirt", "server_id": "local"},
        "destination": {"type": "kvm", "server_id": "remote"},
        "options": {
            "vm_name": target_vm,
            "target_directory": str(target_dir),
            "shutdown_timeout_seconds": 1,
            **options,
        },
    }


async def job_count(hs: httpx.AsyncClient) -> int:
    return int((await hs.post("/jobs/query", json={"all": True})).json()["total"])


async def follow(
    hs: httpx.AsyncClient, job_id: str, timeout: float = 180
) -> tuple[dict[str, Any], list[str]]:
    """Poll the job until it ends; its final view and the stages seen on the way."""
    deadline = time.monotonic() + timeout
    stages: list[str] = []
    while True:
        job = (await hs.get(f"/jobs/{job_id}")).json()
        stage = job["progress"]["stage"]
        if not stages or stages[-1] != stage:
            stages.append(stage)
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job, stages
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)


def images_same(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True
    )


async def power(conn: Connection, name: str) -> str:
    return str((await get_domain(conn, name)).power_state)


async def test_bad_input_creates_nothing(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    before = await job_count(hs)

    async def refused(body: dict[str, Any], status: int, needle: str) -> None:
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == status, resp.text
        assert needle in resp.json()["error"], resp.text

    good = submission(VM, MOVED, target_dir)
    same = {**good, "destination": {"type": "kvm", "server_id": "local"}}
    await refused(same, 400, "destination.server_id")
    ghost = {**good, "destination": {"type": "kvm", "server_id": "ghost"}}
    await refused(ghost, 404, "destination.server_id")
    await refused({**good, "vm_path": "local/no-such-vm"}, 404, "vm_path")
    # The VM's own name exists on the target (the same libvirt here): 409 unless replace.
    await refused(submission(VM, VM, target_dir), 409, "options.vm_name")
    outside = submission(VM, MOVED, Path("/var/tmp/vbtest-not-allowed"))
    resp = await hs.post("/jobs/submit", json=outside)
    assert resp.status_code == 400 and "arget" in resp.json()["error"], resp.text
    # Inside the allowed directories, but missing: nothing is made before the migration.
    await refused(submission(VM, MOVED, target_dir / "missing"), 400, "does not exist")
    await refused(submission(VM, MOVED, target_dir, max_passes=0), 400, "options.max_passes")
    await refused(submission(VM, MOVED, target_dir, bogus=1), 400, "options.bogus")
    unknown_net = {"default": f"vbt-no-such-net-{PID}"}
    body = submission(VM, MOVED, target_dir, network_mapping=unknown_net)
    await refused(body, 400, "options.network_mapping.default")
    stopped = await create_vm(conn, FAILED + "x", vm.directory, [MiB], start=False)
    try:
        await refused(submission(stopped.name, MOVED, target_dir), 400, "cold copy")
    finally:
        await remove_vm(conn, stopped.name)
    assert await job_count(hs) == before
    assert list(target_dir.iterdir()) == []
    with pytest.raises(NotFound):
        await get_domain(conn, MOVED)


async def test_migrate_a_running_vm_while_it_writes(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    system: System,
    vm: SmallVm,
    conn: Connection,
    target_dir: Path,
) -> None:
    writes = {"n": 0}

    async def writer() -> None:
        # The guest keeps writing until the source is stopped at the cut-over.
        offset = 0
        while True:
            try:
                await guest_write(conn, VM, "vda", offset, MiB, pattern=0x11 + writes["n"] % 200)
            except Exception:
                return
            writes["n"] += 1
            offset = (offset + 37 * MiB) % (DISK - MiB)
            await asyncio.sleep(0.05)

    ws_stages: list[str] = []
    protocols: list[Any] = ["virtbackup.v1", f"virtbackup.bearer.{system.token}"]
    ws_url = f"ws://127.0.0.1:{system.hypersdk_port}/ws"

    async def watch(sock: Any) -> None:
        # Every job_update of the job, as a /ws client sees it.
        while True:
            msg = json.loads(await sock.recv())
            data = msg["data"]
            if msg["type"] == "job_update" and data["definition"]["id"] == ids.get("job"):
                stage = data["progress"]["stage"]
                if not ws_stages or ws_stages[-1] != stage:
                    ws_stages.append(stage)

    ids: dict[str, str] = {}
    async with websockets.connect(ws_url, subprotocols=protocols, open_timeout=10) as sock:
        watcher = asyncio.create_task(watch(sock))
        task = asyncio.create_task(writer())
        try:
            # The source's removal is asked, and refused by the inventory (debug fault:
            # another UUID): that does not fail the migration, and keeps the source.
            body = submission(
                VM, MOVED, target_dir, remove_source=True, remove_source_disks=True,
                debug_fault="remove_source",
            )  # fmt: skip
            resp = await hs.post("/jobs/submit", json=body)
            assert resp.status_code == 201, resp.text
            ids["job"] = resp.json()["job_id"]
            job, stages = await follow(hs, ids["job"])
            await asyncio.sleep(1)  # the last job_update
        finally:
            for running in (task, watcher):
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
    for stage in ("copying", "syncing", "cutover", "completed"):
        assert stage in ws_stages, ws_stages
    assert job["status"] == "completed", job
    assert job["definition"]["destination"] == {"type": "kvm", "server_id": "remote"}
    for stage in ("copying", "syncing", "completed"):
        assert stage in stages, stages
    assert writes["n"] > 0
    assert await power(conn, VM) == "shutoff"
    assert await power(conn, MOVED) == "running"
    record = (await api.get(f"/jobs/{job['definition']['id']}")).json()
    result = record["result"]
    assert result["stage"] == "completed"
    assert len(result["passes"]) >= 3  # copy, at least one sync pass, the offline delta
    assert result["passes"][-1]["offline"] is True
    # The last delta was read from the qcow2 image's bitmap by qemu-nbd, without
    # starting QEMU again; those exports are gone, and the image is free.
    assert result["passes"][-1]["fromBitmaps"] is True, result
    assert result["cutoverSeconds"]["copied"] < result["cutoverSeconds"]["defined"], result
    assert bitmap_exports_of(vm.disks[0]) == [], "a qemu-nbd of the source was left running"
    assert list(Path("/tmp").glob(f"vbdelta-{await uuid_of(conn, VM)}.*")) == []
    # The VM is down only for the cut-over: not while the disk is copied and synced.
    started = datetime.fromisoformat(record["startedAt"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(record["finishedAt"].replace("Z", "+00:00"))
    print("migration", (ended - started).total_seconds(), "s:", result, flush=True)
    up = sum(p["seconds"] for p in result["passes"] if not p.get("offline"))
    assert 0 < result["downtimeSeconds"] < (ended - started).total_seconds() - up, result
    # ... and only the last delta is copied while it is down: the disk's data and the
    # sync passes were copied while it ran. Measured in bytes, not against the copy's
    # seconds: on a loaded 2-core machine the cut-over's fixed costs (libvirt calls,
    # qemu-nbd start) took 5.6 s against a copy of 4.7 s, and speed is the benchmark's.
    [offline] = [p for p in result["passes"] if p.get("offline")]
    assert offline["bytes"] * 8 < result["passes"][0]["bytes"], result
    assert result["checkpoints"] == []  # dropped on the source
    # The progress of a completed migration: every byte it copied, of as many (100 %).
    copied = result["bytesCopied"]
    assert copied == sum(p["bytes"] for p in result["passes"]) > 0, result
    assert job["progress"]["percent_complete"] == 100, job
    assert (job["progress"]["current_bytes"], job["progress"]["total_bytes"]) == (copied, copied)
    assert (record["bytesTransferred"], record["totalBytes"]) == (copied, copied), record
    assert f"the source vm {VM} could NOT be removed" in job["message"], job
    assert "not the migrated domain" in job["message"], job
    assert result["sourceRemoval"]["undefined"] is False, result
    assert vm.disks[0].exists()
    moved = target_dir / f"{MOVED}-vda.qcow2"
    assert moved.exists(), list(target_dir.iterdir())
    compared = images_same(vm.disks[0], moved)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # Thin: about the data written (672 MiB and the guest's writes), not the whole disk.
    assert moved.stat().st_blocks * 512 < DISK * 7 // 8


def bitmap_exports_of(image: Path) -> list[int]:
    """Pids of the ``qemu-nbd`` processes that export ``image`` (the cut-over's)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"qemu-nbd") and str(image).encode() in argv:
                found.append(int(proc.name))
    return found


async def uuid_of(conn: Connection, name: str) -> str:
    return str((await get_domain(conn, name)).uuid)


async def checkpoints_of(conn: Connection, name: str) -> list[str]:
    dom = await conn.lookup(name)
    return [c.getName() for c in await conn.call(dom.listAllCheckpoints)]


def target_files(target_dir: Path, name: str) -> list[str]:
    return [p.name for p in target_dir.iterdir() if name in p.name]


async def test_cancel_while_syncing_leaves_the_source_running(
    hs: httpx.AsyncClient, api: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    if await power(conn, VM) != "running":  # the migration above left it shut off
        await conn.call((await conn.lookup(VM)).create, timeout=60)
    before = await checkpoints_of(conn, VM)
    # Through the native API this time.
    body = {"serverId": "local", "vmName": VM, "targetServerId": "remote",
            "targetVmName": CANCELED, "targetDirectory": str(target_dir),
            "shutdownTimeoutSeconds": 1}  # fmt: skip
    resp = await api.post("/api/v1/migrations", json=body)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    deadline = time.monotonic() + 60
    while (await hs.get(f"/jobs/{job_id}")).json()["progress"]["stage"] != "syncing":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    cancel = await hs.post("/jobs/cancel", json={"job_ids": [job_id]})
    assert cancel.status_code == 200, cancel.text
    job, _ = await follow(hs, job_id)
    assert job["status"] == "cancelled", job
    assert await power(conn, VM) == "running"
    assert await checkpoints_of(conn, VM) == before
    with pytest.raises(NotFound):
        await get_domain(conn, CANCELED)
    assert target_files(target_dir, CANCELED) == []


async def test_a_failure_at_cutover_starts_the_source_again(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    assert await power(conn, VM) == "running"
    before = await checkpoints_of(conn, VM)
    body = submission(VM, FAILED, target_dir, debug_fault="cutover")
    resp = await hs.post("/jobs/submit", json=body)
    assert resp.status_code == 201, resp.text
    job, stages = await follow(hs, resp.json()["job_id"])
    assert job["status"] == "failed", job
    assert "cutover" in stages, stages
    assert "started again" in job["error"], job
    assert await power(conn, VM) == "running"
    # The last delta's exports (qemu-nbd on the image) were stopped before the start.
    assert bitmap_exports_of(vm.disks[0]) == []
    assert list(Path("/tmp").glob(f"vbdelta-{await uuid_of(conn, VM)}.*")) == []
    assert await checkpoints_of(conn, VM) == before
    with pytest.raises(NotFound):
        await get_domain(conn, FAILED)
    assert target_files(target_dir, FAILED) == []


async def test_a_failed_start_on_the_target_says_the_vm_stays_defined_there(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    """The VM is defined on the target, and its start there fails: the source is started
    again, and the message says the VM stays defined on the target (a retry's 409)."""
    assert await power(conn, VM) == "running"
    body = submission(VM, START_FAILED, target_dir, debug_fault="start")
    resp = await hs.post("/jobs/submit", json=body)
    assert resp.status_code == 201, resp.text
    job, _ = await follow(hs, resp.json()["job_id"])
    assert job["status"] == "failed", job
    assert "started again" in job["error"], job
    assert f"vm {START_FAILED} stays defined (not started) on server remote" in job["error"]
    assert await power(conn, VM) == "running"
    assert await power(conn, START_FAILED) == "shutoff"
    retry = await hs.post("/jobs/submit", json=submission(VM, START_FAILED, target_dir))
    assert retry.status_code == 409, retry.text
    await remove_vm(conn, START_FAILED)


async def test_two_migrations_cannot_go_to_one_target_name(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    """Both passed the target's checks (no VM of the name there yet): the second one's
    cut-over then moved its images over the first one's running VM's and redefined it.
    The target name is held while a migration goes there; released when it ends."""
    if await power(conn, VM) != "running":
        await conn.call((await conn.lookup(VM)).create, timeout=60)
    await create_vm(conn, OTHER, vm.directory, [MiB])
    first = await hs.post("/jobs/submit", json=submission(VM, TWIN, target_dir))
    assert first.status_code == 201, first.text
    second = await hs.post("/jobs/submit", json=submission(OTHER, TWIN, target_dir))
    assert second.status_code == 409, second.text
    error = second.json()["error"]
    assert error.startswith(f"options.vm_name: vm {TWIN} on server remote"), error
    assert first.json()["job_id"] in error, error
    await hs.post("/jobs/cancel", json={"job_ids": [first.json()["job_id"]]})
    job, _ = await follow(hs, first.json()["job_id"])
    assert job["status"] == "cancelled", job
    # Released with the job's end: the name can be migrated to again.
    again = await hs.post("/jobs/submit", json=submission(OTHER, TWIN, target_dir))
    assert again.status_code == 201, again.text
    await hs.post("/jobs/cancel", json={"job_ids": [again.json()["job_id"]]})
    job, _ = await follow(hs, again.json()["job_id"])
    assert job["status"] == "cancelled", job
    assert await power(conn, VM) == "running"
    with pytest.raises(NotFound):
        await get_domain(conn, TWIN)
    await remove_vm(conn, OTHER)


async def test_a_migration_whose_orchestrator_stopped_is_undone(
    hs: httpx.AsyncClient, system: System, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    """The orchestrator stops while the job syncs; the one started again takes the job
    over from its record: the libvirt job ended, the checkpoints dropped, the target
    clean, the source running."""
    assert await power(conn, VM) == "running"
    before = await checkpoints_of(conn, VM)
    resp = await hs.post("/jobs/submit", json=submission(VM, ORPHANED, target_dir))
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 60
    while (await hs.get(f"/jobs/{job_id}")).json()["progress"]["stage"] != "syncing":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    system.stop("job-orchestrator")  # SIGTERM: it gives up the job's lease
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
    assert await power(conn, VM) == "running"
    assert await checkpoints_of(conn, VM) == before
    with pytest.raises(NotFound):
        await get_domain(conn, ORPHANED)
    assert target_files(target_dir, ORPHANED) == []


async def test_an_orchestrator_stopped_in_the_cutover_stops_the_delta_exports(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    system: System,
    vm: SmallVm,
    conn: Connection,
    target_dir: Path,
) -> None:
    """The orchestrator stops while the last delta's ``qemu-nbd`` exports are up (debug
    fault ``cutover_stall``: after the delta is copied); the one started again ends the
    job from its record: the exports stopped, the checkpoints dropped (the image is free
    again), the target clean, and the source started again."""
    assert await power(conn, VM) == "running"
    before = await checkpoints_of(conn, VM)
    body = submission(VM, STALLED, target_dir, debug_fault="cutover_stall")
    resp = await hs.post("/jobs/submit", json=body)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 90
    while not (await api.get(f"/jobs/{job_id}")).json().get("result", {}).get("stalled"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert await power(conn, VM) == "shutoff"
    assert bitmap_exports_of(vm.disks[0]) != []  # the delta's exports are up
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
    assert job["status"] == "failed" and "started again" in job["error"], job
    assert await power(conn, VM) == "running"
    assert bitmap_exports_of(vm.disks[0]) == []
    assert list(Path("/tmp").glob(f"vbdelta-{await uuid_of(conn, VM)}.*")) == []
    assert await checkpoints_of(conn, VM) == before
    with pytest.raises(NotFound):
        await get_domain(conn, STALLED)
    assert target_files(target_dir, STALLED) == []


async def test_a_uefi_vm_takes_its_variable_store_along(
    hs: httpx.AsyncClient, conn: Connection, vm_dir: Path, target_dir: Path
) -> None:
    """The source's NVRAM, final once it is stopped, is the target's, under the name the
    target's domain gives it."""
    uefi = await create_uefi_vm(conn, UEFI, vm_dir, [16 * MiB], tpm=False)
    try:
        assert uefi.nvram is not None
        resp = await hs.post("/jobs/submit", json=submission(UEFI, UEFI_MOVED, target_dir))
        assert resp.status_code == 201, resp.text
        job, _ = await follow(hs, resp.json()["job_id"])
        assert job["status"] == "completed", job
        assert "UEFI variable store" in job["message"], job
        root = ET.fromstring(await domain_xml(conn, UEFI_MOVED, inactive=True))
        moved_nvram = Path(root.findtext("./os/nvram") or "")
        assert moved_nvram != uefi.nvram and moved_nvram.name.startswith(UEFI_MOVED)
        assert moved_nvram.read_bytes() == uefi.nvram.read_bytes()
        assert await power(conn, UEFI_MOVED) == "running"
    finally:
        for name in (UEFI, UEFI_MOVED):
            await remove_vm(conn, name)


def remote_uri(remote: SshdServer, path: str = "/system") -> str:
    """Server ``remote``'s SSH settings as a libvirt URI."""
    return f"qemu+ssh://{remote.username}@{remote.host}:{remote.port}{path}"


async def test_a_libvirt_uri_must_name_a_configured_server(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    vm: SmallVm,
    remote: SshdServer,
    target_dir: Path,
) -> None:
    before = await job_count(hs)

    async def refused(destination: dict[str, Any], needle: str) -> None:
        body = {**submission(VM, URI_MOVED, target_dir), "destination": destination}
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error.startswith("destination.libvirt_uri: ") and needle in error, error

    unknown = f"qemu+ssh://root@{remote.host}:{remote.port + 1}/system"
    await refused({"type": "kvm", "libvirt_uri": unknown}, "add the server")
    await refused({"type": "kvm", "libvirt_uri": "qemu+ssh://elsewhere/system"}, "add the server")
    # qemu:///system is this host: server local, the source.
    await refused({"type": "kvm", "libvirt_uri": "qemu:///system"}, "the source server")
    both = {"type": "kvm", "server_id": "remote", "libvirt_uri": "qemu:///system"}
    await refused(both, "not destination.server_id 'remote'")
    keyfile = {"type": "kvm", "libvirt_uri": remote_uri(remote) + "?keyfile=/root/.ssh/id"}
    await refused(keyfile, "parameters")
    # The native API's targetLibvirtUri is the same field.
    native = {"serverId": "local", "vmName": VM, "targetVmName": URI_MOVED,
              "targetLibvirtUri": f"qemu+ssh://nobody@{remote.host}:{remote.port}/system",
              "targetDirectory": str(target_dir)}  # fmt: skip
    resp = await api.post("/api/v1/migrations", json=native)
    assert resp.status_code == 400 and "destination.libvirt_uri" in resp.text, resp.text
    assert await job_count(hs) == before
    assert target_files(target_dir, URI_MOVED) == []


async def test_remove_source_and_its_disks_once_the_vm_runs_on_the_target(
    hs: httpx.AsyncClient, conn: Connection, vm_dir: Path, target_dir: Path, remote: SshdServer
) -> None:
    """Given by its libvirt URI, the target is server ``remote``; once the VM runs there
    the source is undefined with its NVRAM file and TPM state, and its images deleted,
    except one another VM names and one another VM's image is built on; the backing
    file below its first image is kept, and listed as kept."""
    source = await create_uefi_vm(conn, REMOVED, vm_dir, [16 * MiB] * 3, tpm=True, start=False)
    base = vm_dir / f"{REMOVED}-base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(base), str(source.disks[0])],
        check=True, capture_output=True,
    )  # fmt: skip
    await conn.call((await conn.lookup(REMOVED)).create, timeout=60)
    assert source.nvram is not None
    tpm_state = Path("/var/lib/libvirt/swtpm") / (await get_domain(conn, REMOVED)).uuid
    assert tpm_state.exists()
    # Another (defined, stopped) VM names the second image: it is not the source's alone.
    await define_domain(conn, build_vm_xml(SHARER, [source.disks[1]]))
    # And another's image is an overlay on the third: the XML of a stopped VM does not
    # show backing files, the image does.
    overlay = vm_dir / f"{OVERLAID}-vda.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(source.disks[2]),
         str(overlay)],
        check=True, capture_output=True,
    )  # fmt: skip
    await define_domain(conn, build_vm_xml(OVERLAID, [overlay]))
    try:
        destination = {"type": "kvm", "server_id": "remote", "libvirt_uri": remote_uri(remote)}
        body = {
            **submission(REMOVED, REMOVED_MOVED, target_dir, remove_source=True),
            "destination": destination,
        }
        body["options"]["remove_source_disks"] = True
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 201, resp.text
        job, _ = await follow(hs, resp.json()["job_id"])
        assert job["status"] == "completed", job
        assert job["definition"]["destination"] == destination
        assert await power(conn, REMOVED_MOVED) == "running"
        with pytest.raises(NotFound):
            await get_domain(conn, REMOVED)
        assert not source.disks[0].exists()
        assert base.exists()  # below it: never deleted, and said so
        kept = f"{base}: the backing file of {source.disks[0]}: backing files are never deleted"
        assert kept in job["message"], job
        assert "3 kept" in job["message"], job
        assert source.disks[1].exists()  # SHARER's
        assert source.disks[2].exists()  # below OVERLAID's image
        assert f"{source.disks[2]}: vm {OVERLAID} uses it too" in job["message"], job
        assert not source.nvram.exists()
        assert not tpm_state.exists()
        assert f"the source vm {REMOVED} was undefined" in job["message"], job
        assert "1 disk image(s) deleted" in job["message"], job
        assert f"vm {SHARER} uses it too" in job["message"], job
        assert (target_dir / f"{REMOVED_MOVED}-vda.qcow2").exists()
    finally:
        for name in (REMOVED, REMOVED_MOVED, SHARER, OVERLAID):
            await remove_vm(conn, name)
