"""From extents to chunks to units, and from unit results to manifests (pure functions;
the job-orchestrator and the remote agent plan their reads with it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from virtbackup.contracts.v1.inventory import STATE_DIRTY, STATE_ZERO
from virtbackup.contracts.v1.work import PartialChunk
from virtbackup.repository.records import DiskManifest, chunk_count


class Extent(Protocol):
    """A byte range with its block status flags: the contracts' ``Extent`` (what the
    inventory returns in ``BackupBegun``) or the NBD client's."""

    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def flags(self) -> int: ...


#: Bytes of a disk per transfer unit (16 chunks of 4 MiB, 32 of 2 MiB): big enough to keep
#: a worker's pipeline full, small enough to spread a disk over many workers. In bytes,
#: not chunks, so that a repository's chunk size does not change how much one unit holds,
#: nor how many units (bus messages, an export flush each for a restore) a disk takes.
UNIT_BYTES: Final = 64 << 20


def unit_chunks(chunk_size: int) -> int:
    """Chunks of ``chunk_size`` bytes per transfer unit: ``UNIT_BYTES`` of them, at least 1."""
    return max(1, UNIT_BYTES // chunk_size)


def chunks_touched(extents: Iterable[Extent], chunk_size: int, wanted: int, mask: int) -> set[int]:
    """Indices of the chunks overlapped by an extent whose ``flags & mask == wanted``."""
    out: set[int] = set()
    for ext in extents:
        if ext.length <= 0 or (ext.flags & mask) != wanted:
            continue
        first = ext.offset // chunk_size
        last = (ext.offset + ext.length - 1) // chunk_size
        out.update(range(first, last + 1))
    return out


def allocated_chunks(extents: Iterable[Extent], chunk_size: int) -> set[int]:
    """Chunks holding anything that does not read as zero (``base:allocation``)."""
    return chunks_touched(extents, chunk_size, 0, STATE_ZERO)


#: An incremental reads a dirty chunk in part (its dirty ranges from the export, the rest
#: from the parent point's chunk) when the parent chunk is all zero (nothing to fetch),
#: or when at most this fraction of it is dirty, by the destination's driver; else
#: whole. Reading in part trades export reads (QEMU's CPU, TLS on both ends, the disk)
#: for a read, decode and hash check of the parent chunk from the destination, so the
#: break-even depends on the destination. Measured with 4 MiB chunks of mixed content on
#: a cold TLS export, reading in part against whole (docs/architecture.md, "How an
#: incremental reads"): a filesystem wins up to about 0.55 (1.9x at 0.02, 1.1x at 0.5,
#: 0.6x at 0.75), S3 (SeaweedFS on loopback) breaks even up to 0.25 with 28% less CPU
#: and loses from 0.4.
PARTIAL_MAX_FRACTION: Final[Mapping[str, float]] = {"filesystem": 0.5, "s3": 0.25}
#: Drivers not in PARTIAL_MAX_FRACTION read a chunk with a stored parent whole: ``sftp``
#: (measured slower at every fraction: 0.9x at 0.02, the worker's SSH encryption of
#: the parent reads), ``gdrive`` (per-request latency and quotas; not measured), ``dummy``
#: (nothing to read back).
DEFAULT_PARTIAL_MAX_FRACTION: Final = 0.0


def partial_max_fraction(driver_id: str) -> float:
    """The PARTIAL_MAX_FRACTION of a destination driver (``filesystem``, ``s3``, ...)."""
    return PARTIAL_MAX_FRACTION.get(driver_id, DEFAULT_PARTIAL_MAX_FRACTION)


def dirty_ranges(
    extents: Iterable[Extent], chunk_size: int, size: int
) -> dict[int, list[tuple[int, int]]]:
    """The dirty bytes of each chunk (``qemu:dirty-bitmap:...``), as ``(start, length)``
    ranges from the chunk's first byte: sorted, merged where they touch, cut at chunk
    boundaries and at ``size``. Chunks without dirty bytes are absent."""
    out: dict[int, list[tuple[int, int]]] = {}
    for ext in sorted(extents, key=lambda e: e.offset):
        if ext.length <= 0 or not ext.flags & STATE_DIRTY:
            continue
        pos, end = max(ext.offset, 0), min(ext.offset + ext.length, size)
        while pos < end:
            index = pos // chunk_size
            base = index * chunk_size
            stop = min(end, base + chunk_size)
            ranges = out.setdefault(index, [])
            start = pos - base
            if ranges and ranges[-1][0] + ranges[-1][1] >= start:
                first, length = ranges[-1]
                ranges[-1] = (first, max(length, stop - base - first))
            else:
                ranges.append((start, stop - pos))
            pos = stop
    return out


def group_units(indices: Iterable[int], per_unit: int) -> list[list[int]]:
    """Sorted chunk indices cut into units of at most ``per_unit`` (:func:`unit_chunks`).

    A unit need not be contiguous: after scattered guest writes, runs broken at every
    gap made units of one or two chunks, and a worker's few units in flight then held
    a handful of chunk reads, not enough to keep QEMU busy (an incremental of 184
    scattered chunks took 146 units and 1.8 s; packed, it takes 12 units)."""
    ordered = sorted(indices)
    return [ordered[i : i + per_unit] for i in range(0, len(ordered), per_unit)]


@dataclass
class DiskPlan:
    """How one disk is read: the chunks to read, and where the others come from."""

    target: str
    path: str
    format: str
    size: int
    chunk_size: int
    nbd_url: str
    read: list[int]
    #: Chunks not read: taken from the parent manifest (incremental) or zero.
    inherited: dict[int, str | None]
    incremental: bool
    #: Chunks of ``read`` that may be read in part (incremental only).
    partial: dict[int, PartialChunk] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk ``index`` (the last chunk of a disk may be shorter)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def read_bytes(self) -> int:
        """Bytes the plan reads from the export: every byte of a chunk read whole, the
        dirty ranges of one read in part."""
        total = 0
        for index in self.read:
            part = self.partial.get(index)
            total += sum(n for _, n in part.ranges) if part else self.chunk_length(index)
        return total

    def partial_of(self, indices: Iterable[int]) -> list[PartialChunk]:
        """The chunks of ``indices`` (a unit's) that may be read in part, in that order."""
        return [self.partial[i] for i in indices if i in self.partial]


def plan_disk(
    *,
    target: str,
    path: str,
    fmt: str,
    size: int,
    chunk_size: int,
    nbd_url: str,
    allocation: Sequence[Extent],
    dirty: Sequence[Extent] | None,
    parent: DiskManifest | None,
    partial_max_fraction: float = DEFAULT_PARTIAL_MAX_FRACTION,
) -> DiskPlan:
    """Plan the read of one disk: incremental if a dirty map and a matching parent
    manifest exist (same size and chunk size), else a full read of what is allocated.

    In an incremental plan, a dirty chunk that is not dirty all through may be read in
    part (``DiskPlan.partial``: its dirty ranges, the rest from the parent manifest's
    chunk at the same index) when that parent chunk is all zero, or when at most
    ``partial_max_fraction`` of it is dirty."""
    count = chunk_count(size, chunk_size)
    usable_parent = (
        parent is not None
        and dirty is not None
        and parent.size == size
        and parent.chunk_size == chunk_size
        and len(parent.chunks) == count
    )
    partial: dict[int, PartialChunk] = {}
    if usable_parent and parent is not None and dirty is not None:
        ranges = dirty_ranges(dirty, chunk_size, size)
        read = set(ranges)
        inherited = {i: parent.chunks[i] for i in range(count) if i not in read}
        incremental = True
        for index, parts in ranges.items():
            length = min(chunk_size, size - index * chunk_size)
            dirty_bytes = sum(n for _, n in parts)
            cheap = parent.chunks[index] is None or dirty_bytes <= partial_max_fraction * length
            if dirty_bytes < length and cheap:
                partial[index] = PartialChunk(
                    index=index, parent=parent.chunks[index], ranges=parts
                )
    else:
        read = allocated_chunks(allocation, chunk_size)
        inherited = {i: None for i in range(count) if i not in read}
        incremental = False
    return DiskPlan(
        target=target,
        path=path,
        format=fmt,
        size=size,
        chunk_size=chunk_size,
        nbd_url=nbd_url,
        read=sorted(i for i in read if i < count),
        inherited=inherited,
        incremental=incremental,
        partial=partial,
    )


def build_manifest(plan: DiskPlan, results: dict[int, str | None]) -> DiskManifest:
    """The complete manifest of a disk; ``ValueError`` if a planned chunk has no result."""
    chunks: list[str | None] = []
    for index in range(plan.count):
        if index in results:
            chunks.append(results[index])
        elif index in plan.inherited:
            chunks.append(plan.inherited[index])
        else:
            raise ValueError(f"disk {plan.target}: chunk {index} was planned but never read")
    return DiskManifest(
        target=plan.target,
        size=plan.size,
        chunk_size=plan.chunk_size,
        format=plan.format,
        source_path=plan.path,
        chunks=chunks,
    )
