"""Beginning and ending backups through the inventory: the extent maps it returns, and
which backup jobs count as in progress. Real libvirtd, QEMU and nats-server."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.inventory import (
    STATE_DIRTY,
    STATE_ZERO,
    BackupBeginRequest,
    BackupBegun,
    BackupEndRequest,
    DiskExport,
    Extent,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.inventory import backups, ownership
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.inventory.inventory import Inventory, ServerEntry
from virtbackup.inventory.reconcile import reconcile
from virtbackup.nbd import BASE_ALLOCATION, NbdClient, NbdError
from virtbackup.nbd.tls import client_context_from_dir
from virtbackup.runtime.errors import Conflict
from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.runtime.ports import free_port
from virtbackup.runtime.provision import ensure_bucket
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.settings import Settings
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.nats import connect
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.testing.sshd import sshd_server
from virtbackup.testing.vms import (
    MiB,
    SmallVm,
    create_vm,
    drop_bitmap,
    guest_write,
    remove_vm,
)
from virtbackup.virt import (
    Connection,
    TcpServer,
    VirtError,
    begin_backup,
    current_backup,
    end_backup,
    get_domain,
)
from virtbackup.virt.backup import SOCKET_NAME
from virtbackup.virt.checkpoints import list_checkpoints
from virtbackup.virt.domains import PowerState
from virtbackup.virt.leftovers import cleanup_leftovers, find_leftovers
from virtbackup.virt.pki import Authority, write_file

pytestmark = pytest.mark.libvirt

INSTALLATION = f"test-{os.getpid()}"


@pytest.fixture(scope="session")
def creds() -> ExportCredentials:
    return ExportCredentials.load(shared_pki_dir())


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
            id="remote",
            host=sshd.host,
            port=sshd.port,
            username=sshd.username,
            private_key=sshd.private_key,
            host_key=sshd.host_key,
        )
        host = HostServer(config=config, timeout=10)
        try:
            yield host
        finally:
            await host.close()


@pytest.fixture(scope="module")
async def conn(server: HostServer) -> Connection:
    return await server.connection()


@pytest.fixture(scope="module")
async def vm(conn: Connection, vm_dir: Path) -> AsyncIterator[SmallVm]:
    small = await create_vm(conn, f"vbt-inv-{os.getpid()}-backup", vm_dir, [32 * MiB, 16 * MiB])
    try:
        yield small
    finally:
        await remove_vm(conn, small.name)


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


def _data(extents: list[Extent]) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in extents if not e.flags & STATE_ZERO]


def _dirty(extents: list[Extent] | None) -> list[tuple[int, int]]:
    assert extents is not None
    return [(e.offset, e.length) for e in extents if e.flags & STATE_DIRTY]


def _covers(extents: list[Extent], size: int) -> bool:
    """A map: from 0 to ``size`` without gaps or overlaps."""
    pos = 0
    for ext in extents:
        if ext.offset != pos or ext.length <= 0:
            return False
        pos += ext.length
    return pos == size


async def _begin(server: HostServer, vm: SmallVm, scratch: Path, **kw: object) -> BackupBegun:
    req = BackupBeginRequest(server_id="local", vm_name=vm.name, quiesce=False, **kw)  # type: ignore[arg-type]
    creds = ExportCredentials.load(shared_pki_dir())
    begun = await backups.begin(server, req, str(scratch), creds, INSTALLATION)
    # The reply crosses the bus: it must survive its own encoding.
    wire = msgspec.json.encode(begun)
    assert msgspec.json.decode(wire, type=BackupBegun) == begun
    return begun


def _disk(begun: BackupBegun, target: str) -> DiskExport:
    return next(d for d in begun.disks if d.target == target)


def _socket_dirs(scratch: Path) -> list[Path]:
    """The backups' socket directories in ``scratch`` (``vb-<uuid>-*.nbd``)."""
    return sorted(scratch.glob("vb-*.nbd"))


def _qemu_uid(vm_name: str) -> int:
    """The real user id of the domain's QEMU process."""
    pid = Path(f"/run/libvirt/qemu/{vm_name}.pid").read_text().strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for QEMU process {pid}")


#: Connects to the Unix socket given as the argument; prints what the kernel answered.
_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    s.settimeout(10)
    print("connected", s.recv(8))
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


