"""A UEFI VM's firmware and TPM state through backup, destroy and restore (agent API, real
libvirtd, QEMU with OVMF under TCG, swtpm). The tests in this module build on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
from harness import System, local_config, running_system, wait_job

from virtbackup.repository.format import chunk_key
from virtbackup.testing.vms import (
    OVMF_VARS,
    SmallVm,
    build_uefi_vm_xml,
    create_uefi_vm,
    remove_vm,
    vm_directory,
)
from virtbackup.virt import Connection, NotFound

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-fw-{os.getpid()}"
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")

State = dict[str, tuple[str, str, str, str]]


def _needs_firmware() -> None:
    if not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() or not shutil.which("swtpm_setup"):
        pytest.skip("needs Debian's ovmf and swtpm-tools (dev.py installs them)")


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    _needs_firmware()
    with running_system(tmp_path_factory.mktemp("fw"), workers=1, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    _needs_firmware()
    directory = vm_directory()
    small = await create_uefi_vm(conn, VM, directory, [64 * MiB])
    try:
        yield small
    finally:
        await remove_vm(conn, VM, delete_directory=directory)


@pytest.fixture(scope="module")
async def api(fw: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=fw.url, headers=fw.auth(), verify=False, timeout=60
    ) as client:
        assert (await client.post("/config", json=local_config(repo_dir))).status_code == 200
        yield client


async def _uuid(conn: Connection) -> str:
    dom = await conn.lookup(VM)
    return str(await conn.call(dom.UUIDString))


def _entry(path: Path) -> tuple[str, str, str, str]:
    st = path.lstat()
    digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest, f"{st.st_mode & 0o7777:04o}", path.owner(), path.group()


def state_of(vm: SmallVm, uuid: str) -> State:
    """The NVRAM file and every entry of the TPM state directory: content hash (or
    ``dir``), mode, owner and group."""
    assert vm.nvram is not None
    out: State = {}
    if vm.nvram.exists():
        out["nvram"] = _entry(vm.nvram)
    tpm = SWTPM_DIR / uuid
    if tpm.exists():
        for path in [tpm, *sorted(tpm.rglob("*"))]:
            out[f"tpm/{path.relative_to(tpm)}"] = _entry(path)
    return out


async def settled_state(vm: SmallVm, uuid: str, timeout: float = 180) -> State:
    """The state once OVMF has written its variables (the store is no longer the
    template) and the TPM its first state: then the same for 8 s in a row."""
    template = hashlib.sha256(OVMF_VARS.read_bytes()).hexdigest()
    deadline = time.monotonic() + timeout
    last: State = {}
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = state_of(vm, uuid)
        written = now.get("nvram", (template,))[0] != template
        if now != last or not written or "tpm/tpm2/tpm2-00.permall" not in now:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 8:
            return now
        await asyncio.sleep(0.5)
    raise AssertionError(f"the firmware state did not settle: {last}")


async def power(api: httpx.AsyncClient, action: str) -> None:
    resp = await api.post("/servers/local/actions", json={"action": action, "vmName": VM})
    assert resp.status_code == 200, resp.text


async def restore(api: httpx.AsyncClient, xml_path: str) -> dict[str, Any]:
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=180)
    assert job["state"] == "success", job
    return job


async def wait_running(conn: Connection, seconds: float = 5) -> None:
    """The VM runs, and is still running (not paused by an error) ``seconds`` later."""
    await asyncio.sleep(seconds)
    dom = await conn.lookup(VM)
    state, _ = await conn.call(dom.state, 0)
    assert state == libvirt.VIR_DOMAIN_RUNNING


STATE: dict[str, Any] = {}


@pytest.mark.timeout(600)
async def test_nvram_and_tpm_state_come_back_byte_for_byte(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, repo_dir: Path
) -> None:
    uuid = await _uuid(conn)
    at_begin = await settled_state(vm, uuid)
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=180)
    assert job["state"] == "success", job
    # The firmware was idle: what the backup read at its begin is what is there now.
    assert state_of(vm, uuid) == at_begin

    [entry] = [e for e in (await api.get("/restore/entries")).json() if e["vmName"] == VM]
    point_dir = repo_dir / "VirtBackup" / Path(entry["xmlPath"]).parent
    record = json.loads((point_dir / "backup.json").read_text())
    files = {(f["role"], f["relative"]): f for f in record["files"]}
    assert vm.nvram is not None
    assert files[("nvram", "")]["path"] == str(vm.nvram)
    assert files[("nvram", "")]["size"] == vm.nvram.stat().st_size
    assert files[("tpm", "")]["path"] == str(SWTPM_DIR / uuid)
    assert files[("tpm", "tpm2/tpm2-00.permall")]["owner"] == "tss"
    for f in record["files"]:
        for chunk in f["chunks"]:
            assert (repo_dir / "VirtBackup" / chunk_key(chunk)).exists()

    # Destroy the VM and everything of it but the disks: definition, NVRAM, TPM state.
    await power(api, "forceOff")
    dom = await conn.lookup(VM)
    await conn.call(
        dom.undefineFlags,
        libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM,
    )
    vm.nvram.unlink()
    shutil.rmtree(SWTPM_DIR / uuid)
    assert state_of(vm, uuid) == {}

    job = await restore(api, entry["xmlPath"])
    assert await _uuid(conn) == uuid
    assert state_of(vm, uuid) == at_begin, job["message"]
    assert not list(vm.nvram.parent.glob(f"{vm.nvram.name}.vb*"))  # no temporary left
    assert not list(SWTPM_DIR.glob(f"{uuid}.vb*"))

    await power(api, "start")
    await wait_running(conn)
    STATE.update(uuid=uuid, entry=entry, point_dir=point_dir, at_begin=at_begin)


@pytest.mark.timeout(300)
async def test_a_point_without_state_files_restores_and_keeps_the_state_there(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, repo_dir: Path
) -> None:
    """A point made before state files were backed up (no ``files`` in backup.json)
    restores its disks and domain, and leaves the VM's NVRAM and TPM state as they are:
    a restore never deletes state it cannot put back."""
    if not STATE:
        pytest.skip("needs the point of the test before")
    uuid, point_dir = STATE["uuid"], STATE["point_dir"]
    old_dir = point_dir.parent / "2020-01-01T00-00-00"
    shutil.copytree(point_dir, old_dir)
    record = json.loads((old_dir / "backup.json").read_text())
    del record["files"]
    record["timestamp"] = old_dir.name
    for disk in record["disks"]:
        disk["manifest"] = disk["manifest"].replace(point_dir.name, old_dir.name)
    (old_dir / "backup.json").write_text(json.dumps(record))

    await power(api, "forceOff")
    before = state_of(vm, uuid)
    assert "nvram" in before and "tpm/tpm2/tpm2-00.permall" in before
    await restore(api, f"vms/{VM}/{old_dir.name}/domain.xml")
    assert state_of(vm, uuid) == before
    await power(api, "start")
    await wait_running(conn)


async def test_sanity_checks_the_state_files_chunks(api: httpx.AsyncClient, repo_dir: Path) -> None:
    if not STATE:
        pytest.skip("needs the point of the first test")
    xml_path = STATE["entry"]["xmlPath"]
    record = json.loads((STATE["point_dir"] / "backup.json").read_text())
    [nvram] = [f for f in record["files"] if f["role"] == "nvram"]
    chunk = repo_dir / "VirtBackup" / chunk_key(nvram["chunks"][0])
    saved = chunk.read_bytes()
    chunk.unlink()
    try:
        resp = await api.post("/restore/sanity", json={"xmlPath": xml_path})
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "failure", job
        [damaged] = job["result"]["damaged"]
        assert (damaged["id"], damaged["disks"]) == (chunk.name, ["nvram"])
    finally:
        chunk.write_bytes(saved)
    resp = await api.post("/restore/sanity", json={"xmlPath": xml_path})
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job


@pytest.mark.timeout(400)
async def test_a_copy_under_a_new_name_gets_its_own_state_and_the_original_keeps_its(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    """A restore beside the original (``vmName``) puts the point's NVRAM and TPM state
    where the copy's domain keeps them (its renamed NVRAM file, the swtpm directory of its
    new UUID), and never touches the original's."""
    if not STATE:
        pytest.skip("needs the point of the first test")
    uuid, entry = STATE["uuid"], STATE["entry"]
    await power(api, "forceOff")
    original = state_of(vm, uuid)
    at_begin = STATE["at_begin"]
    copy = f"{VM}-copy"
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": entry["xmlPath"], "decision": "overwrite", "destinationId": "fs",
              "vmName": copy},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    try:
        job = await wait_job(api, resp.json()["jobId"], timeout=240)
        assert job["state"] == "success", job
        dom = await conn.lookup(copy)
        copy_uuid = str(await conn.call(dom.UUIDString))
        assert copy_uuid != uuid
        assert vm.nvram is not None
        copy_nvram = vm.nvram.parent / vm.nvram.name.replace(VM, copy, 1)
        assert copy_nvram != vm.nvram
        copied = state_of(SmallVm(copy, vm.directory, (), nvram=copy_nvram), copy_uuid)
        assert copied == at_begin  # the point's state, byte for byte, owner and mode
        assert state_of(vm, uuid) == original  # the original's untouched
        resp = await api.post("/servers/local/actions", json={"action": "start", "vmName": copy})
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(5)
        state, _ = await conn.call(dom.state, 0)
        assert state == libvirt.VIR_DOMAIN_RUNNING

        # Restored over by name, the copy keeps its UUID: its own TPM state is the one
        # replaced by the point's (none left behind under another UUID).
        resp = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": copy})
        assert resp.status_code == 200, resp.text
        resp = await api.post(
            "/servers/local/restore/start",
            json={"xmlPath": entry["xmlPath"], "decision": "overwrite", "vmName": copy},
        )
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"], timeout=240)
        assert job["state"] == "success", job
        assert str(await conn.call((await conn.lookup(copy)).UUIDString)) == copy_uuid
        assert state_of(SmallVm(copy, vm.directory, (), nvram=copy_nvram), copy_uuid) == at_begin
        job_uuid = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"virtbackup:restore:{job['id']}")
        assert not (SWTPM_DIR / str(job_uuid)).exists()
        assert not list(SWTPM_DIR.glob(f"{copy_uuid}.vb*"))
        assert "state put back" in job["message"], job["message"]
    finally:
        with contextlib.suppress(Exception):
            await remove_vm(conn, copy)
        for leftover in vm.directory.glob(f"*{copy}*"):
            leftover.unlink(missing_ok=True)


