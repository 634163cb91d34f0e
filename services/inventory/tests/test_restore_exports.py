"""The qemu-nbd exports restores write to: direct I/O, and the fallbacks when the host
cannot do it; who may connect (a local server's private Unix socket, a remote server's
TLS with the workers' certificate); stopping them. Real qemu-img, qemu-nbd and sshd on
this machine."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.inventory import (
    RestoreDisk,
    RestoreFinishRequest,
    RestorePrepareRequest,
    RestoreTarget,
)
from virtbackup.contracts.v1.jobs import Job
from virtbackup.inventory import restore_leftovers, restores
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.nbd import NbdClient, NbdError
from virtbackup.nbd.tls import client_context_from_dir
from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.runtime.provision import ensure_bucket
from virtbackup.testing.nats import connect
from virtbackup.testing.pagecache import resident_pages
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.virt.pki import Authority, write_file

MIB = 1 << 20
IO_URING_SWITCH = Path("/proc/sys/kernel/io_uring_disabled")


def _pid_file(target: RestoreTarget, job_id: str) -> Path:
    return Path(target.pid_file or restores.pid_file(target.path, job_id))


def _export_args(target: RestoreTarget, job_id: str) -> list[str]:
    pid = int(_pid_file(target, job_id).read_text())
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def _write_and_check(target: RestoreTarget) -> bytes:
    data = secrets.token_bytes(8 * MIB)
    tls = None
    if target.nbd_url.startswith("nbds://"):
        tls = ExportCredentials.load(shared_pki_dir()).client
    async with await NbdClient.connect_uri(target.nbd_url, tls=tls) as nbd:
        await nbd.write(4 * MIB, data)
        await nbd.flush()
        assert await nbd.read(4 * MIB, len(data)) == data
    return data


@pytest.fixture
def server() -> HostServer:
    return HostServer(config=Server(id="local", name="This host", host=""), timeout=5)


@pytest.fixture(scope="module")
def remote() -> Iterator[HostServer]:
    """This machine reached over SSH: a remote server to the inventory."""
    with sshd_server(root=True) as sshd:
        yield HostServer(config=_remote_config(sshd), timeout=10)


def _remote_config(sshd: SshdServer) -> Server:
    return Server(
        id="remote",
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        private_key=sshd.private_key,
        host_key=sshd.host_key,
    )


async def _prepare(
    server: HostServer, tmp_path: Path, job_id: str, installation: str = ""
) -> RestoreTarget:
    disk = RestoreDisk(target="vda", path=str(tmp_path / "vm" / "disk.qcow2"), size=64 * MIB)
    req = RestorePrepareRequest(server_id="local", job_id=job_id, disks=[disk])
    creds = ExportCredentials.load(shared_pki_dir())
    prepared = await restores.prepare(server, req, creds, installation)
    return prepared.disks[0]


async def _discard(server: HostServer, target: RestoreTarget, job_id: str) -> None:
    req = RestoreFinishRequest(
        server_id="local", job_id=job_id, vm_name="none", success=False, disks=[target]
    )
    await restores.finish(server, req)
    assert not Path(target.temp_path).exists()
    assert not _pid_file(target, job_id).exists()
    if target.pid_file:  # the export's private directory, with its socket
        assert not Path(target.pid_file).parent.exists()


@contextlib.contextmanager
def _io_uring(enabled: bool) -> Iterator[None]:
    """io_uring as it is, or switched off for the whole machine (as some hardened hosts do)."""
    before = IO_URING_SWITCH.read_text()
    if not enabled:
        IO_URING_SWITCH.write_text("2")
    try:
        yield
    finally:
        IO_URING_SWITCH.write_text(before)


@pytest.mark.parametrize(("io_uring", "aio"), [(True, "io_uring"), (False, "threads")])
async def test_restores_write_with_direct_io(
    server: HostServer, tmp_path: Path, io_uring: bool, aio: str
) -> None:
    """The image is written with O_DIRECT (through io_uring, or threads where the host has
    no io_uring): nothing lands in the page cache, and a failed restore leaves nothing."""
    job_id = f"job-{aio}"
    with _io_uring(io_uring):
        target = await _prepare(server, tmp_path, job_id)
    try:
        args = _export_args(target, job_id)
        assert "--cache=none" in args and f"--aio={aio}" in args, args
        # Request buffers stay in qemu-nbd's heap (see restores.EXPORT_MALLOC).
        pid = int(_pid_file(target, job_id).read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert {setting.encode() for setting in restores.EXPORT_MALLOC} <= set(environ)
        cached = resident_pages(Path(target.temp_path))  # qemu-img create's header
        await _write_and_check(target)
        assert resident_pages(Path(target.temp_path)) <= cached < 64
    finally:
        await _discard(server, target, job_id)
    assert os.listdir(tmp_path / "vm") == []


async def test_a_local_export_is_a_private_unix_socket(server: HostServer, tmp_path: Path) -> None:
    """A local server's export listens on a Unix socket in a directory only the
    inventory's user can enter, not on TCP: another user of the host cannot connect,
    and the workers (the same user) write without TLS."""
    job_id = "job-local"
    target = await _prepare(server, tmp_path, job_id)
    try:
        assert target.nbd_url.startswith("nbd+unix:///vda?socket=")
        socket_path = Path(target.nbd_url.split("socket=", 1)[1])
        private = socket_path.parent
        assert private == Path(target.pid_file).parent
        info = private.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o700)
        args = _export_args(target, job_id)
        assert args[args.index("-k") + 1] == str(socket_path)
        assert "-p" not in args and "--tls-creds" not in args
        someone_else = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "nbdinfo", target.nbd_url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert someone_else.returncode != 0
        assert "Permission denied" in someone_else.stderr, someone_else.stderr
        await _write_and_check(target)
    finally:
        await _discard(server, target, job_id)


async def test_remote_exports_refuse_clients_without_the_workers_certificate(
    remote: HostServer, tmp_path: Path
) -> None:
    """A remote server's export is on TCP with TLS: nobody but a holder of the workers'
    certificate can write into an image being restored, not a plain NBD client, not a
    TLS client with another CA's certificate."""
    job_id = "job-tls"
    target = await _prepare(remote, tmp_path, job_id)
    try:
        assert target.nbd_url.startswith("nbds://127.0.0.1:")
        plain = target.nbd_url.replace("nbds://", "nbd://", 1)
        with pytest.raises(NbdError, match="TLS"):
            await NbdClient.connect_uri(plain, timeout=10)
        other = Authority.create("not VirtBackup")
        theirs = other.issue_client()
        ours = ExportCredentials.load(shared_pki_dir())
        foreign = tmp_path / "foreign"
        write_file(foreign / "ca-cert.pem", ours.authority.cert_pem, 0o644)
        write_file(foreign / "client-cert.pem", theirs.cert_pem, 0o644)
        write_file(foreign / "client-key.pem", theirs.key_pem, 0o600)
        with pytest.raises(NbdError):
            await NbdClient.connect_uri(
                target.nbd_url, tls=client_context_from_dir(foreign), timeout=10
            )
        # The workers' certificate is served.
        await _write_and_check(target)
    finally:
        await _discard(remote, target, job_id)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A qemu-nbd export and a bystander, both children of this process that nothing
    reaps until the test ends (so the export stays a zombie once it exits)."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    served = subprocess.Popen(
        ["qemu-nbd", "-k", str(tmp_path / "nbd.sock"), "-f", "qcow2", str(image)]
    )
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "nbd.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield served, bystander
    finally:
        for proc in (served, bystander):
            proc.kill()
            proc.wait()


