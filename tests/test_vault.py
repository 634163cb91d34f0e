"""The vault (``/api/v1/vault/connections``) against real parts: an SFTP destination
whose password lives only in the vault backs up and restores (real OpenSSH, a real
libvirt/QEMU VM), an S3 one (SeaweedFS) backs up, a server reached over SSH logs in with
a vault connection; the password shows nowhere in clear (API, agent.yaml, the logs, the
NATS store's raw bytes); tests pass and fail as they should; bad input is a 4xx."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from harness import System, api_client, running_system, same, snapshot, wait_job

from virtbackup.contracts.subjects import VaultCmd
from virtbackup.runtime.sealing import new_key
from virtbackup.runtime.vault import VaultCipher
from virtbackup.testing.gdrive import FakeGoogleDrive
from virtbackup.testing.nats import connect
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.testing.vms import SmallVm, guest_write, made_vm
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-vault-{os.getpid()}"
CONNECTIONS = "/api/v1/vault/connections"


@pytest.fixture(scope="module")
def drive() -> Iterator[FakeGoogleDrive]:
    """A stand-in for Google's Drive v3 and token endpoints (Google is not reachable)."""
    with FakeGoogleDrive() as fake:
        yield fake


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, drive: FakeGoogleDrive) -> Iterator[System]:
    # Google's endpoints are the stand-in's; its OAuth client is given only in the vault.
    api = drive.api()
    with running_system(
        tmp_path_factory.mktemp("vault"),
        orchestrators=1,
        VIRTBACKUP_GDRIVE_API_BASE=api.api_base,
        VIRTBACKUP_GDRIVE_UPLOAD_BASE=api.upload_base,
        VIRTBACKUP_GOOGLE_TOKEN_URL=api.token_url,
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system) as client:
        yield client


def sftp_connection(sshd: SshdServer, **extra: Any) -> dict[str, Any]:
    body = {
        "id": "sftp-login",
        "name": "Backup box",
        "kind": "sftp",
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.username,
        "password": sshd.password,
    }
    body.update(extra)
    return body


def sftp_destination(sshd: SshdServer, base: str, connection: str) -> dict[str, Any]:
    params = sshd.params(base)
    del params["password"]
    return {
        "id": "sftpv",
        "driverId": "sftp",
        "params": params,
        "vaultConnectionId": connection,
    }