def _connect_as(user: str, path: str) -> str:
    """What connecting to the socket ``path`` as ``user`` (no supplementary groups)
    gives: ``connected <NBD greeting>`` or the error's name and errno."""
    gid = pwd.getpwnam(user).pw_gid
    argv = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--clear-groups"]
    if user == "root":
        argv = []
    result = subprocess.run(
        [*argv, "/usr/bin/python3", "-c", _CONNECT, path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


async def test_begin_returns_the_extent_maps_of_full_and_incremental_backups(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    await guest_write(conn, vm.name, "vda", 0, 4 * MiB, pattern=0xAB)
    full = await _begin(server, vm, vm_dir, job_id="job-full")
    try:
        assert not full.incremental
        vda, vdb = _disk(full, "vda"), _disk(full, "vdb")
        assert (vda.size, vdb.size) == (32 * MiB, 16 * MiB)
        assert _covers(vda.allocation, vda.size) and _covers(vdb.allocation, vdb.size)
        assert _data(vda.allocation) == [(0, 4 * MiB)]
        assert _data(vdb.allocation) == []
        assert vda.dirty is None and vdb.dirty is None
    finally:
        await backups.end(
            server,
            BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=full.checkpoint),
            str(vm_dir),
        )
    assert await current_backup(conn, vm.name) is None
    assert await ownership.read_tag(conn, vm.name) is None

    # A guest write after the full: the dirty map covers exactly the written range.
    await guest_write(conn, vm.name, "vda", 8 * MiB + 64 * 1024, 1 * MiB, pattern=0xCD)
    inc = await _begin(server, vm, vm_dir, job_id="job-inc", incremental_from=full.checkpoint)
    try:
        assert inc.incremental and inc.parent_checkpoint == full.checkpoint
        vda, vdb = _disk(inc, "vda"), _disk(inc, "vdb")
        assert vda.dirty is not None and _covers(vda.dirty, vda.size)
        assert _dirty(vda.dirty) == [(8 * MiB + 64 * 1024, 1 * MiB)]
        assert vdb.dirty is not None and _covers(vdb.dirty, vdb.size)
        assert _dirty(vdb.dirty) == []
        assert _data(vda.allocation) == [(0, 4 * MiB), (8 * MiB + 64 * 1024, 1 * MiB)]
    finally:
        await backups.end(
            server,
            BackupEndRequest(
                server_id="local", vm_name=vm.name, checkpoint=inc.checkpoint, success=False
            ),
            str(vm_dir),
        )
    names = {c.name for c in await list_checkpoints(conn, vm.name)}
    assert full.checkpoint in names and inc.checkpoint not in names


def _job(job_id: str, state: str) -> bytes:
    now = "2026-01-01T00:00:00Z"
    job = Job(id=job_id, type="backup", state=state, created_at=now, updated_at=now)  # type: ignore[arg-type]
    return msgspec.json.encode(job)


async def test_a_backup_job_is_in_progress_while_its_job_is_active(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path, jobs: KeyValue
) -> None:
    """Derived from libvirt and JetStream alone: what any inventory replica, or one that
    restarted since the begin, would answer."""
    job_id = f"job-{os.getpid()}"
    begun = await _begin(server, vm, vm_dir, job_id=job_id)
    try:
        assert await ownership.read_tag(conn, vm.name) == ownership.BackupTag(
            job_id=job_id, checkpoint=begun.checkpoint, installation=INSTALLATION
        )
        assert not await ownership.in_progress(conn, vm.name, jobs)  # no such job
        await jobs.put(job_id, _job(job_id, "running"))
        assert await ownership.in_progress(conn, vm.name, jobs)
        # A late end of an earlier backup leaves this one running.
        late = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint="vb-earlier")
        await backups.end(server, late, str(vm_dir))
        assert await current_backup(conn, vm.name) is not None
        assert await ownership.in_progress(conn, vm.name, jobs)
        # The job ended without ending its libvirt job (its orchestrator died): a leftover.
        await jobs.put(job_id, _job(job_id, "failure"))
        assert not await ownership.in_progress(conn, vm.name, jobs)
    finally:
        end = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint)
        await backups.end(server, end, str(vm_dir))
    assert await current_backup(conn, vm.name) is None
    assert await ownership.read_tag(conn, vm.name) is None
    # A backup job begun by someone else carries no tag: a leftover.
    foreign = await begin_backup(
        conn,
        vm.name,
        server=TcpServer("127.0.0.1", free_port()),
        scratch_dir=str(vm_dir),
        checkpoint=None,
    )
    try:
        assert not await ownership.in_progress(conn, vm.name, jobs)
    finally:
        await end_backup(conn, foreign)