async def test_a_stopped_export_counts_as_gone_once_it_has_exited(
    server: HostServer,
    tmp_path: Path,
    children: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    """Stopping an export waits until its qemu-nbd has exited, not until its parent has
    reaped it (an init that reaps late kept every restore waiting), and never signals a
    process that is not a qemu-nbd (a pid file outliving its export)."""
    served, bystander = children
    (tmp_path / "export.pid").write_text(f"{served.pid}\n")
    (tmp_path / "stale.pid").write_text(f"{bystander.pid}\n")
    targets = [
        RestoreTarget(target=name, path=str(tmp_path / name), temp_path="",
                      nbd_url="nbd+unix:///x?socket=/nowhere", pid_file=str(tmp_path / pid))
        for name, pid in (("vda", "export.pid"), ("vdb", "stale.pid"))
    ]  # fmt: skip
    started = time.monotonic()
    await restores._teardown(await server.host(), "job-stop", targets, remove=False)
    # The old wait (``kill -0``) saw the zombie for its whole 10 s.
    assert time.monotonic() - started < 5
    state = Path(f"/proc/{served.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "Z"
    assert bystander.poll() is None
    assert not (tmp_path / "export.pid").exists()
    assert not (tmp_path / "stale.pid").exists()


#: A stand-in for a qemu-nbd stopped during a flush (its argv names qemu-nbd, as the
#: stop script checks): a thread takes the image's lock and keeps it for ``argv[2]``
#: seconds (a slow ``fdatasync``). On SIGTERM the main thread ends (``pthread_exit``), so
#: the process shows as a zombie while that thread still has the image, as qemu-nbd's
#: main thread leaves while a thread of its pool is still in the kernel. ``argv[3]``
#: ``ignore`` ignores SIGTERM instead (a flush that never ends: only SIGKILL stops it).
#: Real qemu-nbd cannot be made to stall in the kernel on demand here.
_HELD_BY_A_THREAD = """
import ctypes, fcntl, signal, sys, threading, time
image, seconds, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def leave(signum, frame):
    ctypes.CDLL(None).pthread_exit(None)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore" else leave)
locked = threading.Event()
def flush():
    with open(image, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        locked.set()
        time.sleep(seconds)
threading.Thread(target=flush).start()
locked.wait()
print("locked", flush=True)
while True:
    time.sleep(0.05)
"""


def _locked(path: Path) -> bool:
    with path.open("r+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _start_holder(tmp_path: Path, seconds: float, mode: str) -> subprocess.Popen[bytes]:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_BY_A_THREAD, str(image), str(seconds), mode, "qemu-nbd"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"locked\n"
    assert _locked(image)
    (tmp_path / "export.pid").write_text(f"{proc.pid}\n")
    return proc


async def test_a_stopped_export_has_gone_only_once_no_thread_holds_the_image(
    server: HostServer, tmp_path: Path
) -> None:
    """A qemu-nbd whose main thread has exited while a thread of its pool still flushes
    the image shows as a zombie but still holds the image's lock: the stop waits for the
    last thread (a VM started right after a restore failed with "Failed to get write
    lock" on a loaded machine)."""
    proc = _start_holder(tmp_path, 3, "default")
    target = RestoreTarget(
        target="vda", path=str(tmp_path / "disk.img"), temp_path="",
        nbd_url="nbd+unix:///x?socket=/nowhere", pid_file=str(tmp_path / "export.pid"),
    )  # fmt: skip
    try:
        await restores._teardown(await server.host(), "job-held", [target], remove=False)
        assert not _locked(tmp_path / "disk.img")
    finally:
        proc.kill()
        proc.wait()


async def test_an_export_that_ignores_sigterm_is_killed_and_then_gone(
    server: HostServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export still there ``STOP_TERM_SECONDS`` after SIGTERM gets SIGKILL, and the
    stop returns once the image is free."""
    monkeypatch.setattr(restores, "STOP_TERM_SECONDS", 1)
    proc = _start_holder(tmp_path, 600, "ignore")
    try:
        await restores.stop_exports(await server.host(), [str(tmp_path / "export.pid")])
        assert not _locked(tmp_path / "disk.img")
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def _links_after(fd: int, seconds: float) -> int:
    """The names of the file open as ``fd`` once they are 0, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while os.fstat(fd).st_nlink and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.fstat(fd).st_nlink


async def test_a_committed_image_replaces_the_old_one_which_is_then_removed(
    server: HostServer, tmp_path: Path
) -> None:
    """The finish renames the restored image over the disk (owner and mode kept); the
    image it replaced is removed after the rename, in the background, leaving nothing
    beside the disk."""
    job_id = "job-commit"
    disk = tmp_path / "vm" / "disk.qcow2"
    disk.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    disk.chmod(0o640)
    os.chown(disk, 0, 65534)
    with disk.open("rb") as old:
        target = await _prepare(server, tmp_path, job_id)
        data = await _write_and_check(target)
        req = RestoreFinishRequest(
            server_id="local", job_id=job_id, vm_name=f"none-{os.getpid()}", success=True,
            disks=[target],
        )  # fmt: skip
        await restores.finish(server, req)
        read = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"read -v {4 * MIB} 16", str(disk)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert data[:16].hex(" ") in read.stdout.replace("  ", " ")
        info = disk.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, 65534)
        # The old image is gone for good (its last name removed in the background).
        assert await asyncio.to_thread(_links_after, old.fileno(), 10) == 0
    assert os.listdir(disk.parent) == ["disk.qcow2"]


INSTALLATION = f"test-restore-{os.getpid()}"


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
    job = Job(id=job_id, type="restore", state=state, created_at=now, updated_at=now)  # type: ignore[arg-type]
    return msgspec.json.encode(job)


def _running(target: RestoreTarget) -> bool:
    pid = int(Path(target.pid_file).read_text())
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


@pytest.mark.parametrize("where", ["local", "remote"])
async def test_exports_of_ended_jobs_are_stopped_when_the_inventory_connects(
    server: HostServer, remote: HostServer, tmp_path: Path, jobs: KeyValue, where: str
) -> None:
    """The whole system stopped mid-restore, and the job was ended without its exports
    (the inventory could not be asked): an inventory that connects stops the exports of
    its installation's jobs that are not active, removing their images, and leaves
    those of an active job, of another installation or of another server alone."""
    host = server if where == "local" else remote
    ended, active = f"job-{os.getpid()}-ended", f"job-{os.getpid()}-active"
    await jobs.put(ended, _job(ended, "running"))
    await jobs.put(active, _job(active, "running"))
    ours = await _prepare(host, tmp_path / "a", ended, INSTALLATION)
    busy = await _prepare(host, tmp_path / "b", active, INSTALLATION)
    theirs = await _prepare(host, tmp_path / "c", ended, "another")
    try:
        owner = Path(ours.pid_file).parent / "owner"
        assert stat.S_IMODE(owner.stat().st_mode) == 0o600
        assert msgspec.json.decode(owner.read_bytes())["image"] == ours.temp_path
        done, pending = await restore_leftovers.reconcile(host, jobs, INSTALLATION)
        assert (done, pending) == ([], {ended, active})
        await jobs.put(ended, _job(ended, "failure"))
        done, pending = await restore_leftovers.reconcile(host, jobs, INSTALLATION)
        private = Path(ours.pid_file).parent
        assert done == [
            f"stopped the restore export {private} of job {ended} (failure), "
            f"removed {ours.temp_path}"
        ], done
        assert pending == {active}
        assert not private.exists() and not Path(ours.temp_path).exists()
        assert os.listdir(tmp_path / "a" / "vm") == []
        for left in (busy, theirs):
            assert _running(left) and Path(left.temp_path).exists()
        # Another server's inventory (the same host here) leaves them alone too.
        other = server if where == "remote" else remote
        assert await restore_leftovers.reconcile(other, jobs, INSTALLATION) == ([], set())
        # ``follow`` ends the active job's once that job has ended.
        await jobs.put(active, _job(active, "success"))
        lines = await restore_leftovers.follow(host, jobs, INSTALLATION, {active}, every=0.1)
        assert len(lines) == 1 and active in lines[0], lines
        assert not Path(busy.pid_file).parent.exists() and not Path(busy.temp_path).exists()
    finally:
        for target, job_id in ((busy, active), (theirs, ended)):
            if Path(target.pid_file).parent.exists():
                await _discard(host, target, job_id)
