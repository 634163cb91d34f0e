"""Fan-out backup units and copy units against a real qemu-nbd and filesystem repositories:
one read stored in several repositories (plain and encrypted), a failing destination
left out while the others go on, and chunks copied between repositories."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from virtbackup.contracts.v1.work import ChunkRef, TransferUnit
from virtbackup.nbd import NbdClient
from virtbackup.repository.codec import ZSTD, compress_body, compress_framed, framed_records
from virtbackup.repository.format import CONFIG_KEY
from virtbackup.repository.repository import Repository
from virtbackup.runtime.ports import free_port
from virtbackup.storage.errors import StorageError
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.units import UnitContext, backup_unit, copy_unit

CHUNK = 1 << 20
SIZE = 8 << 20


@pytest.fixture
def export(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A qcow2 image with repeated, half and random data, exported read-only."""
    image = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    raw = tmp_path / "random.bin"
    raw.write_bytes(os.urandom(2 << 20))
    for command in ("write -P 0xab 0 2M", "write -P 0xcd 3M 512k", f"write -s {raw} 5M 2M"):
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True
        )
    port = free_port()
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "qcow2",
            "-r",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "-x",
            "disk",
            str(image),
        ]
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield image, f"nbd://127.0.0.1:{port}/disk"
    proc.terminate()
    proc.wait(10)


def _uctx() -> UnitContext:
    return UnitContext(worker="test", executor=ThreadPoolExecutor(2), budget=ByteBudget(8 << 20))


