"""Reading a backup's NBD export on a cold image: transport and reads in flight.

A VM with a qcow2 disk of mixed content (``peer.prepare_vm``, ``cache='none'``: QEMU
reads the image with ``O_DIRECT``), one pull-mode backup per measurement (full, no
checkpoint), the page cache dropped before each. The allocated 4 MiB chunks (from
``base:allocation``, as the planner chooses them) are read once through the export with
``NbdClient.readinto``, as the transfer worker reads them (each 4 MiB read is two
requests of 2 MiB), over ``--connections`` connections with ``--depths`` chunk reads in
flight on each. Two transports, interleaved: QEMU's NBD server on a Unix socket
(without TLS, what a local server uses) and on TCP with TLS and client certificates
(what a remote one uses). For each: MB/s (10^6 bytes per wall second) and QEMU's CPU
seconds (``/proc/<qemu pid>/stat``, user + system) during the read.

    .venv/bin/python bench/export_reads.py [--disk-mib 2048] [--content-mib 1536]
        [--depths 1,2,4,8] [--connections 1,2] [--transports unix,tls] [--reps 2]
    .venv/bin/python bench/export_reads.py --units 1x8,2x8,2x4 [--transports unix]

With ``--units UxC,...`` the chunks are read by the worker's own code instead: one
transfer-worker's ``backup_unit`` (units of 16 chunks in disk order, ``U`` units at
once sharing one connection, ``C`` chunks of each in flight: ``CHUNKS_IN_FLIGHT``) into
a new filesystem repository in the work directory, with the worker's thread pool and
allocator settings. It reports, besides MB/s and QEMU's CPU, the chunk reads in flight
on the connection (largest, and averaged over time; each is two NBD requests of 2 MiB).

Needs root (libvirt, ``drop_caches``, ``/etc/pki/qemu``). The TLS runs use the tests'
shared CA (``virtbackup.testing.pki``), so the host's QEMU NBD certificates stay those the
tests on this machine expect.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import measure, peer
from virtbackup.nbd import BASE_ALLOCATION, NbdClient, NbdUri
from virtbackup.nbd.tls import client_context_from_dir
from virtbackup.runtime.ports import free_port
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.testing.vms import remove_vm
from virtbackup.virt import (
    Connection,
    NbdServer,
    TcpServer,
    UnixServer,
    begin_backup,
    end_backup,
    open_connection,
)
from virtbackup.virt.backup import SOCKET_NAME, make_socket_dir, qemu_owner
from virtbackup.virt.host import LocalHost
from virtbackup.virt.nbd_tls import install_server_credentials
from virtbackup.virt.pki import ensure_client_credentials, load_or_create_authority

MiB = 1 << 20
CHUNK = 4 * MiB
STATE_ZERO = 2


@dataclass
class Run:
    transport: str
    connections: int
    depth: int
    seconds: float
    bytes: int
    qemu_cpu: float
    #: This process's CPU seconds (the reader: the worker's side).
    reader_cpu: float = 0.0
    #: ``--units``: chunk reads in flight (largest, time-weighted mean).
    max_in_flight: int = 0
    mean_in_flight: float = 0.0

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def _chunks(extents: list[tuple[int, int, int]], size: int) -> list[int]:
    """Offsets of the chunks with any data (not all zero/unallocated)."""
    wanted: set[int] = set()
    for offset, length, flags in extents:
        if flags & STATE_ZERO:
            continue
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        wanted.update(range(first, last + 1))
    return [i * CHUNK for i in sorted(wanted) if i * CHUNK < size]


async def _read_all(
    url: str, tls: ssl.SSLContext | None, offsets: list[int], size: int, conns: int, depth: int
) -> int:
    clients = [await NbdClient.connect_uri(url, tls=tls) for _ in range(conns)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for off in offsets:
        queue.put_nowait(off)
    total = 0

    async def reader(client: NbdClient) -> None:
        nonlocal total
        buf = bytearray(CHUNK)
        while not queue.empty():
            off = queue.get_nowait()
            n = min(CHUNK, size - off)
            await client.readinto(off, memoryview(buf)[:n])
            total += n

    try:
        await asyncio.gather(*(reader(c) for c in clients for _ in range(depth)))
    finally:
        for c in clients:
            await c.disconnect()
    return total


class _Counting:
    """An ``NbdClient`` whose ``readinto`` calls in flight are counted over time."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client
        self.now = 0
        self.most = 0
        self.area = 0.0
        self.since = time.monotonic()

    def _tick(self, delta: int) -> None:
        now = time.monotonic()
        self.area += self.now * (now - self.since)
        self.since = now
        self.now += delta
        self.most = max(self.most, self.now)

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        self._tick(1)
        try:
            await self.client.readinto(offset, buf)
        finally:
            self._tick(-1)


