"""The units of a job that checks chunks (a sanity check of one point, a verify job).

Workers read each chunk of a ``verify`` unit from the destination, decode it and check
its hash (and AEAD), and report the ones that fail (``UnitResult.bad``); the chunks'
place in a disk does not matter, so every ``ChunkRef.index`` is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from virtbackup.contracts.v1.work import ChunkRef, TransferUnit

#: Chunks per verify unit.
VERIFY_CHUNKS_PER_UNIT: Final = 64


def verify_units(
    job_id: str, destination_id: str, chunk_size: int, chunk_ids: Sequence[str]
) -> list[TransferUnit]:
    """``chunk_ids`` in order, ``VERIFY_CHUNKS_PER_UNIT`` per unit, units numbered from 0
    (``[]`` for no chunk); ``chunk_size``: the repository's, in bytes."""
    return [
        TransferUnit(
            job_id=job_id,
            unit=n,
            kind="verify",
            destination_id=destination_id,
            chunk_size=chunk_size,
            chunks=[
                ChunkRef(index=0, id=i) for i in chunk_ids[start : start + VERIFY_CHUNKS_PER_UNIT]
            ],
        )
        for n, start in enumerate(range(0, len(chunk_ids), VERIFY_CHUNKS_PER_UNIT))
    ]
