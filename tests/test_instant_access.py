"""Instant access to a restore point, end to end: a real VM backed up through the agent
API, then one of its disks exported by a transfer worker (``POST /restore/exports``) and
read with nbdinfo, qemu-img and nbdcopy through TLS with the certificate the API
returned; other certificates refused; stop, expiry, a killed worker; bad input. The
tests in this module build on each other, in order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, snapshot, wait_job

from virtbackup.nbd import NbdClient, NbdConnectionError
from virtbackup.nbd.tls import client_context_from_dir
from virtbackup.testing.vms import SmallVm, guest_write, made_vm
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-instant-{os.getpid()}"
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def ia(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A system of its own with two workers (one is killed at the end)."""
    with running_system(tmp_path_factory.mktemp("ia"), workers=2, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [64 * MiB, 64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(ia: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=ia.url, headers=ia.auth(), verify=False, timeout=90
    ) as client:
        assert (await client.post("/config", json=local_config(repo_dir))).status_code == 200
        yield client


def tls_dir(base: Path, created: dict[str, Any]) -> Path:
    """The response's credentials as a ``tls-creds-x509`` folder (QEMU's names)."""
    directory: Path = base / str(created["id"])
    directory.mkdir(mode=0o700)
    (directory / "ca-cert.pem").write_text(created["tls"]["caCert"])
    (directory / "client-cert.pem").write_text(created["tls"]["clientCert"])
    key = directory / "client-key.pem"
    key.touch(mode=0o600)
    key.write_text(created["tls"]["clientKey"])
    return directory


def with_certs(url: str, directory: Path) -> str:
    return f"{url}?tls-certificates={directory}"


async def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, list(args), capture_output=True, text=True, timeout=timeout
    )


def qemu_opts(created: dict[str, Any], directory: Path) -> list[str]:
    host, port = created["nbdUrl"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={directory},endpoint=client",
        "--image-opts",
        f"driver=raw,file.driver=nbd,file.host={host},file.port={port},"
        f"file.export={created['exportName']},file.tls-creds=tls0",
    ]


async def create(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await api.post("/restore/exports", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    created: dict[str, Any] = resp.json()
    return created


async def listed(api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    resp = await api.get("/restore/exports")
    assert resp.status_code == 200, resp.text
    return {e["id"]: e for e in resp.json()}


async def test_an_exported_disk_reads_as_the_backed_up_one(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0xAB)
    await guest_write(conn, VM, "vda", 20 * MiB + 4096, 3 * MiB, pattern=0x5C)
    await guest_write(conn, VM, "vdb", 9 * MiB, MiB, pattern=0x77)
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    snaps = snapshot(vm, tmp_path_factory.mktemp("ia-snap"))
    entries = (await api.get("/restore/entries", params={"destinationId": "fs"})).json()
    point = next(e for e in entries if e["vmName"] == VM)
    # The guest writes on after the backup: the export must show the point, not the disk.
    await guest_write(conn, VM, "vda", 0, MiB, pattern=0x11)

    created = await create(api, xmlPath=point["xmlPath"], disk="vda", ttlSeconds=600)
    certs = tmp_path_factory.mktemp("ia-certs")
    STATE.update(point=point, certs=certs, snaps=snaps, vda=created)
    assert created["state"] == "active"
    assert created["exportName"] == "vda"
    assert created["nbdUrl"].startswith("nbds://127.0.0.1:")
    assert created["size"] == 64 * MiB
    assert created["vmName"] == VM and created["timestamp"] == point["timestamp"]
    assert "BEGIN PRIVATE KEY" in created["tls"]["clientKey"]
    directory = tls_dir(certs, created)

    info = await run("nbdinfo", "--json", with_certs(created["nbdUrl"], directory))
    assert info.returncode == 0, info.stderr
    export = json.loads(info.stdout)["exports"][0]
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is True
    mapped = await run("nbdinfo", "--map", "--json", with_certs(created["nbdUrl"], directory))
    data = [e for e in json.loads(mapped.stdout) if e["type"] == 0]
    assert sum(e["length"] for e in data) == 8 * MiB  # two written 4 MiB chunks, no more

    compared = await run(
        "qemu-img",
        "compare",
        *qemu_opts(created, directory),
        f"driver=raw,file.filename={snaps[0]}",
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    copy = certs / "vda.raw"
    copied = await run("nbdcopy", with_certs(created["nbdUrl"], directory), str(copy))
    assert copied.returncode == 0, copied.stderr
    assert subprocess.run(["cmp", str(copy), str(snaps[0])]).returncode == 0

    # Listed, without any key.
    resp = await api.get("/restore/exports")
    assert "PRIVATE KEY" not in resp.text and "clientKey" not in resp.text
    mine = {e["id"]: e for e in resp.json()}[created["id"]]
    assert mine["state"] == "active"
    assert mine["nbdUrl"] == created["nbdUrl"]
    assert mine["expiresAt"] == created["expiresAt"]


async def test_only_the_export_own_certificate_gets_in(
    api: httpx.AsyncClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    vda, point, certs = STATE["vda"], STATE["point"], STATE["certs"]
    vdb = await create(api, xmlPath=point["xmlPath"], disk="vdb")
    STATE["vdb"] = vdb
    vdb_dir = tls_dir(certs, vdb)
    compared = await run(
        "qemu-img",
        "compare",
        *qemu_opts(vdb, vdb_dir),
        f"driver=raw,file.filename={STATE['snaps'][1]}",
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # vdb's certificate (with vda's CA, so that the server is trusted) at vda's export.
    crossed = tmp_path_factory.mktemp("crossed")
    (crossed / "ca-cert.pem").write_text(vda["tls"]["caCert"])
    (crossed / "client-cert.pem").write_text(vdb["tls"]["clientCert"])
    (crossed / "client-key.pem").write_text(vdb["tls"]["clientKey"])
    refused = await run("nbdinfo", with_certs(vda["nbdUrl"], crossed))
    assert refused.returncode != 0
    img = await run("qemu-img", "info", *qemu_opts(vda, crossed))
    assert img.returncode != 0
    # Without a certificate, and without TLS at all.
    anonymous = tmp_path_factory.mktemp("anonymous")
    (anonymous / "ca-cert.pem").write_text(vda["tls"]["caCert"])
    assert (await run("nbdinfo", with_certs(vda["nbdUrl"], anonymous))).returncode != 0
    plain = vda["nbdUrl"].replace("nbds://", "nbd://")
    assert (await run("nbdinfo", plain)).returncode != 0
    # The export is undisturbed.
    ok = await run("nbdinfo", "--size", with_certs(vda["nbdUrl"], certs / vda["id"]))
    assert ok.stdout.strip() == str(64 * MiB), ok.stderr


async def test_a_stopped_export_drops_its_clients_and_refuses_new_ones(
    api: httpx.AsyncClient,
) -> None:
    vda, certs = STATE["vda"], STATE["certs"]
    directory = certs / vda["id"]
    nbd = await NbdClient.connect_uri(vda["nbdUrl"], tls=client_context_from_dir(directory))
    try:
        assert await nbd.read(0, 4) == b"\xab" * 4
        resp = await api.delete(f"/restore/exports/{vda['id']}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "stopped"
        assert resp.json()["endedAt"]
        with pytest.raises(NbdConnectionError):
            await nbd.read(0, 4)
    finally:
        nbd.abort()
    assert (await run("nbdinfo", with_certs(vda["nbdUrl"], directory))).returncode != 0
    assert (await listed(api))[vda["id"]]["state"] == "stopped"
    # Stopping again changes nothing; the other export still serves.
    again = await api.delete(f"/restore/exports/{vda['id']}")
    assert again.status_code == 200 and again.json()["state"] == "stopped"
    vdb = STATE["vdb"]
    ok = await run("nbdinfo", "--size", with_certs(vdb["nbdUrl"], certs / vdb["id"]))
    assert ok.returncode == 0, ok.stderr


async def test_an_export_ends_with_its_lifetime(api: httpx.AsyncClient) -> None:
    created = await create(api, xmlPath=STATE["point"]["xmlPath"], disk="vda", ttlSeconds=4)
    directory = tls_dir(STATE["certs"], created)
    nbd = await NbdClient.connect_uri(created["nbdUrl"], tls=client_context_from_dir(directory))
    try:
        assert await nbd.read(0, 4) == b"\xab" * 4
        expires = dt.datetime.fromisoformat(created["expiresAt"].replace("Z", "+00:00"))
        await asyncio.sleep((expires - dt.datetime.now(dt.UTC)).total_seconds() + 2)
        with pytest.raises(NbdConnectionError):
            await nbd.read(0, 4)
    finally:
        nbd.abort()
    assert (await run("nbdinfo", with_certs(created["nbdUrl"], directory))).returncode != 0
    found = (await listed(api))[created["id"]]
    assert found["state"] == "expired", found
    assert found["endedAt"]


async def test_bad_input_is_refused_naming_it(api: httpx.AsyncClient) -> None:
    before = await listed(api)
    xml_path = STATE["point"]["xmlPath"]

    async def refused(body: dict[str, Any], status: int, *named: str) -> None:
        resp = await api.post("/restore/exports", json=body)
        assert resp.status_code == status, resp.text
        for name in named:
            assert name in resp.json()["error"], resp.text

    missing = xml_path.replace(STATE["point"]["timestamp"], "2001-01-01T00-00-00")
    await refused({"xmlPath": missing, "disk": "vda"}, 404, missing)
    await refused({"xmlPath": "not/a/point.xml", "disk": "vda"}, 400, "not/a/point.xml")
    await refused({"xmlPath": xml_path, "disk": "vdz"}, 404, "vdz")
    for ttl in (0, -5, 86401, "long"):
        await refused({"xmlPath": xml_path, "disk": "vda", "ttlSeconds": ttl}, 400, "ttlSeconds")
    await refused({"xmlPath": xml_path}, 400, "disk")
    await refused({"xmlPath": xml_path, "disk": "vda", "destinationId": "nope"}, 404, "nope")
    assert (await listed(api)).keys() == before.keys()  # nothing was made
    resp = await api.delete("/restore/exports/0000nothere")
    assert resp.status_code == 404 and "0000nothere" in resp.json()["error"]


async def test_a_killed_worker_takes_its_exports_with_it(
    api: httpx.AsyncClient, ia: System
) -> None:
    vdb, certs = STATE["vdb"], STATE["certs"]
    serving = (await listed(api))[vdb["id"]]["worker"]
    name = next(n for n, proc in ia.procs.items() if serving.endswith(f"-{proc.pid}"))
    victim = ia.procs.pop(name)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert (await run("nbdinfo", with_certs(vdb["nbdUrl"], certs / vdb["id"]))).returncode != 0
    # Listed as failed once its heartbeat has expired (VB_WORKERS keeps it 30 s).
    deadline = time.monotonic() + 45
    while (found := (await listed(api))[vdb["id"]])["state"] == "active":
        assert time.monotonic() < deadline, found
        await asyncio.sleep(1)
    assert found["state"] == "failed", found
    assert serving in found["message"]
    # The other worker serves new exports.
    again = await create(api, xmlPath=STATE["point"]["xmlPath"], disk="vdb", ttlSeconds=60)
    assert again["worker"] != serving
