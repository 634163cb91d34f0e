"""Planning incrementals that read dirty chunks in part: the dirty ranges of each chunk,
which chunks are read in part, with which parent chunk, and the units that carry them."""

from __future__ import annotations

import random
import re

import msgspec

from virtbackup.contracts.v1.inventory import Extent
from virtbackup.contracts.v1.work import PartialChunk, TransferUnit
from virtbackup.job_orchestrator.backup import backup_units
from virtbackup.job_orchestrator.planner import (
    build_manifest,
    dirty_ranges,
    partial_max_fraction,
    plan_disk,
)
from virtbackup.repository.records import DiskManifest

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 4 * MiB


def _map(size: int, dirty: list[tuple[int, int]]) -> list[Extent]:
    """A dirty map as the inventory sends it: the whole disk, alternating flags."""
    out, pos = [], 0
    for offset, length in sorted(dirty):
        if offset > pos:
            out.append(Extent(pos, offset - pos, 0))
        out.append(Extent(offset, length, 1))
        pos = offset + length
    if pos < size:
        out.append(Extent(pos, size - pos, 0))
    return out


def _parent(size: int, chunks: list[str | None]) -> DiskManifest:
    return DiskManifest(
        target="vda", size=size, chunk_size=CHUNK, format="qcow2", source_path="/x", chunks=chunks
    )


def test_dirty_ranges_are_cut_at_chunks_merged_and_clipped() -> None:
    size = 10 * MiB  # the last chunk (2) is 2 MiB long
    extents = [
        Extent(0, 64 * KiB, 0),
        Extent(64 * KiB, 64 * KiB, 1),
        Extent(128 * KiB, 64 * KiB, 1),  # touches the one before: merged
        Extent(192 * KiB, CHUNK - 256 * KiB, 0),
        Extent(CHUNK - 64 * KiB, 128 * KiB, 1),  # across chunks 0 and 1
        Extent(CHUNK + 64 * KiB, 4 * MiB, 0),
        Extent(9 * MiB, 2 * MiB, 1),  # past the end of the disk: clipped
        Extent(3 * MiB, 0, 1),  # empty: ignored
    ]
    assert dirty_ranges(extents, CHUNK, size) == {
        0: [(64 * KiB, 128 * KiB), (CHUNK - 64 * KiB, 64 * KiB)],
        1: [(0, 64 * KiB)],
        2: [(1 * MiB, 1 * MiB)],
    }


def test_dirty_ranges_of_random_maps_cover_exactly_the_dirty_bytes() -> None:
    rng = random.Random(5)
    size = 13 * MiB + 12345
    for _ in range(50):
        writes = []
        for _ in range(rng.randrange(1, 12)):
            offset = rng.randrange(size)
            writes.append((offset, min(rng.randrange(1, 3 * MiB), size - offset)))
        dirty = bytearray(size)
        for offset, length in writes:
            dirty[offset : offset + length] = b"\1" * length
        # The runs of dirty bytes, as the bitmap's map says them.
        runs = [(m.start(), m.end() - m.start()) for m in re.finditer(rb"\x01+", dirty)]
        got = bytearray(size)
        for index, ranges in dirty_ranges(_map(size, runs), CHUNK, size).items():
            previous_end = -1
            for start, length in ranges:
                assert start > previous_end, ranges  # sorted, apart
                assert length > 0 and start + length <= min(CHUNK, size - index * CHUNK)
                previous_end = start + length
                base = index * CHUNK + start
                got[base : base + length] = b"\1" * length
        assert got == dirty


