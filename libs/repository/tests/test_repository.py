"""The repository format on the filesystem driver: chunks, points, encryption, confinement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from virtbackup.repository.codec import FRAME_SIZE
from virtbackup.repository.format import (
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    LEGACY_CHUNK_SIZE,
    chunk_key,
    manifest_key,
    parse_xml_key,
    xml_path,
)
from virtbackup.repository.records import (
    DiskManifest,
    DiskRecord,
    RestorePoint,
    StateFileRecord,
)
from virtbackup.repository.repository import (
    CorruptChunkError,
    NoRepositoryError,
    Repository,
    RepositoryError,
)
from virtbackup.storage.errors import NotFoundError
from virtbackup.storage.filesystem import FilesystemDriver


def _point(ts: str, manifest: str) -> RestorePoint:
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
                manifest=manifest,
            )
        ],
        created_at="2026-01-30T12:00:00Z",
    )


async def test_chunks_are_content_addressed_compressed_and_verified(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    data = b"hello world " * 100_000
    chunk_id = repo.chunk_id(data)
    assert len(chunk_id) == 64
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    assert await repo.has_chunk(chunk_id)
    stored = (tmp_path / chunk_key(chunk_id)).stat().st_size
    assert stored < len(data) // 10  # zstd
    assert await repo.load_chunk(chunk_id) == data

    # Incompressible data is stored as is, one framed record per frame: the blob's 6
    # bytes of header, then per record 4 bytes of record table and a codec byte.
    noise = os.urandom(1 << 20)
    noise_id = repo.chunk_id(noise)
    await repo.store_chunk(noise_id, repo.encode_chunk(noise_id, noise))
    records = -(-len(noise) // FRAME_SIZE)
    assert (tmp_path / chunk_key(noise_id)).stat().st_size == len(noise) + 6 + 5 * records

    # A flipped byte on disk is found.
    path = tmp_path / chunk_key(noise_id)
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match="does not match its hash"):
        await repo.load_chunk(noise_id)


async def test_chunk_blobs_are_read_raw_and_decoded_apart(tmp_path: Path) -> None:
    """Workers read a blob, then decode it on a thread pool: the two halves of load_chunk."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), "pw")
    data = b"chunk " * 50_000
    chunk_id = repo.chunk_id(data)
    blob = repo.encode_chunk(chunk_id, data)
    await repo.store_chunk(chunk_id, blob)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))  # again: harmless
    raw = await repo.read_chunk(chunk_id)
    assert raw != data and len(raw) < len(data)  # compressed and sealed, not plaintext
    assert repo.decode_chunk(chunk_id, raw) == data
    other = repo.chunk_id(b"other")
    assert not await repo.has_chunk(other)
    with pytest.raises(NotFoundError):
        await repo.read_chunk(other)
    with pytest.raises(ValueError, match="not a chunk id"):
        await repo.read_chunk("../repository.json")
    # A blob stored under another chunk's id is refused (the id is the associated data).
    with pytest.raises(CorruptChunkError):
        repo.decode_chunk(other, raw)


