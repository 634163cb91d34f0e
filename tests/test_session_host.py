"""A second host that is not this machine's system libvirt: another user's
``qemu:///session`` daemon reached over SSH on loopback (``session_host``: user
``vbsess`` behind an sshd of its own, configured as server ``session`` with
``uri: qemu:///session``). A running VM migrates there from the system libvirt while its
guest writes, and runs there as that user; a VM of the session host is backed up and
restored there. Real libvirtd/QEMU (two daemons), sshd and services; the tests build on
each other, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, wait_job

from virtbackup.testing.session_host import SESSION_USER, SessionHost
from virtbackup.testing.vms import SmallVm, create_uefi_vm, create_vm, guest_write, remove_vm
from virtbackup.virt import Connection, NotFound, define_domain, domain_xml, get_domain

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PID = os.getpid()
VM = f"vbt-smig-{PID}"
MOVED = f"vbt-smigt-{PID}"
UEFI = f"vbt-suefi-{PID}"
UEFI_MOVED = f"vbt-suefit-{PID}"
LOCAL_VM = f"vbt-sloc-{PID}"
RESTORED = f"vbt-sres-{PID}"
NIC_VM = f"vbt-snic-{PID}"
NIC_MOVED = f"vbt-snict-{PID}"
#: A transient isolated network of the system libvirt (the session host has none).
NETWORK = f"vbt-snet-{PID}"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("session"), orchestrators=1, workers=2) as system:
        yield system


@pytest.fixture(scope="module")
async def session_conn(session_host: SessionHost) -> AsyncIterator[Connection]:
    """Root's own connection to the session daemon, for set-up and checks."""
    conn = await session_host.connect()
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def api(
    system: System, repo_dir: Path, session_host: SessionHost
) -> AsyncIterator[httpx.AsyncClient]:
    """The agent API with servers ``local`` and ``session`` configured, once the
    inventory has listed the session host's VMs."""
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
async def vm(conn: Connection, vm_dir: Path) -> AsyncIterator[SmallVm]:
    """A running VM of the system libvirt: one 128 MiB qcow2 disk, 96 MiB of it written."""
    made = await create_vm(conn, VM, vm_dir, [128 * MiB], start=False)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 96M", str(made.disks[0])],
        check=True,
        capture_output=True,
    )
    await conn.call((await conn.lookup(VM)).create, timeout=60)
    try:
        yield made
    finally:
        await remove_vm(conn, VM)


def qemu_user(name: str) -> str:
    """The user the QEMU process of domain ``name`` runs as ('' if none runs)."""
    found = subprocess.run(
        ["pgrep", "-f", f"guest={name},"], capture_output=True, text=True, check=False
    )
    pids = found.stdout.split()
    if not pids:
        return ""
    owner = subprocess.run(
        ["ps", "-o", "user=", "-p", pids[0]], capture_output=True, text=True, check=False
    )
    return owner.stdout.strip()


def images_same(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True
    )


async def follow(hs: httpx.AsyncClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await hs.get(f"/jobs/{job_id}")).json()
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("uri", ["qemu+ssh://127.0.0.1/session", "qemu:///embed"])
async def test_a_server_over_ssh_takes_only_the_system_or_session_uri(
    api: httpx.AsyncClient, repo_dir: Path, session_host: SessionHost, uri: str
) -> None:
    before = (await api.get("/config")).json()
    cfg = local_config(repo_dir)
    cfg["servers"].append(session_host.server_config(uri=uri))
    resp = await api.post("/config", json=cfg)
    assert resp.status_code == 400, resp.text
    assert "servers[1].uri" in resp.json()["error"], resp.text
    assert (await api.get("/config")).json() == before


async def test_the_session_host_is_a_server_of_its_own(
    api: httpx.AsyncClient, session_host: SessionHost, session_conn: Connection
) -> None:
    made = await session_host.create_vm(session_conn, LOCAL_VM, [64 * MiB])
    await api.post("/servers/session/refresh")
    names = {v["vm"]["name"] for v in (await api.get("/servers/session/vms")).json()}
    assert LOCAL_VM in names
    assert VM not in names and LOCAL_VM not in {
        v["vm"]["name"] for v in (await api.get("/servers/local/vms")).json()
    }
    assert qemu_user(LOCAL_VM) == SESSION_USER
    assert made.disks[0].stat().st_uid == session_host.user.pw_uid


