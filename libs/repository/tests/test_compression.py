"""The repository's compression level: chosen at creation, recorded in ``repository.json``,
used for every blob it writes, and never needed to read one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from virtbackup.repository.codec import FRAMED, RAW, compress_body, compress_framed, decode_blob
from virtbackup.repository.format import CONFIG_KEY, chunk_key
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.storage.filesystem import FilesystemDriver

LEGACY = Path(__file__).parent / "data" / "legacy-v1" / "plain"
#: 1.6 MB: within a chunk of any size a repository may have
TEXT = b"".join(b"line %d of a text that compresses well\n" % i for i in range(40_000))


async def test_the_level_is_recorded_at_creation_and_used_for_every_blob(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), compression_level=-3)
    assert json.loads((tmp_path / CONFIG_KEY).read_bytes())["compressionLevel"] == -3
    chunk_id = repo.chunk_id(TEXT)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, TEXT))
    blob = (tmp_path / chunk_key(chunk_id)).read_bytes()
    assert blob == compress_framed(TEXT, -3) != compress_framed(TEXT, 1)
    assert blob[0] == FRAMED
    # Opened again (another process), with another level asked for: the recorded one.
    again = await Repository.open_or_create(FilesystemDriver(tmp_path), compression_level=5)
    assert again.compression_level == -3
    assert await again.load_chunk(chunk_id) == TEXT


async def test_a_new_repository_compresses_at_level_1_by_default(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    assert repo.compression_level == 1
    assert json.loads((tmp_path / CONFIG_KEY).read_bytes())["compressionLevel"] == 1
    assert repo.encode_chunk("0" * 64, TEXT) == compress_framed(TEXT, 1)


async def test_blobs_of_every_level_decode_in_any_repository(tmp_path: Path) -> None:
    """A reader needs no level: a zstd frame decodes whatever level made it."""
    reader = await Repository.open_or_create(FilesystemDriver(tmp_path), compression_level=9)
    chunk_id = reader.chunk_id(TEXT)
    for level in (-7, -1, 1, 3, 9):
        blob = compress_body(TEXT, level)
        assert reader.decode_chunk(chunk_id, blob) == TEXT
        out = bytearray(len(TEXT))
        assert reader.decode_chunk_into(chunk_id, blob, out) == len(TEXT)
        assert out == TEXT
    assert compress_body(os.urandom(4096), -7)[0] == RAW  # no gain: stored as is


async def test_a_repository_made_before_the_level_existed_reads_and_writes_at_level_1(
    tmp_path: Path,
) -> None:
    """``data/legacy-v1`` has no ``compressionLevel``: it is level 1, its chunks read, and
    what is written into it now is compressed as before."""
    root = tmp_path / "plain"
    shutil.copytree(LEGACY, root)
    assert "compressionLevel" not in json.loads((root / CONFIG_KEY).read_bytes())
    repo = await Repository.open(FilesystemDriver(root))
    assert repo.compression_level == 1
    stored = [p for p in (root / "chunks").rglob("*") if p.is_file()]
    assert stored
    for path in stored:
        assert repo.chunk_id(await repo.load_chunk(path.name)) == path.name
    chunk_id = repo.chunk_id(TEXT)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, TEXT))
    assert (root / chunk_key(chunk_id)).read_bytes() == compress_body(TEXT, 1)
    assert decode_blob((root / chunk_key(chunk_id)).read_bytes(), None, b"") == TEXT


@pytest.mark.parametrize("level", [-8, 20])
async def test_a_level_out_of_range_is_refused(tmp_path: Path, level: int) -> None:
    with pytest.raises(ValueError, match="compression level"):
        await Repository.open_or_create(FilesystemDriver(tmp_path), compression_level=level)
    assert not (tmp_path / CONFIG_KEY).exists()


async def test_a_recorded_level_out_of_range_makes_the_repository_unreadable(
    tmp_path: Path,
) -> None:
    await Repository.open_or_create(FilesystemDriver(tmp_path))
    config = json.loads((tmp_path / CONFIG_KEY).read_bytes())
    config["compressionLevel"] = 99
    (tmp_path / CONFIG_KEY).write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match="compressionLevel"):
        await Repository.open(FilesystemDriver(tmp_path))
