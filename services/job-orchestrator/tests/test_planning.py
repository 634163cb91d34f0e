"""Planning chunks and units, manifests, and restore point timestamps (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackup.job_orchestrator.planner import build_manifest, group_units, plan_disk
from virtbackup.nbd import Extent
from virtbackup.repository.records import DiskManifest
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver

MiB = 1 << 20


def test_full_plan_reads_only_chunks_with_data() -> None:
    allocation = [Extent(0, 1 * MiB, 0), Extent(1 * MiB, 10 * MiB, 3), Extent(11 * MiB, 5 * MiB, 0)]
    plan = plan_disk(
        target="vda",
        path="/x",
        fmt="qcow2",
        size=16 * MiB,
        chunk_size=4 * MiB,
        nbd_url="nbd://h/vda",
        allocation=allocation,
        dirty=None,
        parent=None,
    )
    assert plan.read == [0, 2, 3]  # chunk 1 reads as zero
    assert plan.inherited == {1: None}
    assert not plan.incremental


def test_incremental_plan_reads_dirty_chunks_and_inherits_the_rest() -> None:
    parent = DiskManifest(
        target="vda",
        size=16 * MiB,
        chunk_size=4 * MiB,
        format="qcow2",
        source_path="/x",
        chunks=["a" * 64, None, "b" * 64, "c" * 64],
    )
    dirty = [Extent(0, 5 * MiB, 0), Extent(5 * MiB, 64 * 1024, 1), Extent(5 * MiB + 65536, 1, 0)]
    plan = plan_disk(
        target="vda",
        path="/x",
        fmt="qcow2",
        size=16 * MiB,
        chunk_size=4 * MiB,
        nbd_url="u",
        allocation=[],
        dirty=dirty,
        parent=parent,
    )
    assert plan.incremental
    assert plan.read == [1]
    manifest = build_manifest(plan, {1: "d" * 64})
    assert manifest.chunks == ["a" * 64, "d" * 64, "b" * 64, "c" * 64]
    with pytest.raises(ValueError, match="planned but never read"):
        build_manifest(plan, {})


def test_a_resized_disk_is_read_in_full() -> None:
    parent = DiskManifest(
        target="vda",
        size=8 * MiB,
        chunk_size=4 * MiB,
        format="qcow2",
        source_path="/x",
        chunks=[None, None],
    )
    plan = plan_disk(
        target="vda",
        path="/x",
        fmt="qcow2",
        size=16 * MiB,
        chunk_size=4 * MiB,
        nbd_url="u",
        allocation=[Extent(0, 16 * MiB, 0)],
        dirty=[],
        parent=parent,
    )
    assert not plan.incremental
    assert plan.read == [0, 1, 2, 3]


def test_units_break_at_gaps_and_size() -> None:
    assert group_units([5, 1, 2, 3, 9, 10], per_unit=2) == [[1, 2], [3, 5], [9, 10]]
    assert group_units([40, 7, 1000, 3], per_unit=16) == [[3, 7, 40, 1000]]  # gaps do not split


async def test_two_points_in_one_second_get_distinct_timestamps(tmp_path: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    first = await repo.new_timestamp("vm1")
    await repo.driver.put(f"vms/vm1/{first}/backup.json", b"{}")
    second = await repo.new_timestamp("vm1")
    assert second > first
    assert await repo.new_timestamp("other") <= second