async def test_has_overlay_follows_the_job_not_the_process(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path, jobs: KeyValue
) -> None:
    """A fresh ``Inventory`` (another replica, or this one after a restart) reports a
    running backup as no leftover while its job runs, and as one once the job has ended
    without ending it."""
    ctx = ServiceContext(
        name="inventory",
        settings=Settings(scratch_dir=str(vm_dir), pki_dir=shared_pki_dir()),
        bus=None,  # type: ignore[arg-type]  # _status uses no bus
        tracer_provider=None,  # type: ignore[arg-type]
        buckets={buckets.JOBS.name: jobs},
    )
    inventory = Inventory(ctx)
    entry = ServerEntry(host=server)
    uuid = str((await conn.lookup(vm.name)).UUIDString())

    async def has_overlay() -> bool:
        return (await inventory._status(entry, vm.name, uuid, "running")).has_overlay

    assert not await has_overlay()
    job_id = f"job-{os.getpid()}-overlay"
    await jobs.put(job_id, _job(job_id, "running"))
    begun = await _begin(server, vm, vm_dir, job_id=job_id)
    try:
        assert not await has_overlay()
        await jobs.put(job_id, _job(job_id, "failure"))
        assert await has_overlay()
    finally:
        end = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint)
        await backups.end(server, end, str(vm_dir))
    assert not await has_overlay()


async def test_the_routine_status_check_never_asks_a_checkpoints_size(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path, jobs: KeyValue
) -> None:
    """libvirtd 9.0 died (SIGSEGV in ``qemuCheckpointGetXMLDesc``) when one client asked a
    checkpoint's size while another deleted that checkpoint: every inventory watching the
    host asked it for every domain on every lifecycle event. The routine check (refresh,
    events) leaves stale checkpoints to the explicit check of a cleanup."""
    ctx = ServiceContext(
        name="inventory",
        settings=Settings(scratch_dir=str(vm_dir), pki_dir=shared_pki_dir()),
        bus=None,  # type: ignore[arg-type]  # _status uses no bus
        tracer_provider=None,  # type: ignore[arg-type]
        buckets={buckets.JOBS.name: jobs},
    )
    inventory = Inventory(ctx)
    entry = ServerEntry(host=server)
    uuid = str((await conn.lookup(vm.name)).UUIDString())
    begun = await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-stale")
    end = BackupEndRequest(
        server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint, success=True
    )
    await backups.end(server, end, str(vm_dir))
    assert begun.checkpoint
    checkpoint = begun.checkpoint
    try:
        await drop_bitmap(conn, vm.name, "vda", checkpoint)
        # The explicit check sees the broken checkpoint...
        found = await find_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
        assert checkpoint in found.stale_checkpoints
        # ...the routine one does not ask.
        assert not (await inventory._status(entry, vm.name, uuid, "running")).has_overlay
    finally:
        await cleanup_leftovers(conn, vm.name, scratch_dir=str(vm_dir))
    assert checkpoint not in [c.name for c in await list_checkpoints(conn, vm.name)]


