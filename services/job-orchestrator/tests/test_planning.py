"""Planning chunks and units, manifests, and restore point timestamps (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackup.contracts.v1.inventory import BackupBegun, DiskExport, Extent
from virtbackup.job_orchestrator.backup import plan
from virtbackup.job_orchestrator.planner import build_manifest, group_units, plan_disk
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
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


def _export(target: str, allocation: list[Extent], dirty: list[Extent] | None) -> DiskExport:
    return DiskExport(
        target=target,
        path=f"/vms/{target}.qcow2",
        nbd_url=f"nbd://h:1/{target}",
        size=16 * MiB,
        format="qcow2",
        bitmap_context=f"qemu:dirty-bitmap:backup-{target}" if dirty is not None else None,
        allocation=allocation,
        dirty=dirty,
    )


async def test_plan_uses_the_maps_the_inventory_returned(tmp_path: Path) -> None:
    """No NBD: the sizes and maps come from ``BackupBegun``; a disk with a dirty map and a
    parent manifest is incremental, one without a parent manifest (new disk) is full."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path), chunk_size=4 * MiB)
    parent = RestorePoint(
        vm_name="vm1",
        timestamp="2026-01-01T00-00-00",
        source_server_id="local",
        source_server_name="local",
        kind="full",
        checkpoint="cp1",
        disks=[
            DiskRecord(
                target="vda", basename="vda", path="/x", format="qcow2", size=16 * MiB, manifest="m"
            )
        ],
        created_at="2026-01-01T00:00:00Z",
    )
    old = ["a" * 64, None, "b" * 64, "c" * 64]
    manifest = DiskManifest(
        target="vda",
        size=16 * MiB,
        chunk_size=4 * MiB,
        format="qcow2",
        source_path="/x",
        chunks=old,
    )
    await repo.commit(parent, [manifest], "<domain/>")
    begun = BackupBegun(
        server_id="local",
        vm_name="vm1",
        checkpoint="cp2",
        parent_checkpoint="cp1",
        incremental=True,
        domain_xml="<domain/>",
        disks=[
            _export(
                "vda",
                [Extent(0, 16 * MiB, 0)],
                [Extent(0, 9 * MiB, 0), Extent(9 * MiB, 1, 1), Extent(9 * MiB + 1, 7 * MiB - 1, 0)],
            ),
            _export(
                "vdb",
                [Extent(0, 4 * MiB, 3), Extent(4 * MiB, 12 * MiB, 0)],
                [Extent(0, 16 * MiB, 1)],
            ),
        ],
    )
    vda, vdb = await plan(begun, repo, parent)
    assert (vda.incremental, vda.read, vda.size, vda.nbd_url) == (
        True,
        [2],
        16 * MiB,
        "nbd://h:1/vda",
    )
    assert build_manifest(vda, {2: "d" * 64}).chunks == ["a" * 64, None, "d" * 64, "c" * 64]
    # vdb has no manifest in the parent: read in full, from its allocation map.
    assert (vdb.incremental, vdb.read) == (False, [1, 2, 3])
    # A full backup (no parent) plans from the allocation maps alone.
    full = await plan(begun, repo, None)
    assert [(p.incremental, p.read) for p in full] == [(False, [0, 1, 2, 3]), (False, [1, 2, 3])]
