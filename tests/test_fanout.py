"""One backup read written to several destinations, and copy jobs, end to end: a real VM
(libvirtd/QEMU), the services as processes, a filesystem destination ``fs``, an
encrypted S3 destination ``s3`` (SeaweedFS) and a second filesystem destination ``fs2``.

A backup to ``fs`` and ``s3`` at once reads the disk once (the job's bytes read are
those of one read) and both points restore bit-identical, full and incremental; a copy
of the encrypted S3 point to ``fs2`` restores bit-identical and passes a full verify,
also when a GC (grace 0) of ``fs2`` runs while the copy's chunks are stored but not yet
committed; a later backup to ``fs`` and ``fs2`` builds incrementally on the copied
point in ``fs2``, and one to ``fs`` and ``s3`` reads ``s3`` in full (its newest point
has another checkpoint) from the same read; a destination that fails leaves the other
committed and the job says ``partial failure``. The tests build on each other, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, running_system, same, snapshot, wait_job

from virtbackup.repository.format import DEFAULT_CHUNK_SIZE
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 64 * MiB
CHUNK = DEFAULT_CHUNK_SIZE  # the repository's (the geometry below is in its chunks)
VM = f"vbt-fan-{os.getpid()}"
#: Every job holds this long before it commits (so a GC can be aimed at a copy).
HOLD = 1.5
STATE: dict[str, Any] = {"snaps": {}, "points": {}}


@pytest.fixture(scope="module")
def second_dir() -> Iterator[Path]:
    path = vm_directory(prefix="vbtest-repo2-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
async def odd_dir() -> AsyncIterator[Path]:
    """A filesystem destination whose repository has 1 MiB chunks (the others the default)."""
    path = vm_directory(prefix="vbtest-repo3-")
    repo = await Repository.open_or_create(
        FilesystemDriver(path / "VirtBackup"), chunk_size=1 * MiB
    )
    await repo.close()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("fanout"),
        workers=1,
        orchestrators=1,
        VIRTBACKUP_DEBUG="true",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps({"before:committing": HOLD}),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    directory = vm_directory()
    try:
        yield await create_vm(conn, VM, directory, [SIZE])
    finally:
        await remove_vm(conn, VM, delete_directory=directory)


@pytest.fixture(scope="module")
async def api(
    sysm: System, repo_dir: Path, second_dir: Path, odd_dir: Path, seaweed: SeaweedServer
) -> AsyncIterator[httpx.AsyncClient]:
    config = {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": "fs", "name": "fs", "driverId": "filesystem", "params": {"path": str(repo_dir)}},
            {
                "id": "s3",
                "name": "s3",
                "driverId": "s3",
                "params": seaweed.params(prefix=f"fan-{os.getpid()}"),
                "encryption": {"passphrase": "fan-out secret"},
            },
            {
                "id": "fs2",
                "name": "fs2",
                "driverId": "filesystem",
                "params": {"path": str(second_dir)},
            },
            {
                "id": "odd",
                "name": "odd",
                "driverId": "filesystem",
                "params": {"path": str(odd_dir)},
            },
        ],
        "backupDestinationId": "fs",
    }
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as client:
        resp = await client.post("/config", json=config)
        assert resp.status_code == 200, resp.text
        yield client


async def backup(api: httpx.AsyncClient, also: list[str], **extra: Any) -> dict[str, Any]:
    body = {"vmName": VM, "destinationId": "fs", "alsoDestinationIds": also, **extra}
    resp = await api.post("/servers/local/backup", json=body)
    assert resp.status_code == 200, resp.text
    return await wait_job(api, resp.json()["jobId"])


async def points(api: httpx.AsyncClient, dest: str) -> list[dict[str, Any]]:
    resp = await api.get("/api/v1/restore-points", params={"destinationId": dest, "vmName": VM})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda p: p["timestamp"])


async def copy(api: httpx.AsyncClient, source: str, body: dict[str, Any]) -> str:
    resp = await api.post(f"/api/v1/destinations/{source}/copy", json=body)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    assert job["type"] == "copy" and job["destinationId"] == source
    return str(job["id"])


async def test_bad_input_gets_4xx_naming_the_field(api: httpx.AsyncClient) -> None:
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/servers/local/backup", {"vmName": VM, "alsoDestinationIds": ["nope"]}, 400,
         "alsoDestinationIds"),
        ("/servers/local/backup", {"vmName": VM, "alsoDestinationIds": ["s3", "s3"]}, 400,
         "alsoDestinationIds"),
        ("/servers/local/backup", {"vmName": VM, "alsoDestinationIds": ["fs"]}, 400,
         "alsoDestinationIds"),
        ("/servers/local/backup", {"vmName": VM, "alsoDestinationIds": "s3"}, 400,
         "alsoDestinationIds"),
        ("/servers/local/backup", {"vmName": VM, "alsoDestinationIds": [1]}, 400,
         "alsoDestinationIds"),
        ("/api/v1/destinations/fs/copy", {"vmName": VM, "targetDestinationId": "nope"}, 400,
         "targetDestinationId"),
        ("/api/v1/destinations/fs/copy", {"vmName": VM, "targetDestinationId": "fs"}, 400,
         "targetDestinationId"),
        ("/api/v1/destinations/fs/copy", {"vmName": VM}, 400, "targetDestinationId"),
        ("/api/v1/destinations/fs/copy", {"targetDestinationId": "s3"}, 400, "vmName"),
        ("/api/v1/destinations/fs/copy",
         {"vmName": VM, "targetDestinationId": "s3", "timestamp": "yesterday"}, 400, "timestamp"),
        ("/api/v1/destinations/fs/copy",
         {"vmName": VM, "targetDestinationId": "s3", "stamp": "x"}, 400, "stamp"),
        ("/api/v1/destinations/nope/copy", {"vmName": VM, "targetDestinationId": "s3"}, 404,
         "nope"),
        ("/api/v1/destinations/fs/copy", {"vmName": VM, "targetDestinationId": "s3"}, 404,
         "no backups"),
    ]  # fmt: skip
    for path, body, status, named in cases:
        resp = await api.post(path, json=body)
        assert resp.status_code == status, (path, body, resp.text)
        assert named in resp.text, (path, body, resp.text)
    jobs = (await api.get("/jobs")).json()
    assert not [j for j in jobs if j["type"] in {"backup", "copy"}]  # nothing half-created


async def test_a_full_backup_to_two_destinations_reads_once(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for index, pattern in ((0, 0x11), (3, 0x22), (9, 0x33)):
        await guest_write(conn, VM, "vda", index * CHUNK, CHUNK, pattern=pattern)
    await guest_write(conn, VM, "vda", 12 * CHUNK + 4096, CHUNK * 3 // 4, pattern=0x44)
    STATE["snaps"][1] = snapshot(vm, tmp_path_factory.mktemp("snap1"))[0]
    job = await backup(api, ["s3"])
    assert job["state"] == "success", job
    outcome = job["result"]["destinations"]
    assert {d: o["state"] for d, o in outcome.items()} == {"fs": "committed", "s3": "committed"}
    fs, s3 = (await points(api, "fs"))[-1], (await points(api, "s3"))[-1]
    assert fs["kind"] == s3["kind"] == "full"
    assert fs["timestamp"] == outcome["fs"]["timestamp"]
    assert s3["timestamp"] == outcome["s3"]["timestamp"]
    # Read once: the four chunks written (0, 3, 9, 12) once, not once per destination.
    assert job["bytesTransferred"] == 4 * CHUNK, job
    STATE["points"][1] = {"fs": fs, "s3": s3}


async def test_an_incremental_to_two_destinations(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert 1 in STATE["snaps"], "needs the test before"
    await guest_write(conn, VM, "vda", 3 * CHUNK + 8192, 64 * 1024, pattern=0x55)
    await guest_write(conn, VM, "vda", 6 * CHUNK, CHUNK, pattern=0x66)
    STATE["snaps"][2] = snapshot(vm, tmp_path_factory.mktemp("snap2"))[0]
    job = await backup(api, ["s3"])
    assert job["state"] == "success", job
    fs, s3 = (await points(api, "fs"))[-1], (await points(api, "s3"))[-1]
    assert fs["kind"] == s3["kind"] == "incremental", (fs, s3)
    assert fs["parentTimestamp"] == STATE["points"][1]["fs"]["timestamp"]
    assert s3["parentTimestamp"] == STATE["points"][1]["s3"]["timestamp"]
    # Only the dirty bytes, once: 128 KiB of chunk 3 (read in part) and chunk 6.
    assert CHUNK < job["bytesTransferred"] <= CHUNK + 256 * 1024, job
    STATE["points"][2] = {"fs": fs, "s3": s3}


async def test_a_copy_restores_from_the_target_and_survives_a_gc_of_it(
    api: httpx.AsyncClient, second_dir: Path
) -> None:
    assert 2 in STATE["points"], "needs the tests before"
    # The encrypted S3 point goes to a plain filesystem repository (other chunk ids).
    copy_id = await copy(api, "s3", {"vmName": VM, "targetDestinationId": "fs2"})
    deadline = time.monotonic() + 60
    while True:  # every chunk stored in fs2, the copy holds before its commit
        job = (await api.get(f"/jobs/{copy_id}")).json()
        if job["totalUnits"] and job["completedUnits"] == job["totalUnits"]:
            break
        assert job["state"] in {"queued", "running"} and time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    gc = await api.post("/api/v1/destinations/fs2/gc", json={"graceSeconds": 0})
    assert gc.status_code == 202, gc.text
    done = await wait_job(api, copy_id)
    assert done["state"] == "success", done
    assert done["result"]["chunksStored"] == 5, done  # chunks 0, 3, 6, 9, 12 (3 rewritten)
    gc_job = await wait_job(api, gc.json()["id"])
    assert gc_job["state"] == "success", gc_job
    copied = (await points(api, "fs2"))[-1]
    source = STATE["points"][2]["s3"]
    assert (copied["timestamp"], copied["kind"]) == (source["timestamp"], source["kind"])
    verify = await api.post("/api/v1/destinations/fs2/verify", json={"mode": "full"})
    assert verify.status_code == 202, verify.text
    checked = await wait_job(api, verify.json()["id"])
    assert checked["state"] == "success", checked
    assert (checked["result"]["pointsChecked"], checked["result"]["pointsDamaged"]) == (1, 0)

    # The older point too (by timestamp); the newest again is a no-op.
    older = STATE["points"][1]["s3"]["timestamp"]
    again = await wait_job(api, await copy(api, "s3", {"vmName": VM, "targetDestinationId": "fs2",
                                                      "timestamp": older}))  # fmt: skip
    assert again["state"] == "success", again
    # Only the old chunk 3 is new to fs2; the others are deduplicated.
    assert (again["result"]["chunksStored"], again["result"]["chunksDeduplicated"]) == (1, 3)
    noop = await wait_job(api, await copy(api, "s3", {"vmName": VM, "targetDestinationId": "fs2"}))
    assert noop["state"] == "success" and "already" in noop["message"], noop
    assert [p["timestamp"] for p in await points(api, "fs2")] == [
        STATE["points"][1]["s3"]["timestamp"],
        source["timestamp"],
    ]
    STATE["points"]["copied"] = copied


async def test_destinations_build_on_their_own_points_or_read_in_full(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert "copied" in STATE["points"], "needs the tests before"
    # fs2's newest point is the copy of the newest fan-out point: same checkpoint, so
    # both are incremental.
    await guest_write(conn, VM, "vda", 7 * CHUNK, CHUNK, pattern=0x77)
    STATE["snaps"][3] = snapshot(vm, tmp_path_factory.mktemp("snap3"))[0]
    job = await backup(api, ["fs2"])
    assert job["state"] == "success", job
    fs, fs2 = (await points(api, "fs"))[-1], (await points(api, "fs2"))[-1]
    assert fs["kind"] == fs2["kind"] == "incremental", (fs, fs2)
    assert fs2["parentTimestamp"] == STATE["points"]["copied"]["timestamp"]
    assert job["bytesTransferred"] == CHUNK, job
    STATE["points"][3] = {"fs": fs, "fs2": fs2}

    # s3's newest point has an older checkpoint: s3 is read in full, fs incrementally,
    # from one read (each chunk once).
    await guest_write(conn, VM, "vda", 10 * CHUNK, CHUNK, pattern=0x88)
    STATE["snaps"][4] = snapshot(vm, tmp_path_factory.mktemp("snap4"))[0]
    job = await backup(api, ["s3"])
    assert job["state"] == "success", job
    assert "s3 in full" in job["message"], job["message"]
    fs, s3 = (await points(api, "fs"))[-1], (await points(api, "s3"))[-1]
    assert (fs["kind"], s3["kind"]) == ("incremental", "full"), (fs, s3)
    # Chunks 0, 3, 6, 7, 9, 10, 12: all of s3's full read, fs's dirty chunk among them.
    assert job["bytesTransferred"] == 7 * CHUNK, job
    STATE["points"][4] = {"fs": fs, "s3": s3}


async def test_a_failing_destination_leaves_the_other_committed(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, second_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    assert 4 in STATE["points"], "needs the tests before"
    chunks = second_dir / "VirtBackup" / "chunks"
    aside = second_dir / "chunks-aside"
    chunks.rename(aside)
    chunks.write_bytes(b"")  # a real fault: every chunk write to fs2 fails
    try:
        await guest_write(conn, VM, "vda", 13 * CHUNK, CHUNK, pattern=0x99)
        STATE["snaps"][5] = snapshot(vm, tmp_path_factory.mktemp("snap5"))[0]
        before = len(await points(api, "fs2"))
        job = await backup(api, ["fs2"])
    finally:
        chunks.unlink()
        aside.rename(chunks)
    assert job["state"] == "failure", job
    assert job["message"].startswith("partial failure: committed in fs ("), job["message"]
    outcome = job["result"]["destinations"]
    assert outcome["fs"]["state"] == "committed" and outcome["fs2"]["state"] == "failed", outcome
    assert outcome["fs2"]["error"]
    assert len(await points(api, "fs2")) == before  # nothing committed there
    fs = (await points(api, "fs"))[-1]
    assert fs["timestamp"] == outcome["fs"]["timestamp"]
    STATE["points"][5] = {"fs": fs}

    # A repository of another chunk size fails at once; the backup goes on without it.
    job = await backup(api, ["odd"])
    assert job["state"] == "failure", job
    assert job["message"].startswith("partial failure: committed in fs ("), job["message"]
    assert "chunk size" in job["result"]["destinations"]["odd"]["error"], job["result"]
    assert await points(api, "odd") == []
    assert (await points(api, "fs"))[-1]["timestamp"] == job["result"]["destinations"]["fs"][
        "timestamp"
    ]
    STATE["points"][5] = {"fs": (await points(api, "fs"))[-1]}


async def test_every_destination_restores_bit_identical(
    api: httpx.AsyncClient, vm: SmallVm
) -> None:
    assert 5 in STATE["points"], "needs the tests before"
    cases = [
        (1, "s3"), (1, "fs"), (2, "s3"), (2, "fs"), (3, "fs2"), (4, "s3"), (5, "fs"),
    ]  # fmt: skip
    copied = STATE["points"]["copied"]
    for number, dest in [*cases, ("copied", "fs2")]:
        point = copied if number == "copied" else STATE["points"][number][dest]
        snap = STATE["snaps"][2 if number == "copied" else number]
        off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
        assert off.status_code in {200, 409}
        resp = await api.post(
            "/servers/local/restore/start",
            json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": dest},
        )
        assert resp.status_code == 200, resp.text
        done = await wait_job(api, resp.json()["jobId"])
        assert done["state"] == "success", done
        assert same(vm.disks[0], snap), f"point {number} from {dest} differs"


async def test_a_rerun_writes_every_destination_again(api: httpx.AsyncClient, vm: SmallVm) -> None:
    """backend-api.md's rerun starts the same definition: a fan-out backup's rerun reads
    once and commits in each of its destinations again, not in the first one alone."""
    first = await backup(api, ["fs2"])
    assert first["state"] == "success", first
    resp = await api.post(f"/api/v1/jobs/{first['id']}/rerun")
    assert resp.status_code == 202, resp.text
    again = await wait_job(api, resp.json()["jobId"])
    assert again["state"] == "success", again
    assert again["params"].get("alsoDestinationIds") == ["fs2"], again["params"]
    outcome = again["result"].get("destinations", {})
    assert {d: o["state"] for d, o in outcome.items()} == {"fs": "committed", "fs2": "committed"}
    assert (await points(api, "fs2"))[-1]["timestamp"] == outcome["fs2"]["timestamp"]
    # A copy job reruns as the same copy: that point, to that target.
    copied = await wait_job(api, await copy(api, "fs", {"vmName": VM, "targetDestinationId": "s3"}))
    assert copied["state"] == "success", copied
    resp = await api.post(f"/api/v1/jobs/{copied['id']}/rerun")
    assert resp.status_code == 202, resp.text
    recopied = await wait_job(api, resp.json()["jobId"])
    assert recopied["state"] == "success" and recopied["type"] == "copy", recopied
    assert recopied["params"] == copied["params"], (recopied["params"], copied["params"])
