"""Pull-mode backups and checkpoint chains against the real libvirtd and QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from virtbackup.runtime.ports import free_port
from virtbackup.testing.images import images_equal
from virtbackup.testing.nbdtools import nbd_copy, nbd_info, nbd_map
from virtbackup.testing.vms import MiB, SmallVm, create_vm, drop_bitmap, guest_write, remove_vm
from virtbackup.virt import (
    CheckpointInconsistent,
    Conflict,
    Connection,
    NotFound,
    TcpServer,
    UnixServer,
    VirtError,
    begin_backup,
    check_chain,
    create_checkpoint,
    current_backup,
    delete_checkpoint,
    end_backup,
    get_checkpoint,
    job_info,
    list_checkpoints,
    open_connection,
    perform_action,
)
from virtbackup.virt.backup import (
    SOCKET_NAME,
    make_socket_dir,
    qemu_owner,
    socket_dir_pattern,
    socket_path_fits,
)
from virtbackup.virt.host import LocalHost, path_exists

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
async def vm(
    conn: Connection, vm_dir: Path, vm_name: Callable[[str], str]
) -> AsyncIterator[SmallVm]:
    small = await create_vm(conn, vm_name("backup"), vm_dir, [32 * MiB, 16 * MiB])
    try:
        yield small
    finally:
        await remove_vm(conn, small.name)


def tcp() -> TcpServer:
    return TcpServer("127.0.0.1", free_port())


async def test_full_backup_export_matches_the_idle_source(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    await guest_write(conn, vm.name, "vda", 0, 4 * MiB, pattern=0xAB)
    await guest_write(conn, vm.name, "vdb", 1 * MiB, 1 * MiB, pattern=0xCD)
    job = await begin_backup(
        conn, vm.name, server=tcp(), scratch_dir=str(vm_dir), checkpoint="full-1"
    )
    try:
        assert [e.target for e in job.exports] == ["vda", "vdb"]
        assert all(e.mode == "full" and e.meta_context is None for e in job.exports)
        assert job.export("vda").capacity == 32 * MiB
        assert job.uri("vda") == f"nbd://127.0.0.1:{job.server.port}/vda"  # type: ignore[union-attr]
        info = await job_info(conn, vm.name)
        assert info is not None
        assert info.is_backup
        assert info.type == "unbounded"
        # Workers may read one export over several connections.
        props = nbd_info(job.uri("vda"))
        assert props["can_multi_conn"] is True
        assert props["export-size"] == 32 * MiB
        assert props["is_read_only"] is True
        # The allocation map: data exactly where the guest wrote.
        extents = nbd_map(job.uri("vda"))
        data = [(e.offset, e.length) for e in extents if "data" in e.description]
        assert data == [(0, 4 * MiB)]
        assert sum(e.length for e in extents) == 32 * MiB
        for disk, target in zip(vm.disks, ("vda", "vdb"), strict=True):
            copy = nbd_copy(job.uri(target), vm_dir / f"full-{target}.raw")
            assert images_equal(disk, copy)
            copy.unlink()
        scratch = [e.scratch for e in job.exports]
        assert all(s is not None and s.startswith(str(vm_dir)) for s in scratch)
    finally:
        await end_backup(conn, job)
    assert await job_info(conn, vm.name) is None
    assert await current_backup(conn, vm.name) is None
    assert not [s for s in scratch if s and await path_exists(LocalHost(), s)]
    names = [cp.name for cp in await list_checkpoints(conn, vm.name)]
    assert "full-1" in names
    assert (await check_chain(conn, vm.name, "full-1")).intact


async def test_incremental_bitmap_covers_exactly_the_written_range(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    base = await begin_backup(
        conn, vm.name, server=tcp(), scratch_dir=str(vm_dir), checkpoint="inc-0"
    )
    await end_backup(conn, base)
    await guest_write(conn, vm.name, "vda", 8 * MiB, 2 * MiB, pattern=0xEF)
    job = await begin_backup(
        conn,
        vm.name,
        server=tcp(),
        scratch_dir=str(vm_dir),
        checkpoint="inc-1",
        incremental="inc-0",
    )
    try:
        vda = job.export("vda")
        assert job.incremental == "inc-0"
        assert vda.mode == "incremental"
        assert vda.meta_context == "qemu:dirty-bitmap:backup-vda"
        dirty = [
            (e.offset, e.length)
            for e in nbd_map(job.uri("vda"), vda.meta_context)
            if e.description == "dirty"
        ]
        assert dirty == [(8 * MiB, 2 * MiB)]
        vdb = job.export("vdb")
        assert vdb.meta_context == "qemu:dirty-bitmap:backup-vdb"
        assert all(e.description == "clean" for e in nbd_map(job.uri("vdb"), vdb.meta_context))
        # The export still shows the whole disk as of the begin.
        copy = nbd_copy(job.uri("vda"), vm_dir / "inc-vda.raw")
        assert images_equal(vm.disks[0], copy)
        copy.unlink()
        # One backup job at a time.
        with pytest.raises(Conflict):
            await begin_backup(conn, vm.name, server=tcp(), scratch_dir=str(vm_dir), checkpoint="x")
    finally:
        await end_backup(conn, job)
    cps = {cp.name: cp for cp in await list_checkpoints(conn, vm.name)}
    assert cps["inc-1"].parent == "inc-0"
    assert cps["inc-1"].bitmap_for("vda") == "inc-1"


async def test_unix_socket_export_without_guest_agent(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    sock_dir = vm_dir / "sock"
    sock_dir.mkdir()
    qemu = pwd.getpwnam("libvirt-qemu")
    os.chown(sock_dir, qemu.pw_uid, qemu.pw_gid)
    server = UnixServer(str(sock_dir / "nbd.sock"))
    job = await begin_backup(
        conn, vm.name, server=server, scratch_dir=str(vm_dir), checkpoint=None, quiesce=True
    )
    try:
        # No guest agent in an OS-less VM: the backup goes ahead crash-consistent.
        assert not job.quiesced
        assert job.quiesce_error is not None
        assert "agent" in job.quiesce_error
        assert job.uri("vdb") == f"nbd+unix:///vdb?socket={sock_dir}/nbd.sock"
        extents = nbd_map(job.uri("vdb"))
        assert sum(e.length for e in extents) == 16 * MiB
    finally:
        await end_backup(conn, job)
    assert sock_dir.is_dir()  # a directory make_socket_dir did not make stays


def _qemu_ids(name: str) -> str:
    """``uid:gid`` of the running domain's QEMU process (real ids, from ``/proc``)."""
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = rest.split()[0]
    return f"{ids['Uid']}:{ids['Gid']}"