async def _units(
    url: str,
    tls: ssl.SSLContext | None,
    offsets: list[int],
    size: int,
    units: int,
    chunks: int,
    work: Path,
) -> tuple[int, _Counting]:
    from concurrent.futures import ThreadPoolExecutor

    from virtbackup.contracts.v1.work import TransferUnit
    from virtbackup.repository.repository import Repository
    from virtbackup.storage.filesystem import FilesystemDriver
    from virtbackup.transfer_worker import units as worker_units
    from virtbackup.transfer_worker.allocator import keep_large_buffers
    from virtbackup.transfer_worker.budget import ByteBudget

    keep_large_buffers()
    bounded = worker_units._bounded
    assert bounded.__defaults__ is not None
    saved = bounded.__defaults__
    bounded.__defaults__ = (chunks,)
    repo_dir = Path(tempfile.mkdtemp(prefix="repo-", dir=work))
    repo = await Repository.open_or_create(FilesystemDriver(repo_dir), chunk_size=CHUNK)
    uctx = worker_units.UnitContext(
        worker="bench",
        executor=ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="chunk"),
        budget=ByteBudget(1024 << 20),
    )
    indices = [off // CHUNK for off in offsets]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for i in range(0, len(indices), 16):
        queue.put_nowait(indices[i : i + 16])
    client = await NbdClient.connect_uri(url, tls=tls)
    counting = _Counting(client)
    total = 0

    async def worker(slot: int) -> None:
        nonlocal total
        while not queue.empty():
            batch = queue.get_nowait()
            unit = TransferUnit(
                job_id="bench", unit=batch[0], kind="backup", destination_id="d", disk="vda",
                disk_size=size, chunk_size=CHUNK, nbd_url=url, indices=batch,
            )  # fmt: skip
            result = await worker_units.backup_unit(unit, repo, counting, uctx)  # type: ignore[arg-type]
            total += result.bytes_read

    try:
        await asyncio.gather(*(worker(i) for i in range(units)))
    finally:
        bounded.__defaults__ = saved
        await client.disconnect()
        uctx.executor.shutdown()
        await repo.driver.close()
        subprocess.run(["rm", "-rf", "--", str(repo_dir)], check=False)
    counting._tick(0)
    return total, counting


async def _one(
    conn: Connection,
    vm: peer.PreparedVm,
    transport: str,
    conns: int,
    depth: int,
    work: Path,
    tls: ssl.SSLContext,
    *,
    units: bool = False,
) -> Run:
    host = LocalHost()
    server: NbdServer
    if transport == "unix":
        dom = await conn.lookup(vm.name)
        owner = await qemu_owner(conn, vm.name) or "0:0"
        sockets = await make_socket_dir(host, str(work), str(dom.UUIDString()), owner)
        server = UnixServer(f"{sockets}/{SOCKET_NAME}")
    else:
        server = TcpServer("127.0.0.1", free_port(), tls=True)
    job = await begin_backup(conn, vm.name, server=server, scratch_dir=str(work), checkpoint=None)
    try:
        url = job.uri(vm.target)
        context = tls if NbdUri.parse(url).tls else None
        async with await NbdClient.connect_uri(
            url, tls=context, meta_contexts=[BASE_ALLOCATION]
        ) as nbd:
            size = nbd.size
            extents = [
                (e.offset, e.length, e.flags)
                for e in await nbd.block_status(context=BASE_ALLOCATION)
            ]
        offsets = _chunks(extents, size)
        measure.drop_caches()
        pid = peer.qemu_pid(vm.name)
        before = peer._process_cpu(pid) or 0.0
        mine = time.process_time()
        started = time.monotonic()
        counting: _Counting | None = None
        if units:
            total, counting = await _units(url, context, offsets, size, conns, depth, work)
        else:
            total = await _read_all(url, context, offsets, size, conns, depth)
        seconds = time.monotonic() - started
        cpu = (peer._process_cpu(pid) or 0.0) - before
        reader = time.process_time() - mine
    finally:
        await end_backup(conn, job, host=host)
    run = Run(transport, conns, depth, seconds, total, cpu, reader)
    if counting is not None:
        run.max_in_flight = counting.most
        run.mean_in_flight = counting.area / seconds
    return run


async def _main(args: argparse.Namespace) -> list[Run]:
    conn = await open_connection("qemu:///system", host=LocalHost())
    work = Path(tempfile.mkdtemp(prefix="vb-export-reads-", dir="/var/tmp"))
    work.chmod(0o755)
    pki = shared_pki_dir()
    authority = load_or_create_authority(pki)
    client_dir = ensure_client_credentials(pki, authority)
    await install_server_credentials(LocalHost(), authority, ["127.0.0.1"])
    tls = client_context_from_dir(client_dir)
    name = f"vb-export-reads-{os.getpid()}"
    try:
        vm = await peer.prepare_vm(
            conn,
            name,
            disk_size=args.disk_mib * MiB,
            content_size=args.content_mib * MiB,
            base=work,
            cache="none",
        )
    except BaseException:
        await conn.close()
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)
        raise
    runs: list[Run] = []
    try:
        # One untimed read: a new VM's first read costs its QEMU more (PEER.md, pitfall 5).
        await _one(conn, vm, "unix", 1, 8, work, tls)
        shapes = (
            [(int(u), int(c)) for u, c in (x.split("x") for x in args.units.split(","))]
            if args.units
            else [(c, d) for c in args.connections for d in args.depths]
        )
        for rep in range(args.reps):
            for first, second in shapes:
                for transport in args.transports:
                    run = await _one(
                        conn, vm, transport, first, second, work, tls, units=bool(args.units)
                    )
                    runs.append(run)
                    shape = (
                        f"units {first} x {second:2} chunks"
                        if args.units
                        else f"conns {first} depth {second:2} (requests {first * second * 2:2})"
                    )
                    extra = (
                        f", reads in flight max {run.max_in_flight} mean {run.mean_in_flight:4.1f}"
                        if args.units
                        else ""
                    )
                    print(
                        f"rep {rep} {transport:4} {shape}: {run.bytes / 1e6:6.0f} MB in "
                        f"{run.seconds:5.2f} s = {run.mb_s:5.0f} MB/s, CPU s QEMU "
                        f"{run.qemu_cpu:4.2f} reader {run.reader_cpu:4.2f}{extra}",
                        flush=True,
                    )
    finally:
        await remove_vm(conn, name, delete_directory=vm.directory)
        await conn.close()
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-mib", type=int, default=2048)
    parser.add_argument("--content-mib", type=int, default=1536)
    parser.add_argument("--depths", default="1,2,4,8")
    parser.add_argument("--connections", default="1,2")
    parser.add_argument("--transports", default="unix,tls")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--units", default="", help="UxC,...: the worker's backup_unit")
    args = parser.parse_args()
    args.depths = [int(x) for x in args.depths.split(",")]
    args.connections = [int(x) for x in args.connections.split(",")]
    args.transports = args.transports.split(",")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
