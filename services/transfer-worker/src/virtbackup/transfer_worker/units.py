"""What a worker does with one unit: backup (read, hash, dedup, compress, write),
restore (read, verify, write to NBD), verify (read and check).

A chunk of an incremental backup may come read in part (``TransferUnit.partial``): its
dirty ranges are read from the export while its parent chunk is read from the
repository and checked against its id, and the chunk is the parent with the ranges laid
over it. A missing or damaged parent makes it a whole read instead: the chunk stored is
the one a whole read gives, whatever the repository holds. When the parent's blob is
framed (one record per 256 KiB, repository format 2), the chunk's blob copies the
parent's records of the frames no dirty range touches and compresses only the others.

CPU work (zero detection, hashing, compression, encryption, decompression) runs on a
thread pool: BLAKE3, zstd and the AEADs release the GIL, so one worker uses every core
while the event loop keeps the NBD and destination I/O flowing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from virtbackup.contracts.v1.work import (
    BadChunk,
    ChunkRef,
    DestinationResult,
    PartialChunk,
    TransferUnit,
    UnitResult,
)
from virtbackup.nbd import NbdClient
from virtbackup.repository.codec import FRAME_SIZE
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.storage.errors import NotFoundError, StorageError
from virtbackup.storage.retry import retry
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.metrics import BYTES_DEDUPLICATED

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Chunks of one backup or verify unit in flight at once (reads pipeline on the NBD
#: connection). Each holds a chunk buffer (4 MiB), then its blob until stored; a chunk
#: read in part also its parent's plaintext. A worker works ``worker_units`` (2) units
#: at once on one connection per disk: up to 16 chunk reads, 32 NBD requests of 2 MiB,
#: of which QEMU's NBD server serves 16 at once on a connection (32 across the default
#: two workers). The benchmark machine's disk reads ~600 MB/s with one 1-4 MiB
#: ``O_DIRECT`` read in flight and ~1300 MB/s with 4-8 (through a backup export, one
#: chunk read at a time: 335-560 MB/s; four: 718-1380), so this is enough: through the
#: export (``bench/export_reads.py --units``: one worker's ``backup_unit``, Unix
#: socket, cold ``cache='none'`` qcow2, 1611 MB) 8 kept 6.2-10.4 chunk reads in flight
#: on average (12-20 requests), 4 kept 2.1-4.4; reading waited on hashing and
#: compressing (2.7-2.9 CPU s), not on the disk. 4 would hold half the buffers (a full
#: backup's worker peaked at 170-182 MiB against 212-249 MiB with 8) but was slower end
#: to end: whole full backups through the services, two workers, nine interleaved
#: pairs, median 6.6 s against 5.7 s, slower in six. Counted in bytes
#: (:func:`in_flight`): 8 chunks of 4 MiB, 16 of 2 MiB, so that a smaller chunk size
#: keeps the same bytes in flight (at 2 MiB, 8 chunks halved the pipeline's depth).
IN_FLIGHT_BYTES = 32 << 20
#: :data:`IN_FLIGHT_BYTES` in chunks of 4 MiB (the stage benchmark's depth).
CHUNKS_IN_FLIGHT = IN_FLIGHT_BYTES // (4 << 20)
#: Chunks of one restore unit in flight at once. Each holds its blob and its plaintext
#: until the export has written it. On the benchmark restore (2 workers, 2 units each)
#: 8 took a worker to 270-305 MiB, 4 to 190-200 MiB, at the same speed and with less
#: CPU: the export (qemu-nbd, one thread), not the depth of this pipeline, sets the pace.
#: In bytes too (:func:`in_flight`): 4 chunks of 4 MiB, 8 of 2 MiB.
RESTORE_IN_FLIGHT_BYTES = 16 << 20
#: Pieces of a migration unit in flight at once (see ``migrate_unit``).
RESTORE_CHUNKS_IN_FLIGHT = 4
#: The most bytes of chunk buffers a worker holds at once, whatever the configuration's
#: ``hashblocksLimitBufferMb`` (default 1024) allows: the full backup's 16 chunks in
#: flight (2 units x 8) of 4 MiB, and half as many chunks read in part (each holds its
#: parent's plaintext too). On the benchmark (2 workers, 2 GiB of mixed content, 200
#: scattered 1 MiB writes) the incremental's 16 partial chunks in flight took a worker
#: from 200-220 MiB after the full backup to 288-298 MiB; see ``chunk_budget``.
CHUNK_MEMORY_CAP = 64 << 20
#: Beyond this many remembered ids (about 100 MiB), a worker forgets and asks again.
KNOWN_CHUNKS_LIMIT = 1_000_000


def in_flight(chunk_size: int, nbytes: int = IN_FLIGHT_BYTES) -> int:
    """Chunks of ``chunk_size`` bytes a unit keeps in flight: ``nbytes`` of them, at least 1."""
    return max(1, nbytes // chunk_size) if chunk_size > 0 else 1


def chunk_budget(configured: int) -> int:
    """Bytes of chunk buffers a worker may hold at once (its ``ByteBudget``): the
    configured limit, at most :data:`CHUNK_MEMORY_CAP`. A unit's chunk that needs more
    than the whole budget still runs, alone (``ByteBudget``)."""
    return min(configured, CHUNK_MEMORY_CAP)


class BufferPool:
    """Chunk buffers kept for reuse.

    A fresh ``bytearray(4 MiB)`` costs a ``calloc``: page faults and zeroing of 4 MiB,
    and on a virtual machine the host's faults too. Reads overwrite the whole buffer,
    so a reused one needs no clearing.
    """

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._free: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        return free.pop() if free else bytearray(size)

    def free(self, size: int) -> int:
        """How many buffers of ``size`` bytes are kept."""
        return len(self._free.get(size, ()))

    def give(self, buf: bytearray) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < self.keep:
            free.append(buf)


@dataclass
class UnitContext:
    """What a unit runs with; shared by the units of one worker process."""

    worker: str
    executor: ThreadPoolExecutor
    budget: ByteBudget
    #: Chunk ids known to be stored, per job (saves an ``exists`` per repeated chunk).
    #: Scoped to a job so that nothing a later garbage collection removes is trusted.
    known: dict[str, set[str]] = field(default_factory=dict)
    #: Chunks being written right now, so that equal chunks in flight are written once.
    writing: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    buffers: BufferPool = field(default_factory=BufferPool)

    def known_chunks(self, job_id: str) -> set[str]:
        known = self.known.setdefault(job_id, set())
        if len(known) > KNOWN_CHUNKS_LIMIT:
            known.clear()
        return known

    async def cpu(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class ZeroCheck:
    """Tells all-zero chunks apart (they are not stored), comparing against one shared
    buffer of zeros that grows to the largest chunk seen. Shared by the worker's threads: a
    race while the buffer grows can at worst make a zero chunk look non-zero (it is then
    stored like any other).

    ``bytearray == memoryview`` is one ``memcmp`` (tens of GB/s); ``memoryview ==
    memoryview`` compares item by item holding the GIL (about 1 GB/s).
    """

    def __init__(self) -> None:
        self.buf = b""

    def is_zero(self, data: bytearray) -> bool:
        """Whether every byte of ``data`` is zero."""
        if len(self.buf) < len(data):
            self.buf = bytes(len(data))
        return data == memoryview(self.buf)[: len(data)]


_ZERO = ZeroCheck()


def _analyze(repo: Repository, data: bytearray) -> str | None:
    """``None`` for an all-zero chunk, else its id."""
    if _ZERO.is_zero(data):
        return None
    return repo.chunk_id(data)


async def _bounded(items: list[T], fn: Callable[[T], Awaitable[None]], in_flight: int) -> None:
    """``fn`` on every item, in order, ``in_flight`` at a time."""
    queue: asyncio.Queue[T] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def runner() -> None:
        while not queue.empty():
            await fn(queue.get_nowait())

    await asyncio.gather(*(runner() for _ in range(min(in_flight, len(items)))))


def check_ranges(ranges: list[tuple[int, int]], length: int) -> None:
    """ValueError unless ``ranges`` are sorted, non-empty, apart from each other and
    within ``[0, length)`` (what ``PartialChunk.ranges`` promises)."""
    end = -1
    for start, n in ranges:
        if n <= 0 or start <= end or start + n > length:
            raise ValueError(f"bad dirty ranges {ranges} for a chunk of {length} bytes")
        end = start + n


def gaps(ranges: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` spans of ``[0, length)`` outside ``ranges`` (checked ones)."""
    out, pos = [], 0
    for start, n in ranges:
        if start > pos:
            out.append((pos, start))
        pos = start + n
    if pos < length:
        out.append((pos, length))
    return out


