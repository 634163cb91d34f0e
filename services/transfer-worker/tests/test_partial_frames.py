"""A chunk read in part from a framed parent (repository format 2) copies the parent's
records for the frames (256 KiB) no dirty range touches and compresses only the others; a parent in
one zstd frame (format 1, or a repository upgraded since) is compressed whole as before.
Against a real qemu-nbd and a filesystem repository."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from virtbackup.contracts.v1.work import PartialChunk, TransferUnit, UnitResult
from virtbackup.nbd import NbdClient
from virtbackup.repository.codec import FRAME_SIZE, compress_body, compress_framed, framed_records
from virtbackup.repository.repository import Repository
from virtbackup.runtime.ports import free_port
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.units import UnitContext, backup_unit, clean_frames

FRAME = FRAME_SIZE
CHUNK = 4 * FRAME
#: Two whole chunks and a last one of 2 frames + 12345 bytes (three frames, the last short).
SIZE = 2 * CHUNK + 2 * FRAME + 12345
COUNT = 3


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A writable raw export: text in every frame (compressible, so records differ by level)."""
    image = tmp_path / "disk.raw"
    rng = random.Random(5)
    lines = b"".join(
        b"%08d some text of the disk\n" % rng.randrange(10**8) for _ in range(SIZE // 31 + 1)
    )
    image.write_bytes(lines[:SIZE])
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), "-x", "d", str(image)]
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
        yield f"nbd://127.0.0.1:{port}/d"
    finally:
        proc.terminate()
        proc.wait(10)


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
    uctx = UnitContext(worker="t", executor=ThreadPoolExecutor(2), budget=ByteBudget(4 * CHUNK))
    return await backup_unit(unit, repo, nbd, uctx)


def test_clean_frames_are_those_no_range_touches() -> None:
    assert clean_frames([(0, 1)], CHUNK) == {1, 2, 3}
    assert clean_frames([(FRAME - 1, 2)], CHUNK) == {2, 3}  # straddles a boundary
    assert clean_frames([(FRAME, FRAME)], CHUNK) == {0, 2, 3}  # exactly frame 1
    assert clean_frames([(10, 5), (3 * FRAME, 1)], CHUNK) == {1, 2}
    assert clean_frames([(2 * FRAME + 12344, 1)], 2 * FRAME + 12345) == {0, 1}
    assert clean_frames([(0, CHUNK)], CHUNK) == frozenset()


@pytest.mark.parametrize("passphrase", [None, "a passphrase"], ids=["plain", "encrypted"])
async def test_a_chunk_read_in_part_copies_its_parents_clean_records(
    served: str, tmp_path: Path, passphrase: str | None
) -> None:
    repo = await Repository.open_or_create(
        FilesystemDriver(tmp_path / "repo"), passphrase, chunk_size=CHUNK
    )
    try:
        assert repo.framed
        async with await NbdClient.connect_uri(served) as nbd:
            parents: list[str] = []
            # The parents stored at level 19 (as another writer might): a copied record
            # is then told apart from one compressed again at the repository's level 1.
            for index in range(COUNT):
                data = await nbd.read(index * CHUNK, min(CHUNK, SIZE - index * CHUNK))
                chunk_id = repo.chunk_id(data)
                await repo.store_chunk(
                    chunk_id, repo.seal_chunk(chunk_id, compress_framed(data, 19))
                )
                parents.append(chunk_id)
            writes = {
                0: [(FRAME - 100, 200)],
                1: [(3 * FRAME + 5, 10)],
                2: [(2 * FRAME + 12000, 345)],
            }
            for index, ranges in writes.items():
                for start, n in ranges:
                    await nbd.write(index * CHUNK + start, b"\xee" * n)
            partial = [
                PartialChunk(index=i, parent=parents[i], ranges=r) for i, r in writes.items()
            ]
            result = await _backup(nbd, repo, _unit("j1", sorted(writes), partial))
            assert (result.chunks_partial, result.partial_fallbacks) == (3, 0)
            for ref in result.chunks:
                assert ref.id is not None and ref.id != parents[ref.index]
                length = min(CHUNK, SIZE - ref.index * CHUNK)
                now = await nbd.read(ref.index * CHUNK, length)
                assert ref.id == repo.chunk_id(now)
                assert await repo.load_chunk(ref.id) == now
                out = bytearray(length)
                _, records = repo.decode_chunk_records_into(
                    ref.id, await repo.read_chunk(ref.id), out
                )
                _, before = repo.decode_chunk_records_into(
                    parents[ref.index], await repo.read_chunk(parents[ref.index]), bytearray(length)
                )
                assert records is not None and before is not None
                keep = clean_frames(writes[ref.index], length)
                for frame, record in enumerate(records):
                    piece = now[frame * FRAME : (frame + 1) * FRAME]
                    if frame in keep:  # copied: the parent's level-19 record
                        assert bytes(record) == bytes(before[frame])
                    else:  # compressed again, at the repository's level
                        assert bytes(record) == compress_body(piece, 1)
                        assert bytes(record) != bytes(before[frame])
    finally:
        await repo.close()


async def test_a_parent_in_one_frame_is_compressed_whole(served: str, tmp_path: Path) -> None:
    """A parent written before the repository was framed (one zstd frame) has no records
    to copy: the chunk is framed, compressed in full, and the same chunk."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path / "repo"), chunk_size=CHUNK)
    try:
        async with await NbdClient.connect_uri(served) as nbd:
            data = await nbd.read(0, CHUNK)
            parent = repo.chunk_id(data)
            await repo.store_chunk(parent, compress_body(data, 1))
            await nbd.write(123, b"\x01" * 77)
            unit = _unit("j1", [0], [PartialChunk(index=0, parent=parent, ranges=[(123, 77)])])
            result = await _backup(nbd, repo, unit)
            now = await nbd.read(0, CHUNK)
        assert (result.partial_fallbacks, result.bytes_read) == (0, 77)
        chunk_id = result.chunks[0].id or ""
        blob = await repo.read_chunk(chunk_id)
        assert blob == compress_framed(now, 1)
        assert len(framed_records(blob)[1]) == 4
    finally:
        await repo.close()
