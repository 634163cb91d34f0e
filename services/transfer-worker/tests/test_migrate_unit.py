"""How a migration unit cuts its ranges into pieces (the copy itself is tested end to
end in tests/test_migrate.py)."""

from __future__ import annotations

import pytest

from virtbackup.transfer_worker.migrate_unit import PIECE, pieces


def test_ranges_are_cut_into_pieces_of_at_most_a_buffer() -> None:
    out = pieces([(0, PIECE + 5), (3 * PIECE, 10)], 4 * PIECE)
    assert out == [(0, PIECE), (PIECE, 5), (3 * PIECE, 10)]


@pytest.mark.parametrize("bad", [(-1, 5), (0, 0), (4 * PIECE - 1, 2)])
def test_a_range_outside_the_disk_fails_the_unit(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="not within the disk"):
        pieces([bad], 4 * PIECE)
