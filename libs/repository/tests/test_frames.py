"""Framed chunk blobs (repository format 2): one record per ``FRAME_SIZE`` (256 KiB) of
the chunk, so that a chunk read in part can copy its parent's records for the frames it
did not change. The chunk id stays the hash of the plaintext, format-1 repositories
keep writing one zstd frame, and a repository of a newer format is refused by name."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest

from virtbackup.repository.codec import (
    FRAME_SIZE,
    FRAMED,
    RAW,
    ZSTD,
    BlobError,
    compress_body,
    compress_framed,
    decode_blob,
    decode_blob_into,
    framed_records,
)
from virtbackup.repository.format import CONFIG_KEY, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, chunk_key
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.storage.filesystem import FilesystemDriver

FRAME = FRAME_SIZE
CHUNK = 4 * FRAME


def _mixed(size: int, seed: int = 0) -> bytes:
    """Text, random and zero stretches of 256 KiB in turn: records of both codecs."""
    rng = random.Random(seed)
    parts, pos, kind = [], 0, 0
    while pos < size:
        n = min(256 << 10, size - pos)
        if kind == 0:
            parts.append(
                b"".join(b"line %d of some text\n" % rng.randrange(10**6) for _ in range(n // 16))[
                    :n
                ]
            )
        elif kind == 1:
            parts.append(rng.randbytes(n))
        else:
            parts.append(bytes(n))
        parts[-1] = parts[-1].ljust(n, b"x")
        pos += n
        kind = (kind + 1) % 3
    return b"".join(parts)


#: Every frame boundary of a chunk of 4 frames, a byte either side, and the last chunk of
#: a disk that is not a multiple of a frame (2 frames + 12345 bytes), down to one byte.
SIZES = [
    1,
    4096,
    FRAME - 1,
    FRAME,
    FRAME + 1,
    2 * FRAME - 1,
    2 * FRAME,
    2 * FRAME + 12345,
    3 * FRAME,
]
SIZES += [3 * FRAME + 1, CHUNK - 1, CHUNK]


@pytest.mark.parametrize("size", SIZES)
def test_framed_blobs_round_trip_at_every_frame_boundary(size: int) -> None:
    data = _mixed(size, seed=size)
    body = compress_framed(data, 1)
    assert body[0] == FRAMED
    frame, records = framed_records(body)
    assert frame == FRAME
    assert len(records) == -(-size // FRAME)
    assert decode_blob(body, None, b"") == data
    out = bytearray(CHUNK)
    assert decode_blob_into(body, None, b"", out) == size
    assert out[:size] == data
    exact = bytearray(size)
    assert decode_blob_into(body, None, b"", exact) == size
    assert exact == data
    if size > 1:  # one byte short of the plaintext: refused, never cut
        with pytest.raises(BlobError, match="longer"):
            decode_blob_into(body, None, b"", bytearray(size - 1))


def test_each_mib_is_compressed_alone_or_stored_as_is() -> None:
    text = b"".join(b"text %d\n" % i for i in range(200_000))[:FRAME]
    noise = os.urandom(FRAME)
    records = framed_records(compress_framed(text + noise + text[:1000], 1))[1]
    assert [r[0] for r in records] == [ZSTD, RAW, ZSTD]
    assert bytes(records[1][1:]) == noise
    assert bytes(records[0]) == bytes([ZSTD]) + bytes(compress_body(text, 1)[1:])


@pytest.mark.parametrize("dirty", [[0], [1], [3], [0, 3], [1, 2], []])
def test_a_chunk_copies_its_parents_records_for_the_mib_it_shares(dirty: list[int]) -> None:
    parent = _mixed(CHUNK, seed=1)
    _, records = framed_records(compress_framed(parent, 1))
    child = bytearray(parent)
    for index in dirty:  # a write that straddles nothing: inside its frame
        child[index * FRAME + 10 : index * FRAME + 5000] = os.urandom(4990)
    keep = frozenset(range(4)) - set(dirty)
    body = compress_framed(child, 1, records, keep)
    assert decode_blob(body, None, b"") == child
    assert body == compress_framed(child, 1)  # the same bytes a full compression gives
    new = framed_records(body)[1]
    for index in keep:
        assert bytes(new[index]) == bytes(records[index])


def test_a_parent_of_another_length_is_refused() -> None:
    _, records = framed_records(compress_framed(_mixed(2 * FRAME), 1))
    with pytest.raises(ValueError, match="records"):
        compress_framed(_mixed(3 * FRAME), 1, records, frozenset({0}))


@pytest.mark.parametrize(
    "damage",
    ["record byte", "record table", "header", "truncated", "record swap", "raw record short"],
)
async def test_a_damaged_frame_is_found_and_quarantined(tmp_path: Path, damage: str) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), chunk_size=CHUNK)
    assert repo.framed
    data = bytearray(_mixed(CHUNK, seed=3))
    data[FRAME : 2 * FRAME] = os.urandom(FRAME)  # frame 1 stored as is
    chunk_id = repo.chunk_id(data)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    path = tmp_path / chunk_key(chunk_id)
    blob = bytearray(path.read_bytes())
    _, records = framed_records(bytes(blob))
    table = 6
    third = len(blob) - sum(len(r) for r in records[2:]) + 40  # inside record 2's frame
    if damage == "record byte":
        blob[third] ^= 0x40
    elif damage == "record table":
        struct.pack_into("<I", blob, table, struct.unpack_from("<I", blob, table)[0] + 1)
    elif damage == "header":
        blob[1] = 30  # a frame size no writer makes
    elif damage == "truncated":
        del blob[-100:]
    elif damage == "record swap":  # records 0 and 3 exchanged (their table too)
        body = bytes(blob)
        lens = [len(r) for r in records]
        start = 6 + 4 * len(records)
        order = [3, 1, 2, 0]
        blob = bytearray(body[:6] + struct.pack("<4I", *(lens[i] for i in order)))
        blob += b"".join(bytes(records[i]) for i in order)
        assert len(blob) == len(body) and start == 22
    else:  # the raw record of frame 1 one byte short, the table says so
        start = 6 + 4 * len(records) + len(records[0])
        del blob[start + 1000]
        struct.pack_into("<I", blob, table + 4, len(records[1]) - 1)
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptChunkError):
        await repo.load_chunk(chunk_id)
    with pytest.raises(CorruptChunkError):
        repo.decode_chunk_into(chunk_id, bytes(blob), bytearray(CHUNK))
    assert await repo.quarantine_chunk(chunk_id)  # verify's proof: it moves aside
    assert not await repo.has_chunk(chunk_id)


async def test_records_of_a_parent_are_given_only_once_it_is_checked(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), "pass", chunk_size=CHUNK)
    data = _mixed(CHUNK, seed=4)
    chunk_id = repo.chunk_id(data)
    blob = repo.encode_chunk(chunk_id, data)
    out = bytearray(CHUNK)
    size, records = repo.decode_chunk_records_into(chunk_id, blob, out)
    assert (size, out) == (CHUNK, data)
    assert records is not None and len(records) == 4
    changed = bytearray(data)
    changed[5] ^= 1
    other = repo.chunk_id(changed)
    body = repo.chunk_body(changed, records, frozenset({1, 2, 3}))
    assert repo.decode_chunk(other, repo.seal_chunk(other, body)) == changed
    # Sealed for another id, or a one-frame blob: no records.
    with pytest.raises(CorruptChunkError):
        repo.decode_chunk_records_into(other, blob, out)
    assert repo.decode_chunk_records_into(
        chunk_id, repo.seal_chunk(chunk_id, compress_body(data)), out
    ) == (
        CHUNK,
        None,
    )


async def test_a_new_repository_is_format_2_and_an_old_one_keeps_format_1(tmp_path: Path) -> None:
    new = await Repository.open_or_create(FilesystemDriver(tmp_path / "new"))
    assert json.loads((tmp_path / "new" / CONFIG_KEY).read_bytes())["format"] == 2
    assert new.framed
    old_root = tmp_path / "old"
    old = await Repository.open_or_create(FilesystemDriver(old_root))
    config = json.loads((old_root / CONFIG_KEY).read_bytes())
    config["format"] = 1
    (old_root / CONFIG_KEY).write_text(json.dumps(config))
    old = await Repository.open(FilesystemDriver(old_root))
    assert not old.framed
    data = _mixed(3 * FRAME + 7, seed=5)
    chunk_id = old.chunk_id(data)
    assert chunk_id == new.chunk_id(data)  # the id is the plaintext's, whatever the encoding
    await old.store_chunk(chunk_id, old.encode_chunk(chunk_id, data))
    assert (old_root / chunk_key(chunk_id)).read_bytes() == compress_body(data)  # as before
    # The same id in the other encoding: either blob reads as the same chunk.
    framed = new.encode_chunk(chunk_id, data)
    assert old.decode_chunk(chunk_id, framed) == data
    assert new.decode_chunk(chunk_id, compress_body(data)) == data
    # An explicit upgrade: framed from then on, old chunks read as they are.
    assert await old.upgrade_format()
    assert not await old.upgrade_format()
    assert json.loads((old_root / CONFIG_KEY).read_bytes())["format"] == 2
    again = await Repository.open(FilesystemDriver(old_root))
    assert again.framed and again.compression_level == old.compression_level
    assert await again.load_chunk(chunk_id) == data
    other = _mixed(FRAME, seed=6)
    other_id = again.chunk_id(other)
    await again.store_chunk(other_id, again.encode_chunk(other_id, other))
    assert (old_root / chunk_key(other_id)).read_bytes()[0] == FRAMED


async def test_a_repository_of_a_newer_format_is_refused_by_name(tmp_path: Path) -> None:
    await Repository.open_or_create(FilesystemDriver(tmp_path))
    config = json.loads((tmp_path / CONFIG_KEY).read_bytes())
    config["format"] = FORMAT_VERSION + 1
    (tmp_path / CONFIG_KEY).write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match=r"format 3 is newer than this version.*upgrade"):
        await Repository.open(FilesystemDriver(tmp_path))
    with pytest.raises(RepositoryError, match="newer"):  # never replaced by a new one
        await Repository.open_or_create(FilesystemDriver(tmp_path))
    assert json.loads((tmp_path / CONFIG_KEY).read_bytes())["format"] == 3
    config["format"] = 0
    (tmp_path / CONFIG_KEY).write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match="unsupported repository format 0"):
        await Repository.open(FilesystemDriver(tmp_path))


async def test_a_framed_blob_claiming_more_than_a_chunk_is_damaged_not_allocated(
    tmp_path: Path,
) -> None:
    """4,096 records of 64 MiB (256 GiB of plaintext) in a blob of 20 KiB: the chunk is
    damaged, said so before its plaintext is allocated (it was a MemoryError, or 256 GiB
    of zeros written, before ``decode_blob`` was bounded by the chunk size)."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    count = 4096
    head = struct.pack("<BBI", FRAMED, 26, count)
    blob = head + struct.pack(f"<{count}I", *([1] * count)) + bytes(count)  # RAW, empty
    with pytest.raises(CorruptChunkError, match=f"longer than {DEFAULT_CHUNK_SIZE} bytes"):
        repo.decode_chunk("0" * 64, blob)
    with pytest.raises(BlobError, match="longer than 67108864 bytes"):
        decode_blob(blob, None, b"")
