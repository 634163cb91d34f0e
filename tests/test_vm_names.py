"""Any VM name libvirt accepts, through the agent API, and restore points found wherever
they are: real libvirtd/QEMU VMs named with a space and with a non-ASCII letter, a
filesystem destination, a second one on a real OpenSSH server, and a repository written
before VM names were encoded. The tests in this module build on each other, in order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, running_system, same, snapshot, wait_job

from virtbackup.repository.format import vm_segment
from virtbackup.runtime.ports import free_port
from virtbackup.testing.sshd import SshdServer
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SPACE = f"fc-with space-{os.getpid()}"
UMLAUT = f"fc-ü-{os.getpid()}"
#: Names libvirt accepts whose encoding is too long for one repository segment (hashed).
LONG = f"fc-long-{os.getpid()}-".ljust(240, "x")
CJK = f"fc-{os.getpid()}-" + "日本語の長い名前" * 3
LEGACY = Path(__file__).parents[1] / "libs/repository/tests/data/legacy-v1/plain"


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("names")) as system:
        yield system


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshdServer]:
    server = SshdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def dirs() -> Iterator[dict[str, Path]]:
    made = {name: vm_directory(prefix=f"vbtest-names-{name}-") for name in ("fs", "copy", "old")}
    # A repository written by the code before VM names were encoded.
    shutil.copytree(LEGACY, made["old"] / "VirtBackup")
    yield made
    for path in made.values():
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def sftp(sshd: SshdServer) -> dict[str, Any]:
    """The params of the SFTP destination."""
    return sshd.params(sshd.make_base("b"))


def config(dirs: dict[str, Path], sftp: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """``fs`` is the backup destination; ``sftp`` a second one; ``old`` holds the old
    repository; ``dead`` cannot be reached (an SFTP port nobody listens on)."""
    return {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": "fs", "driverId": "filesystem", "params": {"path": str(dirs["fs"])}},
            {"id": "sftp", "driverId": "sftp", "params": sftp},
            {"id": "old", "driverId": "filesystem", "params": {"path": str(dirs["old"])}},
            {"id": "dead", "driverId": "sftp",
             "params": {"host": "127.0.0.1", "port": free_port(), "username": "u",
                        "password": "p", "basePath": "/b"}},
            {"id": "copy", "driverId": "filesystem", "params": {"path": str(dirs["copy"])}},
            {"id": "off", "driverId": "filesystem", "enabled": False,
             "params": {"path": str(dirs["copy"])}},
        ],
        "backupDestinationId": "fs",
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
async def api(
    ns: System, sftp: dict[str, Any], dirs: dict[str, Path]
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=ns.url, headers=ns.auth(), verify=False, timeout=60
    ) as client:
        resp = await client.post("/config", json=config(dirs, sftp))
        assert resp.status_code == 200, resp.text
        yield client


@pytest.fixture(scope="module")
async def vms(conn: Connection) -> AsyncIterator[dict[str, SmallVm]]:
    directory = vm_directory()
    made = {
        name: await create_vm(conn, name, directory, [64 * MiB])
        for name in (SPACE, UMLAUT, LONG, CJK)
    }
    try:
        yield made
    finally:
        for name in made:
            await remove_vm(conn, name)
        shutil.rmtree(directory, ignore_errors=True)


async def backup(api: httpx.AsyncClient, name: str, **extra: Any) -> dict[str, Any]:
    resp = await api.post("/servers/local/backup", json={"vmName": name, **extra})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    return job


async def entries(api: httpx.AsyncClient, dest: str, name: str) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": dest})
    assert resp.status_code == 200, resp.text
    return sorted((e for e in resp.json() if e["vmName"] == name), key=lambda e: e["timestamp"])


async def restore(api: httpx.AsyncClient, name: str, body: dict[str, Any]) -> dict[str, Any]:
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": name})
    assert off.status_code in {200, 409}, off.text
    resp = await api.post("/servers/local/restore/start", json={"decision": "overwrite", **body})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    start = await api.post("/servers/local/actions", json={"action": "start", "vmName": name})
    assert start.status_code == 200, start.text
    return job


def refused(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, resp.text
    for word in words:
        assert word in resp.json()["error"], (word, resp.text)


STATE: dict[str, Any] = {}


@pytest.mark.parametrize("name", [SPACE, UMLAUT, LONG, CJK], ids=["space", "umlaut", "long", "cjk"])
async def test_a_name_with_a_space_or_utf8_is_backed_up_listed_and_restored(
    api: httpx.AsyncClient,
    ns: System,
    vms: dict[str, SmallVm],
    conn: Connection,
    dirs: dict[str, Path],
    tmp_path: Path,
    name: str,
) -> None:
    vm = vms[name]
    listed = await api.get("/servers/local/vms")
    assert name in {v["vm"]["name"] for v in listed.json()}
    async with httpx.AsyncClient(base_url=ns.hypersdk_url, headers=ns.auth()) as hs:
        info = await hs.get("/vms/info", params={"vm_path": f"local/{name}"})
        assert info.status_code == 200, info.text
        assert info.json()["path"] == f"local/{name}"

    await guest_write(conn, name, "vda", 0, 4 * MiB, pattern=0xA1)
    full = await backup(api, name)
    assert full["message"].startswith("full backup"), full["message"]
    await guest_write(conn, name, "vda", 20 * MiB, 1 * MiB, pattern=0xB2)
    inc = await backup(api, name)
    assert inc["message"].startswith("incremental backup"), inc["message"]
    snap = snapshot(vm, tmp_path)

    points = await entries(api, "fs", name)
    assert [p["vmName"] for p in points] == [name, name]
    latest = points[-1]
    assert latest["xmlPath"] == f"vms/{vm_segment(name)}/{latest['timestamp']}/domain.xml"
    assert latest["diskBasenames"] == [vm.disks[0].name]
    assert (dirs["fs"] / "VirtBackup" / latest["xmlPath"]).is_file()
    folders = {p.name for p in (dirs["fs"] / "VirtBackup" / "vms").iterdir()}
    assert folders == {vm_segment(n) for n in [*STATE.get("names", []), name]}

    precheck = await api.post(
        "/servers/local/restore/precheck", json={"xmlPath": latest["xmlPath"]}
    )
    assert precheck.json() == {"vmExists": True, "canDefineOnly": True}, precheck.text
    await restore(api, name, {"xmlPath": latest["xmlPath"]})
    assert same(vm.disks[0], snap[0])
    STATE.setdefault("names", []).append(name)


async def test_a_long_name_has_a_hashed_folder_and_its_point_checks(
    api: httpx.AsyncClient, dirs: dict[str, Path]
) -> None:
    """The points of LONG and CJK (backed up above) are in hashed folders, and a sanity
    check of each finds every chunk."""
    for name in (LONG, CJK):
        assert len(name.encode()) <= 247  # libvirt accepted it (create_vm defined it)
        point = (await entries(api, "fs", name))[-1]
        folder = point["xmlPath"].split("/")[1]
        assert "~" in folder and len(folder) <= 200
        record = dirs["fs"] / "VirtBackup" / "vms" / folder / point["timestamp"] / "backup.json"
        assert name in record.read_text(encoding="utf-8")
        resp = await api.post("/restore/sanity", json={"xmlPath": point["xmlPath"]})
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "success", job


async def test_names_libvirt_refuses_are_refused_before_a_job(api: httpx.AsyncClient) -> None:
    before = len((await api.get("/jobs")).json())
    # Names libvirt could hold but no VM has: 404 (the 400 for long names is gone).
    for name in ("ü" * 100, "日" * 30, "x" * 199 + " ", "x" * 247):
        resp = await api.post("/servers/local/backup", json={"vmName": name})
        refused(resp, 404, "not found")
    for name in ("a\nb", "a\x00b", "a/b", "", "x" * 248):
        refused(await api.post("/servers/local/backup", json={"vmName": name}), 400, "vmName")
    # As a new name, more UTF-8 than libvirt takes in a domain name is a 400 naming it.
    point = (await entries(api, "fs", SPACE))[-1]
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": point["xmlPath"], "decision": "define", "vmName": "日" * 83},
    )
    refused(resp, 400, "vmName", "247 bytes")
    assert len((await api.get("/jobs")).json()) == before


async def test_a_point_on_a_second_destination_resolves_without_its_id(
    api: httpx.AsyncClient, vms: dict[str, SmallVm], conn: Connection, tmp_path: Path
) -> None:
    name = UMLAUT
    await guest_write(conn, name, "vda", 30 * MiB, 2 * MiB, pattern=0xC3)
    await backup(api, name, destinationId="sftp")
    snap = snapshot(vms[name], tmp_path)
    point = (await entries(api, "sftp", name))[-1]
    assert point["destinationId"] == "sftp"
    xml_path = point["xmlPath"]
    assert xml_path not in {p["xmlPath"] for p in await entries(api, "fs", name)}

    # The agent API's body: no destinationId. The default (fs) lacks it; sftp has it.
    precheck = await api.post("/servers/local/restore/precheck", json={"xmlPath": xml_path})
    assert precheck.status_code == 200, precheck.text
    assert precheck.json() == {"vmExists": True, "canDefineOnly": True}
    resp = await api.post("/restore/sanity", json={"xmlPath": xml_path})
    assert resp.status_code == 200, resp.text
    checked = await wait_job(api, resp.json()["jobId"])
    assert checked["state"] == "success", checked
    assert checked["destinationId"] == "sftp"
    job = await restore(api, name, {"xmlPath": xml_path})
    assert job["destinationId"] == "sftp"
    assert same(vms[name].disks[0], snap[0])

    # Named, a destination that lacks the point is a 404, for each of the three.
    wrong = {"xmlPath": xml_path, "destinationId": "fs"}
    for path, body in (
        ("/servers/local/restore/precheck", wrong),
        ("/restore/sanity", wrong),
        ("/servers/local/restore/start", {**wrong, "decision": "overwrite"}),
    ):
        refused(await api.post(path, json=body), 404, "no restore point", "destination fs")
        refused(await api.post(path, json={**body, "destinationId": "nope"}), 404, "'nope'")
    STATE["sftp_point"] = xml_path


async def test_the_restore_destination_is_searched_first_and_the_first_match_wins(
    api: httpx.AsyncClient, sftp: dict[str, Any], dirs: dict[str, Path]
) -> None:
    point = (await entries(api, "fs", SPACE))[-1]
    # The same repository in two destinations: the restore destination's copy wins, then
    # the backup destination's.
    shutil.copytree(dirs["fs"] / "VirtBackup", dirs["copy"] / "VirtBackup")
    try:
        for restore_dest, expected in (("copy", "copy"), (None, "fs"), ("sftp", "fs")):
            cfg = config(dirs, sftp, restoreDestinationId=restore_dest)
            assert (await api.post("/config", json=cfg)).status_code == 200
            resp = await api.post("/restore/sanity", json={"xmlPath": point["xmlPath"]})
            assert resp.status_code == 200, resp.text
            job = await wait_job(api, resp.json()["jobId"])
            assert job["state"] == "success", job
            assert job["destinationId"] == expected, (restore_dest, job)
    finally:
        assert (await api.post("/config", json=config(dirs, sftp))).status_code == 200


async def test_a_point_nowhere_is_404_naming_where_it_looked_and_what_it_could_not_read(
    api: httpx.AsyncClient,
) -> None:
    missing = f"vms/{vm_segment(SPACE)}/2001-01-01T00-00-00/domain.xml"
    resp = await api.post("/servers/local/restore/precheck", json={"xmlPath": missing})
    refused(
        resp,
        404,
        "no restore point",
        "fs, sftp, old, dead, copy",
        "not searched: destination 'dead'",
    )
    assert "off" not in resp.json()["error"]  # disabled: not searched
    # A point on a reachable destination is found even with an unreachable one configured.
    resp = await api.post("/servers/local/restore/precheck", json={"xmlPath": STATE["sftp_point"]})
    assert resp.status_code == 200, resp.text


async def test_a_repository_written_before_names_were_encoded_lists_and_checks(
    api: httpx.AsyncClient,
) -> None:
    resp = await api.get("/restore/entries", params={"destinationId": "old"})
    assert resp.status_code == 200, resp.text
    listed = sorted((e["vmName"], e["xmlPath"]) for e in resp.json())
    assert listed == [
        ("Web_1.2+x-y", "vms/Web_1.2+x-y/2026-01-30T12-00-00/domain.xml"),
        ("vm1", "vms/vm1/2026-01-30T12-00-00/domain.xml"),
        ("vm1", "vms/vm1/2026-01-30T12-00-01/domain.xml"),
    ]
    for _, xml_path in listed:
        resp = await api.post("/restore/sanity", json={"xmlPath": xml_path})
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "success", job
        assert job["destinationId"] == "old"
