"""The planner moved to ``virtbackup.repository.planner`` (the remote agent plans its
reads with it too); re-exported here for the orchestrator's modules and tests."""

from __future__ import annotations

from virtbackup.repository.planner import (
    DEFAULT_PARTIAL_MAX_FRACTION,
    PARTIAL_MAX_FRACTION,
    UNIT_BYTES,
    DiskPlan,
    Extent,
    allocated_chunks,
    build_manifest,
    chunks_touched,
    dirty_ranges,
    group_units,
    partial_max_fraction,
    plan_disk,
    unit_chunks,
)

__all__ = [
    "DEFAULT_PARTIAL_MAX_FRACTION",
    "PARTIAL_MAX_FRACTION",
    "UNIT_BYTES",
    "DiskPlan",
    "Extent",
    "allocated_chunks",
    "build_manifest",
    "chunks_touched",
    "dirty_ranges",
    "group_units",
    "partial_max_fraction",
    "plan_disk",
    "unit_chunks",
]
