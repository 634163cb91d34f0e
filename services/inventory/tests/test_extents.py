"""Widening extent maps to fit one bus reply (pure functions, no servers)."""

from __future__ import annotations

import itertools
import random
from functools import reduce

import msgspec
import pytest

from virtbackup.contracts.v1.inventory import Extent
from virtbackup.inventory.extents import FIRST_BLOCK, ExtentMap, fit, from_nbd, widen
from virtbackup.nbd import Extent as NbdExtent


def _random_map(rng: random.Random, size: int, max_run: int) -> list[Extent]:
    out: list[Extent] = []
    pos = 0
    while pos < size:
        length = min(rng.randint(1, max_run), size - pos)
        out.append(Extent(pos, length, rng.choice([0, 1, 2, 3])))
        pos += length
    return from_nbd(NbdExtent(e.offset, e.length, e.flags) for e in out)


def _bytes(extents: list[Extent]) -> list[int]:
    """The flags of every byte (small maps only)."""
    return [e.flags for e in extents for _ in range(e.length)]


def _reference(extents: list[Extent], block: int, dirty: bool) -> list[Extent]:
    """Widening done byte by byte."""
    flags = _bytes(extents)
    combine = (lambda a, b: a | b) if dirty else (lambda a, b: a & b)
    blocks = [
        NbdExtent(
            start, min(block, len(flags) - start), reduce(combine, flags[start : start + block])
        )
        for start in range(0, len(flags), block)
    ]
    return from_nbd(blocks)


@pytest.mark.parametrize("dirty", [True, False])
def test_widen_matches_a_byte_by_byte_reference(dirty: bool) -> None:
    rng = random.Random(7)
    for _ in range(120):
        size = rng.randint(1, 3000)
        extents = _random_map(rng, size, rng.choice([1, 5, 40, 700]))
        for block in (1, 2, 16, 64, 512, 4096):
            widened = widen(extents, block, dirty=dirty)
            assert widened == _reference(extents, block, dirty), (extents, block)
            # Still a map: contiguous from 0 to the size, neighbours differ.
            assert widened[0].offset == 0 and widened[-1].offset + widened[-1].length == size
            for a, b in itertools.pairwise(widened):
                assert a.offset + a.length == b.offset and a.flags != b.flags


def test_widening_never_hides_data_or_a_change() -> None:
    # One dirty byte and one byte of data in a sea of clean zeros.
    dirty = [Extent(0, 100_000, 0), Extent(100_000, 1, 1), Extent(100_001, 899_999, 0)]
    allocation = [Extent(0, 700_000, 3), Extent(700_000, 1, 0), Extent(700_001, 299_999, 3)]
    assert widen(dirty, 65536, dirty=True) == [
        Extent(0, 65536, 0),
        Extent(65536, 65536, 1),
        Extent(131072, 1_000_000 - 131072, 0),
    ]
    assert widen(allocation, 65536, dirty=False) == [
        Extent(0, 655360, 3),
        Extent(655360, 65536, 0),
        Extent(720896, 1_000_000 - 720896, 3),
    ]


def test_fit_widens_the_longest_map_until_the_reply_is_small_enough() -> None:
    size = 256 * FIRST_BLOCK
    # A badly fragmented allocation map (4 KiB of data every 8 KiB) and a short
    # dirty map.
    fragmented = [
        Extent(offset, 4096, 0 if i % 2 == 0 else 3)
        for i, offset in enumerate(range(0, size, 4096))
    ]
    fragmented = from_nbd(NbdExtent(e.offset, e.length, e.flags) for e in fragmented)
    short = [Extent(0, FIRST_BLOCK, 1), Extent(FIRST_BLOCK, size - FIRST_BLOCK, 0)]
    allocation, changed = ExtentMap(fragmented, dirty=False), ExtentMap(short, dirty=True)
    assert len(allocation.extents) == 4096
    fit([allocation, changed], limit=100)
    assert len(allocation.extents) + len(changed.extents) <= 100
    assert changed.extents == short and changed.block == 1  # exact: it was not the longest
    # Every 64 KiB block holds data, so the widened map says so in one extent.
    assert allocation.block == FIRST_BLOCK
    assert allocation.extents == [Extent(0, size, 0)]
    # A map that stays long after widening is widened again, doubling the block.
    alternating = ExtentMap(
        [Extent(i * FIRST_BLOCK, FIRST_BLOCK, i % 2 * 3) for i in range(256)], dirty=False
    )
    fit([alternating], limit=10)
    assert alternating.block == 2 * FIRST_BLOCK
    assert alternating.extents == [Extent(0, size, 0)]
    with pytest.raises(ValueError, match="cannot fit"):
        fit([alternating, changed], limit=1)


def test_extents_are_compact_on_the_wire() -> None:
    assert msgspec.json.encode([Extent(0, 65536, 3), Extent(65536, 1 << 40, 0)]) == (
        b"[[0,65536,3],[65536,1099511627776,0]]"
    )
