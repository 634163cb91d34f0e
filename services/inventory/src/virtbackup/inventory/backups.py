"""Beginning and ending libvirt pull-mode backups for the orchestrator."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket

from virtbackup.contracts.v1.inventory import (
    BackupBeginRequest,
    BackupBegun,
    BackupEndRequest,
    DiskExport,
)
from virtbackup.inventory import ownership
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.extents import fit, read_maps
from virtbackup.inventory.hosts import HostServer
from virtbackup.nbd import NbdError
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, NotFound, Unavailable
from virtbackup.virt import (
    BackupJob,
    Connection,
    TcpServer,
    begin_backup,
    check_chain,
    current_backup,
    end_backup,
)
from virtbackup.virt.checkpoints import delete_checkpoint
from virtbackup.virt.domains import domain_xml
from virtbackup.virt.errors import CheckpointInconsistent, VirtError
from virtbackup.virt.errors import Conflict as VirtConflict
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.host import Host

log = logging.getLogger(__name__)

#: Ports tried for NBD exports on remote servers (local ones use any free port).
REMOTE_NBD_PORTS = range(10809, 10909)
#: Seconds to connect to a fresh export and read its maps' first reply.
NBD_TIMEOUT = 30.0


def _free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_checkpoint_name() -> str:
    stamp = utcnow_iso().replace(":", "").replace("-", "").replace(".", "")
    return f"vb-{stamp}-{os.urandom(3).hex()}"


async def begin(
    server: HostServer,
    req: BackupBeginRequest,
    scratch_dir: str,
    creds: ExportCredentials,
    installation: str,
) -> BackupBegun:
    """Begin a backup with a new checkpoint; incremental when the chain from
    ``incremental_from`` is intact, else a full read (and ``full_reason`` says why).

    Each disk comes with its NBD export (``nbds://``: TLS, and only clients with the
    certificate of ``creds`` are served), size and extent maps (see :mod:`.extents`).
    The domain is tagged with ``req.job_id`` and ``installation`` (see
    :mod:`.ownership`), so that no inventory replica reports the running backup as a
    leftover while that job is active, and an inventory that starts can tell its own
    backups that nobody will end from another installation's.
    Raises NotFound (unknown VM), Conflict (not running, another job, no free port,
    a server whose libvirt cannot require client certificates) or Unavailable (the maps
    could not be read; the backup job is then ended and its checkpoint deleted)."""
    conn = await server.connection()
    host = await server.host()
    await creds.install(server)
    await host.run(["mkdir", "-p", scratch_dir], timeout=30)
    incremental: str | None = None
    full_reason = "" if req.incremental_from else "no earlier restore point"
    if req.incremental_from:
        try:
            chain = await check_chain(conn, req.vm_name, req.incremental_from, host=host)
        except VirtNotFound as exc:
            raise NotFound(f"vm {req.vm_name!r} not found on server {server.id}: {exc}") from None
        if chain.intact:
            incremental = req.incremental_from
        else:
            full_reason = "; ".join(chain.problems)
    xml = await domain_xml(conn, req.vm_name, inactive=True, secure=True)
    checkpoint = new_checkpoint_name()
    last_error: Exception | None = None
    for _ in range(5):
        port = _free_local_port() if server.is_local else random.choice(REMOTE_NBD_PORTS)  # noqa: S311
        try:
            job = await begin_backup(
                conn,
                req.vm_name,
                server=TcpServer(host=server.nbd_host, port=port, tls=True),
                scratch_dir=scratch_dir,
                checkpoint=checkpoint,
                incremental=incremental,
                quiesce=req.quiesce,
            )
            break
        except CheckpointInconsistent as exc:
            incremental, full_reason = None, str(exc)
            last_error = exc
        except VirtNotFound as exc:
            raise NotFound(f"vm {req.vm_name!r} not found on server {server.id}: {exc}") from None
        except VirtConflict as exc:
            raise Conflict(str(exc)) from None
        except VirtError as exc:
            last_error = exc
            if "address" not in str(exc).lower() and "port" not in str(exc).lower():
                raise
    else:
        raise Conflict(f"could not begin the backup of {req.vm_name}: {last_error}")
    try:
        await ownership.tag(conn, req.vm_name, req.job_id, checkpoint, installation)
        disks = await _exports(job, xml, creds)
    except BaseException as exc:
        # Nobody will end a backup whose begin failed: end it here, and drop its checkpoint
        # so that the next incremental still covers every change.
        with contextlib.suppress(Exception):
            await _abandon(conn, host, req.vm_name, checkpoint)
        if isinstance(exc, NbdError | OSError):
            raise Unavailable(
                f"reading the extent maps of {req.vm_name} on server {server.id}: {exc}"
            ) from None
        raise
    return BackupBegun(
        server_id=server.id,
        vm_name=req.vm_name,
        checkpoint=checkpoint,
        parent_checkpoint=incremental,
        incremental=incremental is not None,
        full_reason=full_reason if incremental is None else "",
        disks=disks,
        domain_xml=xml,
        quiesced=job.quiesced,
    )


async def _exports(job: BackupJob, xml: str, creds: ExportCredentials) -> list[DiskExport]:
    """Each exported disk with its size and extent maps, read over NBD (the maps of all
    disks together fitted into one bus reply, see :mod:`.extents`)."""
    read = [
        (
            exp,
            await read_maps(
                job.uri(exp.target), exp.meta_context, timeout=NBD_TIMEOUT, tls=creds.client
            ),
        )
        for exp in job.exports
    ]
    fit([m for _, maps in read for m in (maps.allocation, maps.dirty) if m is not None])
    return [
        DiskExport(
            target=exp.target,
            path=_disk_path(xml, exp.target),
            nbd_url=job.uri(exp.target),
            size=maps.size,
            format=_disk_format(xml, exp.target),
            bitmap_context=exp.meta_context,
            allocation=maps.allocation.extents,
            dirty=maps.dirty.extents if maps.dirty is not None else None,
        )
        for exp, maps in read
    ]


async def _abandon(conn: Connection, host: Host, vm_name: str, checkpoint: str) -> None:
    with contextlib.suppress(VirtNotFound):
        await end_backup(conn, vm_name, host=host)
    await ownership.untag(conn, vm_name)
    with contextlib.suppress(VirtNotFound):
        await delete_checkpoint(conn, vm_name, checkpoint)


async def end(server: HostServer, req: BackupEndRequest, scratch_dir: str) -> None:
    """End the backup job and remove the domain's tag (:mod:`.ownership`); when it failed,
    drop its new checkpoint so the next incremental starts from the previous one (libvirt
    merges the bitmaps). Idempotent.

    A backup job tagged with another checkpoint than ``req.checkpoint`` is another
    backup's (a late or repeated end): it is left running."""
    conn = await server.connection()
    host = await server.host()
    with contextlib.suppress(VirtNotFound):
        found = await ownership.read_tag(conn, req.vm_name)
        if found is not None and req.checkpoint and found.checkpoint != req.checkpoint:
            log.warning(
                "not ending the backup job of %s: it is %s's, not %s's",
                req.vm_name,
                found.checkpoint,
                req.checkpoint,
            )
        else:
            job = await current_backup(conn, req.vm_name)
            if job is not None:
                await end_backup(conn, job, host=host)
            await ownership.untag(conn, req.vm_name)
    if not req.success and req.checkpoint:
        with contextlib.suppress(VirtNotFound):
            await delete_checkpoint(conn, req.vm_name, req.checkpoint)


def _disk_element(xml: str, target: str) -> dict[str, str]:
    from virtbackup.virt import parse_disks

    for disk in parse_disks(xml):
        if disk.target == target:
            return {"path": disk.source or "", "format": disk.format}
    return {"path": "", "format": "raw"}


def _disk_path(xml: str, target: str) -> str:
    return _disk_element(xml, target)["path"]


def _disk_format(xml: str, target: str) -> str:
    return _disk_element(xml, target)["format"]
