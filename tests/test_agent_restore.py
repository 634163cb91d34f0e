"""Restores onto a remote agent's host: the point of a backup made by the agent is
restored by the same agent (leased as its backups are), under a new name into a
directory of the server's ``restoreDirectories``, bit-identical; a directory outside
them is a 400 naming ``targetDirectory`` that creates nothing; a cancelled restore
leaves nothing behind. Real nats-server, services, libvirt/QEMU and the agent process
(the fixtures of ``test_remote_agents``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import same, snapshot, wait_job
from test_remote_agents import (  # noqa: F401 - fixtures, used by name
    VM,
    agent,
    agent_backup,
    api,
    start_process,
    sysm,
    vm,
    wait_agent_seen,
)

from virtbackup.testing.vms import (
    NVRAM_DIR,
    SmallVm,
    create_uefi_vm,
    guest_write,
    remove_vm,
    vm_directory,
)
from virtbackup.virt import Connection, get_domain
from virtbackup.virt.domains import domain_xml, undefine_domain
from virtbackup.virt.errors import NotFound as VirtNotFound

pytestmark = pytest.mark.libvirt

COPY = f"{VM}-copy"
CANCELLED = f"{VM}-gone"
FW = f"vbt-agent-fw-{os.getpid()}"
FW_COPY = f"{FW}-copy"
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")
MiB = 1 << 20


@pytest.fixture(scope="module")
async def restore_dir(conn: Connection) -> AsyncIterator[Path]:
    """A directory to restore into; emptied, and the copies undefined, at the end
    (whatever a failed test left)."""
    path = vm_directory(prefix="vbtest-agent-restore-")
    try:
        yield path
    finally:
        for name in (COPY, CANCELLED, FW_COPY):
            await remove_vm(conn, name)
        shutil.rmtree(path, ignore_errors=True)


async def allow(client: httpx.AsyncClient, directory: Path) -> None:
    """Server ``remote`` may restore into ``directory`` only."""
    cfg = (await client.get("/config")).json()
    for server in cfg["servers"]:
        if server["id"] == "remote":
            server["restoreDirectories"] = [str(directory)]
    resp = await client.post("/config", json=cfg)
    assert resp.status_code == 200, resp.text


async def undefine(conn: Connection, name: str) -> None:
    with contextlib.suppress(VirtNotFound):
        await undefine_domain(conn, name)


async def test_a_copy_restored_by_the_agent_is_bit_identical(
    api: httpx.AsyncClient,  # noqa: F811
    agent: dict[str, Any],  # noqa: F811
    vm: SmallVm,  # noqa: F811
    conn: Connection,
    restore_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await wait_agent_seen(api, agent["agentId"])
    await allow(api, restore_dir)
    job = await agent_backup(api, agent)
    snap = snapshot(vm, tmp_path_factory.mktemp("agent-restore"))[0]
    xml_path = f"vms/{VM}/{job['result']['timestamp']}/domain.xml"

    # Outside restoreDirectories: a 400 naming the field; no job, nothing written.
    outside = vm_directory(prefix="vbtest-agent-outside-")
    try:
        before = (await api.get("/jobs")).json()
        resp = await api.post(
            "/servers/remote/restore/start",
            json={"xmlPath": xml_path, "decision": "overwrite", "vmName": COPY,
                  "targetDirectory": str(outside), "destinationId": "fs"},
        )  # fmt: skip
        assert resp.status_code == 400, resp.text
        assert "targetDirectory" in resp.json()["error"], resp.text
        assert "restoreDirectories" in resp.json()["error"], resp.text
        assert (await api.get("/jobs")).json() == before
        assert os.listdir(outside) == []
        with pytest.raises(VirtNotFound):
            await get_domain(conn, COPY)
        # The precheck refuses the same; what only the host can tell, its agent checks.
        resp = await api.post(
            "/servers/remote/restore/precheck",
            json={"xmlPath": xml_path, "vmName": COPY, "targetDirectory": str(outside),
                  "destinationId": "fs"},
        )  # fmt: skip
        assert resp.status_code == 400 and "targetDirectory" in resp.json()["error"], resp.text
        resp = await api.post(
            "/servers/remote/restore/precheck",
            json={"xmlPath": xml_path, "vmName": COPY, "targetDirectory": str(restore_dir),
                  "destinationId": "fs"},
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"vmExists": False, "canDefineOnly": False}, resp.text
    finally:
        shutil.rmtree(outside, ignore_errors=True)

    # A copy under a new name, into the allowed directory, through the agent.
    resp = await api.post(
        "/servers/remote/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "vmName": COPY,
              "targetDirectory": str(restore_dir), "destinationId": "fs"},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    try:
        restored = await wait_job(api, resp.json()["jobId"])
        assert restored["state"] == "success", (
            restored["message"],
            agent["log"].read_text()[-3000:],
        )
        assert restored["params"]["agentId"] == agent["agentId"]
        assert "by agent" in restored["message"] and f"as {COPY}" in restored["message"]
        stages = [s["stage"] for s in restored["result"]["agent"]["stages"]]
        assert stages[:1] == ["leased"] and "writing" in stages and "committing" in stages, stages
        files = sorted(os.listdir(restore_dir))
        assert len(files) == 1 and COPY in files[0], files  # no temporary left
        image = restore_dir / files[0]
        assert image.stat().st_mode & 0o077 == 0, oct(image.stat().st_mode)
        assert same(image, snap)
        # The copy is defined with its disk there, a new name, UUID and MAC address.
        copy = await get_domain(conn, COPY)
        original = await get_domain(conn, VM)
        assert copy.uuid != original.uuid
        copy_xml = await domain_xml(conn, COPY, inactive=True)
        assert str(image) in copy_xml and str(vm.disks[0]) not in copy_xml
        original_xml = await domain_xml(conn, VM, inactive=True)
        macs = {line.strip() for line in original_xml.splitlines() if "<mac " in line}
        assert not any(mac in copy_xml for mac in macs)
        assert same(vm.disks[0], snap)  # the original is as it was
    finally:
        await undefine(conn, COPY)
        for name in os.listdir(restore_dir):
            os.unlink(restore_dir / name)

    # A cancelled restore (mid-write: the agent holds before it commits) leaves nothing.
    resp = await api.post(
        "/servers/remote/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "vmName": CANCELLED,
              "targetDirectory": str(restore_dir), "destinationId": "fs"},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 60
    while not os.listdir(restore_dir):  # the agent writes beside the final path
        assert time.monotonic() < deadline, agent["log"].read_text()[-3000:]
        await asyncio.sleep(0.1)
    assert all(".vbrestore-" in name for name in os.listdir(restore_dir))
    resp = await api.post(f"/jobs/{job_id}/cancel", json={})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, job_id)
    assert job["state"] == "canceled", job
    deadline = time.monotonic() + 30
    while os.listdir(restore_dir):
        assert time.monotonic() < deadline, os.listdir(restore_dir)
        await asyncio.sleep(0.2)
    with pytest.raises(VirtNotFound):
        await get_domain(conn, CANCELLED)


async def test_a_running_vm_is_not_overwritten_and_a_killed_restore_is_cleaned_up(
    api: httpx.AsyncClient,  # noqa: F811
    agent: dict[str, Any],  # noqa: F811
    vm: SmallVm,  # noqa: F811
    conn: Connection,
    restore_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await allow(api, restore_dir)
    points = (await api.get("/restore/entries", params={"destinationId": "fs"})).json()
    xml_path = next(p["xmlPath"] for p in points if p["vmName"] == VM)  # the newest
    assert (await get_domain(conn, VM)).id is not None  # running
    snap = snapshot(vm, tmp_path_factory.mktemp("agent-in-place"))[0]  # as backed up
    await guest_write(conn, VM, "vda", 8 * MiB, MiB, pattern=0x3D)
    assert not same(vm.disks[0], snap)

    # Over the running VM itself: a 409 (the agent's heartbeat says it runs), as on the
    # bus path; no job, nothing written. The precheck says it exists and runs.
    before = sorted(os.listdir(vm.disks[0].parent))
    jobs = (await api.get("/jobs")).json()
    resp = await api.post(
        "/servers/remote/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 409, resp.text
    assert f"vm {VM} is running" in resp.json()["error"], resp.text
    assert (await api.get("/jobs")).json() == jobs
    assert sorted(os.listdir(vm.disks[0].parent)) == before
    resp = await api.post(
        "/servers/remote/restore/precheck", json={"xmlPath": xml_path, "destinationId": "fs"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"vmExists": True, "canDefineOnly": False}, resp.text
    # A new name that exists is replaced only by overwrite.
    resp = await api.post(
        "/servers/remote/restore/start",
        json={"xmlPath": xml_path, "decision": "define", "vmName": VM, "destinationId": "fs"},
    )
    assert resp.status_code == 409 and "already exists" in resp.json()["error"], resp.text

    # Killed mid-restore: what it created is removed when it starts again.
    resp = await api.post(
        "/servers/remote/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "vmName": CANCELLED,
              "targetDirectory": str(restore_dir), "destinationId": "fs"},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 60
    while not os.listdir(restore_dir):
        assert time.monotonic() < deadline, agent["log"].read_text()[-3000:]
        await asyncio.sleep(0.1)
    killed = agent["procs"][-1]
    killed.kill()  # SIGKILL: no cleanup of its own
    killed.wait(10)
    assert os.listdir(restore_dir)  # left behind
    again = start_process(agent["cmd"], agent["env"], agent["log"])  # reads its key file
    agent["procs"].append(again)
    job = await wait_job(api, job_id, timeout=60)
    assert job["state"] == "failure", job
    assert "the agent stopped during the restore" in job["message"], job
    assert os.listdir(restore_dir) == []
    with pytest.raises(VirtNotFound):
        await get_domain(conn, CANCELLED)

    # Shut off (and so reported by a heartbeat), the VM is overwritten in place.
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code == 200, off.text
    deadline = time.monotonic() + 30
    while True:
        view = (await api.get(f"/api/v1/agents/{agent['agentId']}")).json()
        if any(d["name"] == VM and d["state"] == "shutoff" for d in view["discoveredDomains"]):
            break
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.3)
    uuid = (await get_domain(conn, VM)).uuid
    resp = await api.post(
        "/servers/remote/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", (job["message"], agent["log"].read_text()[-3000:])
    assert same(vm.disks[0], snap)
    assert (await get_domain(conn, VM)).uuid == uuid  # the same domain, redefined
    assert sorted(os.listdir(vm.disks[0].parent)) == before  # no temporary left
    on = await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    assert on.status_code == 200, on.text


def _tree(root: Path) -> dict[str, str]:
    """Each entry below ``root``: its content's hash (``dir`` for a directory) and mode."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = f"{digest} {path.stat().st_mode & 0o7777:04o}"
    return out


