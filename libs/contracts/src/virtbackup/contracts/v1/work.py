"""Transfer units (``vb.work.transfer.<job>``) and their results (``unit.done`` events).

A unit is a run of whole chunks of one disk. Backup units name chunk indices to read
from the NBD export; restore units name chunk ids to write at their indices; verify
units name chunk ids to re-read and check. A unit is idempotent: a redelivered unit (its
worker died) is simply done again.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from virtbackup.contracts.v1.common import Message

UnitKind = Literal["backup", "restore", "verify"]


class ChunkRef(Message, frozen=True, kw_only=True, array_like=True):
    """Chunk ``index`` of a disk and its id (``None``: all zero)."""

    index: int
    id: str | None


class TransferUnit(Message, frozen=True, kw_only=True):
    job_id: str
    unit: int
    kind: UnitKind
    destination_id: str
    disk: str = ""
    disk_size: int = 0
    chunk_size: int = 0
    nbd_url: str = ""
    #: backup: chunk indices to read.
    indices: list[int] = msgspec.field(default_factory=list)
    #: restore and verify: chunks to write or check.
    chunks: list[ChunkRef] = msgspec.field(default_factory=list)


class BadChunk(Message, frozen=True, kw_only=True, array_like=True):
    id: str
    problem: Literal["missing", "corrupt"]
    detail: str


class UnitResult(Message, frozen=True, kw_only=True):
    """Payload of the ``unit.done`` event: what one unit did."""

    job_id: str
    unit: int
    kind: UnitKind
    disk: str
    worker: str
    ok: bool
    error: str = ""
    #: backup: every chunk the unit read, with its id (``None`` when all zero).
    chunks: list[ChunkRef] = msgspec.field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    chunks_stored: int = 0
    chunks_deduplicated: int = 0
    bad: list[BadChunk] = msgspec.field(default_factory=list)
    seconds: float = 0.0