async def test_a_remote_backup_export_serves_only_the_workers_certificate(
    remote: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path, tmp_path: Path
) -> None:
    """Issue 11, item 4: any local user could read a VM's disk through its export. A
    remote server's export listens on TCP with TLS and client certificates."""
    await guest_write(conn, vm.name, "vda", 0, MiB, pattern=0x42)
    req = BackupBeginRequest(
        server_id="remote", vm_name=vm.name, quiesce=False, job_id=f"job-{os.getpid()}-tls"
    )
    begun = await backups.begin(
        remote, req, str(vm_dir), ExportCredentials.load(shared_pki_dir()), INSTALLATION
    )
    try:
        url = _disk(begun, "vda").nbd_url
        assert url.startswith(f"nbds://{remote.nbd_host}:"), url
        assert not _socket_dirs(vm_dir)
        with pytest.raises(NbdError, match="TLS"):
            await NbdClient.connect_uri(url.replace("nbds://", "nbd://", 1), timeout=10)
        ours = ExportCredentials.load(shared_pki_dir())
        theirs = Authority.create("not VirtBackup").issue_client()
        foreign = tmp_path / "foreign"
        write_file(foreign / "ca-cert.pem", ours.authority.cert_pem, 0o644)
        write_file(foreign / "client-cert.pem", theirs.cert_pem, 0o644)
        write_file(foreign / "client-key.pem", theirs.key_pem, 0o600)
        with pytest.raises(NbdError):
            await NbdClient.connect_uri(url, tls=client_context_from_dir(foreign), timeout=10)
        async with await NbdClient.connect_uri(
            url, tls=ours.client, meta_contexts=[BASE_ALLOCATION]
        ) as nbd:
            assert await nbd.read(0, 4) == b"\x42" * 4
    finally:
        end = BackupEndRequest(server_id="remote", vm_name=vm.name, checkpoint=begun.checkpoint)
        await backups.end(remote, end, str(vm_dir))
    assert await current_backup(conn, vm.name) is None


async def test_a_local_backup_export_is_a_socket_only_root_and_qemu_can_reach(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    """Issue 13: a local server's export listens on a Unix socket, without TLS, in a
    directory (0700) of the user QEMU runs as: root (the workers) reads, nobody else
    even reaches the socket. It goes when the backup ends, fails or was left behind."""
    await guest_write(conn, vm.name, "vda", 0, MiB, pattern=0x42)
    uuid = str((await conn.lookup(vm.name)).UUIDString())
    begun = await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-unix")
    try:
        url = _disk(begun, "vda").nbd_url
        assert url.startswith("nbd+unix:///vda?socket="), url
        socket_path = url.split("socket=", 1)[1]
        directory = Path(socket_path).parent
        assert _socket_dirs(vm_dir) == [directory]
        assert directory.name.startswith(f"vb-{uuid}-") and Path(socket_path).name == SOCKET_NAME
        info = directory.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == _qemu_uid(vm.name) != 0
        assert _connect_as("nobody", socket_path) == "PermissionError 13"
        assert _connect_as("root", socket_path).startswith("connected b'NBDMAGIC'")
        async with await NbdClient.connect_uri(url, meta_contexts=[BASE_ALLOCATION]) as nbd:
            assert await nbd.read(0, 4) == b"\x42" * 4
    finally:
        end = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint)
        await backups.end(server, end, str(vm_dir))
    assert not directory.exists() and _socket_dirs(vm_dir) == []

    # A begin that fails (the VM has someone else's backup job) leaves no directory.
    foreign = await begin_backup(
        conn,
        vm.name,
        server=TcpServer("127.0.0.1", free_port()),
        scratch_dir=str(vm_dir),
        checkpoint=None,
    )
    try:
        with pytest.raises(Conflict, match="already has a backup job"):
            await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-unix2")
        assert _socket_dirs(vm_dir) == []
    finally:
        await end_backup(conn, foreign)

    # A directory its job left (QEMU killed, the inventory gone) goes at the next end.
    left = vm_dir / f"vb-{uuid}-AbCdEf.nbd"
    left.mkdir(mode=0o700)
    (left / SOCKET_NAME).touch()
    end = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint)
    await backups.end(server, end, str(vm_dir))
    assert _socket_dirs(vm_dir) == []


async def test_a_scratch_directory_too_long_for_a_socket_gets_tls(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    """A Unix socket's path has at most 107 bytes: past that, TCP with TLS as remote."""
    scratch = vm_dir / ("s" * 60)
    scratch.mkdir(mode=0o755, exist_ok=True)
    begun = await _begin(server, vm, scratch, job_id=f"job-{os.getpid()}-long")
    try:
        url = _disk(begun, "vda").nbd_url
        assert url.startswith("nbds://127.0.0.1:"), url
        assert _socket_dirs(scratch) == []
        tls = ExportCredentials.load(shared_pki_dir()).client
        async with await NbdClient.connect_uri(url, tls=tls) as nbd:
            assert nbd.size == 32 * MiB
    finally:
        end = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint)
        await backups.end(server, end, str(scratch))
    assert await current_backup(conn, vm.name) is None