async def test_a_copy_gets_the_points_nvram_and_tpm_state(
    api: httpx.AsyncClient,  # noqa: F811
    agent: dict[str, Any],  # noqa: F811
    conn: Connection,
    restore_dir: Path,
) -> None:
    if not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() or not shutil.which("swtpm_setup"):
        pytest.skip("needs Debian's ovmf and swtpm-tools (dev.py installs them)")
    await allow(api, restore_dir)
    directory = vm_directory()
    # Shut off: the agent backs it up offline (started paused: libvirt makes its NVRAM
    # from the template and swtpm its state), with the state files.
    fw = await create_uefi_vm(conn, FW, directory, [16 << 20], start=False)
    try:
        resp = await api.post("/servers/remote/backup", json={"vmName": FW})
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "success", (job["message"], agent["log"].read_text()[-3000:])
        assert fw.nvram is not None and fw.nvram.exists()
        uuid = (await get_domain(conn, FW)).uuid
        nvram = hashlib.sha256(fw.nvram.read_bytes()).hexdigest()
        tpm = _tree(SWTPM_DIR / uuid)
        assert any(name.endswith(".permall") for name in tpm), tpm

        resp = await api.post(
            "/servers/remote/restore/start",
            json={"xmlPath": f"vms/{FW}/{job['result']['timestamp']}/domain.xml",
                  "decision": "overwrite", "vmName": FW_COPY,
                  "targetDirectory": str(restore_dir), "destinationId": "fs"},
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
        restored = await wait_job(api, resp.json()["jobId"])
        assert restored["state"] == "success", (
            restored["message"],
            agent["log"].read_text()[-3000:],
        )
        assert "state put back" in restored["message"], restored["message"]
        copy_uuid = (await get_domain(conn, FW_COPY)).uuid
        assert copy_uuid != uuid
        copy_xml = await domain_xml(conn, FW_COPY, inactive=True)
        copy_nvram = NVRAM_DIR / f"{FW_COPY}_VARS.fd"
        assert str(copy_nvram) in copy_xml, copy_xml
        assert hashlib.sha256(copy_nvram.read_bytes()).hexdigest() == nvram
        assert _tree(SWTPM_DIR / copy_uuid) == tpm
        # Nothing staged is left beside them; the original's state is untouched.
        assert not [p for p in NVRAM_DIR.iterdir() if ".vbrestore-" in p.name]
        assert not [p for p in SWTPM_DIR.iterdir() if ".vbrestore-" in p.name]
        assert hashlib.sha256(fw.nvram.read_bytes()).hexdigest() == nvram
        assert _tree(SWTPM_DIR / uuid) == tpm
    finally:
        await remove_vm(conn, FW_COPY)
        await remove_vm(conn, FW, delete_directory=directory)
        for name in os.listdir(restore_dir):
            os.unlink(restore_dir / name)