async def test_a_copy_never_writes_over_another_vms_nvram(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    """The NVRAM file a copy would get is another VM's (or a file no VM claims): 409
    before a job exists, naming that VM (or the file), and the file is untouched, as
    for disk files."""
    if not STATE:
        pytest.skip("needs the point of the first test")
    copy, victim = f"{VM}-shared", f"{VM}-nvvictim"
    assert vm.nvram is not None
    shared = vm.nvram.parent / vm.nvram.name.replace(VM, copy, 1)
    xml = build_uefi_vm_xml(victim, [], nvram=shared, tpm=False)
    await conn.call(conn.raw.defineXML, xml)
    shared.write_bytes(b"the victim's variables")
    body = {"xmlPath": STATE["entry"]["xmlPath"], "decision": "overwrite", "vmName": copy}
    try:
        resp = await api.post("/servers/local/restore/start", json=body)
        assert resp.status_code == 409, resp.text
        assert victim in resp.json()["error"] and str(shared) in resp.json()["error"]
        await remove_vm(conn, victim)
        shared.write_bytes(b"nobody's variables")
        resp = await api.post("/servers/local/restore/start", json=body)
        assert resp.status_code == 409, resp.text
        assert "not state of" in resp.json()["error"], resp.text
        assert shared.read_bytes() == b"nobody's variables"
    finally:
        await remove_vm(conn, victim)
        shared.unlink(missing_ok=True)
    with pytest.raises(NotFound):
        await conn.lookup(copy)


@pytest.mark.timeout(300)
async def test_define_puts_back_missing_state_and_never_replaces_state(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    """``define`` after the VM was undefined with its NVRAM and TPM state: the point's
    state comes back where it is missing, and the job says so; defined again, the state
    that is there is left as it is, and the job says that."""
    if not STATE:
        pytest.skip("needs the point of the first test")
    uuid, xml_path = STATE["uuid"], STATE["entry"]["xmlPath"]
    resp = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert resp.status_code in {200, 409}, resp.text
    dom = await conn.lookup(VM)
    await conn.call(
        dom.undefineFlags,
        libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        | libvirt.VIR_DOMAIN_UNDEFINE_TPM
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
    )
    assert state_of(vm, uuid) == {}
    body = {"xmlPath": xml_path, "decision": "define"}
    resp = await api.post("/servers/local/restore/start", json=body)
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=120)
    assert job["state"] == "success", job
    assert "state put back: the UEFI variable store, the TPM state" in job["message"], job
    assert await _uuid(conn) == uuid
    assert state_of(vm, uuid) == STATE["at_begin"]

    assert vm.nvram is not None
    vm.nvram.write_bytes(vm.nvram.read_bytes()[::-1])  # changed since the point
    changed = state_of(vm, uuid)
    resp = await api.post("/servers/local/restore/start", json=body)
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=120)
    assert job["state"] == "success", job
    assert "left as it was" in job["message"], job["message"]
    assert state_of(vm, uuid) == changed