async def test_an_inventory_that_starts_ends_the_backup_jobs_nobody_will_end(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path, jobs: KeyValue
) -> None:
    """Issue 11, item 4: after the inventory was killed mid-backup, the libvirt job and
    its export stayed up and every later backup failed."""
    job_id = f"job-{os.getpid()}-orphan"
    before = {c.name for c in await list_checkpoints(conn, vm.name)}

    async def run() -> list[str]:
        return await reconcile(server, jobs, INSTALLATION, str(vm_dir), grace=0.5)

    # Active job: left to its orchestrator.
    await jobs.put(job_id, _job(job_id, "running"))
    begun = await _begin(server, vm, vm_dir, job_id=job_id)
    assert await run() == []
    assert await current_backup(conn, vm.name) is not None
    # Another installation's backup (same job id, by chance): not ours to end.
    await ownership.tag(conn, vm.name, job_id, begun.checkpoint, "someone-else")
    await jobs.put(job_id, _job(job_id, "failure"))
    assert await run() == []
    assert await current_backup(conn, vm.name) is not None
    # Ours, and its job failed: ended, its checkpoint dropped, the export gone.
    await ownership.tag(conn, vm.name, job_id, begun.checkpoint, INSTALLATION)
    done = await run()
    assert len(done) == 1 and "dropped" in done[0], done
    assert await current_backup(conn, vm.name) is None
    assert await ownership.read_tag(conn, vm.name) is None
    assert _socket_dirs(vm_dir) == []
    assert {c.name for c in await list_checkpoints(conn, vm.name)} == before
    with pytest.raises(NbdError):
        await NbdClient.connect_uri(_disk(begun, "vda").nbd_url)

    # Ours, and its job succeeded (the orchestrator could not end it): the checkpoint of
    # the committed restore point stays.
    job_ok = f"{job_id}-ok"
    begun = await _begin(server, vm, vm_dir, job_id=job_ok)
    await jobs.put(job_ok, _job(job_ok, "success"))
    done = await run()
    assert len(done) == 1 and "kept" in done[0], done
    assert await current_backup(conn, vm.name) is None
    assert begun.checkpoint in {c.name for c in await list_checkpoints(conn, vm.name)}

    # A job VB_JOBS does not know, and an untagged job with VirtBackup's scratch files
    # (the inventory died between the begin and the tag): both ended.
    begun = await _begin(server, vm, vm_dir, job_id=f"{job_id}-unknown")
    assert len(await run()) == 1
    assert await current_backup(conn, vm.name) is None
    begun = await _begin(server, vm, vm_dir, job_id=f"{job_id}-untagged")
    await ownership.untag(conn, vm.name)
    done = await run()
    assert done == [f"{vm.name}: ended an untagged backup job of VirtBackup's"], done
    assert await current_backup(conn, vm.name) is None
    assert _socket_dirs(vm_dir) == []
    # Someone else's untagged backup (scratch files elsewhere) is left alone.
    elsewhere = vm_dir / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    elsewhere.chmod(0o777)
    foreign = await begin_backup(
        conn,
        vm.name,
        server=TcpServer("127.0.0.1", free_port()),
        scratch_dir=str(elsewhere),
        checkpoint=None,
    )
    try:
        assert await run() == []
        assert await current_backup(conn, vm.name) is not None
    finally:
        await end_backup(conn, foreign)


