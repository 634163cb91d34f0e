"""Units against a real qemu-nbd and a filesystem repository: backup, dedup, restore, verify."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from virtbackup.contracts.v1.work import ChunkRef, TransferUnit
from virtbackup.nbd import NbdClient
from virtbackup.repository.format import chunk_key
from virtbackup.repository.repository import Repository
from virtbackup.runtime.ports import free_port
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.units import (
    CHUNK_MEMORY_CAP,
    UnitContext,
    backup_unit,
    chunk_budget,
    restore_unit,
    verify_unit,
)

CHUNK = 1 << 20
SIZE = 16 << 20


def _qemu_io(image: Path, command: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path, str, str]]:
    """A source image with patterns and random data, and an empty target, both exported."""
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    for image in (src, dst):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True
        )
    _qemu_io(src, "write -P 0xab 0 3M")  # chunks 0-2: same content (dedup)
    _qemu_io(src, "write -P 0xcd 5M 512k")  # chunk 5: half data
    raw = tmp_path / "random.bin"
    raw.write_bytes(os.urandom(2 << 20))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {raw} 9M 2M", str(src)],
        check=True,
        capture_output=True,
    )
    procs, urls = [], []
    for image in (src, dst):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    "qemu-nbd",
                    "-f",
                    "qcow2",
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
        )
        urls.append(f"nbd://127.0.0.1:{port}/disk")
    deadline = time.monotonic() + 10
    for url in urls:
        port = int(url.split(":")[2].split("/")[0])
        while time.monotonic() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
    yield src, dst, urls[0], urls[1]
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _uctx() -> UnitContext:
    return UnitContext(worker="test", executor=ThreadPoolExecutor(2), budget=ByteBudget(8 << 20))


async def test_backup_restore_verify_round_trip(
    served: tuple[Path, Path, str, str], tmp_path: Path
) -> None:
    src, dst, src_url, dst_url = served
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path / "repo"), chunk_size=CHUNK)
    uctx = _uctx()
    async with await NbdClient.connect_uri(src_url) as nbd:
        unit = TransferUnit(
            job_id="j1",
            unit=0,
            kind="backup",
            destination_id="d",
            disk="vda",
            disk_size=SIZE,
            chunk_size=CHUNK,
            nbd_url=src_url,
            indices=list(range(SIZE // CHUNK)),
        )
        result = await backup_unit(unit, repo, nbd, uctx)
    ids = {ref.index: ref.id for ref in result.chunks}
    assert len(ids) == 16
    assert ids[0] == ids[1] == ids[2] is not None  # equal content, one id
    assert ids[3] is None and ids[15] is None  # zero chunks are not stored
    assert len({ids[9], ids[10]}) == 2
    assert result.chunks_stored == 4  # 0xab, 0xcd half, two random
    assert result.chunks_deduplicated == 2
    assert result.bytes_read == SIZE

    # A second backup of the same data stores nothing new. It runs with the same
    # context, so its reads land in buffers that still hold the first run's chunks,
    # in another order: stale bytes would show as different ids.
    assert uctx.buffers.free(CHUNK) >= 2
    async with await NbdClient.connect_uri(src_url) as nbd:
        again = await backup_unit(unit, repo, nbd, uctx)
    assert again.chunks_stored == 0
    assert again.chunks == result.chunks

    refs = [ChunkRef(index=i, id=ids[i]) for i in sorted(ids)]
    restore = TransferUnit(
        job_id="j2",
        unit=0,
        kind="restore",
        destination_id="d",
        disk="vda",
        disk_size=SIZE,
        chunk_size=CHUNK,
        nbd_url=dst_url,
        # Into a fresh image the orchestrator sends no zero chunks: they stay holes.
        chunks=[r for r in refs if r.id is not None],
    )
    async with await NbdClient.connect_uri(dst_url) as nbd:
        done = await restore_unit(restore, repo, nbd, uctx)
    assert done.bytes_written == 4 * CHUNK + 2 * CHUNK
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", str(src), str(dst)], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr

    # Into a target holding old data (a device written in place) it sends them all, and
    # the zero chunks are written as zeros over the stale bytes.
    async with await NbdClient.connect_uri(dst_url) as nbd:
        await nbd.write(0, b"\xee" * SIZE)
        await nbd.flush()
        overwrite = msgspec.structs.replace(restore, job_id="j2b", chunks=refs)
        done = await restore_unit(overwrite, repo, nbd, uctx)
    assert done.bytes_written == SIZE
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", str(src), str(dst)], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr

    # Verify finds a flipped byte and a missing chunk.
    bad_id, gone_id = ids[9], ids[5]
    assert bad_id and gone_id
    path = tmp_path / "repo" / chunk_key(bad_id)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    (tmp_path / "repo" / chunk_key(gone_id)).unlink()
    verify = TransferUnit(
        job_id="j3", unit=0, kind="verify", destination_id="d", chunk_size=CHUNK, chunks=refs
    )
    checked = await verify_unit(verify, repo, uctx)
    assert {(b.id, b.problem) for b in checked.bad} == {(bad_id, "corrupt"), (gone_id, "missing")}


def test_a_workers_chunk_memory_is_capped_whatever_the_configuration_allows() -> None:
    """``hashblocksLimitBufferMb`` defaults to 1024: the worker holds at most 64 MiB of
    chunk buffers (16 whole 4 MiB chunks, or 8 read in part with their parents), and a
    smaller configured limit still applies."""
    assert chunk_budget(1024 << 20) == CHUNK_MEMORY_CAP == 64 << 20
    assert chunk_budget(16 << 20) == 16 << 20
