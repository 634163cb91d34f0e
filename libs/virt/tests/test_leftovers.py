"""Leftovers of interrupted backups (``hasOverlay``) and their cleanup, on a real VM."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import libvirt
import pytest

from virtbackup.testing.vms import MiB, SmallVm, create_vm, drop_bitmap, guest_write, remove_vm
from virtbackup.virt import (
    Connection,
    UnixServer,
    begin_backup,
    check_chain,
    cleanup_leftovers,
    create_checkpoint,
    define_domain,
    domain_xml,
    find_leftovers,
    job_info,
    list_checkpoints,
    list_disks,
    perform_action,
)
from virtbackup.virt.backup import SOCKET_NAME, make_socket_dir, qemu_owner
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import LocalHost, path_exists
from virtbackup.virt.leftovers import Overlay, pivot_when_ready

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
async def vm(
    conn: Connection, vm_dir: Path, vm_name: Callable[[str], str]
) -> AsyncIterator[SmallVm]:
    small = await create_vm(
        conn, vm_name("leftovers"), vm_dir, [32 * MiB, 8 * MiB], user_aliases=True
    )
    try:
        yield small
    finally:
        await remove_vm(conn, small.name)


async def pattern_at(image: Path, pattern: int, offset: int, length: int) -> bool:
    """Whether ``image`` (not in use) holds ``pattern`` over the range."""
    result = await LocalHost().run(
        [
            "qemu-io",
            "-r",
            "-f",
            "qcow2",
            "-c",
            f"read -P 0x{pattern:02x} {offset} {length}",
            str(image),
        ]
    )
    return result.returncode == 0 and "verification failed" not in result.stdout


async def test_a_clean_vm_has_no_leftovers(conn: Connection, vm: SmallVm, vm_dir: Path) -> None:
    # (This VM's disks have user aliases: guest_write and drop_bitmap below go through them.)
    assert [d.alias for d in await list_disks(conn, vm.name)] == ["ua-disk-vda", "ua-disk-vdb"]
    found = await find_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert not found.has_overlay
    assert found.backup_job is None
    assert found.scratch_files == ()


async def test_leftovers_of_a_running_vm_are_found_and_cleaned(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    # A checkpoint whose bitmap vanished.
    await create_checkpoint(conn, vm.name, "lo-stale")
    await drop_bitmap(conn, vm.name, "vda", "lo-stale")
    # An external snapshot overlay left on vda, with data written into it.
    overlay_path = vm_dir / f"{vm.name}-vda.overlay-1.qcow2"
    snapshot_xml = (
        "<domainsnapshot><name>lo-snap</name><disks>"
        f"<disk name='vda' snapshot='external'><source file='{overlay_path}'/></disk>"
        "<disk name='vdb' snapshot='no'/></disks></domainsnapshot>"
    )
    dom = await conn.lookup(vm.name)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    await conn.call(dom.snapshotCreateXML, snapshot_xml, flags)
    await guest_write(conn, vm.name, "vda", 20 * MiB, 1 * MiB, pattern=0x5A)
    # A backup that was never ended, on a socket in a directory of its own, and the
    # socket directory of an earlier one whose QEMU died.
    uuid = str(dom.UUIDString())
    owner = await qemu_owner(conn, vm.name)
    assert owner is not None
    sockets = await make_socket_dir(LocalHost(), str(vm_dir), uuid, owner)
    stray = await make_socket_dir(LocalHost(), str(vm_dir), uuid, owner)
    await begin_backup(
        conn,
        vm.name,
        server=UnixServer(f"{sockets}/{SOCKET_NAME}"),
        scratch_dir=str(vm_dir),
        checkpoint="lo-1",
    )

    found = await find_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert found.has_overlay
    assert found.backup_job is not None
    assert found.backup_job.operation == "backup"
    assert [Path(p).name.split("-")[-1] for p in found.scratch_files] == [
        "vda.scratch",
        "vdb.scratch",
    ]
    assert found.stale_checkpoints == ("lo-stale",)
    assert found.overlays == (Overlay("vda", str(overlay_path), str(vm.disks[0]), "qcow2"),)

    report = await cleanup_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert report.aborted_job
    assert report.deleted_checkpoints == ("lo-stale",)
    assert [o.path for o in report.committed_overlays] == [str(overlay_path)]
    assert len(report.removed_files) == 3 and stray in report.removed_files
    assert not Path(sockets).exists() and not Path(stray).exists()

    again = await find_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert not again.has_overlay, again
    assert await job_info(conn, vm.name) is None
    disks = await list_disks(conn, vm.name)
    assert disks[0].source == str(vm.disks[0])
    assert disks[0].backing == ()
    assert not await path_exists(LocalHost(), str(overlay_path))
    assert await conn.call(dom.listAllSnapshots, 0) == []
    names = [cp.name for cp in await list_checkpoints(conn, vm.name)]
    assert names == ["lo-1"]
    # The checkpoint of the aborted backup survived the commit and is usable.
    assert (await check_chain(conn, vm.name, "lo-1")).intact
    # The data written into the overlay is in the base image now.
    await perform_action(conn, vm.name, "forceOff")
    assert await pattern_at(vm.disks[0], 0x5A, 20 * MiB, 1 * MiB)
    assert not await pattern_at(vm.disks[0], 0x5A, 22 * MiB, 1 * MiB)


async def test_overlay_of_a_stopped_vm_is_committed_offline(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    host = LocalHost()
    if (await conn.call((await conn.lookup(vm.name)).isActive)) == 1:
        await perform_action(conn, vm.name, "forceOff")
    overlay = vm_dir / f"{vm.name}-vdb.overlay-2.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(vm.disks[1])]
    (await host.run([*create, str(overlay)])).check()
    write = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 1M", str(overlay)]
    (await host.run(write)).check()
    xml = await domain_xml(conn, vm.name, inactive=True, secure=True)
    await define_domain(conn, xml.replace(f"'{vm.disks[1]}'", f"'{overlay}'"))

    found = await find_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert found.overlays == (Overlay("vdb", str(overlay), str(vm.disks[1]), "qcow2"),)
    assert found.stale_checkpoints == ()

    report = await cleanup_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert [o.target for o in report.committed_overlays] == ["vdb"]
    assert not report.aborted_job
    assert f"'{vm.disks[1]}'" in await domain_xml(conn, vm.name, inactive=True)
    assert not await path_exists(host, str(overlay))
    assert await pattern_at(vm.disks[1], 0x77, 1 * MiB, 1 * MiB)
    assert not (await find_leftovers(conn, vm.name, scratch_dir=str(vm_dir))).has_overlay
    # The domain still starts on its committed image.
    assert (await perform_action(conn, vm.name, "start")).power_state == "running"


async def test_a_pivot_asked_before_the_commit_is_ready_waits_for_it(
    conn: Connection, vm_dir: Path, vm_name: Callable[[str], str]
) -> None:
    """libvirt refuses a pivot until QEMU has said the job is ready ("not ready for pivot
    yet"), which can come after ``blockJobInfo`` shows ``cur == end``: a CI run failed
    that way. The commit is throttled here so that the pivot is always asked too early;
    it must wait, then pivot, and the data written into the overlay is in the base."""
    small = await create_vm(conn, vm_name("pivot"), vm_dir, [16 * MiB])
    try:
        overlay_path = vm_dir / f"{small.name}-vda.overlay-p.qcow2"
        snapshot_xml = (
            "<domainsnapshot><name>pv-snap</name><disks>"
            f"<disk name='vda' snapshot='external'><source file='{overlay_path}'/></disk>"
            "</disks></domainsnapshot>"
        )
        dom = await conn.lookup(small.name)
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        )
        await conn.call(dom.snapshotCreateXML, snapshot_xml, flags)
        await guest_write(conn, small.name, "vda", 4 * MiB, 4 * MiB, pattern=0x6B)
        commit = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        await conn.call(dom.blockCommit, "vda", None, None, 1, commit)  # 1 MiB/s
        with pytest.raises(VirtError, match="not ready for pivot"):
            await conn.call(dom.blockJobAbort, "vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

        async def unthrottle() -> None:
            await asyncio.sleep(1)
            await conn.call(dom.blockJobSetSpeed, "vda", 0, 0)

        loop = asyncio.get_running_loop()
        lift = asyncio.create_task(unthrottle())
        await pivot_when_ready(conn, dom, "vda", deadline=loop.time() + 60)
        await lift
        assert not await conn.call(dom.blockJobInfo, "vda", 0)
        [disk] = await list_disks(conn, small.name)
        assert disk.source == str(small.disks[0])  # back on the base image
        await perform_action(conn, small.name, "forceOff")
        assert await pattern_at(small.disks[0], 0x6B, 4 * MiB, 4 * MiB)
    finally:
        await remove_vm(conn, small.name)
        Path(vm_dir / f"{small.name}-vda.overlay-p.qcow2").unlink(missing_ok=True)