@pytest.mark.parametrize("password", [None, "pw"])
async def test_a_chunk_decodes_into_a_reused_buffer(tmp_path: Path, password: str | None) -> None:
    """A restoring worker decodes into buffers of its pool (``decode_chunk_into``): the
    same plaintext as ``decode_chunk``, for compressed and stored-as-is chunks, sealed or
    not, at the start of a buffer that held something else; a plaintext longer than the
    buffer, a blob of another chunk or a damaged one are ``CorruptChunkError``."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), password)
    buf = bytearray(b"\xee" * (1 << 20))
    for data in (b"text " * 100_000, os.urandom(300_000), os.urandom(1 << 20)):
        chunk_id = repo.chunk_id(data)
        blob = repo.encode_chunk(chunk_id, data)
        size = repo.decode_chunk_into(chunk_id, blob, buf)
        assert size == len(data) and bytes(buf[:size]) == data
    small = bytearray(1000)
    for data in (b"text " * 100_000, os.urandom(300_000)):
        chunk_id = repo.chunk_id(data)
        with pytest.raises(CorruptChunkError):
            repo.decode_chunk_into(chunk_id, repo.encode_chunk(chunk_id, data), small)
    data = b"text " * 100_000
    chunk_id = repo.chunk_id(data)
    blob = repo.encode_chunk(chunk_id, data)
    with pytest.raises(CorruptChunkError):
        repo.decode_chunk_into(repo.chunk_id(b"other"), blob, buf)
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF
    with pytest.raises(CorruptChunkError):
        repo.decode_chunk_into(chunk_id, bytes(damaged), buf)


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
    assert [p.timestamp for p in await repo.restore_points("vm1")] == ["2026-01-30T12-00-01"]
    assert await repo.restore_points("vm2") == []
    assert await repo.restore_points("../vm1") == []


def test_keys_of_a_point() -> None:
    point = _point("2026-01-30T12-00-01", "vms/vm1/2026-01-30T12-00-01/vda.manifest")
    assert point.xml_path == "vms/vm1/2026-01-30T12-00-01/domain.xml"
    assert point.xml_path == xml_path("vm1", "2026-01-30T12-00-01")
    assert parse_xml_key(point.xml_path) == ("vm1", "2026-01-30T12-00-01")
    assert manifest_key("vm1", point.timestamp, "vda") == point.disks[0].manifest
    # Any name is one safe segment (see test_vm_names.py); an empty one is none.
    assert xml_path("../x", "2026-01-30T12-00-01") == "vms/%2E.%2Fx/2026-01-30T12-00-01/domain.xml"
    with pytest.raises(ValueError, match="invalid vm name"):
        xml_path("", "2026-01-30T12-00-01")
    with pytest.raises(ValueError, match="invalid disk target"):
        manifest_key("vm1", "2026-01-30T12-00-01", "vd/a")


async def test_opening_where_there_is_no_repository(tmp_path: Path) -> None:
    with pytest.raises(NoRepositoryError, match="no repository"):
        await Repository.open(FilesystemDriver(tmp_path))
    driver = FilesystemDriver(tmp_path)
    async with await Repository.open_or_create(driver) as created:
        assert (await Repository.open(FilesystemDriver(tmp_path))).config == created.config
    assert driver._closed  # leaving the block closed the driver


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
        "vms/%41/2026-01-30T12-00-00/domain.xml",  # not canonical: "A" is "A"
        "vms/%2e%2e/2026-01-30T12-00-00/domain.xml",
        "vms/.x/2026-01-30T12-00-00/domain.xml",
        "vms/%C3/2026-01-30T12-00-00/domain.xml",  # not UTF-8
        "vms/vm1/not-a-time/domain.xml",
    ],
)
def test_xml_paths_outside_the_layout_are_refused(xml_path: str) -> None:
    with pytest.raises(ValueError, match=r"invalid|not the key of a restore point"):
        parse_xml_key(xml_path)


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
async def test_encrypted_repository(tmp_path: Path, cipher: str) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), "correct horse", cipher)
    plain = await Repository.open_or_create(FilesystemDriver(tmp_path / "plain"))
    data = b"secret payload " * 1000
    chunk_id = repo.chunk_id(data)
    assert chunk_id != plain.chunk_id(data)  # keyed ids: equal content does not show
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    assert b"secret payload" not in (tmp_path / chunk_key(chunk_id)).read_bytes()

    again = await Repository.open(FilesystemDriver(tmp_path), "correct horse")
    assert await again.load_chunk(chunk_id) == data
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        await Repository.open(FilesystemDriver(tmp_path), "wrong")
    with pytest.raises(RepositoryError, match="passphrase is required"):
        await Repository.open(FilesystemDriver(tmp_path))


async def test_state_files_are_stored_as_chunks_and_come_back(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), "pw", chunk_size=64 * 1024)
    nvram = os.urandom(150_000)  # three chunks, the last one short
    ids = await repo.store_bytes(nvram)
    assert len(ids) == 3 and all([await repo.has_chunk(i) for i in ids])
    assert b"".join([await repo.load_chunk(i) for i in ids]) == nvram
    assert await repo.load_bytes(ids, len(nvram)) == nvram
    assert await repo.store_bytes(b"") == []
    assert await repo.load_bytes([], 0) == b""
    with pytest.raises(CorruptChunkError, match="expected 150001"):
        await repo.load_bytes(ids, len(nvram) + 1)

    record = StateFileRecord(
        role="nvram", path="/var/lib/libvirt/qemu/nvram/vm1_VARS.fd", size=len(nvram),
        mode="0600", owner="libvirt-qemu", group="libvirt-qemu", chunks=ids,
    )  # fmt: skip
    manifest = "vms/vm1/2026-01-30T12-00-01/vda.manifest"
    point = msgspec.structs.replace(_point("2026-01-30T12-00-01", manifest), files=[record])
    await repo.commit(point, [], "<domain/>")
    loaded = await repo.restore_point(point.xml_path)
    assert loaded.files == [record]
    raw = msgspec.json.decode((tmp_path / "vms/vm1/2026-01-30T12-00-01/backup.json").read_bytes())
    assert raw["files"][0]["mode"] == "0600" and raw["files"][0]["chunks"] == ids


async def test_a_point_from_before_state_files_still_loads(tmp_path: Path) -> None:
    """backup.json written before the ``files`` list existed: it loads, with no files."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    old = {
        "format": 1, "vmName": "vm1", "timestamp": "2026-01-30T12-00-00",
        "status": "complete", "sourceServerId": "local", "sourceServerName": "Local",
        "kind": "full", "checkpoint": "vb-1", "disks": [], "createdAt": "2026-01-30T12:00:41Z",
    }  # fmt: skip
    await repo.driver.put("vms/vm1/2026-01-30T12-00-00/backup.json", msgspec.json.encode(old))
    [point] = await repo.restore_points("vm1")
    assert point.files == []
    assert await repo.restore_point(point.xml_path) == point