async def test_migrate_a_running_vm_to_the_session_host_while_it_writes(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    session_conn: Connection,
    session_host: SessionHost,
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
            offset = (offset + 3 * MiB) % (120 * MiB)
            await asyncio.sleep(0.05)

    body = {
        "vm_path": f"local/{VM}",
        "source": {"type": "libvirt", "server_id": "local"},
        "destination": {"type": "kvm", "server_id": "session"},
        "options": {
            "vm_name": MOVED,
            "target_directory": str(session_host.images),
            "shutdown_timeout_seconds": 1,
        },
    }
    task = asyncio.create_task(writer())
    try:
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 201, resp.text
        job = await follow(hs, resp.json()["job_id"])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert job["status"] == "completed", job
    assert writes["n"] > 0
    assert str((await get_domain(conn, VM)).power_state) == "shutoff"
    assert str((await get_domain(session_conn, MOVED)).power_state) == "running"
    with pytest.raises(NotFound):
        await get_domain(conn, MOVED)  # on the session host only
    assert qemu_user(MOVED) == SESSION_USER
    record = (await api.get(f"/jobs/{job['definition']['id']}")).json()
    assert record["result"]["downtimeSeconds"] > 0, record["result"]
    moved = session_host.images / f"{MOVED}-vda.qcow2"
    xml = await domain_xml(session_conn, MOVED, inactive=True)
    assert str(moved) in xml
    st = moved.stat()
    assert st.st_uid == session_host.user.pw_uid and st.st_mode & 0o077 == 0, oct(st.st_mode)
    # The source is shut off (its writes flushed): the target's disk is the same.
    compared = images_same(vm.disks[0], moved)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert st.st_blocks * 512 < 128 * MiB  # thin


async def test_a_uefi_vm_gets_its_variable_store_in_the_users_home(
    hs: httpx.AsyncClient,
    conn: Connection,
    session_conn: Connection,
    session_host: SessionHost,
    vm_dir: Path,
) -> None:
    """The NVRAM of a system VM (libvirt-qemu's, in /var/lib/libvirt/qemu/nvram) lands
    where the session daemon keeps it: below the user's home, the user's own."""
    uefi = await create_uefi_vm(conn, UEFI, vm_dir, [16 * MiB], tpm=False)
    try:
        assert uefi.nvram is not None
        body = {
            "vm_path": f"local/{UEFI}",
            "source": {"type": "libvirt", "server_id": "local"},
            "destination": {"type": "kvm", "server_id": "session"},
            "options": {
                "vm_name": UEFI_MOVED,
                "target_directory": str(session_host.images),
                "shutdown_timeout_seconds": 1,
            },
        }
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 201, resp.text
        job = await follow(hs, resp.json()["job_id"])
        assert job["status"] == "completed", job
        assert "UEFI variable store" in job["message"], job
        root = ET.fromstring(await domain_xml(session_conn, UEFI_MOVED, inactive=True))
        nvram = Path(root.findtext("./os/nvram") or "")
        home = Path(session_host.user.pw_dir)
        assert nvram.is_relative_to(home / ".config/libvirt/qemu/nvram"), nvram
        assert nvram.read_bytes() == uefi.nvram.read_bytes()
        assert nvram.stat().st_uid == session_host.user.pw_uid
        assert str((await get_domain(session_conn, UEFI_MOVED)).power_state) == "running"
    finally:
        await remove_vm(conn, UEFI)


async def test_backup_and_restore_on_the_session_host(
    api: httpx.AsyncClient, session_conn: Connection, session_host: SessionHost
) -> None:
    await guest_write(session_conn, LOCAL_VM, "vda", 4 * MiB, 8 * MiB, pattern=0xC3)
    resp = await api.post("/servers/session/backup", json={"vmName": LOCAL_VM})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    entries = (await api.get("/restore/entries", params={"destinationId": "fs"})).json()
    mine = sorted((e for e in entries if e["vmName"] == LOCAL_VM), key=lambda e: e["timestamp"])
    assert mine and mine[-1]["sourceServerId"] == "session", mine
    # Nothing of the backup is left in the user's scratch folder.
    daemon = session_host.ensure_daemon()
    assert os.listdir(daemon.scratch_dir) == []
    body = {
        "decision": "overwrite",
        "xmlPath": mine[-1]["xmlPath"],
        "vmName": RESTORED,
        "targetDirectory": str(session_host.images),
        "start": True,
    }
    resp = await api.post("/servers/session/restore/start", json=body)
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    assert str((await get_domain(session_conn, RESTORED)).power_state) == "running"
    assert qemu_user(RESTORED) == SESSION_USER
    restored = session_host.images / f"{RESTORED}-vda.qcow2"
    st = restored.stat()
    assert st.st_uid == session_host.user.pw_uid and st.st_mode & 0o077 == 0, oct(st.st_mode)
    # The backup's source disk, as it was (the guest has not written since), is the copy.
    original = session_host.images / f"{LOCAL_VM}-vda.qcow2"
    compared = images_same(original, restored)
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.fixture
def network() -> Iterator[str]:
    """:data:`NETWORK`, started on the system libvirt (isolated: no forward, no address)."""
    xml = f"<network><name>{NETWORK}</name><bridge name='vbts{PID % 100000}'/></network>"
    subprocess.run(["virsh", "net-create", "/dev/stdin"], input=xml.encode(), check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield NETWORK
    finally:
        subprocess.run(["virsh", "net-destroy", NETWORK], capture_output=True, check=False)


async def test_a_network_the_target_lacks_is_refused_before_the_cutover(
    hs: httpx.AsyncClient,
    conn: Connection,
    session_conn: Connection,
    session_host: SessionHost,
    vm_dir: Path,
    network: str,
) -> None:
    """A running VM on a network the session host does not have, and no
    ``network_mapping`` for it: a 400 naming it, before anything is made (it used to be
    found only when the VM failed to start there, after the source's downtime, the VM
    left defined on the target)."""
    made = await create_vm(conn, NIC_VM, vm_dir, [64 * MiB], start=False)
    try:
        root = ET.fromstring(await domain_xml(conn, NIC_VM, inactive=True))
        devices = root.find("devices")
        assert devices is not None
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network=network)
        await define_domain(conn, ET.tostring(root, encoding="unicode"))
        await conn.call((await conn.lookup(NIC_VM)).create, timeout=60)
        before = sorted(session_host.images.iterdir())
        body = {
            "vm_path": f"local/{NIC_VM}",
            "source": {"type": "libvirt", "server_id": "local"},
            "destination": {"type": "kvm", "server_id": "session"},
            "options": {"vm_name": NIC_MOVED, "target_directory": str(session_host.images)},
        }
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == 400, resp.text
        assert f"options.network_mapping.{network}" in resp.json()["error"], resp.text
        # A mapping key the VM does not use (a typo of its network) is named too: the
        # real network would go unmapped.
        typo = {
            **body,
            "options": {
                "vm_name": NIC_MOVED,
                "target_directory": str(session_host.images),
                "network_mapping": {"defualt": "x"},
            },
        }
        resp = await hs.post("/jobs/submit", json=typo)
        assert resp.status_code == 400, resp.text
        assert "options.network_mapping.defualt" in resp.json()["error"], resp.text
        assert "no interface on network" in resp.json()["error"], resp.text
        assert str((await get_domain(conn, NIC_VM)).power_state) == "running"
        with pytest.raises(NotFound):
            await get_domain(session_conn, NIC_MOVED)
        assert sorted(session_host.images.iterdir()) == before
        assert made.disks[0].exists()
    finally:
        await remove_vm(conn, NIC_VM)
