"""A shut-off VM's last delta read from its images' persistent bitmaps by ``qemu-nbd``
(``offline_from_bitmaps``: a migration's cut-over), locally over a private Unix socket
and on a remote server over TLS; its ends. Real libvirtd, QEMU, qemu-nbd and sshd."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.inventory import (
    STATE_DIRTY,
    BackupBeginRequest,
    BackupBegun,
    BackupEndRequest,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.inventory import backups
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.inventory.reconcile import reconcile
from virtbackup.nbd import NbdClient, NbdError
from virtbackup.runtime.errors import BadRequest
from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.runtime.provision import ensure_bucket
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.nats import connect
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.testing.session_host import SessionHost
from virtbackup.testing.sshd import sshd_server
from virtbackup.testing.vms import MiB, SmallVm, create_vm, guest_write, remove_vm
from virtbackup.virt import Connection, VirtError, get_domain
from virtbackup.virt.checkpoints import create_checkpoint, list_checkpoints
from virtbackup.virt.domains import PowerState

pytestmark = pytest.mark.libvirt

INSTALLATION = f"test-{os.getpid()}"
CHECKPOINT = f"vbt-ck-{os.getpid()}"
#: Where the guest wrote after the checkpoint: (disk, offset, length, pattern).
WRITES = [("vda", 4 * MiB + 64 * 1024, MiB, 0x6B), ("vdb", 0, 128 * 1024, 0x7C)]


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[HostServer]:
    try:
        ensure_libvirtd()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no usable libvirtd: {exc}")
    host = HostServer(config=Server(id="local", name="This host", host=""), timeout=5)
    try:
        yield host
    finally:
        await host.close()


@pytest.fixture(scope="module")
async def remote(server: HostServer) -> AsyncIterator[HostServer]:
    """This machine reached over SSH: a remote server to the inventory."""
    with sshd_server(root=True) as sshd:
        config = Server(
            id="remote", host=sshd.host, port=sshd.port, username=sshd.username,
            private_key=sshd.private_key, host_key=sshd.host_key,
        )  # fmt: skip
        host = HostServer(config=config, timeout=10)
        try:
            yield host
        finally:
            await host.close()


@pytest.fixture(scope="module")
async def conn(server: HostServer) -> Connection:
    return await server.connection()


@pytest.fixture(scope="module")
async def stopped_vm(conn: Connection, vm_dir: Path) -> AsyncIterator[SmallVm]:
    """A VM with two qcow2 disks, a checkpoint, guest writes after it (``WRITES``), shut
    off: QEMU wrote the checkpoint's bitmaps into the images as it stopped."""
    vm = await create_vm(conn, f"vbt-bmx-{os.getpid()}", vm_dir, [16 * MiB, 8 * MiB])
    try:
        await guest_write(conn, vm.name, "vda", 0, MiB, pattern=0x11)  # before: not dirty
        await create_checkpoint(conn, vm.name, CHECKPOINT)
        for target, offset, length, pattern in WRITES:
            await guest_write(conn, vm.name, target, offset, length, pattern=pattern)
        await conn.call((await conn.lookup(vm.name)).destroy)
        yield vm
    finally:
        await remove_vm(conn, vm.name)


@pytest.fixture(scope="module")
def creds() -> ExportCredentials:
    return ExportCredentials.load(shared_pki_dir())


async def _begin(
    server: HostServer,
    vm: SmallVm,
    vm_dir: Path,
    job_id: str = f"job-{os.getpid()}",
    installation: str = INSTALLATION,
) -> BackupBegun:
    req = BackupBeginRequest(
        server_id=server.id, vm_name=vm.name, incremental_from=CHECKPOINT, quiesce=False,
        job_id=job_id, offline_from_bitmaps=True,
    )  # fmt: skip
    creds = ExportCredentials.load(shared_pki_dir())
    begun = await backups.begin(server, req, str(vm_dir), creds, installation)
    wire = msgspec.json.encode(begun)
    assert msgspec.json.decode(wire, type=BackupBegun) == begun
    return begun


async def _end(server: HostServer, vm: SmallVm, vm_dir: Path, begun: BackupBegun) -> None:
    end = BackupEndRequest(
        server_id=server.id, vm_name=vm.name, checkpoint=begun.checkpoint, success=False,
        export_dir=begun.export_dir,
    )  # fmt: skip
    assert await backups.end(server, end, str(vm_dir)) is False


