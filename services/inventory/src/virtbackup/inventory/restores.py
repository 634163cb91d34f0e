"""Restores on a hypervisor: precheck, fresh images exported over NBD, then define.

Images are written beside their final path (``<path>.vbrestore-<job>``) through a
``qemu-nbd`` export the workers write to, and moved over the final path only when every
chunk is written; a failed or cancelled restore removes them and leaves the original
disks and domain untouched. The exports require TLS and a client certificate signed by
VirtBackup's CA (the server's certificate is the one backups use, see
:mod:`.credentials`): nobody else can write into an image being restored.
"""

from __future__ import annotations

import contextlib
import random
import shlex
import xml.etree.ElementTree as ET

from virtbackup.contracts.v1.inventory import (
    RestoreDisk,
    RestoreFinishRequest,
    RestorePrecheckRequest,
    RestorePrecheckResult,
    RestorePrepared,
    RestorePrepareRequest,
    RestoreTarget,
)
from virtbackup.inventory import state_files
from virtbackup.inventory.backups import REMOTE_NBD_PORTS, _free_local_port
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.runtime.errors import BadRequest, Conflict
from virtbackup.virt import get_domain
from virtbackup.virt.domains import PowerState, define_domain, undefine_domain
from virtbackup.virt.errors import CommandFailed, VirtError
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.host import Host
from virtbackup.virt.images import image_info

#: Connections one qemu-nbd export accepts (the workers write in parallel).
EXPORT_CONNECTIONS = 16
#: How the export writes the image, best first. Direct I/O, so that a restore neither
#: fills the host's page cache with data no one reads soon nor pays the kernel's copy
#: into it; io_uring, because Linux native AIO blocks while ext4 allocates (writing
#: 2 GiB into a new qcow2 image on the benchmark machine: io_uring 2.5 s, threads 2.8 s,
#: native 4.3-8.4 s, buffered 4.4 s). A host whose kernel or QEMU lacks io_uring gets
#: threads; a filesystem without O_DIRECT gets buffered writes.
IO_MODES: tuple[tuple[str, ...], ...] = (
    ("--cache=none", "--aio=io_uring"),
    ("--cache=none", "--aio=threads"),
    ("--cache=writeback",),
)


def temp_path(path: str, job_id: str) -> str:
    return f"{path}.vbrestore-{job_id}"


def pid_file(path: str, job_id: str) -> str:
    return f"{temp_path(path, job_id)}.pid"


def _check_path(disk: RestoreDisk) -> None:
    if not disk.path.startswith("/") or "/../" in disk.path or disk.path.endswith("/.."):
        raise BadRequest(f"disk {disk.target}: path {disk.path!r} is not an absolute path")


async def precheck(server: HostServer, req: RestorePrecheckRequest) -> RestorePrecheckResult:
    conn = await server.connection()
    host = await server.host()
    try:
        dom = await get_domain(conn, req.vm_name)
        exists, running = True, dom.power_state != PowerState.SHUTOFF
    except VirtNotFound:
        exists, running = False, False
    problems = []
    for disk in req.disks:
        try:
            info = await image_info(host, disk.path)
        except (CommandFailed, VirtError):
            problems.append(f"{disk.target}: {disk.path} does not exist")
            continue
        if info.virtual_size != disk.size:
            problems.append(
                f"{disk.target}: {disk.path} is {info.virtual_size} bytes, expected {disk.size}"
            )
    return RestorePrecheckResult(
        vm_exists=exists, vm_running=running, can_define_only=not problems, problems=problems
    )


async def prepare(
    server: HostServer, req: RestorePrepareRequest, creds: ExportCredentials
) -> RestorePrepared:
    """Create each disk's temporary image and export it (``nbds://``, see the module
    docstring). Raises BadRequest (a path that is not absolute), Conflict (an image or
    export that cannot be made, or a server that cannot require client certificates);
    nothing is left behind on failure."""
    host = await server.host()
    tls_dir = await creds.install(server)
    targets: list[RestoreTarget] = []
    try:
        for disk in req.disks:
            _check_path(disk)
            targets.append(await _export(server, host, req.job_id, disk, tls_dir))
    except BaseException:
        await _teardown(host, req.job_id, targets, remove=True)
        raise
    return RestorePrepared(disks=targets)