async def test_an_offline_backup_nobody_will_end_is_shut_off_again(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path, jobs: KeyValue
) -> None:
    """Issue 12, item 4: a shut-off VM is started paused for its backup; when its
    inventory dies mid-backup, the VM must not stay running paused."""
    job_id = f"job-{os.getpid()}-offline"
    before = {c.name for c in await list_checkpoints(conn, vm.name)}

    async def run() -> list[str]:
        return await reconcile(server, jobs, INSTALLATION, str(vm_dir), grace=0.5)

    async def power() -> PowerState:
        return (await get_domain(conn, vm.name)).power_state

    await conn.call((await conn.lookup(vm.name)).destroy)
    try:
        await jobs.put(job_id, _job(job_id, "running"))
        begun = await _begin(server, vm, vm_dir, job_id=job_id)
        assert begun.offline
        assert await power() == PowerState.PAUSED
        tag = await ownership.read_tag(conn, vm.name)
        assert tag is not None and tag.offline and tag.job_id == job_id
        # Active: left to its orchestrator; VM actions are refused meanwhile.
        assert await run() == []
        with pytest.raises(Conflict, match="held by an offline backup"):
            await backups.check_offline_hold(server, vm.name, jobs, INSTALLATION, str(vm_dir))
        assert await power() == PowerState.PAUSED
        # Its job failed while the inventory was dead: the backup ends, its checkpoint is
        # dropped and the VM is shut off again.
        await jobs.put(job_id, _job(job_id, "failure"))
        done = await run()
        assert len(done) == 1 and "dropped" in done[0] and "shut off again" in done[0], done
        assert await power() == PowerState.SHUTOFF
        assert {c.name for c in await list_checkpoints(conn, vm.name)} == before

        # Died after ending the libvirt job, before the destroy: paused, tagged, no job.
        ok = f"{job_id}-ok"
        await jobs.put(ok, _job(ok, "success"))
        begun = await _begin(server, vm, vm_dir, job_id=ok)
        await end_backup(conn, vm.name)
        done = await run()
        assert len(done) == 1 and "kept" in done[0], done
        assert await power() == PowerState.SHUTOFF
        assert begun.checkpoint in {c.name for c in await list_checkpoints(conn, vm.name)}

        # A VM action finds such a VM (job unknown to VB_JOBS) and shuts it off first.
        begun = await _begin(server, vm, vm_dir, job_id=f"{job_id}-unknown")
        await backups.check_offline_hold(server, vm.name, jobs, INSTALLATION, str(vm_dir))
        assert await power() == PowerState.SHUTOFF
        assert begun.checkpoint not in {c.name for c in await list_checkpoints(conn, vm.name)}
    finally:
        if await power() != PowerState.RUNNING:
            with contextlib.suppress(VirtError):
                await conn.call((await conn.lookup(vm.name)).destroy)
            await conn.call((await conn.lookup(vm.name)).create)