@pytest.mark.timeout(300)
async def test_a_remote_agents_backup_saves_the_state_files_too(
    vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A remote agent (``virtbackup agent``, here its backup run without the process)
    saves the VM's NVRAM and TPM state with the point, as the bus path does: the same
    records, and bytes that are the files' as they were."""
    from virtbackup.cli.agent.backup import run_backup
    from virtbackup.contracts.v1.config import Destination
    from virtbackup.repository.destinations import open_repository

    uuid = await _uuid(conn)
    at_begin = await settled_state(vm, uuid)
    home = tmp_path_factory.mktemp("agent-fw")
    home.chmod(0o700)
    (home / "r").mkdir(mode=0o700)
    dest = Destination(id="agentfw", driver_id="filesystem", params={"path": str(home / "r")})
    scratch = vm_directory(prefix="vbtest-agentfw-scratch-")  # QEMU must traverse it

    async def report(body: dict[str, Any]) -> dict[str, Any]:
        return {"cancel": False, "commit": body["status"] == "committing"}

    job = {"id": f"agentfw-{os.getpid()}", "vmName": VM, "serverId": "remote", "fresh": True}
    try:
        message = await run_backup(job, dest, report, scratch_dir=str(scratch))
        assert message.startswith("full backup"), message
        assert not list(scratch.glob("vbstate-*"))  # the copies are removed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    async with await open_repository(dest) as repo:
        [point] = await repo.restore_points(VM)
        files = {(f.role, f.relative): f for f in point.files}
        assert vm.nvram is not None
        nvram = files[("nvram", "")]
        assert nvram.path == str(vm.nvram) and nvram.kind == "file"
        data = await repo.load_bytes(nvram.chunks, nvram.size)
        assert hashlib.sha256(data).hexdigest() == at_begin["nvram"][0]
        assert nvram.mode == at_begin["nvram"][1]
        assert files[("tpm", "")].path == str(SWTPM_DIR / uuid)
        permall = files[("tpm", "tpm2/tpm2-00.permall")]
        assert permall.owner == "tss"
        data = await repo.load_bytes(permall.chunks, permall.size)
        assert hashlib.sha256(data).hexdigest() == at_begin["tpm/tpm2/tpm2-00.permall"][0]