def _unit(url: str, also: list[str]) -> TransferUnit:
    return TransferUnit(
        job_id="j1",
        unit=0,
        kind="backup",
        destination_id="a",
        disk="vda",
        disk_size=SIZE,
        chunk_size=CHUNK,
        nbd_url=url,
        indices=list(range(SIZE // CHUNK)),
        also_destination_ids=also,
    )


async def _image_of(repo: Repository, ids: dict[int, str | None]) -> bytes:
    out = bytearray(SIZE)
    for index, chunk_id in ids.items():
        if chunk_id is not None:
            data = await repo.load_chunk(chunk_id)
            out[index * CHUNK : index * CHUNK + len(data)] = data
    return bytes(out)


async def test_one_read_is_stored_in_every_repository(
    export: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = export
    plain = await Repository.open_or_create(FilesystemDriver(tmp_path / "a"), chunk_size=CHUNK)
    sealed = await Repository.open_or_create(
        FilesystemDriver(tmp_path / "b"), passphrase="pw", chunk_size=CHUNK
    )
    other = await Repository.open_or_create(FilesystemDriver(tmp_path / "c"), chunk_size=CHUNK)
    async with await NbdClient.connect_uri(url) as nbd:
        result = await backup_unit(
            _unit(url, ["b", "c"]), plain, nbd, _uctx(), [("b", sealed), ("c", other)]
        )
    assert result.ok
    assert result.bytes_read == SIZE  # read once, not once per destination
    by_dest = {d.destination_id: d for d in result.destinations}
    assert [d.destination_id for d in result.destinations] == ["a", "b", "c"]
    # Two plain repositories: the same ids, each holding every chunk (blobs alike).
    assert by_dest["c"].chunks == by_dest["a"].chunks
    for ref in by_dest["c"].chunks:
        if ref.id is not None:
            assert await other.read_chunk(ref.id) == await plain.read_chunk(ref.id)
    assert all(d.ok for d in result.destinations)
    ids_a = {r.index: r.id for r in by_dest["a"].chunks}
    ids_b = {r.index: r.id for r in by_dest["b"].chunks}
    assert ids_a == {r.index: r.id for r in result.chunks}
    # Keyed ids in the encrypted repository: the same content, other ids.
    stored = {i for i, c in ids_a.items() if c is not None}
    assert stored == {i for i, c in ids_b.items() if c is not None} == {0, 1, 3, 5, 6}
    assert all(ids_a[i] != ids_b[i] for i in stored)
    assert by_dest["a"].chunks_stored == by_dest["b"].chunks_stored == 4  # 0 and 1 dedup
    assert await _image_of(plain, ids_a) == await _image_of(sealed, ids_b)


async def test_a_failing_destination_is_left_out_and_named(
    export: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = export
    good = await Repository.open_or_create(FilesystemDriver(tmp_path / "a"), chunk_size=CHUNK)
    bad = await Repository.open_or_create(FilesystemDriver(tmp_path / "b"), chunk_size=CHUNK)
    # A real fault: the chunks folder of "b" is a file, so every chunk write fails.
    chunks = tmp_path / "b" / "chunks"
    shutil.rmtree(chunks, ignore_errors=True)
    chunks.write_bytes(b"")
    async with await NbdClient.connect_uri(url) as nbd:
        result = await backup_unit(_unit(url, ["b"]), good, nbd, _uctx(), [("b", bad)])
    assert result.ok
    outcome = {d.destination_id: d for d in result.destinations}
    assert outcome["a"].ok and len(outcome["a"].chunks) == SIZE // CHUNK
    assert not outcome["b"].ok and outcome["b"].error and outcome["b"].chunks == []
    ids = {r.index: r.id for r in outcome["a"].chunks}
    for chunk_id in ids.values():
        if chunk_id is not None:
            assert await good.has_chunk(chunk_id)

    # A unit of a backup to one destination fails as before.
    bad_unit = msgspec.structs.replace(_unit(url, []), destination_id="b")
    with pytest.raises(StorageError, match="chunks"):
        async with await NbdClient.connect_uri(url) as nbd:
            await backup_unit(bad_unit, bad, nbd, _uctx())
    # A unit of a fan-out backup whose only destination fails reports it (and stops
    # reading): the job goes on with its other destinations.
    fanned = msgspec.structs.replace(bad_unit, fan_out=True)
    async with await NbdClient.connect_uri(url) as nbd:
        alone = await backup_unit(fanned, bad, nbd, _uctx())
    assert alone.ok and alone.chunks == []
    assert [(d.destination_id, d.ok) for d in alone.destinations] == [("b", False)]


async def test_copy_units_translate_ids_and_deduplicate(
    export: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = export
    source = await Repository.open_or_create(
        FilesystemDriver(tmp_path / "src"), passphrase="pw", chunk_size=CHUNK
    )
    async with await NbdClient.connect_uri(url) as nbd:
        backed = await backup_unit(_unit(url, []), source, nbd, _uctx())
    ids = sorted({r.id for r in backed.chunks if r.id is not None})
    refs = [ChunkRef(index=i, id=c) for i, c in enumerate(ids)]
    target = await Repository.open_or_create(FilesystemDriver(tmp_path / "dst"), chunk_size=CHUNK)
    unit = TransferUnit(
        job_id="c1",
        unit=0,
        kind="copy",
        destination_id="src",
        target_destination_id="dst",
        chunk_size=CHUNK,
        chunks=refs,
    )
    done = await copy_unit(unit, source, target, _uctx())
    assert done.chunks_stored == len(ids) == 4
    mapping = {ids[r.index]: r.id for r in done.chunks}
    for source_id, target_id in mapping.items():
        assert target_id is not None and target_id != source_id  # keyed -> plain ids
        assert await target.load_chunk(target_id) == await source.load_chunk(source_id)

    # Again (another job): everything is there already.
    again = await copy_unit(msgspec.structs.replace(unit, job_id="c2"), source, target, _uctx())
    assert again.chunks_stored == 0 and again.chunks_deduplicated == len(ids)
    assert {ids[r.index]: r.id for r in again.chunks} == mapping

    # Plain to plain: the ids are kept, and a chunk the target has is not read at all.
    plain = await Repository.open_or_create(FilesystemDriver(tmp_path / "p"), chunk_size=CHUNK)
    copy_back = TransferUnit(
        job_id="c3",
        unit=0,
        kind="copy",
        destination_id="dst",
        target_destination_id="p",
        chunk_size=CHUNK,
        chunks=[ChunkRef(index=i, id=c) for i, c in enumerate(mapping.values())],
    )
    first = await copy_unit(copy_back, target, plain, _uctx())
    assert [r.id for r in first.chunks] == list(mapping.values())
    second = await copy_unit(
        msgspec.structs.replace(copy_back, job_id="c4"),
        target,
        plain,
        _uctx(),
    )
    assert second.bytes_read == 0 and second.chunks_deduplicated == 4


async def test_each_repository_gets_its_own_compression_level(
    export: tuple[Path, str], tmp_path: Path
) -> None:
    """Two plain repositories of different zstd levels: one read, the same ids, and each
    blob compressed at its own repository's level (the body is shared per level only)."""
    _, url = export
    fast = await Repository.open_or_create(
        FilesystemDriver(tmp_path / "a"), chunk_size=CHUNK, compression_level=-5
    )
    dense = await Repository.open_or_create(
        FilesystemDriver(tmp_path / "b"), chunk_size=CHUNK, compression_level=9
    )
    async with await NbdClient.connect_uri(url) as nbd:
        result = await backup_unit(_unit(url, ["b"]), fast, nbd, _uctx(), [("b", dense)])
    assert result.bytes_read == SIZE
    by_dest = {d.destination_id: d for d in result.destinations}
    assert by_dest["a"].chunks == by_dest["b"].chunks
    compressed = 0
    for ref in by_dest["a"].chunks:
        if ref.id is None:
            continue
        data = await fast.load_chunk(ref.id)
        assert await dense.load_chunk(ref.id) == data
        assert await fast.read_chunk(ref.id) == compress_framed(data, -5)
        assert await dense.read_chunk(ref.id) == compress_framed(data, 9)
        _, records = framed_records(await fast.read_chunk(ref.id))
        compressed += records[0][0] == ZSTD  # its first record's codec
    assert compressed == 3  # 0, 1 and 3; the random chunks 5 and 6 are stored as they are


async def test_a_format_1_and_a_format_2_repository_each_get_their_encoding(
    export: tuple[Path, str], tmp_path: Path
) -> None:
    """One read into a repository of format 1 (one zstd frame per chunk, as it always
    was) and one of format 2 (framed): the same ids, each blob as its repository writes."""
    _, url = export
    framed = await Repository.open_or_create(FilesystemDriver(tmp_path / "a"), chunk_size=CHUNK)
    await Repository.open_or_create(FilesystemDriver(tmp_path / "b"), chunk_size=CHUNK)
    config = msgspec.json.decode((tmp_path / "b" / CONFIG_KEY).read_bytes())
    (tmp_path / "b" / CONFIG_KEY).write_bytes(msgspec.json.encode({**config, "format": 1}))
    single = await Repository.open(FilesystemDriver(tmp_path / "b"))
    assert framed.framed and not single.framed
    async with await NbdClient.connect_uri(url) as nbd:
        result = await backup_unit(_unit(url, ["b"]), framed, nbd, _uctx(), [("b", single)])
    by_dest = {d.destination_id: d for d in result.destinations}
    assert by_dest["a"].chunks == by_dest["b"].chunks
    stored = [ref.id for ref in by_dest["a"].chunks if ref.id is not None]
    assert stored
    for chunk_id in stored:
        data = await framed.load_chunk(chunk_id)
        assert await framed.read_chunk(chunk_id) == compress_framed(data, 1)
        assert await single.read_chunk(chunk_id) == compress_body(data, 1)