def _fill_gaps(
    view: memoryview, parent: bytes | bytearray | None, ranges: list[tuple[int, int]]
) -> None:
    """Copy the parent's bytes (zeros for ``None``) into ``view`` outside ``ranges``."""
    if parent is None:
        if len(_ZERO.buf) < len(view):
            _ZERO.buf = bytes(len(view))
        source = memoryview(_ZERO.buf)
    else:
        source = memoryview(parent)
    for start, end in gaps(ranges, len(view)):
        view[start:end] = source[start:end]


async def _read_ranges(
    nbd: NbdClient, offset: int, view: memoryview, ranges: list[tuple[int, int]]
) -> None:
    """Read each range of the chunk at ``offset`` from the export into ``view``, all at
    once; raises the first failure, and returns (or raises) only when no read writes
    into ``view`` any more."""
    reads = [
        asyncio.ensure_future(nbd.readinto(offset + start, view[start : start + n]))
        for start, n in ranges
    ]
    try:
        results = await asyncio.gather(*reads, return_exceptions=True)
    except asyncio.CancelledError:
        for read in reads:
            read.cancel()
        await asyncio.wait(reads)
        raise
    for result in results:
        if isinstance(result, BaseException):
            raise result


@dataclass(frozen=True)
class ParentFrames:
    """A parent chunk's framed records (``Repository.decode_chunk_records_into``) and the
    frames (indices, of ``codec.FRAME_SIZE`` bytes) that no dirty range of the chunk read
    in part touches: their records decode to the chunk's bytes there."""

    records: list[memoryview]
    keep: frozenset[int]


