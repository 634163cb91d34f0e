"""Garbage collection, repository locks, statistics and ``verify.json`` on the filesystem,
SFTP (a real sshd), S3 (a real SeaweedFS) and Google Drive (the local stand-in of its
API) drivers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtbackup.repository.format import (
    chunk_key,
    manifest_key,
    quarantine_key,
    record_key,
    xml_path,
)
from virtbackup.repository.lifecycle_gc import (
    GarbageCollection,
    LockRecord,
    RepositoryLocked,
    UnreadablePoint,
    repository_stats,
    write_lock,
)
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint, StateFileRecord
from virtbackup.repository.repository import CorruptChunkError, Repository
from virtbackup.repository.verification import (
    Verification,
    read_verification,
    verification_key,
    write_verification,
)
from virtbackup.testing.fixtures import driver_case

CHUNK = 64 * 1024
KINDS = ["filesystem", "sftp", "s3", "gdrive"]


@pytest.fixture(params=KINDS)
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Repository]:
    case = driver_case(request, request.param, tmp_path)
    repository = await Repository.open_or_create(case.driver, chunk_size=CHUNK)
    try:
        yield repository
    finally:
        await repository.close()


async def store(repo: Repository, data: bytes) -> str:
    chunk_id = repo.chunk_id(data)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    return chunk_id


def block(tag: int) -> bytes:
    return bytes([tag]) * 100 + os.urandom(CHUNK - 100)


async def commit(
    repo: Repository, ts: str, chunks: list[str | None], files: list[str] | None = None
) -> RestorePoint:
    size = len(chunks) * CHUNK
    point = RestorePoint(
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
                size=size,
                manifest=manifest_key("vm1", ts, "vda"),
            )
        ],
        created_at="2026-01-30T12:00:00Z",
        files=[
            StateFileRecord(
                role="nvram",
                path="/x/nvram",
                size=len(files) * CHUNK,
                mode="0600",
                owner="root",
                group="root",
                chunks=files,
            )
        ]
        if files
        else [],
    )
    manifest = DiskManifest(
        target="vda", size=size, chunk_size=CHUNK, format="qcow2", source_path="/x", chunks=chunks
    )
    await repo.commit(point, [manifest], "<domain/>")
    return point


async def delete_point(repo: Repository, ts: str) -> None:
    """What deleting a point does: ``backup.json`` first, then manifests and the XML."""
    await repo.driver.delete(record_key("vm1", ts))
    await repo.driver.delete(manifest_key("vm1", ts, "vda"))
    await repo.driver.delete(xml_path("vm1", ts))


async def chunk_ids(repo: Repository) -> set[str]:
    return {c async for c in repo.all_chunk_ids()}


def collection(repo: Repository, grace: float, **kw: object) -> GarbageCollection:
    return GarbageCollection(repo, installation="inst1", job_id="job1", grace_seconds=grace, **kw)  # type: ignore[arg-type]


async def test_gc_removes_exactly_deleted_points_and_old_failed_chunks(repo: Repository) -> None:
    shared, only_old, only_new, nvram, _failed = [await store(repo, block(i)) for i in range(5)]
    await commit(repo, "2026-01-01T00-00-00", [shared, None, only_old])
    kept_point = await commit(repo, "2026-01-02T00-00-00", [shared, only_new], files=[nvram])
    await delete_point(repo, "2026-01-01T00-00-00")
    await asyncio.sleep(2.2)
    young = await store(repo, block(9))  # a failed backup's chunk, within the grace period
    before = await chunk_ids(repo)

    dry = collection(repo, 1.5, dry_run=True)
    await dry.begin()
    await dry.mark()
    result = await dry.sweep()
    await dry.end()
    assert (result.chunks_removed, result.chunks_kept, result.chunks_too_young) == (2, 4, 1)
    assert await chunk_ids(repo) == before
    assert [i async for i in repo.driver.list_info("locks/")] == []

    gc = collection(repo, 1.5)
    await gc.begin()
    await gc.mark()
    result = await gc.sweep()
    await gc.end()
    assert await chunk_ids(repo) == {shared, only_new, nvram, young}
    assert result.chunks_removed == 2
    assert result.bytes_removed > 2 * CHUNK  # random data does not compress
    assert (result.chunks_kept, result.points) == (4, 1)
    manifest = await repo.manifest(kept_point, "vda")
    for chunk_id in [*manifest.chunks, nvram]:
        assert chunk_id is not None
        await repo.load_chunk(chunk_id)


async def test_grace_zero_keeps_what_backups_reference_or_write_during_gc(
    repo: Repository,
) -> None:
    """At grace 0: a point committed between mark and sweep that deduplicates against an
    old unreferenced chunk keeps it, and a chunk written after the start (a backup's, a
    late worker's) is too young to go; only the old unreferenced one goes."""
    base = await store(repo, block(1))
    await commit(repo, "2026-01-01T00-00-00", [base])
    orphan_reused = await store(repo, block(2))  # a failed backup's, reused below
    await store(repo, block(3))  # the one that goes
    await asyncio.sleep(1.1)
    gc = collection(repo, 0)
    await gc.begin()
    await gc.mark()
    # A backup runs during the mark: it finds orphan_reused (has_chunk) and writes one.
    assert await repo.has_chunk(orphan_reused)
    fresh = await store(repo, block(4))
    await commit(repo, "2026-01-03T00-00-00", [base, orphan_reused, fresh])
    late = await store(repo, block(5))  # a worker that outlived its job
    result = await gc.sweep()
    await gc.end()
    assert await chunk_ids(repo) == {base, orphan_reused, fresh, late}
    assert result.chunks_removed == 1
    assert result.points == 2


async def test_a_second_gc_and_another_installations_backup_are_detected(
    repo: Repository,
) -> None:
    first = collection(repo, 0)
    await first.begin()
    second = GarbageCollection(repo, installation="inst2", job_id="job2", grace_seconds=0)
    with pytest.raises(RepositoryLocked, match="another garbage collection"):
        await second.begin()
    assert [i.key async for i in repo.driver.list_info("locks/")] == [first.lock]
    # Our own installation's backups are held back by the orchestrator, not by the lock.
    await write_lock(repo, LockRecord(kind="backup", installation="inst1", job_id="b1"))
    await first.mark()
    await first.sweep()
    other = await write_lock(repo, LockRecord(kind="backup", installation="inst2", job_id="b2"))
    orphan = await store(repo, block(7))
    with pytest.raises(RepositoryLocked, match="backup of another installation"):
        await first.sweep()
    assert orphan in await chunk_ids(repo)
    await first.end()
    await repo.driver.delete(other)
    await second.begin()
    await second.end()
    # A GC lock that one of our own jobs left when it died does not block the next GC.
    dead = await write_lock(repo, LockRecord(kind="gc", installation="inst1", job_id="dead"))
    with pytest.raises(RepositoryLocked):
        await collection(repo, 0).begin()

    async def ended(lock: LockRecord) -> bool:
        return lock.installation == "inst1" and lock.job_id in {"dead", "b1"}

    third = collection(repo, 0, ended=ended)
    await third.begin()
    assert not await repo.driver.exists(dead)
    await third.end()


async def test_an_unreadable_point_makes_gc_remove_nothing(repo: Repository) -> None:
    good = await store(repo, block(1))
    orphan = await store(repo, block(2))
    await commit(repo, "2026-01-01T00-00-00", [good])
    await repo.driver.put(manifest_key("vm1", "2026-01-01T00-00-00", "vda"), b"\x00garbage")
    gc = collection(repo, 0)
    await gc.begin()
    with pytest.raises(UnreadablePoint, match="2026-01-01T00-00-00"):
        await gc.mark()
    await gc.end()
    assert await chunk_ids(repo) == {good, orphan}


@pytest.mark.parametrize(
    "record",
    [
        b'{"x":',  # cut short
        b'{"vmName": "vm1"}',  # not a record
        b'{"vmName":"vm2","timestamp":"2026-01-01T00-00-00","sourceServerId":"l",'
        b'"sourceServerName":"L","kind":"full","disks":[],"createdAt":"x"}',  # elsewhere
    ],
)
async def test_a_record_that_cannot_be_read_makes_gc_remove_nothing(
    repo: Repository, record: bytes
) -> None:
    """A ``backup.json`` that exists but does not decode is an unreadable point, not a
    missing one: its manifests may name any chunk (a later repair must find them)."""
    good, nvram = await store(repo, block(1)), await store(repo, block(2))
    orphan = await store(repo, block(3))
    ts = "2026-01-01T00-00-00"
    await commit(repo, ts, [good], files=[nvram])
    await repo.driver.put(record_key("vm1", ts), record)
    await asyncio.sleep(1.1)
    scan = await repo.scan_points()
    assert scan.points == [] and [u.key for u in scan.unreadable] == [record_key("vm1", ts)]
    assert [u.key for u in (await repo.scan_points("vm1")).unreadable] == [record_key("vm1", ts)]
    for dry_run in (True, False):
        gc = collection(repo, 0, dry_run=dry_run)
        await gc.begin()
        with pytest.raises(UnreadablePoint, match=record_key("vm1", ts)):
            await gc.mark()
        with pytest.raises(UnreadablePoint, match=record_key("vm1", ts)):
            await gc.sweep()
        await gc.end()
    assert await chunk_ids(repo) == {good, nvram, orphan}
    stats = await repository_stats(repo)
    assert stats.unreadable_points == [xml_path("vm1", ts)]
    assert stats.as_dict()["unreadablePoints"] == [xml_path("vm1", ts)]
    # Once the folder is gone (the point deleted, or never committed), GC proceeds.
    await repo.driver.delete(record_key("vm1", ts))
    gc = collection(repo, 0)
    await gc.begin()
    await gc.mark()
    result = await gc.sweep()
    await gc.end()
    assert result.chunks_removed == 3 and await chunk_ids(repo) == set()


async def test_a_manifest_that_is_not_a_manifest_makes_gc_remove_nothing(
    repo: Repository,
) -> None:
    """A manifest that decrypts and decompresses but is not a manifest (valid JSON)."""
    good = await store(repo, block(1))
    point = await commit(repo, "2026-01-01T00-00-00", [good])
    key = manifest_key("vm1", point.timestamp, "vda")
    await repo.driver.put(key, repo._encode_object(key, b'{"target": 1}'))
    gc = collection(repo, 0)
    await gc.begin()
    with pytest.raises(UnreadablePoint, match=point.timestamp):
        await gc.mark()
    await gc.end()
    stats = await repository_stats(repo)
    assert stats.unreadable_points == [point.xml_path]
    assert await chunk_ids(repo) == {good}


async def test_a_damaged_chunk_is_quarantined_then_stored_again(repo: Repository) -> None:
    data, other = block(1), block(2)
    victim, fine = await store(repo, data), await store(repo, other)
    point = await commit(repo, "2026-01-01T00-00-00", [victim, fine])
    blob = bytearray(await repo.read_chunk(victim))
    blob[len(blob) // 2] ^= 0xFF
    await repo.driver.put(chunk_key(victim), bytes(blob))
    with pytest.raises(CorruptChunkError):
        await repo.load_chunk(victim)
    # A good chunk and a missing one are never moved.
    assert not await repo.quarantine_chunk(fine)
    assert not await repo.quarantine_chunk("ab" * 32)
    assert await repo.has_chunk(fine)
    assert await repo.quarantine_chunk(victim)
    assert not await repo.has_chunk(victim)
    assert await repo.driver.get(quarantine_key(victim)) == bytes(blob)
    assert victim not in await chunk_ids(repo)  # a quarantined object is no chunk
    stats = await repository_stats(repo)
    assert (stats.chunk_count, stats.unreferenced_chunks) == (1, 0)
    # GC keeps the quarantined copy while a point names the chunk and it is not healed.
    await asyncio.sleep(1.1)
    gc = collection(repo, 0)
    await gc.begin()
    await gc.mark()
    result = await gc.sweep()
    await gc.end()
    assert (result.quarantined_kept, result.quarantined_removed, result.chunks_removed) == (
        1,
        0,
        0,
    )
    assert await repo.driver.exists(quarantine_key(victim))
    # The next backup with the data stores it again (no longer deduplicated): healed.
    assert await repo.store_bytes(data) == [victim]
    manifest = await repo.manifest(point, "vda")
    for chunk_id in manifest.chunks:
        assert chunk_id is not None
        await repo.load_chunk(chunk_id)
    gc = collection(repo, 0)
    await gc.begin()
    await gc.mark()
    result = await gc.sweep()
    await gc.end()
    assert (result.quarantined_kept, result.quarantined_removed) == (0, 1)
    assert not await repo.driver.exists(quarantine_key(victim))
    assert await chunk_ids(repo) == {victim, fine}


async def test_stats_count_logical_and_stored_bytes(repo: Repository) -> None:
    a, b = await store(repo, block(1)), await store(repo, b"\x01" * CHUNK)
    await commit(repo, "2026-01-01T00-00-00", [a, None, b])
    await commit(repo, "2026-01-02T00-00-00", [a, b, b])
    await store(repo, block(3))
    stats = await repository_stats(repo)
    blob = {i.key: i.size async for i in repo.driver.list_info("chunks/")}
    stored = blob[chunk_key(a)] + blob[chunk_key(b)]
    assert (stats.points, stats.logical_bytes, stats.chunk_count) == (2, 5 * CHUNK, 2)
    assert stats.stored_bytes == stored
    assert stats.unreferenced_chunks == 1
    figures = stats.as_dict()
    assert figures["dedupFactor"] == round(5 * CHUNK / stored, 3)
    assert figures["vms"] == [
        {
            "vmName": "vm1",
            "points": 2,
            "logicalBytes": 5 * CHUNK,
            "storedBytes": stored,
            "chunkCount": 2,
            "dedupFactor": round(5 * CHUNK / stored, 3),
        }
    ]


async def test_verification_sidecar_defaults_and_roundtrip(repo: Repository) -> None:
    assert await read_verification(repo, "vm1", "2026-01-01T00-00-00") == Verification()
    done = Verification(
        state="damaged",
        verified_at="2026-01-02T00:00:00Z",
        mode="full",
        chunks_checked=3,
        damaged_chunks=["ab" * 32],
    )
    await write_verification(repo, "vm1", "2026-01-01T00-00-00", done)
    assert await read_verification(repo, "vm1", "2026-01-01T00-00-00") == done
    raw = await repo.driver.get(verification_key("vm1", "2026-01-01T00-00-00"))
    assert raw.startswith(b'{"state":"damaged","verifiedAt":"2026-01-02T00:00:00Z"')


class _Cancel(Exception):
    pass


async def test_a_sweep_cut_short_says_what_it_removed(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep cancelled between batches (``progress`` raises, as a job's cancel does)
    leaves in ``done`` exactly what it removed, so the job's final record can say it."""
    import virtbackup.repository.lifecycle_gc as lifecycle_gc

    monkeypatch.setattr(lifecycle_gc, "DELETE_BATCH", 2)
    orphans = [await store(repo, block(20 + i)) for i in range(5)]
    await asyncio.sleep(2.2)  # object times are whole seconds on some drivers

    async def cancel_after_first_batch(text: str) -> None:
        if text.startswith("removed "):
            raise _Cancel

    gc = collection(repo, 1.0, progress=cancel_after_first_batch)
    await gc.begin()
    await gc.mark()
    with pytest.raises(_Cancel):
        await gc.sweep()
    await gc.end()
    assert gc.done is not None
    left = await chunk_ids(repo)
    assert gc.done.chunks_removed == 2 == len(orphans) - len(left & set(orphans))
    assert gc.done.bytes_removed > 2 * CHUNK  # random data does not compress
    assert gc.done.as_dict()["graceSeconds"] == 1 and gc.done.duration_seconds > 0
