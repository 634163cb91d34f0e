"""Destinations through the API: SFTP (real OpenSSH), S3 (real SeaweedFS), encryption at
rest, the SFTP test and the Google token store, and destination servers that stop in
the middle of a backup. The VM is a real libvirt/QEMU one; the tests build on each other.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
import yaml
from harness import System, running_system, same, snapshot, wait_job

from virtbackup.testing.gdrive import FakeGoogleDrive
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.sshd import SshdServer
from virtbackup.testing.vms import SmallVm, guest_write, made_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-dest-{os.getpid()}"


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshdServer]:
    server = SshdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    server = SeaweedServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def drive() -> Iterator[FakeGoogleDrive]:
    """A stand-in for Google's Drive v3 and token endpoints (Google is not reachable)."""
    with FakeGoogleDrive() as fake:
        yield fake


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory, drive: FakeGoogleDrive) -> Iterator[System]:
    api = drive.api()
    with running_system(
        tmp_path_factory.mktemp("ds"),
        VIRTBACKUP_WORK_ACK_WAIT="4",
        VIRTBACKUP_JOB_STALL_TIMEOUT="90",
        VIRTBACKUP_GDRIVE_API_BASE=api.api_base,
        VIRTBACKUP_GDRIVE_UPLOAD_BASE=api.upload_base,
        VIRTBACKUP_GOOGLE_TOKEN_URL=api.token_url,
        VIRTBACKUP_GOOGLE_CLIENT_ID=api.client_id,
        VIRTBACKUP_GOOGLE_CLIENT_SECRET=api.client_secret,
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [128 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
def fs_dir() -> Iterator[Path]:
    path = vm_directory(prefix="vbtest-encrepo-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
async def api(
    ds: System, sshd: SshdServer, seaweed: SeaweedServer, fs_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=ds.url, headers=ds.auth(), verify=False, timeout=60
    ) as client:
        cfg = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": [
                {"id": "sftp", "driverId": "sftp", "params": sshd.params(sshd.make_base("b"))},
                {"id": "s3", "driverId": "s3", "params": seaweed.params(prefix="vb")},
                {"id": "gd", "driverId": "gdrive", "params": {"rootPath": "/backups"}},
                {
                    "id": "enc",
                    "driverId": "filesystem",
                    "params": {"path": str(fs_dir)},
                    "encryption": {
                        "cipher": "chacha20-poly1305",
                        "passphrase": "correct horse battery",
                    },
                },
            ],
            "backupDestinationId": "sftp",
        }
        resp = await client.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
        yield client


async def backup(api: httpx.AsyncClient, dest: str) -> dict[str, Any]:
    resp = await api.post("/servers/local/backup", json={"vmName": VM, "destinationId": dest})
    assert resp.status_code == 200, resp.text
    return await wait_job(api, resp.json()["jobId"])


async def points(api: httpx.AsyncClient, dest: str) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": dest})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda e: e["timestamp"])


async def restore(api: httpx.AsyncClient, dest: str, xml_path: str) -> dict[str, Any]:
    await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": dest},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    return job


async def test_sftp_test_endpoint(api: httpx.AsyncClient, sshd: SshdServer) -> None:
    params = sshd.params(sshd.make_base("probe"))
    ok = await api.post("/sftp/test", json=params)
    assert ok.json() == {
        "success": True,
        "message": "SFTP connection successful (read/write OK).",
        "hostKeyFingerprint": asyncssh.import_public_key(sshd.host_key).get_fingerprint(),
    }
    # The masked password of a configured destination is looked up, not sent as is.
    masked = (await api.get("/config")).json()["destinations"][0]["params"]
    assert masked["password"] == "********"
    assert (await api.post("/sftp/test", json=masked)).json()["success"] is True
    bad = await api.post("/sftp/test", json={**params, "password": "wrong"})
    assert bad.status_code == 200
    assert bad.json()["success"] is False
    assert "SFTP test failed" in bad.json()["message"]
    invalid = await api.post("/sftp/test", json={**params, "port": "22"})
    assert invalid.status_code == 400
    assert "port" in invalid.json()["error"]
    nul = await api.post("/sftp/test", json={**params, "username": "vbtest\x00root"})
    assert nul.status_code == 400
    assert "at `$.username`" in nul.json()["error"]


async def test_sftp_host_key_is_pinned_on_first_use_and_checked(
    api: httpx.AsyncClient, sshd: SshdServer
) -> None:
    config = (await api.get("/config")).json()
    first_use = sshd.params(sshd.make_base("tofu"), hostKey="")
    config["destinations"].append({"id": "tofu", "driverId": "sftp", "params": first_use})
    assert (await api.post("/config", json=config)).status_code == 200
    config = (await api.get("/config")).json()
    stored = config["destinations"][-1]["params"]
    # Pinned when the configuration was saved: the key sshd really has, shown in GET /config.
    assert asyncssh.import_public_key(stored["hostKey"]).public_data == (
        asyncssh.import_public_key(sshd.host_key).public_data
    )
    pinned = asyncssh.import_public_key(sshd.host_key).get_fingerprint()
    assert (await api.post("/sftp/test", json=stored)).json()["hostKeyFingerprint"] == pinned

    # Another server with another host key answers at the same address (and would accept
    # the same user and password): the stored password is not sent, both keys are named.
    sshd.stop()
    impostor = SshdServer(port=sshd.port)
    try:
        impostor.start()
        presented = asyncssh.import_public_key(impostor.host_key).get_fingerprint()
        assert presented != pinned
        refused = (await api.post("/sftp/test", json=stored)).json()
        assert refused["success"] is False
        assert "does not match the pinned hostKey" in refused["message"]
        assert f"pinned {pinned}" in refused["message"]
        assert f"presented {presented}" in refused["message"]
        assert "Accepted password" not in impostor.log_path.read_text()
    finally:
        impostor.close()
        sshd.start()

    # Moving the destination with its masked password is refused; nothing is stored.
    moved = {**stored, "port": sshd.port + 1}
    config["destinations"][-1]["params"] = moved
    resp = await api.post("/config", json=config)
    assert resp.status_code == 400
    assert "give the password again: the port changed" in resp.json()["error"]
    assert (
        f"$.destinations[{len(config['destinations']) - 1}].params.password`"
        in (resp.json()["error"])
    )
    config["destinations"].pop()
    assert (await api.post("/config", json=config)).status_code == 200


async def test_google_tokens_are_stored_masked_and_cleared(api: httpx.AsyncClient) -> None:
    body = {
        "accessToken": "ya29.a",
        "refreshToken": "1//r",
        "scope": "s",
        "accountEmail": "u@example.com",
        "expiresAt": 1775707200000,
    }
    assert (await api.post("/oauth/google", json=body)).json() == {"success": True}
    gdrive = (await api.get("/config")).json()["backup"]["gdrive"]
    assert gdrive["accessToken"] == gdrive["refreshToken"] == "********"
    assert gdrive["expiresAt"] == "2026-04-09T04:00:00Z"
    assert gdrive["accountEmail"] == "u@example.com"
    for seconds in (1775707200, "2026-04-09T04:00:00Z"):
        assert (
            await api.post("/oauth/google", json={**body, "expiresAt": seconds})
        ).status_code == 200
        stored = (await api.get("/config")).json()["backup"]["gdrive"]["expiresAt"]
        assert stored == "2026-04-09T04:00:00Z"
    missing = await api.post("/oauth/google", json={"accessToken": "x"})
    assert missing.status_code == 400
    assert "refreshToken is required" in missing.json()["error"]
    assert (await api.post("/oauth/google", json={**body, "expiresAt": "soon"})).status_code == 400
    for absurd in (int("9" * 400), "9" * 400):
        resp = await api.post("/oauth/google", json={**body, "expiresAt": absurd})
        assert resp.status_code == 400, resp.text
        assert "expiresAt" in resp.json()["error"]
    resp = await api.post("/oauth/google", json={**body, "accountEmail": "u@x\x00"})
    assert resp.status_code == 400
    assert "accountEmail" in resp.json()["error"]
    assert (await api.post("/oauth/google/clear")).json() == {"success": True}
    cleared = (await api.get("/config")).json()["backup"]["gdrive"]
    assert cleared["accessToken"] == cleared["refreshToken"] == ""


@pytest.mark.parametrize("dest", ["sftp", "s3"])
async def test_full_incremental_and_restore(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    dest: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await guest_write(conn, VM, "vda", 0, 8 * MiB, pattern=0x41)
    full = await backup(api, dest)
    assert full["state"] == "success", full
    snap1 = snapshot(vm, tmp_path_factory.mktemp(f"{dest}-1"))
    # An eighth of a 2 MiB chunk: read in part on S3 too (up to a quarter; the sftp run
    # finds that chunk zero in its parent, nothing to fetch).
    await guest_write(conn, VM, "vda", 64 * MiB, 256 * 1024, pattern=0x42)
    inc = await backup(api, dest)
    assert inc["state"] == "success", inc
    assert inc["message"].startswith("incremental"), inc["message"]
    assert inc["bytesTransferred"] == 256 * 1024  # the dirty part of one chunk
    snap2 = snapshot(vm, tmp_path_factory.mktemp(f"{dest}-2"))
    first, second = (await points(api, dest))[-2:]
    for point, snap in ((first, snap1), (second, snap2)):
        job = await restore(api, dest, point["xmlPath"])
        assert job["state"] == "success", job
        assert same(vm.disks[0], snap[0])


async def test_google_drive_backup_and_restore(
    ds: System,
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    drive: FakeGoogleDrive,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Sign-in tokens whose access token has already expired: the first use refreshes it.
    tokens = drive.issue_tokens(expires_in=-10)
    body = {
        "accessToken": tokens.access_token,
        "refreshToken": tokens.refresh_token,
        "expiresAt": tokens.expires_at.isoformat() if tokens.expires_at else None,
    }
    assert (await api.post("/oauth/google", json=body)).status_code == 200
    await guest_write(conn, VM, "vda", 48 * MiB, 2 * MiB, pattern=0x44)
    job = await backup(api, "gd")
    assert job["state"] == "success", job
    assert drive.refreshes >= 1
    # The refreshed access token was kept, and agent.yaml follows the bucket.
    deadline = time.monotonic() + 10
    while True:
        stored = yaml.safe_load((ds.data_dir / "agent.yaml").read_text())["backup"]["gdrive"]
        if stored["accessToken"] != tokens.access_token:
            break
        assert time.monotonic() < deadline, stored
        await asyncio.sleep(0.2)
    assert stored["refreshToken"] == tokens.refresh_token
    snap = snapshot(vm, tmp_path_factory.mktemp("gd"))
    point = (await points(api, "gd"))[-1]
    restored = await restore(api, "gd", point["xmlPath"])
    assert restored["state"] == "success", restored
    assert same(vm.disks[0], snap[0])


async def test_encrypted_repository(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    fs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await guest_write(conn, VM, "vda", 32 * MiB, 4 * MiB, pattern=0x43)
    job = await backup(api, "enc")
    assert job["state"] == "success", job
    snap = snapshot(vm, tmp_path_factory.mktemp("enc"))
    repo_json = (fs_dir / "VirtBackup" / "repository.json").read_text()
    assert '"cipher":"chacha20-poly1305"' in repo_json
    chunk = next(p for p in (fs_dir / "VirtBackup" / "chunks").rglob("*") if p.is_file())
    assert bytes([0x43]) * 64 not in chunk.read_bytes()
    point = (await points(api, "enc"))[-1]

    ok = await restore(api, "enc", point["xmlPath"])
    assert ok["state"] == "success", ok
    assert same(vm.disks[0], snap[0])

    cfg = (await api.get("/config")).json()
    cfg["destinations"][3]["encryption"]["passphrase"] = "a wrong passphrase"
    assert (await api.post("/config", json=cfg)).status_code == 200
    refused = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": "enc"},
    )
    assert refused.status_code == 400
    assert refused.json() == {"error": "destination enc: wrong passphrase for this repository"}
    # A backup to it fails with the reason too, and writes nothing.
    failed = await backup(api, "enc")
    assert failed["state"] == "failure"
    assert "wrong passphrase" in failed["message"]
    assert len(await points(api, "enc")) == 1


async def _stop_mid_backup(
    api: httpx.AsyncClient, conn: Connection, dest: str, stop: Any, start: Any
) -> None:
    before = await points(api, dest)
    for i in range(6):
        await guest_write(conn, VM, "vda", 16 * MiB * i, 16 * MiB, pattern=0x60 + i)
    resp = await api.post("/servers/local/backup", json={"vmName": VM, "destinationId": dest})
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 60
    while (await api.get(f"/jobs/{job_id}")).json()["state"] == "queued":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stop()
    try:
        job = await wait_job(api, job_id, timeout=110)
    finally:
        start()
    after = await points(api, dest)
    if job["state"] == "success":  # retried through
        assert len(after) == len(before) + 1
    else:  # failed cleanly: the reason, and no half restore point
        assert job["state"] == "failure"
        assert job["message"]
        assert after == before
    again = await backup(api, dest)
    assert again["state"] == "success", again


async def test_sshd_stopped_mid_backup(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, sshd: SshdServer
) -> None:
    await _stop_mid_backup(api, conn, "sftp", sshd.stop, lambda: sshd.start())


async def test_seaweedfs_stopped_mid_backup(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, seaweed: SeaweedServer
) -> None:
    await _stop_mid_backup(api, conn, "s3", seaweed.stop, lambda: seaweed.start())