async def _export(
    server: HostServer, host: Host, job_id: str, disk: RestoreDisk, tls_dir: str
) -> RestoreTarget:
    temp = temp_path(disk.path, job_id)
    parent = disk.path.rsplit("/", 1)[0] or "/"
    await host.run(["mkdir", "-p", parent], timeout=30)
    created = await host.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", temp, str(disk.size)], timeout=60
    )
    if created.returncode != 0:
        raise Conflict(f"cannot create {temp}: {created.stderr.strip()}")
    last = ""
    for attempt in range(5):
        port = _free_local_port() if server.is_local else random.choice(REMOTE_NBD_PORTS)  # noqa: S311
        # A failure most likely means the host refused this I/O mode (a busy port is
        # rare): the next attempt uses the next one; the last one works everywhere.
        io_mode = IO_MODES[min(attempt, len(IO_MODES) - 1)]
        started = await host.run(
            [
                "qemu-nbd", "--fork", "--persistent", "-e", str(EXPORT_CONNECTIONS),
                "-f", "qcow2", *io_mode, "--discard=unmap",
                "-b", server.nbd_host, "-p", str(port), "-x", disk.target,
                "--object",
                f"tls-creds-x509,id=vbtls,dir={tls_dir.replace(',', ',,')},"
                "endpoint=server,verify-peer=on",
                "--tls-creds", "vbtls",
                "--pid-file", pid_file(disk.path, job_id), temp,
            ],
            timeout=60,
        )  # fmt: skip
        if started.returncode == 0:
            host_part = f"[{server.nbd_host}]" if ":" in server.nbd_host else server.nbd_host
            url = f"nbds://{host_part}:{port}/{disk.target}"
            return RestoreTarget(target=disk.target, path=disk.path, temp_path=temp, nbd_url=url)
        last = started.stderr.strip()
    await host.run(["rm", "-f", temp], timeout=30)
    raise Conflict(f"cannot export {temp} over NBD: {last}")


async def _teardown(host: Host, job_id: str, targets: list[RestoreTarget], *, remove: bool) -> None:
    for target in targets:
        pid = shlex.quote(pid_file(target.path, job_id))
        script = f"test -f {pid} && kill $(cat {pid}); rm -f {pid}"
        with contextlib.suppress(CommandFailed, VirtError, OSError):
            await host.run(["sh", "-c", script], timeout=30)
        if remove:
            with contextlib.suppress(CommandFailed, VirtError, OSError):
                await host.run(["rm", "-f", target.temp_path], timeout=30)


async def finish(server: HostServer, req: RestoreFinishRequest) -> None:
    """Stop the exports; on success move the images into place and define the domain.

    Idempotent: an image already moved into place (its temporary file gone, its final
    path present) is left as it is, so a commit cut short can simply be repeated."""
    host = await server.host()
    await _teardown(host, req.job_id, req.disks, remove=not req.success)
    if not req.success:
        left = await state_files.staged_for(server, req.job_id, "", req.state)
        await state_files.discard(host, left, req.job_id)
        return
    state = await state_files.staged_for(server, req.job_id, req.domain_xml, req.state)
    conn = await server.connection()
    with contextlib.suppress(VirtNotFound):
        dom = await get_domain(conn, req.vm_name)
        if dom.power_state != PowerState.SHUTOFF:
            for target in req.disks:
                await host.run(["rm", "-f", target.temp_path], timeout=30)
            await state_files.discard(host, state, req.job_id)
            raise Conflict(f"vm {req.vm_name} was started during the restore; nothing replaced")
    for target in req.disks:
        present = await host.run(["test", "-e", target.temp_path], timeout=30)
        if present.returncode != 0:
            # Already moved by an earlier finish of this job that was cut short (its
            # orchestrator died while committing): finishing again is idempotent.
            there = await host.run(["test", "-e", target.path], timeout=30)
            if there.returncode == 0:
                continue
        moved = await host.run(["mv", "-f", target.temp_path, target.path], timeout=60)
        if moved.returncode != 0:
            raise Conflict(f"cannot move {target.temp_path} to {target.path}: {moved.stderr}")
    await state_files.commit(host, req.job_id, state)
    if req.domain_xml:
        await define(server, req.vm_name, req.domain_xml)


async def define(server: HostServer, vm_name: str, domain_xml: str) -> None:
    """Define the domain from the saved XML, replacing a shut-off one of that name (its
    checkpoints go with it: they describe disks that were just replaced; its NVRAM and
    TPM state stay: a restore has just put them back, or has none to put back)."""
    name = ET.fromstring(domain_xml).findtext("name")  # noqa: S314 - XML from our backup
    if name != vm_name:
        raise BadRequest(f"the saved XML defines {name!r}, not {vm_name!r}")
    conn = await server.connection()
    try:
        dom = await get_domain(conn, vm_name)
    except VirtNotFound:
        dom = None
    if dom is not None:
        if dom.power_state != PowerState.SHUTOFF:
            raise Conflict(f"vm {vm_name} is {dom.power_state}: shut it off to restore it")
        await undefine_domain(conn, vm_name, keep_nvram=True, keep_tpm=True)
    await define_domain(conn, domain_xml)