@dataclass(frozen=True)
class InPart:
    """What :func:`read_in_part` did: ``read`` bytes from the export (``None``: the
    parent could not be used and the chunk was read whole), and the parent's records the
    chunk may copy (``None``: the parent is not framed, is all zero, or was not used)."""

    read: int | None
    frames: ParentFrames | None = None


def clean_frames(ranges: list[tuple[int, int]], length: int) -> frozenset[int]:
    """The indices of the ``FRAME_SIZE`` frames of a chunk of ``length`` bytes that no
    range of ``ranges`` (``(start, length)``) overlaps."""
    count = -(-length // FRAME_SIZE)
    dirty: set[int] = set()
    for start, n in ranges:
        dirty.update(range(start // FRAME_SIZE, (start + n - 1) // FRAME_SIZE + 1))
    return frozenset(range(count)) - dirty


async def parent_chunk(
    repo: Repository, uctx: UnitContext, chunk_id: str, out: bytearray
) -> tuple[bool, list[memoryview] | None]:
    """Decode a parent chunk into ``out`` (a buffer of the worker's pool, as long as the
    chunk must be), checked against its id: ``(True, its framed records or None)``;
    ``(False, None)`` (logged) when it is missing, damaged or not ``len(out)`` bytes
    long. Other storage errors (after the retries of transient ones) are raised.

    Decoded into a pooled buffer rather than a fresh one: a fresh 4 MiB plaintext per
    chunk read in part was allocated on whichever pool thread decoded it, and freed
    memory of one thread's heap does not serve another's (the worker's peak memory
    grew by ~50 MiB in an incremental)."""
    try:
        blob = await retry(lambda: repo.read_chunk(chunk_id))
        size, records = await uctx.cpu(repo.decode_chunk_records_into, chunk_id, blob, out)
    except (NotFoundError, CorruptChunkError, ValueError) as exc:
        log.warning("parent chunk %s cannot be used (%s): reading the chunk whole", chunk_id, exc)
        return False, None
    if size != len(out):
        log.warning(
            "parent chunk %s is %d bytes, expected %d: reading the chunk whole",
            chunk_id,
            size,
            len(out),
        )
        return False, None
    return True, records


async def read_in_part(
    part: PartialChunk,
    offset: int,
    buf: bytearray,
    repo: Repository,
    nbd: NbdClient,
    uctx: UnitContext,
) -> InPart:
    """Fill ``buf`` with the chunk at ``offset`` as the export holds it now: the dirty
    ranges of ``part`` from the export, the rest from the parent chunk, both read at once.
    Returns the bytes read from the export, or ``None`` when the parent chunk could not
    be used and the chunk was read whole instead (``len(buf)`` bytes), and the parent's
    framed records with the frames the chunk shares with it (:class:`InPart`).

    ValueError for ranges that are not within the chunk (a bad unit)."""
    check_ranges(part.ranges, len(buf))
    view = memoryview(buf)
    if part.parent is None:  # the parent's chunk is all zero
        await _read_ranges(nbd, offset, view, part.ranges)
        await uctx.cpu(_fill_gaps, view, None, part.ranges)
        return InPart(sum(n for _, n in part.ranges))
    # A parent longer than the chunk does not fit: it fails to decode (not usable).
    parent = uctx.buffers.take(len(buf))
    fetch = asyncio.ensure_future(parent_chunk(repo, uctx, part.parent, parent))
    try:
        await _read_ranges(nbd, offset, view, part.ranges)
        usable, records = await fetch
    except BaseException:
        fetch.cancel()
        raise  # ``parent`` is not given back: a pool thread may still decode into it
    if not usable:
        uctx.buffers.give(parent)
        await nbd.readinto(offset, buf)
        return InPart(None)
    await uctx.cpu(_fill_gaps, view, parent, part.ranges)
    uctx.buffers.give(parent)
    frames = None
    if records is not None:
        keep = clean_frames(part.ranges, len(buf))
        frames = ParentFrames(records, keep) if keep else None
    return InPart(sum(n for _, n in part.ranges), frames)


@dataclass
class _Target:
    """One destination a backup unit stores its chunks in, and what it did there."""

    destination_id: str
    repo: Repository
    refs: dict[int, str | None] = field(default_factory=dict)
    written: int = 0
    stored: int = 0
    dedup: int = 0
    error: str = ""


class SharedChunk:
    """One chunk being stored in several repositories (or read in part from a framed
    parent): its id per ``id_key`` and its compressed body per encoding and compression
    level, each computed once (on the worker's threads) when first needed. ``frames``:
    the parent's records a framed body copies instead of compressing those MiB again."""

    def __init__(
        self, uctx: UnitContext, buf: bytearray, frames: ParentFrames | None = None
    ) -> None:
        self.uctx = uctx
        self.buf = buf
        self.frames = frames
        self._ids: dict[bytes, asyncio.Future[str | None]] = {}
        self._bodies: dict[tuple[bool, int], asyncio.Future[bytes]] = {}

    async def chunk_id(self, repo: Repository) -> str | None:
        """The chunk's id in ``repo`` (``None``: all zero)."""
        found = self._ids.get(repo.id_key)
        if found is None:
            found = asyncio.ensure_future(self.uctx.cpu(_analyze, repo, self.buf))
            self._ids[repo.id_key] = found
        return await asyncio.shield(found)

    async def body(self, repo: Repository) -> bytes:
        """The unsealed blob as ``repo`` writes it (``Repository.chunk_body``: framed or
        not, at its level), shared with every repository that writes alike."""
        key = (repo.framed, repo.compression_level)
        found = self._bodies.get(key)
        if found is None:
            if repo.framed and self.frames is not None:
                work = self.uctx.cpu(
                    repo.chunk_body, self.buf, self.frames.records, self.frames.keep
                )
            else:
                work = self.uctx.cpu(repo.chunk_body, self.buf)
            found = asyncio.ensure_future(work)
            self._bodies[key] = found
        return await asyncio.shield(found)


async def store_in(
    uctx: UnitContext,
    job_id: str,
    target: _Target,
    index: int,
    buf: bytearray,
    shared: SharedChunk | None = None,
) -> None:
    """Hash ``buf`` (chunk ``index``) for ``target``'s repository and store it there
    unless it is all zero or already there (``has_chunk``: deduplicated). ``shared``:
    the chunk goes to several repositories; its id and compression are reused across
    them. Raises the repository's errors (transient ones after their retries)."""
    repo = target.repo
    if shared is not None:
        chunk_id = await shared.chunk_id(repo)
    else:
        chunk_id = await uctx.cpu(_analyze, repo, buf)
    target.refs[index] = chunk_id
    if chunk_id is None:
        return
    # Scoped by destination: two repositories may hold different chunks of one id.
    scope = f"{job_id}@{target.destination_id}"
    known = uctx.known_chunks(scope)
    flight = f"{target.destination_id}/{chunk_id}"
    while (pending := uctx.writing.get(flight)) is not None:
        await asyncio.shield(pending)
    if chunk_id in known:
        target.dedup += 1
        BYTES_DEDUPLICATED.inc(len(buf))
        return
    # Registered before the first await: an equal chunk waits for this one.
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    uctx.writing[flight] = done
    try:
        if await retry(lambda: repo.has_chunk(chunk_id)):
            target.dedup += 1
            BYTES_DEDUPLICATED.inc(len(buf))
        else:
            if shared is not None:
                body = await shared.body(repo)
                blob = await uctx.cpu(repo.seal_chunk, chunk_id, body) if repo.sealer else body
            else:
                blob = await uctx.cpu(repo.encode_chunk, chunk_id, buf)
            await retry(lambda: repo.store_chunk(chunk_id, blob))
            target.written += len(blob)
            target.stored += 1
        known.add(chunk_id)
    finally:
        uctx.writing.pop(flight, None)
        done.set_result(None)


async def backup_unit(
    unit: TransferUnit,
    repo: Repository,
    nbd: NbdClient,
    uctx: UnitContext,
    also: list[tuple[str, Repository]] | None = None,
) -> UnitResult:
    """Read, hash and store every chunk of ``unit.indices`` (those in ``unit.partial``
    in part, see :func:`read_in_part`); the result names each chunk's id by index.

    ``also``: the repositories of ``unit.also_destination_ids`` (in that order). Each
    chunk is read once and stored in ``repo`` and in each of them (its own id there).
    With ``unit.fan_out`` (or ``also``), a destination that fails (after the retries of
    transient errors) is dropped for the rest of the unit and reported in
    ``UnitResult.destinations``, and the unit stops reading once every destination
    failed; otherwise a failure raises (as before), failing the unit."""
    started = time.monotonic()
    targets = [_Target(unit.destination_id, repo)]
    targets += [_Target(dest, r) for dest, r in also or []]
    fan_out = unit.fan_out or len(targets) > 1
    partial = {p.index: p for p in unit.partial}
    counters = {"read": 0, "partial": 0, "fallback": 0}

    async def one(index: int) -> None:
        offset = index * unit.chunk_size
        length = min(unit.chunk_size, unit.disk_size - offset)
        part = partial.get(index)
        # A chunk read in part holds its parent's plaintext for a while too; one stored
        # in several repositories a blob for each (its compressed body, then sealed).
        held = 2 * length if part is not None and part.parent is not None else length
        held += (len(targets) - 1) * length
        if all(t.error for t in targets):
            return  # nowhere left to store it
        async with uctx.budget.hold(held):
            buf = uctx.buffers.take(length)
            try:
                frames = await read(offset, buf, part)
                live = [t for t in targets if not t.error]
                if len(live) == 1 and frames is None:
                    await store(live[0], index, buf, None)
                else:  # hashed once per id key, compressed once, stored at once
                    shared = SharedChunk(uctx, buf, frames)
                    await asyncio.gather(*(store(t, index, buf, shared) for t in live))
            finally:
                uctx.buffers.give(buf)

    async def read(offset: int, buf: bytearray, part: PartialChunk | None) -> ParentFrames | None:
        if part is None:
            await nbd.readinto(offset, buf)
            counters["read"] += len(buf)
            return None
        done = await read_in_part(part, offset, buf, repo, nbd, uctx)
        counters["partial"] += 1
        read = done.read
        if read is None:
            counters["fallback"] += 1
            read = len(buf)
        counters["read"] += read
        return done.frames

    async def store(
        target: _Target, index: int, buf: bytearray, shared: SharedChunk | None
    ) -> None:
        if not fan_out:
            await store_in(uctx, unit.job_id, target, index, buf, shared)
            return
        try:
            await store_in(uctx, unit.job_id, target, index, buf, shared)
        except (StorageError, RepositoryError) as exc:
            log.warning(
                "unit %s/%s: destination %s failed: %s",
                unit.job_id,
                unit.unit,
                target.destination_id,
                exc,
            )
            target.error = f"{type(exc).__name__}: {exc}"

    await _bounded(unit.indices, one, in_flight(unit.chunk_size))
    own = targets[0]
    return UnitResult(
        job_id=unit.job_id,
        unit=unit.unit,
        kind="backup",
        disk=unit.disk,
        worker=uctx.worker,
        ok=True,
        chunks=[] if own.error else [ChunkRef(index=i, id=own.refs[i]) for i in sorted(own.refs)],
        bytes_read=counters["read"],
        bytes_written=sum(t.written for t in targets),
        chunks_stored=sum(t.stored for t in targets),
        chunks_deduplicated=sum(t.dedup for t in targets),
        seconds=time.monotonic() - started,
        chunks_partial=counters["partial"],
        partial_fallbacks=counters["fallback"],
        destinations=[_destination_result(t) for t in targets] if fan_out else [],
    )


def _destination_result(target: _Target) -> DestinationResult:
    if target.error:
        return DestinationResult(destination_id=target.destination_id, ok=False, error=target.error)
    return DestinationResult(
        destination_id=target.destination_id,
        ok=True,
        chunks=[ChunkRef(index=i, id=target.refs[i]) for i in sorted(target.refs)],
        bytes_written=target.written,
        chunks_stored=target.stored,
        chunks_deduplicated=target.dedup,
    )


async def copy_unit(
    unit: TransferUnit, source: Repository, target: Repository, uctx: UnitContext
) -> UnitResult:
    """Copy every chunk of ``unit.chunks`` (ids in ``source``) into ``target``: read and
    decode it from ``source`` (checked against its id: a damaged chunk fails the unit,
    naming it, rather than being copied), take its id in ``target`` (another one when
    either repository is encrypted), and store it there (compressed and sealed as
    ``target`` does) unless ``target`` has it. When both repositories name chunks alike
    (plain BLAKE3, no key), a chunk ``target`` has already is not even read. The result's
    ``chunks`` are the ids in ``target`` by the unit's ``index``."""
    started = time.monotonic()
    same_ids = source.sealer is None and target.sealer is None
    scope = f"{unit.job_id}@{unit.target_destination_id}"
    known = uctx.known_chunks(scope)
    refs: dict[int, str] = {}
    counters = {"read": 0, "written": 0, "stored": 0, "dedup": 0}

    async def one(ref: ChunkRef) -> None:
        if ref.id is None:
            return
        source_id = ref.id
        if same_ids and (source_id in known or await retry(lambda: target.has_chunk(source_id))):
            known.add(source_id)
            refs[ref.index] = source_id
            counters["dedup"] += 1
            return
        async with uctx.budget.hold(unit.chunk_size or source.chunk_size):
            blob = await retry(lambda: source.read_chunk(source_id))
            counters["read"] += len(blob)
            data = await uctx.cpu(source.decode_chunk, source_id, blob)
            into = _Target(unit.target_destination_id, target)
            await store_in(uctx, unit.job_id, into, ref.index, bytearray(data))
            chunk_id = into.refs[ref.index]
            if chunk_id is None:  # an all-zero chunk stored by another tool: keep it
                chunk_id = target.chunk_id(data)
                if not await retry(lambda: target.has_chunk(chunk_id)):
                    encoded = await uctx.cpu(target.encode_chunk, chunk_id, data)
                    await retry(lambda: target.store_chunk(chunk_id, encoded))
            refs[ref.index] = chunk_id
            counters["written"] += into.written
            counters["stored"] += into.stored
            counters["dedup"] += into.dedup

    await _bounded(unit.chunks, one, in_flight(unit.chunk_size or source.chunk_size))
    return UnitResult(
        job_id=unit.job_id,
        unit=unit.unit,
        kind="copy",
        disk=unit.disk,
        worker=uctx.worker,
        ok=True,
        chunks=[ChunkRef(index=i, id=refs[i]) for i in sorted(refs)],
        bytes_read=counters["read"],
        bytes_written=counters["written"],
        chunks_stored=counters["stored"],
        chunks_deduplicated=counters["dedup"],
        seconds=time.monotonic() - started,
    )


async def restore_unit(
    unit: TransferUnit, repo: Repository, nbd: NbdClient, uctx: UnitContext
) -> UnitResult:
    """Write every chunk of the unit at its offset. A zero chunk (``id`` ``None``) is
    written as zeros (NBD ``WRITE_ZEROES``, or a buffer of zeros where the export cannot
    do that): the orchestrator sends zero chunks only for a target that is not a fresh
    image (a device written in place), and leaves them out, as holes, otherwise."""
    started = time.monotonic()
    counters = {"read": 0, "written": 0}

    async def one(ref: ChunkRef) -> None:
        offset = ref.index * unit.chunk_size
        length = min(unit.chunk_size, unit.disk_size - offset)
        if ref.id is None:
            await _write_zeroes(nbd, offset, length)
            counters["written"] += length
            return
        chunk_id = ref.id
        async with uctx.budget.hold(length):
            blob = await retry(lambda: repo.read_chunk(chunk_id))
            counters["read"] += len(blob)
            # Decoded into a buffer of the worker's pool (the one its backups read into),
            # so a worker's restores and backups share their chunk buffers, and the blob
            # is let go before the write.
            buf = uctx.buffers.take(unit.chunk_size)
            try:
                size = await uctx.cpu(repo.decode_chunk_into, chunk_id, blob, buf)
                del blob
                if size != length:
                    raise CorruptChunkError(chunk_id, f"is {size} bytes, expected {length}")
                await nbd.write(offset, memoryview(buf)[:length])
            finally:
                uctx.buffers.give(buf)
            counters["written"] += length

    await _bounded(unit.chunks, one, in_flight(unit.chunk_size, RESTORE_IN_FLIGHT_BYTES))
    await nbd.flush()
    return UnitResult(
        job_id=unit.job_id,
        unit=unit.unit,
        kind="restore",
        disk=unit.disk,
        worker=uctx.worker,
        ok=True,
        bytes_read=counters["read"],
        bytes_written=counters["written"],
        seconds=time.monotonic() - started,
    )


async def _write_zeroes(nbd: NbdClient, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` read as zeros."""
    if nbd.info.can_write_zeroes:
        await nbd.write_zeroes(offset, length)
        return
    if len(_ZERO.buf) < length:
        _ZERO.buf = bytes(length)
    await nbd.write(offset, memoryview(_ZERO.buf)[:length])


async def verify_unit(unit: TransferUnit, repo: Repository, uctx: UnitContext) -> UnitResult:
    """Re-read every chunk and check it against its id; report what is missing or corrupt."""
    started = time.monotonic()
    bad: list[BadChunk] = []
    counters = {"read": 0}

    async def one(ref: ChunkRef) -> None:
        if ref.id is None:
            return
        chunk_id = ref.id
        async with uctx.budget.hold(unit.chunk_size or repo.chunk_size):
            try:
                blob = await retry(lambda: repo.read_chunk(chunk_id))
            except NotFoundError:
                bad.append(BadChunk(id=chunk_id, problem="missing", detail="not found"))
                return
            counters["read"] += len(blob)
            try:
                await uctx.cpu(repo.decode_chunk, chunk_id, blob)
            except CorruptChunkError as exc:
                bad.append(BadChunk(id=chunk_id, problem="corrupt", detail=exc.reason))

    await _bounded(unit.chunks, one, in_flight(unit.chunk_size or repo.chunk_size))
    return UnitResult(
        job_id=unit.job_id,
        unit=unit.unit,
        kind="verify",
        disk=unit.disk,
        worker=uctx.worker,
        ok=True,
        bad=sorted(bad, key=lambda b: b.id),
        bytes_read=counters["read"],
        seconds=time.monotonic() - started,
    )
