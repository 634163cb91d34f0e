"""One backup read written to several destinations (``BackupRequest.also_destination_ids``).

The VM is read once: one libvirt backup job, one NBD read of each chunk. Each chunk is
stored in every destination that needs it, each in its own repository (its ids,
compression, encryption), and each destination gets a restore point of its own,
committed only once every chunk it names is durable there.

Which destinations an incremental serves (docs/repository-format.md, "One read, several
destinations"): the libvirt job is incremental from the checkpoint of the *first*
destination's parent point (its newest point of the VM from that server, as for a
backup to one destination). Another destination builds on its own newest point only
when that point has the very same checkpoint (a point of an earlier fan-out backup, or
a copy of one): then the dirty map is relative to its parent too. Any other destination
(no point yet, a point of another checkpoint, a parent whose last verify found damage)
gets a full read: every allocated chunk, from the same export, in the same units where
the chunks overlap, so the disk is still read once.

A destination that fails (a write, its repository, its commit) is dropped; the others
still commit. The job then ends ``failure`` with a message starting ``partial failure``
and ``result.destinations`` saying, per destination, ``committed`` (with its timestamp)
or ``failed`` (with the error). The libvirt checkpoint is kept whenever one destination
committed: the failed ones' newest points have another checkpoint, so their next backup
reads them in full by the rule above.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.work import PartialChunk, TransferUnit, UnitResult
from virtbackup.job_orchestrator.planner import DiskPlan, group_units, unit_chunks

#: ``Job.params`` key of the extra destinations, in request order.
PARAM: str = "alsoDestinationIds"


def also_destinations(job: Job) -> list[str]:
    """The job's extra destinations (``params.alsoDestinationIds``), in request order."""
    value = job.params.get(PARAM) or []
    return [str(v) for v in value] if isinstance(value, list) else []


def written_destinations(job: Job) -> list[str]:
    """Every destination a backup or copy job writes: a backup's own and its extras, a
    copy's target."""
    if job.type == "copy":
        target = job.params.get("targetDestinationId")
        return [str(target)] if target else []
    own = [job.destination_id] if job.destination_id else []
    return own + also_destinations(job)


def parent_of(job: Job, destination_id: str) -> tuple[bool, str | None]:
    """The parent point a backup job recorded for ``destination_id``: ``(False, None)``
    while it has recorded none yet, else ``(True, timestamp or None for a full read)``."""
    if destination_id == job.destination_id:
        if "parentTimestamp" not in job.result:
            return False, None
        parent = job.result["parentTimestamp"]
        return True, parent if isinstance(parent, str) else None
    extra = job.result.get("destinations", {})
    entry = extra.get(destination_id) if isinstance(extra, dict) else None
    if not isinstance(entry, dict) or "parentTimestamp" not in entry:
        return False, None
    parent = entry["parentTimestamp"]
    return True, parent if isinstance(parent, str) else None


