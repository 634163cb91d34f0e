"""Transfer units (``vb.work.transfer.<job>``) and their results (``unit.done`` events).

A unit is a run of whole chunks of one disk. Backup units name chunk indices to read
from the NBD export (and, in an incremental backup, which of them may be read in part:
``partial``); restore units name chunk ids to write at their indices; verify
units name chunk ids to re-read and check. A unit is idempotent: a redelivered unit (its
worker died) is simply done again.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from virtbackup.contracts.v1.common import Message

UnitKind = Literal["backup", "restore", "verify", "copy", "migrate"]


class ChunkRef(Message, frozen=True, kw_only=True, array_like=True):
    """Chunk ``index`` of a disk and its id (``None``: all zero)."""

    index: int
    id: str | None


class PartialChunk(Message, frozen=True, kw_only=True, array_like=True):
    """A chunk of an incremental backup unit that may be read in part.

    Only ``ranges`` changed since the parent restore point: ``[start, length]`` pairs in
    bytes from the chunk's first byte, sorted, neither overlapping nor touching, within
    the chunk. The rest of the chunk is the parent point's chunk ``parent`` (its id;
    ``None``: all zero). A worker reads the ranges from the export and takes the rest
    from the parent chunk (checked against its id), or reads the whole chunk when the
    parent cannot be had (missing, damaged, of another size): the chunk it stores is the
    same either way.

    ``[index, parent, [[start, length], ...]]`` on the wire.
    """

    index: int
    parent: str | None
    ranges: list[tuple[int, int]]


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
    #: backup: those of ``indices`` that may be read in part (see PartialChunk), in the
    #: order of ``indices``; the others are read whole. Workers that predate the field
    #: ignore it and read every chunk whole, which gives the same chunks.
    partial: list[PartialChunk] = msgspec.field(default_factory=list)
    #: restore and verify: chunks to write or check; copy: chunks to copy (``index``
    #: numbers them within the job, ``id`` is the chunk's id in ``destination_id``).
    chunks: list[ChunkRef] = msgspec.field(default_factory=list)
    #: backup: more destinations every chunk of the unit is stored in (one read, each
    #: destination's own repository: its ids, compression, encryption). A failure of
    #: one of them is reported in ``UnitResult.destinations``, not a failed unit.
    also_destination_ids: list[str] = msgspec.field(default_factory=list)
    #: backup: the job writes several destinations (not all of them need be this
    #: unit's): every destination's outcome is reported in ``UnitResult.destinations``,
    #: and a unit whose destinations all failed is still ``ok`` (the job goes on with
    #: its other destinations).
    fan_out: bool = False
    #: copy: the destination the chunks are copied to.
    target_destination_id: str = ""
    #: migrate: the export written (``nbd_url`` is the source export read), and the
    #: byte ranges ``[offset, length]`` of the disk to copy (sorted, within the disk).
    #: ``destination_id`` is empty: a migration touches no repository.
    target_nbd_url: str = ""
    ranges: list[tuple[int, int]] = msgspec.field(default_factory=list)


class BadChunk(Message, frozen=True, kw_only=True, array_like=True):
    id: str
    problem: Literal["missing", "corrupt"]
    detail: str


class DestinationResult(Message, frozen=True, kw_only=True):
    """What a backup unit with ``also_destination_ids`` did in one of its destinations:
    the chunks' ids there (they differ between encrypted repositories), what was
    stored, or why that destination failed (``error``; then ``chunks`` is empty)."""

    destination_id: str
    ok: bool
    error: str = ""
    chunks: list[ChunkRef] = msgspec.field(default_factory=list)
    bytes_written: int = 0
    chunks_stored: int = 0
    chunks_deduplicated: int = 0


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
    #: backup: bytes read from the export (only the ranges of a chunk read in part).
    bytes_read: int = 0
    bytes_written: int = 0
    chunks_stored: int = 0
    chunks_deduplicated: int = 0
    bad: list[BadChunk] = msgspec.field(default_factory=list)
    seconds: float = 0.0
    #: backup: chunks read in part (their unchanged bytes taken from the parent chunk),
    #: and those of them read whole instead because the parent chunk was missing or
    #: damaged in the repository.
    chunks_partial: int = 0
    partial_fallbacks: int = 0
    #: backup with ``also_destination_ids``: one entry per destination of the unit (its
    #: own first); the unit is ``ok`` when at least one destination stored every chunk.
    #: copy: ``chunks`` are the copied chunks' ids in the target, by ``index``.
    destinations: list[DestinationResult] = msgspec.field(default_factory=list)