def test_a_state_file_mode_is_four_octal_digits() -> None:
    good = b'{"role":"tpm","path":"/x","mode":"0711","owner":"root","group":"root"}'
    assert msgspec.json.decode(good, type=StateFileRecord).kind == "file"
    with pytest.raises(msgspec.ValidationError, match="mode"):
        msgspec.json.decode(good.replace(b"0711", b"0o711"), type=StateFileRecord)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
async def test_a_repository_of_a_newer_format_is_refused_and_left_alone(
    tmp_path: Path, version: int
) -> None:
    """A newer format may store chunks this version would misread (format 1 readers took
    a framed chunk for damaged): opening it fails by name, before any chunk is read, and
    ``open_or_create`` does not replace its ``repository.json``."""
    await Repository.open_or_create(FilesystemDriver(tmp_path))
    config = json.loads((tmp_path / CONFIG_KEY).read_bytes())
    assert config["format"] == FORMAT_VERSION
    config["format"] = version
    (tmp_path / CONFIG_KEY).write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match=f"repository format {version} is newer"):
        await Repository.open(FilesystemDriver(tmp_path))
    with pytest.raises(RepositoryError, match=f"repository format {version} is newer"):
        await Repository.open_or_create(FilesystemDriver(tmp_path))
    assert json.loads((tmp_path / CONFIG_KEY).read_bytes())["format"] == version


async def test_the_chunk_size_is_the_repositorys_own_whatever_the_default(tmp_path: Path) -> None:
    """A new repository records the default chunk size; one made with another keeps it;
    a ``repository.json`` without ``chunkSize`` (none was written so, but a hand-made or
    foreign one may be) is read as 4 MiB, what every repository had before the default
    became 2 MiB, never as today's default: the wrong size would misplace every chunk."""
    new = await Repository.open_or_create(FilesystemDriver(tmp_path / "new"))
    assert new.chunk_size == DEFAULT_CHUNK_SIZE == 2 << 20
    await new.close()
    recorded = json.loads((tmp_path / "new" / CONFIG_KEY).read_bytes())
    assert recorded["chunkSize"] == DEFAULT_CHUNK_SIZE
    old = await Repository.open_or_create(FilesystemDriver(tmp_path / "old"), chunk_size=4 << 20)
    await old.close()
    reopened = await Repository.open(FilesystemDriver(tmp_path / "old"))
    assert reopened.chunk_size == 4 << 20
    await reopened.close()
    del recorded["chunkSize"]
    (tmp_path / "new" / CONFIG_KEY).write_text(json.dumps(recorded))
    bare = await Repository.open(FilesystemDriver(tmp_path / "new"))
    assert bare.chunk_size == LEGACY_CHUNK_SIZE == 4 << 20
    await bare.close()


@pytest.mark.parametrize("size", [0, -1, 1, 3, 3 << 20, 32 << 10, 128 << 20, 1 << 40])
async def test_a_chunk_size_out_of_bounds_is_refused_on_read_and_on_create(
    tmp_path: Path, size: int
) -> None:
    """A ``chunkSize`` that is not a power of two from 64 KiB to 64 MiB: ``open`` refuses
    the repository naming the field (a hostile or hand-edited ``repository.json``; a
    negative one made ``store_bytes`` return no chunks without an error), and
    ``open_or_create`` makes none (0 was taken as "the default")."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path / "r"))
    await repo.close()
    config = json.loads((tmp_path / "r" / CONFIG_KEY).read_bytes())
    config["chunkSize"] = size
    (tmp_path / "r" / CONFIG_KEY).write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match="chunkSize"):
        await Repository.open(FilesystemDriver(tmp_path / "r"))
    with pytest.raises(ValueError, match="chunkSize"):
        await Repository.open_or_create(FilesystemDriver(tmp_path / "new"), chunk_size=size)
    assert not (tmp_path / "new" / CONFIG_KEY).exists()