async def listed(api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    resp = await api.get(CONNECTIONS)
    assert resp.status_code == 200, resp.text
    return {c["id"]: c for c in resp.json()}


async def test_bad_input_saves_nothing(api: httpx.AsyncClient, sshd: SshdServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({**sftp_connection(sshd), "colour": "red"}, "colour"),
        (sftp_connection(sshd, kind="ftp"), "$.kind"),
        (sftp_connection(sshd, port="22"), "$.port"),
        (sftp_connection(sshd, endpoint="s3.example.com"), "$.endpoint"),
        (sftp_connection(sshd, password=""), "$.password"),
        (sftp_connection(sshd, password="********"), "$.password"),
        (sftp_connection(sshd, username="a\x00b"), "$.username"),
        (sftp_connection(sshd, id="a/b"), "$.id"),
        (sftp_connection(sshd, id="a:b"), "id"),  # an id the vault's KV cannot key
        (sftp_connection(sshd, id="ends."), "id"),
        (sftp_connection(sshd, privateKey="not a key", password=""), "$.privateKey"),
        ({"kind": "s3", "endpoint": "127.0.0.1:1", "bucket": "bkt"}, "$.accessKey"),
    ]
    for body, field in cases:
        resp = await api.post(CONNECTIONS, json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert field in resp.json()["error"], (field, resp.text)
    # A wrong password: the test fails, so nothing is saved (400 with the reason) ...
    wrong = sftp_connection(sshd, id="wrong", password="not-the-password")
    resp = await api.post(CONNECTIONS, json=wrong)
    assert resp.status_code == 400, resp.text
    assert "authentication failed" in resp.json()["error"]
    assert "wrong" not in await listed(api)
    # ... unless asked: then saved, marked failing, and its test keeps failing.
    resp = await api.post(CONNECTIONS, json={**wrong, "saveOnFailure": True})
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "failing"
    assert resp.json()["password"] == "********"
    tested = await api.post(f"{CONNECTIONS}/wrong/test")
    assert tested.status_code == 200
    assert tested.json()["success"] is False
    assert "authentication failed" in tested.json()["message"]
    assert (await listed(api))["wrong"]["status"] == "failing"
    assert (await api.post(CONNECTIONS, json={**wrong, "saveOnFailure": True})).status_code == 409
    assert (await api.delete(f"{CONNECTIONS}/wrong")).status_code == 204
    assert (await api.delete(f"{CONNECTIONS}/wrong")).status_code == 404
    assert (await api.post(f"{CONNECTIONS}/nope/test")).status_code == 404
    assert (await api.post(f"{CONNECTIONS}/ends./test")).status_code == 404  # was a 500
    for bad_id in ("a%20b", "a%00b", "x" * 201):
        resp = await api.delete(f"{CONNECTIONS}/{bad_id}")
        assert resp.status_code == 400, (bad_id, resp.text)
        assert "connectionId" in resp.json()["error"], resp.text
    assert "wrong" not in await listed(api)


async def test_sftp_password_in_the_vault_backs_up_and_restores_and_shows_nowhere(
    api: httpx.AsyncClient,
    system: System,
    sshd: SshdServer,
    vm: SmallVm,
    conn: Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert sshd.password
    password = sshd.password.encode()
    resp = await api.post(CONNECTIONS, json=sftp_connection(sshd, hostKey=""))
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["status"] == "ok", created
    assert created["password"] == "********"
    assert created["hostKey"]  # pinned when it was saved
    ok = await api.post(f"{CONNECTIONS}/sftp-login/test", json={})
    assert ok.json() == {"success": True, "message": "SFTP login successful", "status": "ok"}

    base = sshd.make_base("vault")
    local = {"id": "local", "name": "This host", "host": ""}
    dest = sftp_destination(sshd, base, "sftp-login")
    cfg = {"servers": [local], "destinations": [dest], "backupDestinationId": "sftpv"}
    # References are checked: unknown id, a secret beside it, another address: 400s.
    bad_refs = [
        ({**dest, "vaultConnectionId": "nope"}, "does not exist"),
        ({**dest, "params": {**dest["params"], "password": "x"}}, "params.password"),
        ({**dest, "params": {**dest["params"], "port": sshd.port + 1}}, "its secrets go only"),
        ({**dest, "params": {**dest["params"], "username": "root"}}, "logs in as"),
    ]
    for bad, says in bad_refs:
        resp = await api.post("/config", json={**cfg, "destinations": [bad]})
        assert resp.status_code == 400, resp.text
        assert says in resp.json()["error"], resp.text
        assert "$.destinations[0]" in resp.json()["error"], resp.text
    assert (await api.post("/config", json=cfg)).status_code == 200
    assert (await listed(api))["sftp-login"]["usedBy"] == ["destination sftpv"]

    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0x5A)
    resp = await api.post("/servers/local/backup", json={"vmName": VM, "destinationId": "sftpv"})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    snap = snapshot(vm, tmp_path_factory.mktemp("vault-snap"))
    entries = (await api.get("/restore/entries", params={"destinationId": "sftpv"})).json()
    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0x11)  # changed after the backup
    await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": entries[-1]["xmlPath"], "decision": "overwrite", "destinationId": "sftpv"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    assert same(vm.disks[0], snap[0])
    await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})

    # Deleting it while the destination refers to it: 409 naming the destination.
    refused = await api.delete(f"{CONNECTIONS}/sftp-login")
    assert refused.status_code == 409
    assert "destination sftpv" in refused.json()["error"]

    # Nowhere in clear: the API, agent.yaml, every log, the NATS store's raw bytes.
    assert password not in (await api.get("/config")).content
    assert password not in (await api.get(CONNECTIONS)).content
    assert (system.data_dir / "agent.yaml").exists()
    seen = [
        path
        for path in system.data_dir.rglob("*")
        if path.is_file() and password in path.read_bytes()
    ]
    assert seen == []
    # The grep reads what the buckets hold: their other fields are there in clear.
    store = [p for p in (system.data_dir / "nats").rglob("*") if p.is_file()]
    vault_files = [p for p in store if "KV_VB_VAULT" in str(p)]
    assert any(b"Backup box" in p.read_bytes() for p in vault_files)
    config_files = [p for p in store if "KV_VB_CONFIG" in str(p)]
    assert any(b"sftp-login" in p.read_bytes() for p in config_files)


