"""Repository formats an operator meets, end to end: a format-1 repository (made by an
earlier version) backed up into by this one stays format 1 and readable; after
``upgrade_format()`` the chain goes on with framed chunks (one chain of both
encodings), chunks read in part whose parent is all zero, a format-1 chunk, a framed one,
and the short last chunk of a disk that is no multiple of the chunk size; every point
verifies and restores bit-identical. A repository of format 3 is refused by name on every
route that opens it (never a 500).

A real VM (libvirtd/QEMU), one transfer worker, filesystem destinations. The tests in
this module build on each other, in order.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, backup_ok, local_config, running_system, same, snapshot, wait_job

from virtbackup.repository.codec import FRAMED, RAW, ZSTD, framed_records
from virtbackup.repository.format import CONFIG_KEY
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.vms import SmallVm, guest_write, made_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 4 * MiB  # the repository is made with it: the geometry below is in its chunks
FRAME = 256 * KiB
SIZE = 20 * MiB + 300 * KiB  # 6 chunks, the last of 300 KiB
LAST = 5
VM = f"vbt-fmt-{os.getpid()}"
STATE: dict[str, Any] = {"snaps": []}


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("fmt"), workers=1, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [SIZE]) as small:
        yield small


async def made_with_format(root: Path, version: int) -> None:
    """A repository at ``root`` whose ``repository.json`` says ``version``."""
    repo = await Repository.open_or_create(FilesystemDriver(root), chunk_size=CHUNK)
    await repo.close()
    config = json.loads((root / CONFIG_KEY).read_bytes())
    config["format"] = version
    (root / CONFIG_KEY).write_text(json.dumps(config))


@pytest.fixture(scope="module")
async def api(
    sysm: System, repo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    await made_with_format(repo_dir / "VirtBackup", 1)
    newer = vm_directory(prefix="vbtest-repo3-")
    await made_with_format(newer / "VirtBackup", 3)
    STATE["newer"] = newer
    config = local_config(repo_dir)
    config["destinations"].append(
        {"id": "v3", "name": "Newer", "driverId": "filesystem", "params": {"path": str(newer)}}
    )
    STATE["config"] = config
    try:
        async with httpx.AsyncClient(
            base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
        ) as client:
            resp = await client.post("/config", json=config)
            assert resp.status_code == 200, resp.text
            yield client
    finally:
        shutil.rmtree(newer, ignore_errors=True)


async def backup(api: httpx.AsyncClient) -> dict[str, Any]:
    return await backup_ok(api, VM)


async def open_repo(repo_dir: Path) -> Repository:
    return await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))


async def codecs(repo_dir: Path) -> list[int]:
    """The codec byte of each stored chunk of the newest point (0 for an all-zero one)."""
    repo = await open_repo(repo_dir)
    try:
        latest = (await repo.restore_points(VM))[-1]
        chunks = (await repo.manifest(latest, "vda")).chunks
        return [(await repo.read_chunk(c))[0] if c else 0 for c in chunks]
    finally:
        await repo.close()


async def round_(
    api: httpx.AsyncClient,
    conn: Connection,
    vm: SmallVm,
    writes: list[tuple[int, int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    for number, (offset, length) in enumerate(writes):
        await guest_write(
            conn, VM, "vda", offset, length, pattern=0x40 + len(STATE["snaps"]) + number
        )
    job = await backup(api)
    STATE["snaps"].append(snapshot(vm, tmp_path_factory.mktemp("point"))[0])
    return job


async def test_a_format_1_repository_stays_format_1(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Content in chunks 0-2 and the short last one; chunks 3 and 4 stay all zero.
    full = await round_(
        api,
        conn,
        vm,
        [(777, 3 * MiB), (CHUNK + 5, 3 * MiB), (2 * CHUNK + 9, 3 * MiB), (LAST * CHUNK, 300 * KiB)],
        tmp_path_factory,
    )
    assert full["message"].startswith("full backup"), full["message"]
    assert all(c in {RAW, ZSTD} for c in await codecs(repo_dir))
    # A write in chunk 1, one in all-zero chunk 3, one at the end of the short chunk.
    job = await round_(
        api,
        conn,
        vm,
        [(CHUNK + FRAME + 1, 5000), (3 * CHUNK + 3 * FRAME - 7, 100), (SIZE - 513, 513)],
        tmp_path_factory,
    )
    assert "(3 in part)" in job["message"], job["message"]
    found = await codecs(repo_dir)
    assert found[4] == 0 and all(found[i] in {RAW, ZSTD} for i in (0, 1, 2, 3, LAST)), found
    assert json.loads((repo_dir / "VirtBackup" / CONFIG_KEY).read_bytes())["format"] == 1


async def test_after_upgrade_the_chain_goes_on_framed(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert len(STATE["snaps"]) == 2, "needs the test before"
    repo = await open_repo(repo_dir)
    try:
        assert await repo.upgrade_format()
    finally:
        await repo.close()
    # The workers keep a destination's repository open until the configuration changes:
    # saving it again makes them read the new format.
    assert (await api.post("/config", json=STATE["config"])).status_code == 200
    # Parents of format 1 (chunks 1, 2 and the short last one) and all zero (chunk 4).
    job = await round_(
        api,
        conn,
        vm,
        [
            (CHUNK + 2 * FRAME + 3, 70000),
            (2 * CHUNK + FRAME - 1, 2),
            (4 * CHUNK + 11, 1),
            (SIZE - FRAME, 1000),
        ],
        tmp_path_factory,
    )
    assert "(4 in part)" in job["message"], job["message"]
    found = await codecs(repo_dir)
    assert all(found[i] == FRAMED for i in (1, 2, 4, LAST)), found
    assert found[0] in {RAW, ZSTD} and found[3] in {RAW, ZSTD}, found  # unchanged
    # Framed parents now: frames copied; a write across the chunk 0/1 boundary, one of
    # several MiB across chunks 2-4, and one byte at the end of the disk.
    job = await round_(
        api,
        conn,
        vm,
        [
            (CHUNK - 100, 200),
            (2 * CHUNK + 3 * MiB + 1, 5 * MiB),
            (SIZE - 1, 1),
            (CHUNK + 7 * FRAME, FRAME),
        ],
        tmp_path_factory,
    )
    assert job["message"].startswith("incremental backup"), job["message"]
    repo = await open_repo(repo_dir)
    try:
        before, latest = (await repo.restore_points(VM))[-2:]
        old = (await repo.manifest(before, "vda")).chunks
        new = (await repo.manifest(latest, "vda")).chunks
        shared = 0
        for index in (1, LAST):  # framed parents read in part: records copied
            parent = framed_records(await repo.read_chunk(old[index] or ""))[1]
            child = framed_records(await repo.read_chunk(new[index] or ""))[1]
            shared += sum(bytes(a) == bytes(b) for a, b in zip(parent, child, strict=True))
        assert shared > 0
    finally:
        await repo.close()


async def test_the_whole_mixed_chain_verifies_and_restores(
    api: httpx.AsyncClient, vm: SmallVm
) -> None:
    assert len(STATE["snaps"]) == 4, "needs the tests before"
    resp = await api.post("/api/v1/destinations/fs/verify", json={"mode": "full", "vmName": VM})
    assert resp.status_code == 202, resp.text
    job = await wait_job(api, resp.json()["id"])
    assert job["state"] == "success", job
    assert job["result"]["pointsChecked"] == 4, job["result"]
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    listed = sorted(resp.json(), key=lambda e: e["timestamp"])
    assert len(listed) == 4
    for point, snap in zip(listed, STATE["snaps"], strict=True):
        off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
        assert off.status_code in {200, 409}
        resp = await api.post(
            "/servers/local/restore/start",
            json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": "fs"},
        )
        assert resp.status_code == 200, resp.text
        done = await wait_job(api, resp.json()["jobId"])
        assert done["state"] == "success", done
        assert same(vm.disks[0], snap), f"point {point['timestamp']} differs"


NEWER = "repository format 3 is newer than this version"


async def refused(api: httpx.AsyncClient, resp: httpx.Response) -> str:
    """What is wrong with the answer to a request for the format-3 destination ("" when
    it is a 4xx/503 naming the format, or a job that fails naming it)."""
    what = f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        ok = (resp.status_code < 500 or resp.status_code == 503) and NEWER in resp.text
        return "" if ok else what
    body = resp.json()
    if not isinstance(body, dict) or not (body.get("jobId") or body.get("id")):
        return what
    job = await wait_job(api, body.get("jobId") or body["id"])
    if job["state"] == "failure" and NEWER in job["message"]:
        return ""
    return f"{what} -> job {job['state']}: {job['message'][:300]}"


async def test_a_format_3_repository_is_refused_by_name_on_every_route(
    api: httpx.AsyncClient, vm: SmallVm
) -> None:
    wrong = [
        await refused(
            api, await api.post("/servers/local/backup", json={"vmName": VM, "destinationId": "v3"})
        ),
        await refused(api, await api.get("/restore/entries", params={"destinationId": "v3"})),
        await refused(api, await api.get("/api/v1/restore-points", params={"destinationId": "v3"})),
        await refused(api, await api.get("/api/v1/destinations/v3/stats")),
    ]
    for what, body in (
        ("verify", {"mode": "full"}),
        ("prune", {"keepLast": 1}),
        ("gc", {"graceSeconds": 0}),
    ):
        wrong.append(
            await refused(api, await api.post(f"/api/v1/destinations/v3/{what}", json=body))
        )
    restore = {"xmlPath": f"vms/{VM}/2026-01-01T00-00-00/domain.xml", "decision": "overwrite"}
    wrong.append(
        await refused(
            api,
            await api.post("/servers/local/restore/start", json={**restore, "destinationId": "v3"}),
        )
    )
    sanity = {"xmlPath": restore["xmlPath"], "destinationId": "v3"}
    wrong.append(await refused(api, await api.post("/restore/sanity", json=sanity)))
    assert not [w for w in wrong if w], wrong
    config = json.loads((STATE["newer"] / "VirtBackup" / CONFIG_KEY).read_bytes())
    assert config["format"] == 3  # never replaced by a repository this version makes
