"""Deleting a restore point, and its sidecars (``point.json``, ``verify.json``), on a real
filesystem driver; the driver is wrapped only to record the order of its deletes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtbackup.repository.format import manifest_key, record_key, xml_path
from virtbackup.repository.lifecycle import (
    PointMeta,
    SidecarError,
    Verification,
    point_meta_key,
    read_point_meta,
    read_verification,
    verify_key,
    write_point_meta,
)
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.gdrive import FakeGoogleDrive, google_driver

VM = "web 1/ü"  # an encoded folder
TS = "2026-01-30T12-00-00"


class RecordingDriver(FilesystemDriver):
    """The filesystem driver, remembering what it was asked to delete, in order."""

    deleted: list[str]

    async def delete(self, key: str) -> None:
        self.deleted.append(key)
        await super().delete(key)

    async def delete_many(self, keys: object) -> None:
        keys = list(keys)  # type: ignore[call-overload]
        self.deleted.extend(keys)
        await super().delete_many(keys)


async def _point(repo: Repository, ts: str, data: bytes) -> RestorePoint:
    chunk_id = repo.chunk_id(data)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    manifests = [
        DiskManifest(target=t, size=len(data), chunk_size=repo.chunk_size, format="raw",
                     source_path=f"/x/{t}", chunks=[chunk_id])
        for t in ("vda", "vdb")
    ]  # fmt: skip
    point = RestorePoint(
        vm_name=VM, timestamp=ts, source_server_id="s", source_server_name="S", kind="full",
        created_at="2026-01-30T12:00:00Z",
        disks=[DiskRecord(target=t, basename=t, path=f"/x/{t}", format="raw", size=len(data),
                          manifest=manifest_key(VM, ts, t)) for t in ("vda", "vdb")],
    )  # fmt: skip
    await repo.commit(point, manifests, "<domain/>")
    return point


async def test_delete_point_removes_the_record_first_and_never_chunks(tmp_path: Path) -> None:
    driver = RecordingDriver(tmp_path)
    driver.deleted = []
    repo = await Repository.open_or_create(driver)
    shared = os.urandom(4096)
    doomed = await _point(repo, TS, shared)
    kept = await _point(repo, "2026-01-30T12-00-01", shared)
    await write_point_meta(repo, VM, TS, PointMeta(protected=False, notes="n"))
    await driver.put(verify_key(VM, TS), b'{"state":"ok","verifiedAt":"x","mode":"full"}')
    await driver.put(f"{record_key(VM, TS).rsplit('/', 1)[0]}/leftover.tmp", b"?")
    chunks = [key async for key in driver.list("chunks/")]

    removed = await repo.delete_point(doomed)

    assert driver.deleted[0] == record_key(VM, TS)
    assert driver.deleted[1:3] == [manifest_key(VM, TS, "vda"), manifest_key(VM, TS, "vdb")]
    assert driver.deleted[3] == xml_path(VM, TS)
    assert driver.deleted[4:6] == [point_meta_key(VM, TS), verify_key(VM, TS)]
    assert driver.deleted[6:] == [f"{record_key(VM, TS).rsplit('/', 1)[0]}/leftover.tmp"]
    assert removed == driver.deleted
    assert not any(key.startswith("chunks/") for key in driver.deleted)
    assert [key async for key in driver.list("chunks/")] == chunks
    assert [p.timestamp for p in await repo.restore_points(VM)] == [kept.timestamp]
    # The other point is whole: it restores from its own manifests.
    assert (await repo.manifest(kept, "vda")).chunks == [repo.chunk_id(shared)]
    # Deleting again is harmless.
    await repo.delete_point(doomed)
    await repo.close()


async def test_sidecars_read_their_defaults_when_absent_or_broken(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    await _point(repo, TS, os.urandom(512))
    assert await read_point_meta(repo, VM, TS) == PointMeta(protected=False, notes="")
    assert await read_verification(repo, VM, TS) == Verification()
    await write_point_meta(repo, VM, TS, PointMeta(protected=True, notes="keep"))
    assert await read_point_meta(repo, VM, TS) == PointMeta(protected=True, notes="keep")
    await repo.driver.put(verify_key(VM, TS), b'{"state":"damaged","damagedChunks":["ab"]}')
    verified = await read_verification(repo, VM, TS)
    assert (verified.state, verified.damaged_chunks) == ("damaged", ["ab"])
    await repo.driver.put(point_meta_key(VM, TS), b"{not json")
    assert await read_point_meta(repo, VM, TS) == PointMeta()
    with pytest.raises(SidecarError, match=r"point\.json"):
        await read_point_meta(repo, VM, TS, strict=True)
    await repo.close()


async def test_delete_point_leaves_no_folder_on_google_drive(google: FakeGoogleDrive) -> None:
    """Drive keeps folders as objects of their own: a deleted point's folder goes with
    it (as on the filesystem and SFTP), its VM's folder stays while it holds points."""
    async with google_driver(google, root_path="/lifecycle") as driver:
        repo = await Repository.open_or_create(driver)
        shared = os.urandom(4096)
        doomed = await _point(repo, TS, shared)
        kept = await _point(repo, "2026-01-30T12-00-01", shared)
        await write_point_meta(repo, VM, TS, PointMeta(protected=True, notes="n"))
        folder = record_key(VM, TS).rsplit("/", 1)[0]
        assert google.folder_id(f"lifecycle/VirtBackup/{folder}") is not None
        await repo.delete_point(doomed)
        assert google.folder_id(f"lifecycle/VirtBackup/{folder}") is None
        assert [k async for k in driver.list(f"{folder}/")] == []
        assert [p.timestamp for p in await repo.restore_points(VM)] == [kept.timestamp]
        await repo.delete_point(doomed)  # again: harmless
