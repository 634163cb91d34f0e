"""The repository format on the filesystem driver: chunks, points, encryption, confinement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtbackup.repository.format import chunk_key, parse_xml_key
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.storage.errors import NotFoundError
from virtbackup.storage.filesystem import FilesystemDriver


def _point(ts: str, manifest_key: str) -> RestorePoint:
    return RestorePoint(
        vm_name="vm1",
        timestamp=ts,
        source_server_id="local",
        source_server_name="Local",
        kind="full",
        disks=[
            DiskRecord(
                target="vda",
                basename="vda.qcow2",
                path="/x/vda.qcow2",
                format="qcow2",
                size=8 << 20,
                manifest=manifest_key,
            )
        ],
        created_at="2026-01-30T12:00:00Z",
    )


async def test_chunks_are_content_addressed_compressed_and_verified(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    data = b"hello world " * 100_000
    chunk_id = repo.chunk_id(data)
    assert len(chunk_id) == 64
    await repo.put_chunk_blob(chunk_id, repo.encode_chunk(chunk_id, data))
    assert await repo.has_chunk(chunk_id)
    stored = (tmp_path / chunk_key(chunk_id)).stat().st_size
    assert stored < len(data) // 10  # zstd
    assert await repo.load_chunk(chunk_id) == data

    # Incompressible data is stored as is (plus one codec byte).
    noise = os.urandom(1 << 20)
    noise_id = repo.chunk_id(noise)
    await repo.put_chunk_blob(noise_id, repo.encode_chunk(noise_id, noise))
    assert (tmp_path / chunk_key(noise_id)).stat().st_size == len(noise) + 1

    # A flipped byte on disk is found.
    path = tmp_path / chunk_key(noise_id)
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match="does not match its hash"):
        await repo.load_chunk(noise_id)


async def test_a_point_is_listed_only_once_its_record_is_written(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    manifest = DiskManifest(
        target="vda",
        size=8 << 20,
        chunk_size=4 << 20,
        format="qcow2",
        source_path="/x/vda.qcow2",
        chunks=[None, None],
    )
    # A manifest alone (a backup that died before committing) is not a restore point.
    await repo.driver.put("vms/vm1/2026-01-30T12-00-00/vda.manifest", b"partial")
    assert await repo.restore_points() == []
    point = _point("2026-01-30T12-00-01", "vms/vm1/2026-01-30T12-00-01/vda.manifest")
    await repo.commit(point, [manifest], "<domain/>")
    points = await repo.restore_points()
    assert [p.timestamp for p in points] == ["2026-01-30T12-00-01"]
    loaded = await repo.restore_point("vms/vm1/2026-01-30T12-00-01/domain.xml")
    assert loaded == point
    assert await repo.manifest(loaded, "vda") == manifest
    assert await repo.domain_xml(loaded) == "<domain/>"
    with pytest.raises(NotFoundError):
        await repo.restore_point("vms/vm1/2026-01-30T12-00-00/domain.xml")


@pytest.mark.parametrize(
    "xml_path",
    [
        "../etc/passwd",
        "/etc/passwd",
        "vms/../../etc/domain.xml",
        "vms/vm1/../domain.xml",
        "vms/vm1/2026-01-30T12-00-00/../../x/domain.xml",
        "vms/vm1/2026-01-30T12-00-00/backup.json",
        "vms/vm 1/2026-01-30T12-00-00/domain.xml",
        "vms/vm1/not-a-time/domain.xml",
    ],
)
def test_xml_paths_outside_the_layout_are_refused(xml_path: str) -> None:
    with pytest.raises(ValueError, match=r"invalid|not a restore point"):
        parse_xml_key(xml_path)


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
async def test_encrypted_repository(tmp_path: Path, cipher: str) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), "correct horse", cipher)
    plain = await Repository.open_or_create(FilesystemDriver(tmp_path / "plain"))
    data = b"secret payload " * 1000
    chunk_id = repo.chunk_id(data)
    assert chunk_id != plain.chunk_id(data)  # keyed ids: equal content does not show
    await repo.put_chunk_blob(chunk_id, repo.encode_chunk(chunk_id, data))
    assert b"secret payload" not in (tmp_path / chunk_key(chunk_id)).read_bytes()

    again = await Repository.open(FilesystemDriver(tmp_path), "correct horse")
    assert await again.load_chunk(chunk_id) == data
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        await Repository.open(FilesystemDriver(tmp_path), "wrong")
    with pytest.raises(RepositoryError, match="passphrase is required"):
        await Repository.open(FilesystemDriver(tmp_path))