@dataclass
class FanOut:
    """The units of a backup to several destinations and what came back for each.

    ``order``: the destinations, the job's own first. ``plans``: each one's plan of
    every disk (same disks, same order). A chunk is read once and stored in every
    destination whose plan reads it; units hold chunks of one disk that go to the same
    destinations."""

    job_id: str
    order: list[str]
    plans: dict[str, list[DiskPlan]]
    units: list[TransferUnit] = field(default_factory=list)
    #: unit number -> its destinations, the unit's own first.
    unit_destinations: dict[int, list[str]] = field(default_factory=dict)
    #: destination -> disk -> chunk index -> id (``None``: all zero).
    results: dict[str, dict[str, dict[int, str | None]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    total_bytes: int = 0

    def __post_init__(self) -> None:
        first = self.plans[self.order[0]]
        for dest in self.order:
            self.results[dest] = {p.target: {} for p in first}
            self.stats[dest] = {"stored": 0, "dedup": 0}
        self._build()

    def _build(self) -> None:
        own = self.order[0]
        for position, disk in enumerate(self.plans[own]):
            needed: dict[int, list[str]] = {}
            for dest in self.order:
                for index in self.plans[dest][position].read:
                    needed.setdefault(index, []).append(dest)
            groups: dict[tuple[str, ...], list[int]] = {}
            for index in sorted(needed):
                groups.setdefault(tuple(needed[index]), []).append(index)
            for dests, indices in groups.items():
                for chunk_group in group_units(indices, unit_chunks(disk.chunk_size)):
                    partial = disk.partial_of(chunk_group) if dests[0] == own else []
                    self._add(disk, list(dests), chunk_group, partial)

    def _add(
        self, disk: DiskPlan, dests: list[str], indices: list[int], partial: list[PartialChunk]
    ) -> None:
        number = len(self.units)
        self.units.append(
            TransferUnit(
                job_id=self.job_id,
                unit=number,
                kind="backup",
                destination_id=dests[0],
                disk=disk.target,
                disk_size=disk.size,
                chunk_size=disk.chunk_size,
                nbd_url=disk.nbd_url,
                indices=indices,
                partial=partial,
                also_destination_ids=dests[1:],
                fan_out=len(self.order) > 1,
            )
        )
        self.unit_destinations[number] = dests
        parts = {p.index: p for p in partial}
        for index in indices:
            part = parts.get(index)
            self.total_bytes += sum(n for _, n in part.ranges) if part else disk.chunk_length(index)

    @property
    def chunks_read(self) -> int:
        return sum(len(u.indices) for u in self.units)

    def on_result(self, result: UnitResult) -> None:
        """Record a unit's chunk ids per destination, and the destinations it failed in."""
        dests = self.unit_destinations.get(result.unit, [])
        if not result.destinations:
            if dests:
                self._record(dests[0], result.disk, result, result.chunks_stored,
                             result.chunks_deduplicated)  # fmt: skip
            return
        for outcome in result.destinations:
            if not outcome.ok:
                self.failed.setdefault(outcome.destination_id, outcome.error)
                continue
            into = self.results.get(outcome.destination_id)
            if into is None:
                continue
            for ref in outcome.chunks:
                into[result.disk][ref.index] = ref.id
            stats = self.stats[outcome.destination_id]
            stats["stored"] += outcome.chunks_stored
            stats["dedup"] += outcome.chunks_deduplicated

    def _record(self, dest: str, disk: str, result: UnitResult, stored: int, dedup: int) -> None:
        for ref in result.chunks:
            self.results[dest][disk][ref.index] = ref.id
        self.stats[dest]["stored"] += stored
        self.stats[dest]["dedup"] += dedup

    def alive(self) -> list[str]:
        """The destinations that have not failed, in order."""
        return [d for d in self.order if d not in self.failed]


def outcome(
    order: Sequence[str],
    committed: dict[str, dict[str, Any]],
    failed: dict[str, str],
    parents: dict[str, str | None],
) -> dict[str, dict[str, Any]]:
    """``result.destinations``: per destination, ``state`` (``committed``, ``failed``,
    or ``pending`` before the commit), its parent's timestamp, and what it committed
    (``timestamp``, ``kind``) or why it failed (``error``)."""
    out: dict[str, dict[str, Any]] = {}
    for dest in order:
        entry: dict[str, Any] = {"parentTimestamp": parents.get(dest)}
        if dest in failed:
            entry.update(state="failed", error=failed[dest])
        elif dest in committed:
            entry.update(state="committed", **committed[dest])
        else:
            entry["state"] = "pending"
        out[dest] = entry
    return out


def summary(
    order: Iterable[str], committed: dict[str, dict[str, Any]], failed: dict[str, str]
) -> str:
    """``committed in a (ts), b (ts); failed in c: why``."""
    done = [f"{d} ({committed[d]['timestamp']})" for d in order if d in committed]
    text = "committed in " + ", ".join(done) if done else "committed nowhere"
    if failed:
        text += "; failed in " + "; ".join(f"{d}: {e}" for d, e in failed.items())
    return text