async def test_end_says_the_vm_stopped_only_when_it_did(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    """Issue 12 (trial, item 4): the answer came from a missing tag, so a tag removed by
    someone else, or an end asked twice, read as "the VM stopped". Now libvirt says: the
    domain is not running, or runs as another process than the begin's."""

    def end_of(begun: BackupBegun, **kw: object) -> BackupEndRequest:
        return BackupEndRequest(
            server_id="local",
            vm_name=vm.name,
            checkpoint=begun.checkpoint,
            domain_id=begun.domain_id,
            **kw,  # type: ignore[arg-type]
        )

    begun = await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-stop")
    assert begun.domain_id is not None and not begun.offline
    # The tag and the libvirt job are gone, the VM runs on as the same process.
    await ownership.untag(conn, vm.name)
    await end_backup(conn, vm.name)
    assert not await backups.end(server, end_of(begun, success=False), str(vm_dir))
    # An end asked again (its first answer was lost) says the same.
    assert not await backups.end(server, end_of(begun, success=False), str(vm_dir))

    begun = await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-stop2")
    dom = await conn.lookup(vm.name)
    await conn.call(dom.destroy)
    await conn.call(dom.create)  # stopped, and started again: another process
    assert _socket_dirs(vm_dir)  # QEMU died with its job: its socket's directory stayed
    assert await backups.end(server, end_of(begun, success=False), str(vm_dir))
    assert _socket_dirs(vm_dir) == []

    begun = await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-stop3")
    await conn.call((await conn.lookup(vm.name)).destroy)
    try:
        assert await backups.end(server, end_of(begun, success=False), str(vm_dir))
    finally:
        await conn.call((await conn.lookup(vm.name)).create)


async def test_an_offline_backup_whose_tag_is_gone_is_shut_off_again(
    server: HostServer, conn: Connection, vm: SmallVm, vm_dir: Path
) -> None:
    """The end knows from the begin's answer that it started the VM paused: the VM is shut
    off again even when the tag that said so is gone."""

    async def power() -> PowerState:
        return (await get_domain(conn, vm.name)).power_state

    await conn.call((await conn.lookup(vm.name)).destroy)
    try:
        begun = await _begin(server, vm, vm_dir, job_id=f"job-{os.getpid()}-off")
        assert begun.offline and await power() == PowerState.PAUSED
        await ownership.untag(conn, vm.name)
        end = BackupEndRequest(
            server_id="local",
            vm_name=vm.name,
            checkpoint=begun.checkpoint,
            success=False,
            domain_id=begun.domain_id,
            offline=True,
        )
        assert not await backups.end(server, end, str(vm_dir))
        assert await power() == PowerState.SHUTOFF
        assert await current_backup(conn, vm.name) is None
        # A VM its user started since is not ours to shut off.
        await conn.call((await conn.lookup(vm.name)).create)
        await backups.end(server, end, str(vm_dir))
        assert await power() == PowerState.RUNNING
    finally:
        if await power() != PowerState.RUNNING:
            with contextlib.suppress(VirtError):
                await conn.call((await conn.lookup(vm.name)).destroy)
            await conn.call((await conn.lookup(vm.name)).create)


async def test_cleanup_refuses_a_vm_a_job_holds(
    server: HostServer,
    conn: Connection,
    vm: SmallVm,
    vm_dir: Path,
    jobs: KeyValue,
    nats_server: NatsServer,
) -> None:
    """Cleanup is for leftovers: while a job of this installation holds the VM (its
    backup's tag, or its lock in VB_LOCKS: a restore) it is a 409 naming the job."""
    from virtbackup.contracts.buckets import vm_lock_key
    from virtbackup.inventory.reconcile import check_no_job_holds

    client = await connect(nats_server)
    locks = await ensure_bucket(client.jetstream(), buckets.LOCKS)
    job_id = f"job-{os.getpid()}-held"

    async def check() -> None:
        await check_no_job_holds(server, vm.name, jobs, locks, INSTALLATION)

    try:
        await check()  # nothing holds it
        await jobs.put(job_id, _job(job_id, "running"))
        begun = await _begin(server, vm, vm_dir, job_id=job_id)
        try:
            with pytest.raises(Conflict, match=job_id):
                await check()
            # The holding job itself (a migration dropping its own checkpoints) is let by.
            await check_no_job_holds(server, vm.name, jobs, locks, INSTALLATION, holder=job_id)
            await jobs.put(job_id, _job(job_id, "failure"))
            await check()  # its job ended: a leftover
        finally:
            end = BackupEndRequest(server_id="local", vm_name=vm.name, checkpoint=begun.checkpoint)
            await backups.end(server, end, str(vm_dir))
        restore = f"{job_id}-restore"
        lock = {"jobId": restore, "jobType": "restore", "takenAt": 0.0}
        await locks.put(vm_lock_key("local", vm.name), msgspec.json.encode(lock))
        await check()  # a lock whose job is long gone
        await jobs.put(restore, _job(restore, "running"))
        with pytest.raises(Conflict, match=f"restore job running \\({restore}\\)"):
            await check()
        await check_no_job_holds(server, vm.name, jobs, locks, INSTALLATION, holder=restore)
        await jobs.put(restore, _job(restore, "success"))
        await check()
    finally:
        await client.drain()


async def test_backups_beginning_together_install_one_matching_server_key_and_certificate(
    tmp_path: Path,
) -> None:
    """Each install that finds the TLS folder wanting writes a new server key and
    certificate: begins at the same moment used to leave the key of one with the
    certificate of another (every handshake then failed), or failed on each other's
    temporary files."""
    import asyncio
    import ssl

    from virtbackup.virt.nbd_tls import read_backup_tls_config
    from virtbackup.virt.pki import SERVER_CERT, SERVER_KEY

    creds = ExportCredentials.load(shared_pki_dir())
    server = HostServer(config=Server(id="local", name="local"), timeout=30)
    try:
        host = await server.host()
        directory = (await read_backup_tls_config(host)).directory
        cert = Path(directory) / SERVER_CERT
        for _ in range(3):
            cert.unlink(missing_ok=True)  # the folder wants a new certificate again
            dirs = await asyncio.gather(*(creds.install(server) for _ in range(6)))
            assert set(dirs) == {directory}
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            # Raises "key values mismatch" when the key is not the certificate's.
            context.load_cert_chain(cert, Path(directory) / SERVER_KEY)
            assert not list(Path(directory).glob("*.vbtmp*"))
    finally:
        await server.close()
