"""Garbage collection, verification and statistics of a destination's repository
(``vb.cmd.job.gc``, ``vb.cmd.job.verify``, ``vb.cmd.job.stats``; native API
``/api/v1/destinations/{id}/gc|verify|stats``)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from virtbackup.contracts.v1.common import Message, ServerId, VmName

#: Grace period of a collection, in seconds (0 allowed; up to ten years).
GraceSeconds = Annotated[int, msgspec.Meta(ge=0, le=10 * 365 * 86400)]
SamplePercent = Annotated[int, msgspec.Meta(ge=1, le=100)]
Days = Annotated[int, msgspec.Meta(ge=0, le=100 * 365)]
DestinationId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class GcRequest(Message, frozen=True, kw_only=True):
    """Start a garbage collection of the destination's repository: a ``gc`` job.

    ``grace_seconds`` (default 24 h + 5 min): unreferenced chunks younger than this, by
    the destination's clock, are kept. ``dry_run``: count, remove nothing."""

    destination_id: DestinationId
    grace_seconds: GraceSeconds | None = None
    dry_run: bool = False


class VerifyRequest(Message, frozen=True, kw_only=True):
    """Start a verification of the destination's restore points: a ``verify`` job.

    ``mode`` ``full`` reads every chunk of every selected point, ``sample`` reads
    ``sample_percent`` of each point's chunks, chosen at random (at least one).
    ``outdated_after_days`` skips points verified less than that many days ago.
    ``server_id`` / ``vm_name`` select the points of one source server / VM."""

    destination_id: DestinationId
    mode: Literal["full", "sample"] = "full"
    sample_percent: SamplePercent | None = None
    outdated_after_days: Days | None = None
    server_id: ServerId | None = None
    vm_name: VmName | None = None


class StatsRequest(Message, frozen=True, kw_only=True):
    destination_id: DestinationId


class VmStats(Message, frozen=True, kw_only=True):
    """One VM's figures (a chunk shared with another VM counts in both)."""

    vm_name: str
    points: int
    logical_bytes: int
    stored_bytes: int
    chunk_count: int
    dedup_factor: float | None


class DestinationStats(Message, frozen=True, kw_only=True):
    """A repository's figures.

    ``logical_bytes``: the plaintext of every non-zero chunk of every point, summed over
    points (what restoring every point would write, zeros aside). ``stored_bytes`` and
    ``chunk_count``: the chunk objects the points reference, once each, as stored
    (compressed, encrypted). ``dedup_factor``: logical / stored (``None`` when nothing is
    stored). ``unreferenced_*``: chunk objects no point names (garbage collection removes
    them once older than its grace period). ``unreadable_points``: points whose
    manifests could not be read (counted without their chunks)."""

    destination_id: str
    points: int
    logical_bytes: int
    stored_bytes: int
    chunk_count: int
    dedup_factor: float | None
    unreferenced_chunks: int
    unreferenced_bytes: int
    unreadable_points: list[str] = msgspec.field(default_factory=list)
    vms: list[VmStats] = msgspec.field(default_factory=list)
