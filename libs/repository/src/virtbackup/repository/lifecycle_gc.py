"""Garbage collection, repository locks and statistics (docs/repository-format.md, "Garbage
collection").

The protocol, in the order a collection runs it (``GarbageCollection``):

1. ``begin``: write the lock object ``locks/gc-<installation>-<job>.json``. Its
   last-modified time, read back from the destination, is the collection's start on
   the *destination's* clock; the cutoff is that start minus the grace period. Another
   live GC lock (from any installation) makes the collection fail (``RepositoryLocked``).
2. ``mark``: read every restore point and every manifest, and collect the chunk ids they
   name (disks and state files). Backups may run meanwhile.
3. The caller makes the destination exclusive: no backup of its installation runs from
   here to ``end`` (the orchestrator's per-destination gate).
4. ``sweep``: check the locks again (another live GC lock, or a live backup lock of
   *another* installation, fails the collection before anything is removed), read the
   list of points again and mark every point not marked yet, then remove every chunk
   that no point names and whose last-modified time is before the cutoff.
5. ``end``: remove the lock object.

A point that cannot be read makes the collection fail before anything is removed (its
chunks could not be counted as referenced): a ``backup.json`` that exists but does not
decode (or names another folder's point), or a readable one whose manifests are missing
or do not decode, unless that ``backup.json`` has disappeared meanwhile (it was being
deleted). A folder without ``backup.json`` is no point (not committed yet, or being
deleted). Quarantined chunks (``<chunk key>.bad``, see ``Repository.quarantine_chunk``)
are not chunks: the sweep removes one only once a good copy of its chunk is stored again
or no point names the chunk any more and it is older than the cutoff.

Lock objects are plaintext JSON (``LockRecord``) and count as *live* while their
last-modified time is less than ``LOCK_STALE_SECONDS`` before the newest lock read in
the same listing (the destination's clock again): holders rewrite them every
``LOCK_REFRESH_SECONDS``, so a crashed holder's lock stops counting after a while.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from virtbackup.repository.format import CHUNKS_PREFIX, check_id, quarantined_id, record_key
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import Repository, RepositoryError
from virtbackup.storage.errors import NotFoundError

LOCKS_PREFIX = "locks/"
#: A lock not rewritten for this long no longer counts (its holder died).
LOCK_STALE_SECONDS = 3600.0
#: How often holders rewrite their lock objects.
LOCK_REFRESH_SECONDS = 600.0
#: Default grace period: chunks younger than this are never removed (24 h + 5 min).
DEFAULT_GRACE_SECONDS = 24 * 3600 + 300
#: Chunks removed per ``delete_many`` call (and between progress reports).
DELETE_BATCH = 500

Progress = Callable[[str], Awaitable[None]]
#: Whether a lock's holder is known to have ended (its lock is a leftover).
Ended = Callable[["LockRecord"], Awaitable[bool]]


class RepositoryLocked(RepositoryError):
    """Another GC, or a backup of another installation, holds the repository."""


class UnreadablePoint(RepositoryError):
    """A restore point's manifests cannot be read: the collection removes nothing."""


class LockRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``locks/<kind>-<installation>-<job>.json``: who works on the repository."""

    kind: str
    installation: str
    job_id: str
    host: str = ""
    created_at: str = ""


@dataclass(frozen=True)
class LockInfo:
    key: str
    record: LockRecord
    modified: float


def lock_key(kind: str, installation: str, job_id: str) -> str:
    """``locks/<kind>-<installation>-<job>.json`` (``kind``: ``gc`` or ``backup``)."""
    for part in (kind, installation, job_id):
        if not part or not all(c.isalnum() or c in "_." for c in part):
            raise ValueError(f"lock name parts are letters, digits, _ and .: {part!r}")
    return f"{LOCKS_PREFIX}{kind}-{installation}-{job_id}.json"


async def write_lock(repo: Repository, record: LockRecord) -> str:
    """Write (or rewrite: refresh) a lock object; returns its key."""
    key = lock_key(record.kind, record.installation, record.job_id)
    await repo.driver.put(key, msgspec.json.encode(record))
    return key


async def remove_lock(repo: Repository, key: str) -> None:
    await repo.driver.delete(key)


async def live_locks(repo: Repository, *, now: float | None = None) -> list[LockInfo]:
    """Lock objects rewritten less than ``LOCK_STALE_SECONDS`` before ``now`` (destination
    clock; default: the newest lock's own time). Unreadable lock objects count, as
    ``kind`` ``unknown``: something wrote them."""
    infos = [info async for info in repo.driver.list_info(LOCKS_PREFIX)]
    if not infos:
        return []
    reference = now if now is not None else max(i.modified for i in infos)
    live = []
    for info in infos:
        if reference - info.modified >= LOCK_STALE_SECONDS:
            continue
        try:
            record = msgspec.json.decode(await repo.driver.get(info.key), type=LockRecord)
        except NotFoundError:
            continue
        except (msgspec.DecodeError, msgspec.ValidationError):
            record = LockRecord(kind="unknown", installation="?", job_id=info.key)
        live.append(LockInfo(info.key, record, info.modified))
    return live


async def point_chunks(repo: Repository, point: RestorePoint) -> list[tuple[str, int]]:
    """Every chunk reference of the point (its disks' manifests, then its state files),
    in order and repeated where the point repeats a chunk, with the plaintext length it
    stands for. ``NotFoundError`` for a missing manifest, ``RepositoryError`` for one
    that does not decode."""
    refs: list[tuple[str, int]] = []
    for disk in point.disks:
        try:
            manifest = await repo.manifest(point, disk.target)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RepositoryError(f"manifest of {disk.target}: {exc}") from None
        for index, chunk_id in enumerate(manifest.chunks):
            if chunk_id is not None:
                start = index * manifest.chunk_size
                refs.append((chunk_id, max(0, min(manifest.chunk_size, manifest.size - start))))
    for state_file in point.files:
        left = state_file.size
        for chunk_id in state_file.chunks:
            length = max(0, min(repo.chunk_size, left))
            refs.append((chunk_id, length))
            left -= length
    return refs


@dataclass
class GcResult:
    """What a collection did (or, with ``dry_run``, would do)."""

    chunks_removed: int = 0
    bytes_removed: int = 0
    chunks_kept: int = 0
    bytes_kept: int = 0
    #: Unreferenced chunks kept because they are younger than the cutoff.
    chunks_too_young: int = 0
    #: Quarantined chunks (``<id>.bad``) removed (counted in ``chunks_removed`` too).
    quarantined_removed: int = 0
    #: Quarantined chunks kept: their chunk is not stored again and a point names it.
    quarantined_kept: int = 0
    points: int = 0
    duration_seconds: float = 0.0
    dry_run: bool = False
    grace_seconds: float = 0.0
    #: The cutoff on the destination's clock (seconds since the epoch).
    cutoff: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "chunksRemoved": self.chunks_removed,
            "bytesRemoved": self.bytes_removed,
            "chunksKept": self.chunks_kept,
            "bytesKept": self.bytes_kept,
            "chunksTooYoung": self.chunks_too_young,
            "quarantinedRemoved": self.quarantined_removed,
            "quarantinedKept": self.quarantined_kept,
            "points": self.points,
            "durationSeconds": round(self.duration_seconds, 3),
            "dryRun": self.dry_run,
            # Whole seconds when whole (the request's unit), as the API documents it.
            "graceSeconds": int(self.grace_seconds)
            if float(self.grace_seconds).is_integer()
            else self.grace_seconds,
            "cutoff": self.cutoff,
        }


async def _noop(_: str) -> None:
    return None


async def _never(_: LockRecord) -> bool:
    return False


@dataclass
class GarbageCollection:
    """One collection of ``repo`` (see the module docstring for the protocol).

    ``progress`` is awaited with a message between steps and batches; it may raise to
    cancel (the caller then awaits ``end``; ``done`` holds what the sweep removed until
    then). Nothing is removed before ``sweep``.
    ``ended`` says which locks are leftovers of holders that are known to have ended
    (the caller's own jobs that died): they are removed and do not count.
    """

    repo: Repository
    installation: str
    job_id: str
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    dry_run: bool = False
    host: str = ""
    progress: Progress = _noop
    #: Tells which live-looking locks are leftovers of holders known to have ended (the
    #: caller's own installation's jobs): they are removed instead of refusing.
    ended: Ended = _never
    started: float = 0.0
    lock: str | None = None
    marked_points: set[str] = field(default_factory=set)
    referenced: set[str] = field(default_factory=set)
    #: What ``sweep`` has done so far, kept up to date batch by batch: when it is
    #: cancelled (``progress`` raised) or fails midway, what it removed is still known.
    done: GcResult | None = None
    _clock: float = field(default_factory=time.monotonic)

    @property
    def cutoff(self) -> float:
        """Chunks last written before this time (destination clock) may be removed."""
        return self.started - self.grace_seconds

    async def begin(self) -> None:
        """Write the GC lock and read the start time back. ``RepositoryLocked`` (lock
        removed again) when another GC holds the repository."""
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")
        record = LockRecord(
            kind="gc",
            installation=self.installation,
            job_id=self.job_id,
            host=self.host,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        self.lock = await write_lock(self.repo, record)
        try:
            mine = [i async for i in self.repo.driver.list_info(self.lock)]
            if not mine:
                raise RepositoryError(f"the lock object {self.lock} vanished right after writing")
            self.started = mine[0].modified
            await self._check_locks(during="start")
        except BaseException:
            await self.end()
            raise

    async def _check_locks(self, *, during: str) -> None:
        for lock in await live_locks(self.repo):
            if lock.key == self.lock:
                continue
            record = lock.record
            if await self.ended(record):
                await remove_lock(self.repo, lock.key)
                continue
            if record.kind == "backup" and record.installation == self.installation:
                continue  # ours: the caller keeps them from running during the sweep
            if record.kind == "backup" and during == "start":
                continue  # another installation's backup: the sweep refuses if it still runs
            what = (
                "another garbage collection"
                if record.kind == "gc"
                else f"a {record.kind} of another installation"
            )
            raise RepositoryLocked(
                f"{what} holds the repository ({lock.key}, installation "
                f"{record.installation}, job {record.job_id}); try again when it has ended, "
                f"or remove that lock object if its holder is gone for good (it lapses "
                f"{int(LOCK_STALE_SECONDS)} s after its last refresh)"
            )

    async def refresh(self) -> None:
        """Rewrite the lock object (holders do so every ``LOCK_REFRESH_SECONDS``)."""
        if self.lock is not None:
            await self.repo.driver.put(self.lock, await self.repo.driver.get(self.lock))

    async def _mark_points(self) -> int:
        """Mark every point not marked yet; returns how many points exist now."""
        scan = await self.repo.scan_points()
        unreadable = [u for u in scan.unreadable if await self.repo.driver.exists(u.key)]
        if unreadable:
            raise UnreadablePoint(
                "restore point records that cannot be read: "
                + "; ".join(str(u) for u in unreadable)
                + "; nothing was removed (a record that cannot be read may name any chunk: "
                "repair it, or delete its folder if the point is lost)"
            )
        points = scan.points
        for point in points:
            key = record_key(point.vm_name, point.timestamp)
            if key in self.marked_points:
                continue
            try:
                chunks = await point_chunks(self.repo, point)
            except (NotFoundError, RepositoryError) as exc:
                if not await self.repo.driver.exists(key):
                    continue  # being deleted: its chunks are garbage (next time)
                raise UnreadablePoint(
                    f"restore point {point.vm_name} {point.timestamp}: {exc}; nothing was "
                    "removed (a point whose chunks cannot be listed keeps every chunk)"
                ) from None
            self.referenced.update(chunk_id for chunk_id, _ in chunks)
            self.marked_points.add(key)
            await self.progress(f"marked {len(self.marked_points)} restore points")
        return len(points)

    async def mark(self) -> None:
        """Phase 1 (backups may run): mark every restore point there is now."""
        await self._mark_points()

    async def sweep(self) -> GcResult:
        """Phase 2 (exclusive: the caller's backups of this destination are held back):
        mark the points committed since ``mark``, then remove the unreferenced chunks
        older than the cutoff. ``RepositoryLocked`` / ``UnreadablePoint`` before
        anything is removed."""
        await self.refresh()
        await self._check_locks(during="sweep")
        result = self.done = GcResult(
            dry_run=self.dry_run, grace_seconds=self.grace_seconds, cutoff=self.cutoff
        )
        result.points = await self._mark_points()
        doomed: list[tuple[str, int]] = []
        present: set[str] = set()
        quarantined: list[tuple[str, str, int, float]] = []
        async for info in self.repo.driver.list_info(CHUNKS_PREFIX):
            name = info.key.rsplit("/", 1)[-1]
            bad_id = quarantined_id(name)
            if bad_id is not None:
                quarantined.append((bad_id, info.key, info.size, info.modified))
                continue
            try:
                check_id(name)
            except ValueError:
                continue  # not a chunk: never ours to remove
            present.add(name)
            if name in self.referenced:
                result.chunks_kept += 1
                result.bytes_kept += info.size
            elif info.modified >= self.cutoff:
                result.chunks_too_young += 1
                result.chunks_kept += 1
                result.bytes_kept += info.size
            else:
                doomed.append((info.key, info.size))
        for bad_id, key, size, modified in quarantined:
            # Healed (stored again since), or named by no point and past the grace: the
            # damaged copy has served its purpose. Else kept, for inspection.
            if bad_id in present or (bad_id not in self.referenced and modified < self.cutoff):
                doomed.append((key, size))
                result.quarantined_removed += 1
            else:
                result.quarantined_kept += 1
        await self.progress(
            f"{len(doomed)} unreferenced chunks older than the cutoff "
            f"({result.chunks_kept} kept, {result.chunks_too_young} of them too young)"
        )
        for start in range(0, len(doomed), DELETE_BATCH):
            batch = doomed[start : start + DELETE_BATCH]
            if not self.dry_run:
                await self.repo.driver.delete_many([key for key, _ in batch])
            result.chunks_removed += len(batch)
            result.bytes_removed += sum(size for _, size in batch)
            result.duration_seconds = time.monotonic() - self._clock
            verb = "would remove" if self.dry_run else "removed"
            await self.progress(f"{verb} {result.chunks_removed} of {len(doomed)} chunks")
        result.duration_seconds = time.monotonic() - self._clock
        return result

    async def end(self) -> None:
        """Remove the lock object (idempotent)."""
        lock, self.lock = self.lock, None
        if lock is not None:
            await remove_lock(self.repo, lock)


@dataclass
class VmStats:
    vm_name: str
    points: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    chunk_count: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "vmName": self.vm_name,
            "points": self.points,
            "logicalBytes": self.logical_bytes,
            "storedBytes": self.stored_bytes,
            "chunkCount": self.chunk_count,
            "dedupFactor": dedup_factor(self.logical_bytes, self.stored_bytes),
        }


@dataclass
class RepositoryStats:
    """Figures of a repository (see ``repository_stats``)."""

    points: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    chunk_count: int = 0
    unreferenced_chunks: int = 0
    unreferenced_bytes: int = 0
    unreadable_points: list[str] = field(default_factory=list)
    vms: list[VmStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "points": self.points,
            "logicalBytes": self.logical_bytes,
            "storedBytes": self.stored_bytes,
            "chunkCount": self.chunk_count,
            "dedupFactor": dedup_factor(self.logical_bytes, self.stored_bytes),
            "unreferencedChunks": self.unreferenced_chunks,
            "unreferencedBytes": self.unreferenced_bytes,
            "unreadablePoints": self.unreadable_points,
            "vms": [vm.as_dict() for vm in self.vms],
        }


def dedup_factor(logical: int, stored: int) -> float | None:
    """Logical bytes per stored byte (deduplication and compression together), rounded
    to 3 places; ``None`` when nothing is stored."""
    return round(logical / stored, 3) if stored else None


def _is_chunk(name: str) -> bool:
    try:
        check_id(name)
    except ValueError:
        return False
    return True


async def repository_stats(repo: Repository) -> RepositoryStats:
    """Figures of the repository:

    - ``logical_bytes``: what the points hold, summed over every point: the plaintext of
      every non-zero chunk of every disk and state file (zero chunks are not counted);
    - ``stored_bytes`` / ``chunk_count``: the chunk objects the points reference, counted
      once each, as stored (compressed, encrypted);
    - ``dedup_factor``: ``logical_bytes / stored_bytes``;
    - ``unreferenced_*``: chunk objects no point names (what GC removes past the grace);
    - per VM the same, over that VM's points (a chunk shared by two VMs counts in both).

    Points whose manifests cannot be read are named in ``unreadable_points`` (by
    ``xmlPath``) and counted without their chunks; so are records that exist but cannot
    be read (``Repository.scan_points``), which are not counted as points (their chunks
    count as unreferenced here, but garbage collection refuses to run while they exist).
    Needs the repository's key (manifests are sealed).
    """
    sizes = {
        name: info.size
        async for info in repo.driver.list_info(CHUNKS_PREFIX)
        if _is_chunk(name := info.key.rsplit("/", 1)[-1])
    }
    stats = RepositoryStats()
    per_vm: dict[str, tuple[VmStats, set[str]]] = {}
    referenced: set[str] = set()
    scan = await repo.scan_points()
    stats.unreadable_points += [u.xml_path for u in scan.unreadable]
    for point in scan.points:
        vm, vm_chunks = per_vm.setdefault(point.vm_name, (VmStats(point.vm_name), set()))
        vm.points += 1
        stats.points += 1
        try:
            chunks = await point_chunks(repo, point)
        except (NotFoundError, RepositoryError):
            stats.unreadable_points.append(point.xml_path)
            continue
        logical = sum(length for _, length in chunks)
        vm.logical_bytes += logical
        stats.logical_bytes += logical
        ids = {chunk_id for chunk_id, _ in chunks}
        vm_chunks.update(ids)
        referenced.update(ids)
    for vm, vm_chunks in per_vm.values():
        present = [c for c in vm_chunks if c in sizes]
        vm.chunk_count = len(present)
        vm.stored_bytes = sum(sizes[c] for c in present)
        stats.vms.append(vm)
    present = [c for c in referenced if c in sizes]
    stats.chunk_count = len(present)
    stats.stored_bytes = sum(sizes[c] for c in present)
    unreferenced = [size for chunk_id, size in sizes.items() if chunk_id not in referenced]
    stats.unreferenced_chunks = len(unreferenced)
    stats.unreferenced_bytes = sum(unreferenced)
    return stats