def test_an_incremental_reads_lightly_dirty_chunks_in_part() -> None:
    size = 18 * MiB  # chunks 0-3 of 4 MiB, chunk 4 of 2 MiB
    parent = _parent(size, ["a" * 64, None, "b" * 64, "c" * 64, "d" * 64])
    dirty = [
        (1 * MiB + 512, 1 * MiB),  # chunk 0: a quarter, unaligned
        (CHUNK + 100, 300),  # chunk 1: a few bytes over a zero parent chunk
        (2 * CHUNK, 3 * MiB),  # chunk 2: three quarters: whole
        (3 * CHUNK, CHUNK + 2 * MiB),  # chunks 3 and 4: wholly dirty
    ]
    plan = plan_disk(
        target="vda",
        path="/x",
        fmt="qcow2",
        size=size,
        chunk_size=CHUNK,
        nbd_url="u",
        allocation=[],
        dirty=_map(size, dirty),
        parent=parent,
        partial_max_fraction=0.5,
    )
    assert plan.read == [0, 1, 2, 3, 4]
    assert plan.partial == {
        0: PartialChunk(index=0, parent="a" * 64, ranges=[(1 * MiB + 512, 1 * MiB)]),
        1: PartialChunk(index=1, parent=None, ranges=[(100, 300)]),
    }
    # What the export is asked for: the ranges of chunks 0 and 1, chunks 2-4 whole.
    assert plan.read_bytes == 1 * MiB + 300 + 2 * CHUNK + 2 * MiB
    # The manifest is made from the results as before.
    assert build_manifest(plan, dict.fromkeys(range(5), "e" * 64)).chunks == ["e" * 64] * 5


def test_the_threshold_decides_between_part_and_whole() -> None:
    size = 16 * MiB
    parent = _parent(size, ["a" * 64, "b" * 64, None, None])
    # A quarter, three quarters; over zero parent chunks: three quarters, all.
    dirty = _map(
        size, [(0, 1 * MiB), (CHUNK, 3 * MiB), (2 * CHUNK + 1, 3 * MiB), (3 * CHUNK, CHUNK)]
    )

    def partial(fraction: float) -> list[int]:
        plan = plan_disk(
            target="vda",
            path="/x",
            fmt="qcow2",
            size=size,
            chunk_size=CHUNK,
            nbd_url="u",
            allocation=[],
            dirty=dirty,
            parent=parent,
            partial_max_fraction=fraction,
        )
        assert plan.read == [0, 1, 2, 3]
        return sorted(plan.partial)

    # A zero parent costs nothing to fetch: read in part whatever the threshold, unless
    # the chunk is dirty all through (then it is one whole read anyway).
    assert partial(0.0) == [2]
    assert partial(0.25) == [0, 2]
    assert partial(0.75) == [0, 1, 2]
    assert partial(1.0) == [0, 1, 2]


def test_the_threshold_is_the_destinations() -> None:
    assert partial_max_fraction("filesystem") == 0.5
    assert partial_max_fraction("s3") == 0.25
    # Slower, not measured, or nothing to read back: a stored parent means a whole read.
    for driver in ("sftp", "gdrive", "dummy"):
        assert partial_max_fraction(driver) == 0.0


def test_a_full_read_has_nothing_in_part() -> None:
    size = 8 * MiB
    plan = plan_disk(
        target="vda",
        path="/x",
        fmt="qcow2",
        size=size,
        chunk_size=CHUNK,
        nbd_url="u",
        allocation=[Extent(0, size, 0)],
        dirty=_map(size, [(0, 4096)]),
        parent=_parent(16 * MiB, [None] * 4),  # another size: no usable parent
    )
    assert not plan.incremental
    assert plan.partial == {}
    assert plan.read_bytes == size


def test_units_carry_the_partial_chunks_of_their_indices() -> None:
    size = 40 * 4 * MiB
    parent = _parent(size, [f"{i:064x}" for i in range(40)])
    writes = [(i * CHUNK + 5000, 70000) for i in range(40) if i % 2 == 0]  # 20 chunks
    writes.append((1 * CHUNK, CHUNK))  # chunk 1: whole
    plan = plan_disk(
        target="vda",
        path="/x",
        fmt="qcow2",
        size=size,
        chunk_size=CHUNK,
        nbd_url="u",
        allocation=[],
        dirty=_map(size, writes),
        parent=parent,
        partial_max_fraction=0.5,
    )
    units = backup_units("job", "dest", [plan])
    assert [len(u.indices) for u in units] == [16, 5]
    for unit in units:
        assert [p.index for p in unit.partial] == [i for i in unit.indices if i != 1]
        for part in unit.partial:
            assert part.parent == f"{part.index:064x}"
            assert part.ranges == [(5000, 70000)]
    # The wire form is what a worker decodes (and an older worker ignores).
    wire = msgspec.json.encode(units[0])
    assert b'"partial":[[0,"' in wire
    assert msgspec.json.decode(wire, type=TransferUnit) == units[0]