async def test_s3_keys_in_the_vault_back_up(
    api: httpx.AsyncClient, system: System, seaweed: SeaweedServer
) -> None:
    params = seaweed.params(prefix="vault")
    body = {
        "id": "s3-keys",
        "kind": "s3",
        "endpoint": params["endpoint"],
        "bucket": params["bucket"],
        "region": params["region"],
        "secure": params["secure"],
        "accessKey": params["accessKey"],
        "secretKey": params["secretKey"],
    }
    assert (
        await api.post(f"{CONNECTIONS}", json={**body, "id": "bad-s3", "secretKey": "x"})
    ).status_code == 400
    resp = await api.post(CONNECTIONS, json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["secretKey"] == "********"
    cfg = (await api.get("/config")).json()
    s3_params = {k: v for k, v in params.items() if k not in ("secretKey", "accessKey")}
    s3 = {"id": "s3v", "driverId": "s3", "params": s3_params, "vaultConnectionId": "s3-keys"}
    # A kind mismatch: an s3 destination naming the sftp connection.
    mismatch = {
        **cfg,
        "destinations": [*cfg["destinations"], {**s3, "vaultConnectionId": "sftp-login"}],
    }
    resp = await api.post("/config", json=mismatch)
    assert resp.status_code == 400
    assert "needs a s3 one" in resp.json()["error"]
    assert "$.destinations[1].vaultConnectionId" in resp.json()["error"]
    # Tested over plain HTTP (SeaweedFS here): a destination must say the same.
    tls = {
        **cfg,
        "destinations": [*cfg["destinations"], {**s3, "params": {**s3_params, "secure": True}}],
    }
    resp = await api.post("/config", json=tls)
    assert resp.status_code == 400
    assert "secure" in resp.json()["error"]
    cfg["destinations"].append(s3)
    assert (await api.post("/config", json=cfg)).status_code == 200
    resp = await api.post("/servers/local/backup", json={"vmName": VM, "destinationId": "s3v"})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    secret = str(params["secretKey"]).encode()
    assert not [p for p in system.data_dir.rglob("*") if p.is_file() and secret in p.read_bytes()]


async def test_a_server_logs_in_with_a_vault_connection(
    api: httpx.AsyncClient, vm: SmallVm
) -> None:
    with sshd_server(root=True) as remote:
        body = {
            "id": "root-login",
            "kind": "ssh",
            "host": remote.host,
            "port": remote.port,
            "username": remote.username,
            "privateKey": remote.private_key,
        }
        resp = await api.post(CONNECTIONS, json=body)
        assert resp.status_code == 201, resp.text
        assert resp.json()["privateKey"] == "********"
        cfg = (await api.get("/config")).json()
        server = {"id": "remote", "host": remote.host, "port": remote.port}
        wrong_kind = {
            **cfg,
            "servers": [*cfg["servers"], {**server, "vaultConnectionId": "s3-keys"}],
        }
        resp = await api.post("/config", json=wrong_kind)
        assert resp.status_code == 400
        assert "$.servers[1].vaultConnectionId" in resp.json()["error"]
        cfg["servers"].append({**server, "vaultConnectionId": "root-login"})
        assert (await api.post("/config", json=cfg)).status_code == 200
        # Over SSH on a busy shared host a first answer may take longer than a command
        # waits (503): a client tries again.
        for _ in range(4):
            tested = await api.post("/servers/remote/test", json={})
            if tested.status_code != 503:
                break
        assert tested.status_code == 200, tested.text
        assert tested.json()["success"] is True, tested.text
        for _ in range(4):  # libvirt through the SSH tunnel
            vms = await api.get("/servers/remote/vms")
            if vms.status_code != 503:
                break
        assert vms.status_code == 200, vms.text
        assert VM in vms.text
        stored = (await api.get("/config")).json()["servers"][-1]
        assert stored["password"] == stored["privateKey"] == ""
        # The host key the connection pinned (and tested) when it was saved.
        assert stored["hostKey"] == (await listed(api))["root-login"]["hostKey"]


async def test_a_service_gets_only_what_the_configuration_gives_it_and_only_sealed(
    system: System, sshd: SshdServer
) -> None:
    """On the bus, as the transfer workers log in: the SFTP destination's credentials
    come sealed (no password in the reply's bytes); a connection no destination names
    (the server's SSH login) and an unknown one are refused."""
    assert sshd.password
    worker = await connect(system.nats, "transfer-worker")
    try:

        async def ask(connection_id: str) -> dict[str, Any]:
            body = msgspec.json.encode({"connectionId": connection_id})
            reply = await worker.request(VaultCmd.OPEN_DESTINATION, body, timeout=10)
            assert sshd.password and sshd.password.encode() not in reply.data
            decoded: dict[str, Any] = msgspec.json.decode(reply.data)
            return decoded

        given = (await ask("sftp-login"))["result"]
        assert given["kind"] == "sftp"
        assert given["fields"]["username"] == sshd.username
        assert given["fields"]["password"].startswith("vbsec:v1:")
        for refused in ("root-login", "nope"):
            assert (await ask(refused))["error"]["code"] == "not_found"
    finally:
        await worker.close()


async def test_google_drive_client_and_refresh_token_in_the_vault(
    api: httpx.AsyncClient, system: System, drive: FakeGoogleDrive
) -> None:
    tokens = drive.issue_tokens()
    body = {
        "id": "google",
        "kind": "gdrive",
        "clientId": drive.client_id,
        "clientSecret": drive.client_secret,
        "refreshToken": tokens.refresh_token,
    }
    refused = await api.post(CONNECTIONS, json={**body, "clientSecret": "wrong"})
    assert refused.status_code == 400, refused.text
    assert "Google refused" in refused.json()["error"]
    resp = await api.post(CONNECTIONS, json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["clientSecret"] == resp.json()["refreshToken"] == "********"
    cfg = (await api.get("/config")).json()
    gd = {"id": "gd", "driverId": "gdrive", "params": {"rootPath": "/vault"}}
    cfg["destinations"].append({**gd, "vaultConnectionId": "google"})
    assert (await api.post("/config", json=cfg)).status_code == 200
    refreshes = drive.refreshes
    resp = await api.post("/servers/local/backup", json={"vmName": VM, "destinationId": "gd"})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    assert drive.refreshes > refreshes  # with the vault's client: none is configured
    gdrive = (await api.get("/config")).json()["backup"]["gdrive"]
    assert gdrive["accessToken"] == gdrive["refreshToken"] == ""  # nothing stored there
    for secret in (drive.client_secret, tokens.refresh_token):
        raw = secret.encode()
        assert not [p for p in system.data_dir.rglob("*") if p.is_file() and raw in p.read_bytes()]


async def test_the_vault_key_rotates(api: httpx.AsyncClient, system: System) -> None:
    """A new VIRTBACKUP_VAULT_KEY with the old one in VIRTBACKUP_VAULT_KEY_PREVIOUS: the
    gateway seals every connection again at start; then the old key can go."""
    old = (system.data_dir / "secrets" / "vault-key").read_text().strip()
    new = new_key()
    new_id = VaultCipher(base64.b64decode(new)).key_id
    admin = await connect(system.nats)
    try:
        vault = await admin.jetstream().key_value("VB_VAULT")

        async def sealed_under() -> set[str]:
            keys = await vault.keys()
            records = [msgspec.json.decode((await vault.get(k)).value or b"{}") for k in keys]
            return {r["sealed"].split(":")[2] for r in records}

        assert new_id not in await sealed_under()
        for env in (
            {"VIRTBACKUP_VAULT_KEY": new, "VIRTBACKUP_VAULT_KEY_PREVIOUS": old},
            {"VIRTBACKUP_VAULT_KEY": new},  # the old key dropped
        ):
            system.stop("gateway")
            system.extra_env.pop("VIRTBACKUP_VAULT_KEY_PREVIOUS", None)
            system.extra_env.update(env)
            system.start("gateway")
            system.wait_ready()
            deadline = asyncio.get_running_loop().time() + 20
            while await sealed_under() != {new_id}:
                assert asyncio.get_running_loop().time() < deadline, await sealed_under()
                await asyncio.sleep(0.2)
            tested = await api.post(f"{CONNECTIONS}/sftp-login/test")
            assert tested.json()["success"] is True, tested.text
    finally:
        await admin.close()
