"""The qemu-nbd exports restores write to: direct I/O, and the fallbacks when the host
cannot do it. Real qemu-img and qemu-nbd on this machine."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.inventory import (
    RestoreDisk,
    RestoreFinishRequest,
    RestorePrepareRequest,
    RestoreTarget,
)
from virtbackup.inventory import restores
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.nbd import NbdClient, NbdError
from virtbackup.nbd.tls import client_context_from_dir
from virtbackup.testing.pagecache import resident_pages
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.virt.pki import Authority, write_file

MIB = 1 << 20
IO_URING_SWITCH = Path("/proc/sys/kernel/io_uring_disabled")


def _export_args(target: RestoreTarget, job_id: str) -> list[str]:
    pid = int(Path(restores.pid_file(target.path, job_id)).read_text())
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def _write_and_check(target: RestoreTarget) -> bytes:
    data = secrets.token_bytes(8 * MIB)
    tls = ExportCredentials.load(shared_pki_dir()).client
    async with await NbdClient.connect_uri(target.nbd_url, tls=tls) as nbd:
        await nbd.write(4 * MIB, data)
        await nbd.flush()
        assert await nbd.read(4 * MIB, len(data)) == data
    return data


@pytest.fixture
def server() -> HostServer:
    return HostServer(config=Server(id="local", name="This host", host=""), timeout=5)


async def _prepare(server: HostServer, tmp_path: Path, job_id: str) -> RestoreTarget:
    disk = RestoreDisk(target="vda", path=str(tmp_path / "vm" / "disk.qcow2"), size=64 * MIB)
    req = RestorePrepareRequest(server_id="local", job_id=job_id, disks=[disk])
    prepared = await restores.prepare(server, req, ExportCredentials.load(shared_pki_dir()))
    return prepared.disks[0]


async def _discard(server: HostServer, target: RestoreTarget, job_id: str) -> None:
    req = RestoreFinishRequest(
        server_id="local", job_id=job_id, vm_name="none", success=False, disks=[target]
    )
    await restores.finish(server, req)
    assert not Path(target.temp_path).exists()
    assert not Path(restores.pid_file(target.path, job_id)).exists()


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
        cached = resident_pages(Path(target.temp_path))  # qemu-img create's header
        await _write_and_check(target)
        assert resident_pages(Path(target.temp_path)) <= cached < 64
    finally:
        await _discard(server, target, job_id)
    assert os.listdir(tmp_path / "vm") == []


async def test_restore_exports_refuse_clients_without_the_workers_certificate(
    server: HostServer, tmp_path: Path
) -> None:
    """Nobody but a holder of the workers' certificate can write into an image being
    restored: not a plain NBD client, not a TLS client with another CA's certificate."""
    job_id = "job-tls"
    target = await _prepare(server, tmp_path, job_id)
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
        await _discard(server, target, job_id)
