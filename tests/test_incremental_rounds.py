"""Incrementals that read dirty chunks in part, end to end: many rounds of guest writes at
offsets and sizes aligned to nothing (neither the bitmap's 64 KiB nor the chunk), an
incremental after each, and every restore point restored bit-identical; then a parent
chunk missing or damaged in the repository, which the next incremental reads whole.
The repository is format 2: chunks are framed (one record per 256 KiB), and a chunk read
in part keeps its parent's records for the frames its writes did not touch.

A real VM (libvirtd/QEMU) through the agent API, two transfer workers, a filesystem
destination. The tests in this module build on each other, in order.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, backup_ok, local_config, running_system, same, snapshot, wait_job

from virtbackup.repository.codec import FRAMED, framed_records
from virtbackup.repository.format import DEFAULT_CHUNK_SIZE, chunk_key
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.vms import SmallVm, guest_write, made_vm
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
CHUNK = DEFAULT_CHUNK_SIZE  # the repository's (the geometry below is in its chunks)
GRANULE = 64 * KiB  # the dirty bitmap's (the qcow2 cluster size)
VM = f"vbt-incr-{os.getpid()}"
ROUNDS = 6


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("incr"), workers=2, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [SIZE]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(sysm: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as client:
        assert (await client.post("/config", json=local_config(repo_dir))).status_code == 200
        yield client


async def backup(api: httpx.AsyncClient) -> dict[str, Any]:
    return await backup_ok(api, VM)


async def restore(api: httpx.AsyncClient, xml_path: str) -> None:
    off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": VM})
    assert off.status_code in {200, 409}
    resp = await api.post(
        "/servers/local/restore/start",
        json={"xmlPath": xml_path, "decision": "overwrite", "destinationId": "fs"},
    )
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job


async def points(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda e: e["timestamp"])


def expected_reads(writes: list[tuple[int, int]]) -> tuple[int, int]:
    """What an incremental after ``writes`` reads at least (the dirty 64 KiB granules)
    and at most (every dirty chunk whole)."""
    granules = {g for o, n in writes for g in range(o // GRANULE, (o + n - 1) // GRANULE + 1)}
    chunks = {g * GRANULE // CHUNK for g in granules}
    return len(granules) * GRANULE, len(chunks) * CHUNK


async def scattered_writes(conn: Connection, rng: random.Random) -> list[tuple[int, int]]:
    """A few guest writes at unaligned offsets and sizes, each its own pattern: small ones
    (a chunk read in part), and one of 2-3 MiB (a chunk possibly read whole)."""
    writes = []
    sizes = [rng.randrange(1, 700 * KiB) for _ in range(rng.randrange(3, 7))]
    sizes.append(rng.randrange(2 * MiB, 3 * MiB))
    for size in sizes:
        offset = rng.randrange(SIZE - size)
        if offset % 512 == 0:
            offset += 1
        await guest_write(
            conn, VM, "vda", offset, size, pattern=rng.randrange(1, 256), flush=size == sizes[-1]
        )
        writes.append((offset, size))
    return writes


STATE: dict[str, Any] = {}


async def shared_records(repo_dir: Path) -> int:
    """Every chunk of every point is framed; returns how many records the chunks of each
    incremental that changed share, byte for byte, with its parent's chunk there."""
    repo = await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))
    try:
        assert repo.config.format == 2 and repo.framed
        shared, before = 0, None
        for point in await repo.restore_points(VM):
            chunks = (await repo.manifest(point, "vda")).chunks
            for index, chunk_id in enumerate(chunks):
                if chunk_id is None:
                    continue
                blob = await repo.read_chunk(chunk_id)
                assert blob[0] == FRAMED, (point.timestamp, index)
                parent = before[index] if before else None
                if parent is not None and parent != chunk_id:
                    old = framed_records(await repo.read_chunk(parent))[1]
                    new = framed_records(blob)[1]
                    shared += sum(bytes(a) == bytes(b) for a, b in zip(old, new, strict=True))
            before = chunks
        return shared
    finally:
        await repo.close()


async def test_rounds_of_unaligned_writes_restore_bit_identical(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    rng = random.Random(13)
    for index in range(SIZE // CHUNK):  # content in every chunk: parents that are not zero
        await guest_write(conn, VM, "vda", index * CHUNK + 777, CHUNK * 3 // 4, pattern=index + 1)
    full = await backup(api)
    assert full["message"].startswith("full backup"), full["message"]
    snaps = [snapshot(vm, tmp_path_factory.mktemp("round0"))[0]]
    for round_ in range(1, ROUNDS + 1):
        writes = await scattered_writes(conn, rng)
        least, most = expected_reads(writes)
        job = await backup(api)
        message = job["message"]
        assert message.startswith("incremental backup"), message
        assert " in part)" in message, message
        # Only the dirty ranges of the chunks read in part come from the disk.
        assert least <= job["bytesTransferred"] < most, (job["bytesTransferred"], least, most)
        snaps.append(snapshot(vm, tmp_path_factory.mktemp(f"round{round_}"))[0])
    listed = await points(api)
    assert len(listed) == ROUNDS + 1
    assert await shared_records(repo_dir) > 0
    for point, snap in zip(listed, snaps, strict=True):
        await restore(api, point["xmlPath"])
        assert same(vm.disks[0], snap), f"point {point['timestamp']} differs"
    STATE["latest"] = listed[-1]


async def test_a_missing_or_damaged_parent_chunk_is_read_whole(
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert "latest" in STATE, "needs the rounds before"
    start = await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    assert start.status_code == 200, start.text
    # The restore started a new chain: a point to be incremental from, then the damage.
    await backup(api)
    repo = await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))
    try:
        latest = (await repo.restore_points(VM))[-1]
        chunks = (await repo.manifest(latest, "vda")).chunks
        # Chunks whose content is nowhere else on the disk.
        missing, damaged, other = [i for i, c in enumerate(chunks) if c and chunks.count(c) == 1][
            :3
        ]
        await repo.driver.delete(chunk_key(chunks[missing] or ""))
        # A blob that decodes, to other content: only its hash tells.
        blob = await repo.read_chunk(chunks[other] or "")
        await repo.driver.put(chunk_key(chunks[damaged] or ""), blob)
    finally:
        await repo.close()
    await guest_write(conn, VM, "vda", missing * CHUNK + 4097, 5000, pattern=0xE1)
    await guest_write(conn, VM, "vda", damaged * CHUNK + 65537, 70000, pattern=0xE2)
    job = await backup(api)
    message = job["message"]
    assert message.startswith("incremental backup"), message
    assert "(2 in part)" in message, message
    assert "2 chunks of the previous restore point were missing or damaged" in message, message
    assert job["bytesTransferred"] == 2 * CHUNK  # both read whole
    snap = snapshot(vm, tmp_path_factory.mktemp("damaged"))[0]
    await restore(api, (await points(api))[-1]["xmlPath"])
    assert same(vm.disks[0], snap)