def _exporters(image: Path) -> list[int]:
    """Pids of ``qemu-nbd`` processes exporting ``image``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"qemu-nbd") and str(image).encode() in argv:
                    found.append(int(proc.name))
    return found


async def _check_delta(begun: BackupBegun, vm: SmallVm, tls: object = None) -> None:
    """Each disk's dirty map is exactly what the guest wrote after the checkpoint, and
    the export reads it."""
    assert begun.incremental and begun.checkpoint == begun.parent_checkpoint == CHECKPOINT
    assert not begun.offline and begun.domain_id is None
    by_target = {d.target: d for d in begun.disks}
    assert sorted(by_target) == ["vda", "vdb"]
    for target, offset, length, pattern in WRITES:
        disk = by_target[target]
        assert disk.dirty is not None and disk.bitmap_context == f"qemu:dirty-bitmap:{CHECKPOINT}"
        dirty = [(e.offset, e.length) for e in disk.dirty if e.flags & STATE_DIRTY]
        assert dirty == [(offset, length)], (target, dirty)
        async with await NbdClient.connect_uri(disk.nbd_url, tls=tls, timeout=10) as nbd:  # type: ignore[arg-type]
            assert await nbd.read(offset, 4096) == bytes([pattern]) * 4096


async def test_the_last_delta_is_read_without_starting_qemu(
    server: HostServer, conn: Connection, stopped_vm: SmallVm, vm_dir: Path
) -> None:
    vm = stopped_vm
    begun = await _begin(server, vm, vm_dir)
    try:
        assert (await get_domain(conn, vm.name)).power_state == PowerState.SHUTOFF
        export_dir = Path(begun.export_dir)
        assert export_dir.parent == Path("/tmp") and export_dir.name.startswith("vbdelta-")
        mode = export_dir.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == 0
        for disk in begun.disks:
            assert disk.nbd_url.startswith("nbd+unix://") and begun.export_dir in disk.nbd_url
        await _check_delta(begun, vm)
        # The read-only exports hold the images: the VM cannot start under them.
        with pytest.raises(VirtError):
            await conn.call((await conn.lookup(vm.name)).create)
    finally:
        await _end(server, vm, vm_dir, begun)
    assert not Path(begun.export_dir).exists()
    assert [p for image in vm.disks for p in _exporters(image)] == []
    # No checkpoint was made, and the one read from stays (the migration drops it).
    assert [c.name for c in await list_checkpoints(conn, vm.name)] == [CHECKPOINT]
    # Ended again (a repeated end): nothing to do, no error.
    await _end(server, vm, vm_dir, begun)


async def test_a_remote_servers_delta_is_served_over_tls(
    remote: HostServer,
    conn: Connection,
    stopped_vm: SmallVm,
    vm_dir: Path,
    creds: ExportCredentials,
) -> None:
    vm = stopped_vm
    begun = await _begin(remote, vm, vm_dir)
    try:
        url = begun.disks[0].nbd_url
        assert url.startswith(f"nbds://{remote.nbd_host}:"), url
        with pytest.raises(NbdError, match="TLS"):
            await NbdClient.connect_uri(url.replace("nbds://", "nbd://", 1), timeout=10)
        await _check_delta(begun, vm, tls=creds.client)
    finally:
        await _end(remote, vm, vm_dir, begun)
    assert [p for image in vm.disks for p in _exporters(image)] == []
    assert (await get_domain(conn, vm.name)).power_state == PowerState.SHUTOFF


async def test_an_end_stops_only_a_bitmap_exports_directory_of_that_vm(
    server: HostServer, conn: Connection, stopped_vm: SmallVm, vm_dir: Path, tmp_path: Path
) -> None:
    vm = stopped_vm
    other = "00000000-0000-0000-0000-000000000000"
    for bad in ("/etc", str(tmp_path), f"/tmp/vbdelta-{other}.abcdEFGH", "/tmp/vbdelta-x/../etc"):
        end = BackupEndRequest(server_id="local", vm_name=vm.name, export_dir=bad)
        with pytest.raises(BadRequest, match="export_dir"):
            await backups.end(server, end, str(vm_dir))
    assert Path("/etc").is_dir() and tmp_path.is_dir()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path_factory.mktemp("nats"), auth=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def jobs(nats_server: NatsServer) -> AsyncIterator[KeyValue]:
    client = await connect(nats_server)
    try:
        yield await ensure_bucket(client.jetstream(), buckets.JOBS)
    finally:
        await client.drain()


def _job(job_id: str, state: str) -> bytes:
    now = "2026-01-01T00:00:00Z"
    job = Job(id=job_id, type="migration", state=state, created_at=now, updated_at=now)  # type: ignore[arg-type]
    return msgspec.json.encode(job)


async def test_exports_nobody_will_stop_are_stopped_when_the_inventory_connects(
    server: HostServer, stopped_vm: SmallVm, vm_dir: Path, jobs: KeyValue
) -> None:
    """The orchestrator that would end them is gone and none ended the job: the
    inventory's reconcile stops the exports of its installation's jobs that ended, and
    leaves those of an active job, or of another installation, alone."""
    vm = stopped_vm
    job_id = f"job-{os.getpid()}-left"
    await jobs.put(job_id, _job(job_id, "running"))
    ours = await _begin(server, vm, vm_dir, job_id=job_id)
    theirs = await _begin(server, vm, vm_dir, job_id=job_id, installation="another")
    try:
        assert await reconcile(server, jobs, INSTALLATION, str(vm_dir), grace=0) == []
        assert Path(ours.export_dir, "owner").stat().st_mode & 0o077 == 0
        await jobs.put(job_id, _job(job_id, "failure"))
        done = await reconcile(server, jobs, INSTALLATION, str(vm_dir), grace=0)
        assert done == [f"stopped the bitmap exports {ours.export_dir} of job {job_id}"], done
        assert not Path(ours.export_dir).exists()
        assert Path(theirs.export_dir).is_dir()
        assert len(_exporters(vm.disks[0])) == 1  # theirs
    finally:
        await _end(server, vm, vm_dir, ours)
        await _end(server, vm, vm_dir, theirs)
    assert [p for image in vm.disks for p in _exporters(image)] == []


async def test_a_session_hosts_delta_is_exported_as_its_user(
    session_host: SessionHost, creds: ExportCredentials
) -> None:
    """On a session host (another user's ``qemu:///session`` over SSH) ``qemu-nbd`` runs
    as that user, who owns the images, over TLS."""
    conn = await session_host.connect()
    server = HostServer(config=msgspec.convert(session_host.server_config(), Server), timeout=10)
    try:
        vm = await session_host.create_vm(conn, f"vbt-bms-{os.getpid()}", [8 * MiB])
        await create_checkpoint(conn, vm.name, CHECKPOINT)
        await guest_write(conn, vm.name, "vda", 2 * MiB, 64 * 1024, pattern=0x3E)
        await conn.call((await conn.lookup(vm.name)).destroy)
        begun = await _begin(server, vm, session_host.images)
        try:
            assert begun.export_dir and begun.disks[0].nbd_url.startswith("nbds://")
            pids = _exporters(vm.disks[0])
            assert pids and all(_uid(pid) == session_host.user.pw_uid for pid in pids)
            vda = begun.disks[0]
            assert vda.dirty is not None
            assert [(e.offset, e.length) for e in vda.dirty if e.flags & STATE_DIRTY] == [
                (2 * MiB, 64 * 1024)
            ]
            async with await NbdClient.connect_uri(vda.nbd_url, tls=creds.client) as nbd:
                assert await nbd.read(2 * MiB, 512) == b"\x3e" * 512
        finally:
            await _end(server, vm, session_host.images, begun)
        assert _exporters(vm.disks[0]) == []
    finally:
        await server.close()
        await conn.close()


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for process {pid}")


async def test_a_running_vm_is_read_as_before(
    server: HostServer, conn: Connection, vm_dir: Path
) -> None:
    """``offline_from_bitmaps`` applies to shut-off VMs with qcow2 disks only: a running
    VM gets its online backup (with a new checkpoint)."""
    vm = await create_vm(conn, f"vbt-bmr-{os.getpid()}", vm_dir, [8 * MiB])
    try:
        await create_checkpoint(conn, vm.name, CHECKPOINT)
        begun = await _begin(server, vm, vm_dir)
        try:
            assert begun.export_dir == "" and begun.checkpoint != CHECKPOINT
            assert begun.domain_id is not None
        finally:
            end = BackupEndRequest(
                server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint, success=False
            )
            await backups.end(server, end, str(vm_dir))
    finally:
        await remove_vm(conn, vm.name)
