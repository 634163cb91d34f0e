"""The units of a chunk check (sanity check, verify job): one helper for both."""

from __future__ import annotations

from virtbackup.job_orchestrator.verify_units import VERIFY_CHUNKS_PER_UNIT, verify_units


def test_chunks_are_cut_into_numbered_verify_units_in_order() -> None:
    ids = [f"{n:064x}" for n in range(2 * VERIFY_CHUNKS_PER_UNIT + 3)]
    units = verify_units("j1", "fs", 4 << 20, ids)
    assert [u.unit for u in units] == [0, 1, 2]
    assert [len(u.chunks) for u in units] == [VERIFY_CHUNKS_PER_UNIT, VERIFY_CHUNKS_PER_UNIT, 3]
    assert [c.id for u in units for c in u.chunks] == ids
    assert {(u.job_id, u.kind, u.destination_id, u.chunk_size) for u in units} == {
        ("j1", "verify", "fs", 4 << 20)
    }
    assert {c.index for u in units for c in u.chunks} == {0}
    assert verify_units("j1", "fs", 4 << 20, []) == []
