"""Crafted chunk blobs in a format-2 repository (the attacker controls the destination's
files), through the real paths: an incremental whose parent chunks are crafted reads
them whole and stores the right chunks, a restore of the crafted point fails naming a
chunk and leaves the disk as it was, so does a copy of it to another destination, and a
full verify names and quarantines every damaged chunk without crashing its worker (a
zstd chunk followed by a second frame too, which restores fail on), while two odd but
valid blobs (4 KiB frames; a record of two zstd frames) stay good.

A real VM (libvirtd/QEMU) whose disk is no multiple of the chunk size, one transfer
worker, a filesystem destination. The tests in this module build on each other, in order.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from harness import System, backup_ok, local_config, running_system, same, snapshot, wait_job

from virtbackup.repository.codec import FRAMED, RAW, ZSTD, compress_record, framed_records
from virtbackup.repository.format import chunk_key, quarantine_key
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.vms import SmallVm, guest_write, made_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 4 * MiB  # the repository is made with it: the geometry below is in its chunks
FRAME = 256 * KiB
SIZE = 34 * MiB + 300 * KiB  # 9 chunks, the last of 2 MiB + 300 KiB
LAST = 8
VM = f"vbt-craft-{os.getpid()}"
#: Chunks made damaged, and chunks made odd but still good (index: how).
DAMAGED = {
    0: "zstd frame (codec 1) claiming 1 TiB",
    1: "framed, no records",
    2: "framed, a RAW record longer than its frame",
    3: "framed, a record that fills half its frame",
    6: "framed, a record whose zstd frame claims 1 TiB",
    7: "zstd (codec 1), the chunk's frame then another",
    8: "framed, a last record longer than the chunk",
}
ODD = {4: "framed with 4 KiB frames", 5: "framed, a record of two zstd frames"}
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("craft"), workers=1, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [SIZE]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(sysm: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    other = vm_directory(prefix="vbtest-repo2-")
    STATE["other"] = other
    for root in (repo_dir, other):  # a copy needs equal chunk sizes
        made = await Repository.open_or_create(
            FilesystemDriver(root / "VirtBackup"), chunk_size=CHUNK
        )
        await made.close()
    config = local_config(repo_dir)
    config["destinations"].append(
        {"id": "fs2", "name": "Other", "driverId": "filesystem", "params": {"path": str(other)}}
    )
    try:
        async with httpx.AsyncClient(
            base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
        ) as client:
            assert (await client.post("/config", json=config)).status_code == 200
            yield client
    finally:
        shutil.rmtree(other, ignore_errors=True)


async def backup(api: httpx.AsyncClient) -> dict[str, Any]:
    return await backup_ok(api, VM)


async def restore(api: httpx.AsyncClient, xml_path: str) -> dict[str, Any]:
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code in {200, 409}
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    return await wait_job(api, resp.json()["jobId"])


def framed(shift: int, records: list[bytes]) -> bytes:
    head = struct.pack("<BBI", FRAMED, shift, len(records))
    return head + struct.pack(f"<{len(records)}I", *map(len, records)) + b"".join(records)


def huge_zstd_frame() -> bytes:
    """A zstd frame whose header claims 1 TiB of content (one RLE block of 1 KiB)."""
    head = struct.pack("<I", 0xFD2FB528) + bytes([0b11100000]) + struct.pack("<Q", 1 << 40)
    return head + struct.pack("<I", (1024 << 3) | (1 << 1) | 1)[:3] + b"a"


def crafted(index: int, data: bytes, records: list[bytes]) -> bytes:
    """The blob that replaces chunk ``index`` (plaintext ``data``, real ``records``)."""
    if index == 0:
        return bytes([ZSTD]) + huge_zstd_frame()
    if index == 1:
        return framed(18, [])
    if index == 2:
        return framed(18, [*records[:2], bytes([RAW]) + data[: FRAME + 1], *records[3:]])
    if index == 3:
        half = b"".join(compress_record(data[FRAME : FRAME + FRAME // 2], 1))
        return framed(18, [records[0], half, *records[2:]])
    if index == 4:
        small = [
            b"".join(compress_record(data[i : i + 4 * KiB], 1))
            for i in range(0, len(data), 4 * KiB)
        ]
        return framed(12, small)
    if index == 5:
        comp = zstandard.ZstdCompressor()
        two = comp.compress(data[: FRAME // 2]) + comp.compress(data[FRAME // 2 : FRAME])
        return framed(18, [bytes([ZSTD]) + two, *records[1:]])
    if index == 6:
        return framed(18, [records[0], bytes([ZSTD]) + huge_zstd_frame(), *records[2:]])
    if index == 7:
        comp = zstandard.ZstdCompressor()
        return bytes([ZSTD]) + comp.compress(data) + comp.compress(b"more")
    assert index == LAST
    return framed(18, [*records[:-1], bytes([RAW]) + bytes(FRAME)])


async def test_crafted_parent_chunks_are_read_whole(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    for index in range(LAST + 1):  # content of its own in every chunk
        length = 3 * MiB if index < LAST else 2 * MiB
        await guest_write(conn, VM, "vda", index * CHUNK + 777, length, pattern=index + 1)
    assert (await backup(api))["message"].startswith("full backup")
    repo = await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))
    try:
        assert repo.framed
        full = (await repo.restore_points(VM))[-1]
        chunks = (await repo.manifest(full, "vda")).chunks
        assert len(chunks) == LAST + 1 and None not in chunks and len(set(chunks)) == LAST + 1
        ids = [c or "" for c in chunks]
        for index in (*DAMAGED, *ODD):
            blob = await repo.read_chunk(ids[index])
            data = repo.decode_chunk(ids[index], blob)
            records = [bytes(r) for r in framed_records(blob)[1]]
            await repo.driver.put(chunk_key(ids[index]), crafted(index, data, records))
        for index in ODD:  # good still: they decode to their chunk
            assert repo.decode_chunk(ids[index], await repo.read_chunk(ids[index]))
    finally:
        await repo.close()
    # A write in the second frame of every chunk, and in the short last one's last frame.
    for index in range(LAST + 1):
        await guest_write(conn, VM, "vda", index * CHUNK + FRAME + 5, 5000, pattern=0xE0 + index)
    await guest_write(conn, VM, "vda", SIZE - 1000, 999, pattern=0xEF)
    job = await backup(api)
    message = job["message"]
    assert message.startswith("incremental backup"), message
    assert "(9 in part)" in message, message
    assert f"{len(DAMAGED)} chunks of the previous restore point were missing or damaged" in (
        message
    ), message
    snap = snapshot(vm, tmp_path_factory.mktemp("after"))[0]
    latest = (await points(api))[-1]
    assert (await restore(api, latest["xmlPath"]))["state"] == "success"
    assert same(vm.disks[0], snap)
    STATE.update(ids=ids, snap=snap, full=full.timestamp)


async def points(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda e: e["timestamp"])


async def test_a_restore_of_the_crafted_point_fails_naming_a_chunk(
    api: httpx.AsyncClient, vm: SmallVm
) -> None:
    assert "ids" in STATE, "needs the test before"
    ids = STATE["ids"]
    first = next(p for p in await points(api) if p["timestamp"] == STATE["full"])
    job = await restore(api, first["xmlPath"])
    assert job["state"] == "failure", job
    assert any(ids[index] in job["message"] for index in DAMAGED), job["message"]
    assert same(vm.disks[0], STATE["snap"])  # as it was


async def test_a_copy_of_the_crafted_point_fails_naming_a_chunk(api: httpx.AsyncClient) -> None:
    assert "ids" in STATE, "needs the tests before"
    ids = STATE["ids"]
    body = {"vmName": VM, "targetDestinationId": "fs2", "timestamp": STATE["full"]}
    resp = await api.post("/api/v1/destinations/fs/copy", json=body)
    assert resp.status_code == 202, resp.text
    job = await wait_job(api, resp.json()["id"])
    assert job["state"] == "failure", job
    assert any(ids[index] in job["message"] for index in DAMAGED), job["message"]
    listed = await api.get("/restore/entries", params={"destinationId": "fs2"})
    assert listed.status_code == 200 and listed.json() == [], listed.text


async def test_verify_names_and_quarantines_every_crafted_chunk(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    assert "ids" in STATE, "needs the tests before"
    ids = STATE["ids"]
    resp = await api.post("/api/v1/destinations/fs/verify", json={"mode": "full", "vmName": VM})
    assert resp.status_code == 202, resp.text
    job = await wait_job(api, resp.json()["id"])
    assert job["state"] == "failure", job
    assert "points" in job["result"], job  # a worker that crashed gives no result
    damaged = [p for p in job["result"]["points"] if p["state"] == "damaged"]
    assert [p["timestamp"] for p in damaged] == [STATE["full"]], job["result"]
    named = {c["id"] for c in damaged[0]["damagedChunks"]}
    assert named == {ids[index] for index in DAMAGED}, (named, DAMAGED)
    repo = await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))
    try:
        for index in DAMAGED:
            assert await repo.driver.exists(quarantine_key(ids[index])), DAMAGED[index]
            assert not await repo.has_chunk(ids[index]), DAMAGED[index]
        for index in ODD:
            assert await repo.has_chunk(ids[index]), ODD[index]
    finally:
        await repo.close()
