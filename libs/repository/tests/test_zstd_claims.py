"""A zstd blob (codec 1, readable in every format) whose frame header claims more than a
chunk: damaged, said before anything is allocated. ``ZstdDecompressor.decompress``
allocates the content size a frame's header claims whatever ``max_output_size`` says, so
16 KiB of RLE blocks made 512 MiB, and a claim of 1 TiB a ``MemoryError`` that failed a
verify job's unit without naming or quarantining the chunk."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import zstandard

from virtbackup.repository.codec import ZSTD, BlobError, decode_blob
from virtbackup.repository.format import DEFAULT_CHUNK_SIZE, chunk_key, quarantine_key
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.points import write_point

MiB = 1 << 20
CHUNK = DEFAULT_CHUNK_SIZE  # a new repository's


def rle_frame(content: int, claimed: int) -> bytes:
    """A zstd frame of ``content`` bytes of ``a`` in RLE blocks of 128 KiB whose header
    claims ``claimed`` bytes (a few bytes per block: 16 KiB for 512 MiB)."""
    head = struct.pack("<I", 0xFD2FB528) + bytes([0b11100000]) + struct.pack("<Q", claimed)
    blocks, left = [], content
    while left:
        size = min(128 * 1024, left)
        left -= size
        blocks.append(struct.pack("<I", (size << 3) | (1 << 1) | (left == 0))[:3] + b"a")
    return head + b"".join(blocks)


@pytest.mark.parametrize(
    ("content", "claimed"), [(512 * MiB, 512 * MiB), (1024, 1 << 40), (1024, CHUNK + 1)]
)
async def test_a_zstd_blob_claiming_more_than_a_chunk_is_damaged_not_allocated(
    tmp_path: Path, content: int, claimed: int
) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    blob = bytes([ZSTD]) + rle_frame(content, claimed)
    assert len(blob) < 20_000
    chunk_id = "ab" * 32
    with pytest.raises(CorruptChunkError, match=f"zstd frame of {claimed} bytes, longer than"):
        repo.decode_chunk(chunk_id, blob)
    with pytest.raises(BlobError, match=f"longer than {CHUNK} bytes"):
        decode_blob(blob, None, b"", CHUNK)
    # Verify's proof reads it again the same way: it is moved aside, not a crash.
    await repo.driver.put(chunk_key(chunk_id), blob)
    assert await repo.quarantine_chunk(chunk_id)
    assert await repo.driver.exists(quarantine_key(chunk_id))


async def test_a_zstd_blob_of_a_whole_chunk_still_decodes(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    data = b"a" * CHUNK
    blob = bytes([ZSTD]) + rle_frame(len(data), len(data))
    assert repo.decode_chunk(repo.chunk_id(data), blob) == data


async def test_a_manifest_or_domain_xml_claiming_too_much_is_a_repository_error(
    tmp_path: Path,
) -> None:
    """A point's manifest and domain XML are bounded too (its disk's chunk count, 16 MiB):
    a 1 KiB frame claiming 1 TiB was a ``MemoryError`` out of every listing, restore,
    verify and GC that read them (``GET /restore/entries`` reads the XML)."""
    xml_path = await write_point(tmp_path)
    repo = await Repository.open(FilesystemDriver(tmp_path / "VirtBackup"))
    point = await repo.restore_point(xml_path)
    assert len((await repo.manifest(point, "vda")).chunks) == 3  # a real one reads
    assert "<name>vm1</name>" in await repo.domain_xml(point)
    bomb = bytes([ZSTD]) + rle_frame(1024, 1 << 40)
    await repo.driver.put(point.xml_path, bomb)
    with pytest.raises(RepositoryError, match="zstd frame of 1099511627776 bytes"):
        await repo.domain_xml(point)
    await repo.driver.put(point.disks[0].manifest, bomb)
    with pytest.raises(RepositoryError, match="zstd frame of 1099511627776 bytes"):
        await repo.manifest(point, "vda")
    # Real content beyond the bound (a 3-chunk disk's manifest is far below 1 MiB).
    await repo.driver.put(point.disks[0].manifest, bytes([ZSTD]) + rle_frame(MiB, MiB))
    with pytest.raises(RepositoryError, match="longer than"):
        await repo.manifest(point, "vda")


async def test_verify_and_restore_read_a_zstd_blob_of_several_frames_alike(tmp_path: Path) -> None:
    """``decode_chunk`` (verify, copy, instant access) read the first zstd frame only and
    ``decode_chunk_into`` (restore, an incremental's parent) every frame: a chunk's frame
    followed by another passed verify and failed every restore, and a chunk stored as two
    frames was quarantined by verify though a restore read it right."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    data = os.urandom(3000) * (CHUNK // 3000)  # one chunk
    chunk_id = repo.chunk_id(data)
    comp = zstandard.ZstdCompressor()
    halves = (
        bytes([ZSTD])
        + comp.compress(data[: len(data) // 2])
        + comp.compress(data[len(data) // 2 :])
    )
    trailing = bytes([ZSTD]) + comp.compress(data) + comp.compress(b"more")
    out = bytearray(repo.chunk_size)
    assert repo.decode_chunk(chunk_id, halves) == data
    assert repo.decode_chunk_into(chunk_id, halves, out) == len(data)
    for decode in (
        lambda: repo.decode_chunk(chunk_id, trailing),
        lambda: repo.decode_chunk_into(chunk_id, trailing, out),
    ):
        with pytest.raises(CorruptChunkError, match="does not match its hash"):
            decode()