async def test_a_socket_directory_of_its_own_is_qemus_and_goes_with_the_job(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    uuid = str((await conn.lookup(vm.name)).UUIDString())
    owner = await qemu_owner(conn, vm.name)
    assert owner is not None and owner == _qemu_ids(vm.name) and not owner.startswith("0:")
    directory = Path(await make_socket_dir(LocalHost(), str(vm_dir), uuid, owner))
    info = directory.stat()
    assert directory.parent == vm_dir and directory.match(socket_dir_pattern(uuid))
    assert (info.st_mode & 0o777, f"{info.st_uid}:{info.st_gid}") == (0o700, owner)
    job = await begin_backup(
        conn,
        vm.name,
        server=UnixServer(str(directory / SOCKET_NAME)),
        scratch_dir=str(vm_dir),
        checkpoint=None,
    )
    try:
        assert sum(e.length for e in nbd_map(job.uri("vdb"))) == 16 * MiB
    finally:
        await end_backup(conn, job)
    assert not directory.exists()
    # A scratch directory too long a path for a socket in it is told apart.
    assert socket_path_fits("/var/lib/libvirt/images/virtbackup-scratch", uuid)
    assert not socket_path_fits("/var/lib/libvirt/images/" + "s" * 30, uuid)


async def test_ending_a_job_polls_for_its_end_quickly_then_backs_off(
    conn: Connection, vm: SmallVm, vm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted backup job is gone a few ms after ``abortJob``: the end waits for it in
    pauses that start at 2 ms and double up to 100 ms (a fixed 100 ms pause was a third
    of a 0-byte incremental's time). The job is made to look alive for three more polls
    than libvirt says, so that the pauses are always seen."""
    from virtbackup.virt import backup as backup_module

    pauses: list[float] = []
    real_sleep, real_running = asyncio.sleep, backup_module.backup_running
    polls = 0

    async def recording_sleep(delay: float) -> None:
        if sys._getframe(1).f_code.co_name == "wait_job_gone":
            pauses.append(delay)
        await real_sleep(delay)

    async def running_longer(conn: Connection, name: str) -> bool:
        nonlocal polls
        polls += 1
        return polls <= 4 or await real_running(conn, name)

    job = await begin_backup(conn, vm.name, server=tcp(), scratch_dir=str(vm_dir), checkpoint=None)
    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    monkeypatch.setattr(backup_module, "backup_running", running_longer)
    try:
        await end_backup(conn, job)
    finally:
        monkeypatch.undo()
    assert await current_backup(conn, vm.name) is None
    first, most = backup_module.JOB_GONE_POLL_FIRST, backup_module.JOB_GONE_POLL_MAX
    assert len(pauses) >= 3
    assert pauses == [min(first * 2**i, most) for i in range(len(pauses))]
    assert first <= 0.005 and most <= 0.1


async def test_deleted_checkpoint_is_a_broken_chain(conn: Connection, vm: SmallVm) -> None:
    cp = await create_checkpoint(conn, vm.name, "manual-1")
    assert [d.bitmap for d in cp.disks if d.target in ("vda", "vdb")] == ["manual-1", "manual-1"]
    assert (await check_chain(conn, vm.name, "manual-1")).intact
    await delete_checkpoint(conn, vm.name, "manual-1")
    check = await check_chain(conn, vm.name, "manual-1")
    assert not check.intact
    assert "does not exist" in check.problems[0]
    assert not (await check_chain(conn, vm.name, None)).intact
    with pytest.raises(NotFound):
        await delete_checkpoint(conn, vm.name, "manual-1")


async def test_missing_bitmap_is_a_broken_chain_and_needs_metadata_only_delete(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    await create_checkpoint(conn, vm.name, "manual-2")
    await drop_bitmap(conn, vm.name, "vda", "manual-2")
    check = await check_chain(conn, vm.name, "manual-2")
    assert not check.intact
    assert check.problems == ("bitmap manual-2 of disk vda is missing or broken",)
    sized = await get_checkpoint(conn, vm.name, "manual-2", with_size=True)
    assert [d.size for d in sized.disks if d.target == "vdb"] == [0]
    with pytest.raises(CheckpointInconsistent):
        await begin_backup(
            conn,
            vm.name,
            server=tcp(),
            scratch_dir=str(vm_dir),
            checkpoint="never",
            incremental="manual-2",
        )
    assert await job_info(conn, vm.name) is None
    with pytest.raises(VirtError, match="not found"):
        await delete_checkpoint(conn, vm.name, "manual-2")
    await delete_checkpoint(conn, vm.name, "manual-2", metadata_only=True)
    assert "manual-2" not in [cp.name for cp in await list_checkpoints(conn, vm.name)]


async def test_stopped_domain_chain_checked_with_qemu_img(conn: Connection, vm: SmallVm) -> None:
    await create_checkpoint(conn, vm.name, "offline-1")
    await perform_action(conn, vm.name, "forceOff")
    try:
        assert (await check_chain(conn, vm.name, "offline-1")).intact
        with pytest.raises(Conflict, match="not running"):
            await begin_backup(
                conn, vm.name, server=tcp(), scratch_dir="/var/tmp", checkpoint="never"
            )
        removal = ["qemu-img", "bitmap", "--remove", str(vm.disks[1]), "offline-1"]
        (await LocalHost().run(removal)).check()
        check = await check_chain(conn, vm.name, "offline-1")
        assert check.problems == ("bitmap offline-1 of disk vdb is missing",)
    finally:
        await perform_action(conn, vm.name, "start")


async def test_a_begin_survives_another_client_querying_the_block_nodes(
    conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    """QEMU 7.2 aborts (``qcow2_get_specific_info: Assertion 'false'``) when a client asks
    for the block nodes (``virDomainGetBlockInfo``, a checkpoint's size, block domstats:
    all ``query-named-block-nodes``) while libvirt creates a backup's scratch image with
    ``blockdev-create``, whose job runs with the monitor free and a half-opened qcow2 node
    in the graph. Monitoring tools ask that every few seconds; so did our inventory's
    refresh. Begins must not open that window: the VM survives a begin hammered by block
    queries from another connection, again and again."""
    other = await open_connection()
    stop = asyncio.Event()
    queries = 0

    async def hammer() -> None:
        nonlocal queries
        dom = await other.lookup(vm.name)
        while not stop.is_set():
            with contextlib.suppress(VirtError):
                await other.call(dom.blockInfo, "vda", 0)
                queries += 1

    task = asyncio.create_task(hammer())
    try:
        for round_ in range(12):
            job = await begin_backup(
                conn, vm.name, server=tcp(), scratch_dir=str(vm_dir), checkpoint=None
            )
            scratch = [e.scratch for e in job.exports if e.scratch]
            # The scratch images hold the guest's old data: readable by QEMU's user only.
            assert scratch and all(os.stat(s).st_mode & 0o777 == 0o600 for s in scratch)
            await end_backup(conn, job)
            assert not [s for s in scratch if os.path.exists(s)]
            dom = await conn.lookup(vm.name)
            assert bool(await conn.call(dom.isActive)), f"QEMU died in round {round_}"
    finally:
        stop.set()
        await task
        await other.close()
    assert queries > 12
