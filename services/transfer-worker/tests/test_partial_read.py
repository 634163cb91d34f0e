"""Backup units that read chunks in part, against a real qemu-nbd and a filesystem
repository: the chunk a partial read stores is the one a whole read stores, and a
parent chunk that is missing, damaged or of another size makes it a whole read."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtbackup.contracts.v1.work import PartialChunk, TransferUnit, UnitResult
from virtbackup.nbd import NbdClient
from virtbackup.repository.format import chunk_key
from virtbackup.repository.repository import Repository
from virtbackup.runtime.ports import free_port
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.units import UnitContext, backup_unit

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 1 * MiB
#: Nine full chunks and a short last one (chunk 9: 300 KiB + 7 bytes).
SIZE = 9 * CHUNK + 300 * KiB + 7
COUNT = 10


@dataclass
class Served:
    url: str
    image: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A writable export of a qcow2 image: random data in chunks 0-5 and 9, zeros
    (unallocated) in 6-8."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    data = tmp_path / "data.bin"
    data.write_bytes(random.Random(1).randbytes(6 * CHUNK))
    tail = tmp_path / "tail.bin"
    tail.write_bytes(random.Random(2).randbytes(SIZE - 9 * CHUNK))
    for source, offset in ((data, 0), (tail, 9 * CHUNK)):
        command = f"write -s {source} {offset} {source.stat().st_size}"
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True
        )
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "qcow2", "-t", "-b", "127.0.0.1", "-p", str(port), "-x", "d", str(image)]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.05)
        yield Served(f"nbd://127.0.0.1:{port}/d", image)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=[None, "a passphrase"], ids=["plain", "encrypted"])
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Repository]:
    driver = FilesystemDriver(tmp_path / "repo")
    repository = await Repository.open_or_create(driver, request.param, chunk_size=CHUNK)
    yield repository
    await repository.close()


def _uctx() -> UnitContext:
    return UnitContext(worker="t", executor=ThreadPoolExecutor(2), budget=ByteBudget(4 * CHUNK))


def _unit(job: str, indices: list[int], partial: list[PartialChunk] | None = None) -> TransferUnit:
    return TransferUnit(
        job_id=job,
        unit=0,
        kind="backup",
        destination_id="d",
        disk="vda",
        disk_size=SIZE,
        chunk_size=CHUNK,
        nbd_url="",
        indices=indices,
        partial=partial or [],
    )


async def _backup(nbd: NbdClient, repo: Repository, unit: TransferUnit) -> UnitResult:
    # A new context per backup: no chunk is known stored from an earlier one.
    return await backup_unit(unit, repo, nbd, _uctx())


def _ids(result: UnitResult) -> list[str | None]:
    return [ref.id for ref in sorted(result.chunks, key=lambda r: r.index)]


async def _scatter(
    nbd: NbdClient, rng: random.Random, count: int
) -> dict[int, list[tuple[int, int]]]:
    """``count`` writes of random bytes at unaligned offsets and sizes; returns the dirty
    ranges of each chunk (merged, as the planner sends them)."""
    dirty = bytearray(SIZE)
    for _ in range(count):
        offset = rng.randrange(SIZE - 1)
        length = min(rng.randrange(1, 200 * KiB), SIZE - offset)
        await nbd.write(offset, rng.randbytes(length))
        dirty[offset : offset + length] = b"\1" * length
    out: dict[int, list[tuple[int, int]]] = {}
    for index in range(COUNT):
        chunk = dirty[index * CHUNK : (index + 1) * CHUNK]
        ranges = _runs(chunk)
        if ranges:
            out[index] = ranges
    return out


def _runs(data: bytearray) -> list[tuple[int, int]]:
    """The runs of ones in ``data`` (ones and zeros) as ``(start, length)``."""
    runs, pos = [], 0
    while pos < len(data):
        start = data.find(b"\1", pos)
        if start < 0:
            break
        end = data.find(b"\0", start)
        end = len(data) if end < 0 else end
        runs.append((start, end - start))
        pos = end
    return runs


async def test_a_chunk_read_in_part_is_the_chunk_read_whole(
    served: Served, repo: Repository
) -> None:
    rng = random.Random(7)
    async with await NbdClient.connect_uri(served.url) as nbd:
        parent = _ids(await _backup(nbd, repo, _unit("j0", list(range(COUNT)))))
        assert parent[6] is None and parent[9] is not None
        for round_ in range(4):
            dirty = await _scatter(nbd, rng, count=3 + round_)
            indices = sorted(dirty)
            partial = [PartialChunk(index=i, parent=parent[i], ranges=dirty[i]) for i in indices]
            in_part = await _backup(nbd, repo, _unit(f"p{round_}", indices, partial))
            whole = await _backup(nbd, repo, _unit(f"w{round_}", indices))
            assert _ids(in_part) == _ids(whole)
            assert in_part.chunks_partial == len(indices)
            assert in_part.partial_fallbacks == 0
            assert in_part.bytes_read == sum(n for i in indices for _, n in dirty[i])
            assert whole.bytes_read == sum(min(CHUNK, SIZE - i * CHUNK) for i in indices)
            for ref in whole.chunks:
                parent[ref.index] = ref.id
        # Every chunk stored decodes to what the export holds now.
        for index, chunk_id in enumerate(parent):
            data = await nbd.read(index * CHUNK, min(CHUNK, SIZE - index * CHUNK))
            if chunk_id is None:
                assert data == bytes(len(data))
            else:
                assert await repo.load_chunk(chunk_id) == data


@pytest.mark.parametrize("damage", ["missing", "garbage", "another chunk", "another size"])
async def test_a_bad_parent_chunk_makes_it_a_whole_read(
    served: Served, repo: Repository, damage: str
) -> None:
    async with await NbdClient.connect_uri(served.url) as nbd:
        parent = _ids(await _backup(nbd, repo, _unit("j0", list(range(COUNT)))))
        await nbd.write(2 * CHUNK + 1000, b"\x5a" * 3000)
        await nbd.write(9 * CHUNK + 10, b"\xa5" * 10)
        key = chunk_key(parent[2] or "")
        parent_of_9 = parent[9]
        if damage == "missing":
            await repo.driver.delete(key)
        elif damage == "garbage":
            await repo.driver.put(key, os.urandom(5000))
        elif damage == "another chunk":  # a valid blob of other content under this id
            await repo.driver.put(key, await repo.driver.get(chunk_key(parent[3] or "")))
        else:  # an id of a whole chunk as the parent of the short last one
            parent_of_9 = parent[3]
        unit = _unit(
            "j1",
            [2, 9],
            [
                PartialChunk(index=2, parent=parent[2], ranges=[(1000, 3000)]),
                PartialChunk(index=9, parent=parent_of_9, ranges=[(10, 10)]),
            ],
        )
        result = await _backup(nbd, repo, unit)
        whole = await _backup(nbd, repo, _unit("j2", [2, 9]))
        assert _ids(result) == _ids(whole)
        assert result.partial_fallbacks == 1
        fell_back = 2 if damage != "another size" else 9
        read_whole = min(CHUNK, SIZE - fell_back * CHUNK)
        other = 3000 if fell_back == 9 else 10
        assert result.bytes_read == read_whole + other
        for ref in result.chunks:
            data = await nbd.read(ref.index * CHUNK, min(CHUNK, SIZE - ref.index * CHUNK))
            assert await repo.load_chunk(ref.id or "") == data


async def test_a_zero_parent_needs_no_repository_read(served: Served, repo: Repository) -> None:
    async with await NbdClient.connect_uri(served.url) as nbd:
        parent = _ids(await _backup(nbd, repo, _unit("j0", list(range(COUNT)))))
        assert parent[7] is None
        await nbd.write(7 * CHUNK + 123, b"\x01" * 456)
        unit = _unit("j1", [7], [PartialChunk(index=7, parent=None, ranges=[(123, 456)])])
        result = await _backup(nbd, repo, unit)
    expected = bytearray(CHUNK)  # the rest of the chunk is zeros, not a reused buffer's bytes
    expected[123:579] = b"\x01" * 456
    assert (result.bytes_read, result.partial_fallbacks) == (456, 0)
    assert _ids(result) == [repo.chunk_id(expected)]
    assert await repo.load_chunk(repo.chunk_id(expected)) == expected


async def test_ranges_outside_the_chunk_fail_the_unit(served: Served, repo: Repository) -> None:
    async with await NbdClient.connect_uri(served.url) as nbd:
        for ranges in ([(CHUNK - 10, 11)], [(10, 5), (12, 5)], [(0, 0)]):
            unit = _unit("j1", [1], [PartialChunk(index=1, parent=None, ranges=ranges)])
            with pytest.raises(ValueError, match="bad dirty ranges"):
                await _backup(nbd, repo, unit)


async def test_parent_chunks_are_decoded_into_the_pools_buffers(
    served: Served, repo: Repository
) -> None:
    """A chunk read in part decodes its parent into a buffer of the worker's pool and
    gives it back: the worker's chunk buffers are all it holds, reused from unit to unit,
    instead of a fresh plaintext per parent (memory of whichever thread decoded it)."""
    async with await NbdClient.connect_uri(served.url) as nbd:
        parent = _ids(await _backup(nbd, repo, _unit("j0", list(range(COUNT)))))
        await nbd.write(1 * CHUNK + 100, b"\x11" * 200)
        await nbd.write(4 * CHUNK + 300, b"\x22" * 400)
        uctx = _uctx()
        partial = [
            PartialChunk(index=1, parent=parent[1], ranges=[(100, 200)]),
            PartialChunk(index=4, parent=parent[4], ranges=[(300, 400)]),
        ]
        kept: list[int] = []
        for round_ in range(3):
            taken = 0
            take = uctx.buffers.take

            def counting(size: int, take: Callable[[int], bytearray] = take) -> bytearray:
                nonlocal taken
                taken += 1
                return take(size)

            uctx.buffers.take = counting  # type: ignore[method-assign]
            result = await backup_unit(_unit(f"j{round_ + 1}", [1, 4], partial), repo, nbd, uctx)
            uctx.buffers.take = take  # type: ignore[method-assign]
            assert (result.partial_fallbacks, result.bytes_read) == (0, 600)
            assert taken == 4  # each chunk's buffer and its parent's
            kept.append(uctx.buffers.free(CHUNK))
        # All given back (at most the two chunks' and their parents'), none made anew.
        assert 2 <= kept[0] <= 4
        assert kept == [kept[0]] * 3
        whole = await _backup(nbd, repo, _unit("j9", [1, 4]))
        assert _ids(result) == _ids(whole)
