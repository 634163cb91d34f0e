"""Beginning and ending libvirt pull-mode backups for the orchestrator, of running VMs
and (started paused) of shut-off ones.

Who can read a disk through a backup's NBD export (QEMU's NBD server): nobody but the
workers.

* A remote server's export listens on TCP and requires TLS and a client certificate
  signed by VirtBackup's CA (see :mod:`.credentials`).
* A local server's export (the inventory runs on the hypervisor, as root; the workers
  reach it there, as root) listens on a Unix socket, without TLS, in a directory of its
  own in the scratch directory (``vb-<domain uuid>-<random>.nbd``, mode 0700) owned by
  the user QEMU runs as (the domain's DAC label: ``libvirt-qemu`` on Debian's
  ``qemu:///system``). libvirt labels nothing for a backup's socket, so QEMU must own
  the directory to create its socket there; root enters any directory; every other
  user is kept out of it, so cannot reach the socket, whatever its mode. The same
  principals as before (the workers' client key is root's), and no encryption of data
  that never leaves the host: TLS was QEMU's largest cost in a backup, and QEMU does it
  on one thread. Reading 1611 MB of a cold 2 GiB qcow2 image (``cache='none'``, page
  cache dropped before each run, ``bench/export_reads.py``, socket and TLS interleaved,
  20 runs each): QEMU used 0.88-1.29 CPU s over the socket (median 1.07; 2.40 once, a
  first run) against 1.63-1.91 with TLS (median 1.77), and the reader (the worker's
  ``backup_unit``, ten runs each) 2.65-3.01 against 3.51-3.86. The socket read faster
  in 18 of the 20 interleaved pairs (1 to 16 chunk reads in flight, 1 or 2
  connections). A whole full backup of that image through the services (two workers;
  TLS forced by a scratch path too long for a socket; three interleaved pairs): QEMU
  1.01-1.24 CPU s against 1.78-2.10, the workers 3.70-4.10 against 4.51-5.34, and
  5.4-7.9 s against 7.0-12.4 s on a loaded machine. The directory goes when the backup
  ends (:func:`end`, also after a failed or cancelled job), when its begin fails, and
  in the inventory's reconcile and leftover cleanup (``vb-<uuid>-*.nbd`` of a domain
  without a backup job). A scratch directory whose path is too long for a socket in it
  (107 bytes), or a domain whose live XML names no user for QEMU, gets TCP with TLS,
  as a remote server does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket

from nats.js.kv import KeyValue

from virtbackup.contracts.v1.inventory import (
    BackupBeginRequest,
    BackupBegun,
    BackupEndRequest,
    DiskExport,
)
from virtbackup.contracts.v1.jobs import ACTIVE_STATES
from virtbackup.inventory import ownership
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.extents import fit, read_maps
from virtbackup.inventory.hosts import HostServer
from virtbackup.nbd import NbdError, NbdUri
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, NotFound, Unavailable
from virtbackup.virt import (
    BackupJob,
    Connection,
    NbdServer,
    TcpServer,
    UnixServer,
    begin_backup,
    check_chain,
    current_backup,
    end_backup,
    get_domain,
)
from virtbackup.virt.backup import (
    SOCKET_NAME,
    BackupExport,
    make_socket_dir,
    qemu_owner,
    remove_socket_dirs,
    scratch_pattern,
    socket_path_fits,
)
from virtbackup.virt.checkpoints import discard_checkpoint
from virtbackup.virt.domains import destroy_if_paused, domain_xml, start_paused
from virtbackup.virt.errors import CheckpointInconsistent, VirtError
from virtbackup.virt.errors import Conflict as VirtConflict
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.host import Host, list_files, remove_files

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
    ``incremental_from`` is usable, else a full read (and ``full_reason`` says why). In an
    incremental backup, a disk the checkpoint cannot serve (added since, broken bitmap,
    raw image) is read in full alone, its ``full_reason`` saying why.

    With ``req.offline_from_bitmaps``, a shut-off VM with qcow2 disks is read from the
    persistent bitmaps of ``incremental_from`` by ``qemu-nbd``, without starting QEMU and
    without a new checkpoint (:mod:`.bitmap_exports`); otherwise, and for other VMs, as
    follows.

    A shut-off VM is backed up *offline*: the domain is started paused (the guest runs
    no instruction; ``offline`` in the answer), tagged as started by this backup (see
    :mod:`.ownership`), and read by the same pull-mode backup with its checkpoint, so
    the checkpoints and the images' persistent bitmaps stay one chain whatever the VM's
    state at each backup. :func:`end` shuts it off again if it is still paused.

    Each disk comes with its NBD export, size and extent maps (see :mod:`.extents`): on
    a remote server ``nbds://`` (TLS, and only clients with the certificate of
    ``creds`` are served), on a local one ``nbd+unix://`` in a directory only root and
    QEMU may enter (see the module docstring).
    The domain is tagged with ``req.job_id`` and ``installation`` (see
    :mod:`.ownership`), so that no inventory replica reports the running backup as a
    leftover while that job is active, and an inventory that starts can tell its own
    backups that nobody will end from another installation's.
    Raises NotFound (unknown VM), Conflict (another job, no free port, a server whose
    libvirt cannot require client certificates, a socket directory that cannot be
    made, a shut-off VM that cannot be started paused: the message names libvirt's
    reason) or Unavailable (the maps could not be read; the backup job is then ended,
    its checkpoint deleted and an offline VM shut off again)."""
    conn = await server.connection()
    host = await server.host()
    if req.offline_from_bitmaps:
        from virtbackup.inventory import bitmap_exports

        try:
            from_bitmaps = await bitmap_exports.begin(server, conn, host, req, creds, installation)
        except VirtNotFound as exc:
            raise NotFound(f"vm {req.vm_name!r} not found on server {server.id}: {exc}") from None
        if from_bitmaps is not None:
            return from_bitmaps
    await host.run(["mkdir", "-p", scratch_dir], timeout=30)
    checkpoint = new_checkpoint_name()
    offline = await _start_if_shut_off(conn, req, checkpoint, installation, server.id)
    try:
        return await _begin(
            server, conn, host, req, scratch_dir, creds, installation, checkpoint, offline
        )
    except BaseException:
        if offline:
            with contextlib.suppress(Exception):
                await destroy_if_paused(conn, req.vm_name)
        raise


async def _start_if_shut_off(
    conn: Connection, req: BackupBeginRequest, checkpoint: str, installation: str, server_id: str
) -> bool:
    """Start the VM paused and tag it if it is shut off (see :func:`begin`); whether it was."""
    try:
        dom = await get_domain(conn, req.vm_name)
    except VirtNotFound as exc:
        raise NotFound(f"vm {req.vm_name!r} not found on server {server_id}: {exc}") from None
    if dom.id is not None:
        return False
    try:
        await start_paused(conn, req.vm_name)
    except VirtNotFound as exc:
        raise NotFound(f"vm {req.vm_name!r} not found on server {server_id}: {exc}") from None
    except VirtError as exc:
        if (await get_domain(conn, req.vm_name)).id is not None:
            return False  # started by someone else meanwhile: an online backup
        raise Conflict(
            f"vm {req.vm_name} is shut off and could not be started paused for an offline "
            f"backup: {exc}"
        ) from None
    try:
        await ownership.tag(conn, req.vm_name, req.job_id, checkpoint, installation, offline=True)
    except BaseException:
        with contextlib.suppress(Exception):
            await destroy_if_paused(conn, req.vm_name)
        raise
    log.info("vm %s was shut off: started paused for an offline backup", req.vm_name)
    return True


async def _begin(
    server: HostServer,
    conn: Connection,
    host: Host,
    req: BackupBeginRequest,
    scratch_dir: str,
    creds: ExportCredentials,
    installation: str,
    checkpoint: str,
    offline: bool,
) -> BackupBegun:
    try:
        dom = await get_domain(conn, req.vm_name)
    except VirtNotFound as exc:
        raise NotFound(f"vm {req.vm_name!r} not found on server {server.id}: {exc}") from None
    incremental: str | None = None
    full_reason = "" if req.incremental_from else "no earlier restore point"
    full_disks: dict[str, str] = {}
    if req.incremental_from:
        try:
            chain = await check_chain(conn, req.vm_name, req.incremental_from, host=host)
        except VirtNotFound as exc:
            raise NotFound(f"vm {req.vm_name!r} not found on server {server.id}: {exc}") from None
        if chain.usable:
            incremental = req.incremental_from
            full_disks = dict(chain.disk_problems)
        else:
            full_reason = "; ".join(chain.problems)
    xml = await domain_xml(conn, req.vm_name, inactive=True, secure=True)
    socket_dir = await _socket_dir(server, conn, host, req.vm_name, dom.uuid, scratch_dir)
    try:
        return await _begin_job(
            server, conn, host, req, scratch_dir, creds, installation, checkpoint, offline,
            xml=xml, domain_id=dom.id, incremental=incremental, full_reason=full_reason,
            full_disks=full_disks, socket_dir=socket_dir,
        )  # fmt: skip
    except BaseException:
        if socket_dir is not None:
            with contextlib.suppress(Exception):
                await host.run(["rm", "-rf", "--", socket_dir], timeout=30)
        raise


async def _socket_dir(
    server: HostServer, conn: Connection, host: Host, vm_name: str, uuid: str, scratch_dir: str
) -> str | None:
    """A private directory for the export's Unix socket on a local server (see the
    module docstring), or ``None``: a remote server, or a scratch directory whose path
    is too long for a socket in it (TCP with TLS then, as on a remote server). Raises
    NotFound (the VM is gone) or Conflict (the directory cannot be made)."""
    if not server.is_local:
        return None
    if not socket_path_fits(scratch_dir, uuid):
        log.warning(
            "the scratch directory %s is too long a path for a Unix socket: the backup of "
            "%s is exported over TCP with TLS",
            scratch_dir,
            vm_name,
        )
        return None
    try:
        owner = await qemu_owner(conn, vm_name)
        if owner is None:
            log.warning(
                "vm %s: its live XML names no user for QEMU (no DAC label): the backup is "
                "exported over TCP with TLS",
                vm_name,
            )
            return None
        return await make_socket_dir(host, scratch_dir, uuid, owner)
    except VirtNotFound as exc:
        raise NotFound(f"vm {vm_name!r} not found on server {server.id}: {exc}") from None
    except VirtError as exc:
        raise Conflict(f"cannot make a directory for the export of {vm_name}: {exc}") from None


async def _begin_job(
    server: HostServer,
    conn: Connection,
    host: Host,
    req: BackupBeginRequest,
    scratch_dir: str,
    creds: ExportCredentials,
    installation: str,
    checkpoint: str,
    offline: bool,
    *,
    xml: str,
    domain_id: int | None,
    incremental: str | None,
    full_reason: str,
    full_disks: dict[str, str],
    socket_dir: str | None,
) -> BackupBegun:
    if socket_dir is None:
        await creds.install(server)
    last_error: Exception | None = None
    for _ in range(5):
        nbd_server: NbdServer
        if socket_dir is not None:
            nbd_server = UnixServer(socket=f"{socket_dir}/{SOCKET_NAME}")
        else:
            port = _free_local_port() if server.is_local else random.choice(REMOTE_NBD_PORTS)  # noqa: S311
            nbd_server = TcpServer(host=server.nbd_host, port=port, tls=True)
        try:
            job = await begin_backup(
                conn,
                req.vm_name,
                server=nbd_server,
                scratch_dir=scratch_dir,
                checkpoint=checkpoint,
                incremental=incremental,
                # A guest that runs no instruction has nothing to freeze.
                quiesce=req.quiesce and not offline,
                full=list(full_disks),
            )
            break
        except CheckpointInconsistent as exc:
            incremental, full_reason, full_disks = None, str(exc), {}
            last_error = exc
        except VirtNotFound as exc:
            raise NotFound(f"vm {req.vm_name!r} not found on server {server.id}: {exc}") from None
        except VirtConflict as exc:
            raise Conflict(str(exc)) from None
        except VirtError as exc:
            last_error = exc
            if socket_dir is not None:
                # QEMU could not listen in the socket's directory (a host whose sVirt
                # profile, AppArmor or SELinux, does not let QEMU write there): the
                # export listens on TCP with TLS instead, as a remote server's does. The
                # directory is removed with the others when the backup ends.
                log.warning(
                    "vm %s: the backup export cannot listen on a Unix socket (%s): "
                    "using TCP with TLS",
                    req.vm_name,
                    exc,
                )
                socket_dir = None
                await creds.install(server)
                continue
            if "address" not in str(exc).lower() and "port" not in str(exc).lower():
                raise
    else:
        raise Conflict(f"could not begin the backup of {req.vm_name}: {last_error}")
    try:
        await ownership.tag(
            conn, req.vm_name, req.job_id, checkpoint, installation, offline=offline
        )
        disks = await _exports(job, xml, creds, full_disks if incremental else None)
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
        offline=offline,
        domain_id=domain_id,
    )


async def _exports(
    job: BackupJob, xml: str, creds: ExportCredentials, full_disks: dict[str, str] | None
) -> list[DiskExport]:
    """Each exported disk with its size and extent maps, read over NBD (the maps of all
    disks together fitted into one bus reply, see :mod:`.extents`). ``full_disks``
    (``None`` for a full backup) says why a disk of an incremental backup has no bitmap."""
    read = [
        (
            exp,
            await read_maps(
                job.uri(exp.target),
                exp.meta_context,
                timeout=NBD_TIMEOUT,
                tls=creds.client if NbdUri.parse(job.uri(exp.target)).tls else None,
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
            full_reason=_full_reason(exp, xml, full_disks),
        )
        for exp, maps in read
    ]


def _full_reason(exp: BackupExport, xml: str, full_disks: dict[str, str] | None) -> str:
    if full_disks is None or exp.bitmap is not None:
        return ""
    if exp.target in full_disks:
        return full_disks[exp.target]
    fmt = _disk_format(xml, exp.target)
    if fmt != "qcow2":
        return f"{fmt} image: no dirty bitmap"
    return "no dirty bitmap"


async def _abandon(conn: Connection, host: Host, vm_name: str, checkpoint: str) -> None:
    with contextlib.suppress(VirtNotFound):
        await end_backup(conn, vm_name, host=host)
    await ownership.untag(conn, vm_name)
    with contextlib.suppress(VirtNotFound):
        await discard_checkpoint(conn, vm_name, checkpoint, host=host)


async def end(server: HostServer, req: BackupEndRequest, scratch_dir: str) -> bool:
    """End the backup job and remove the domain's tag (:mod:`.ownership`); when it failed,
    drop its new checkpoint so the next incremental starts from the previous one, even if
    the domain has stopped meanwhile (:func:`discard_checkpoint`). Idempotent.

    A domain that an offline backup started (its tag says so, or ``req.offline`` with
    the begin's ``req.domain_id``: the same QEMU process) is shut off again if it is
    still paused (one that someone resumed keeps running), whatever else fails here: a
    libvirt error ending the job or dropping the checkpoint is raised after it.

    Returns whether the VM stopped during the backup: with ``req.domain_id``, from
    libvirt (no backup job is left, and the domain is not running, or runs as another
    process); without it, inferred from the tag (live metadata, gone with the QEMU
    process) and the backup job being both gone.

    A backup job tagged with another checkpoint than ``req.checkpoint`` is another
    backup's (a late or repeated end): it is left running, and its domain as it is.
    Without ``req.checkpoint`` (a job ended by whoever took over from an orchestrator that
    died before it recorded the checkpoint), the tagged job is ended, and when it failed
    the checkpoint its tag names is dropped.

    A backup read from bitmaps (``req.export_dir``, :mod:`.bitmap_exports`) has no libvirt
    job: its ``qemu-nbd`` exports are stopped, nothing else (it returns False)."""
    if req.export_dir:
        from virtbackup.inventory import bitmap_exports

        await bitmap_exports.end(server, req)
        return False
    conn = await server.connection()
    host = await server.host()
    stopped = False
    found: ownership.BackupTag | None = None
    offline = req.offline
    try:
        job_left = False
        theirs = False
        with contextlib.suppress(VirtNotFound):
            found = await ownership.read_tag(conn, req.vm_name)
            if found is not None and req.checkpoint and found.checkpoint != req.checkpoint:
                theirs = True
                log.warning(
                    "not ending the backup job of %s: it is %s's, not %s's",
                    req.vm_name,
                    found.checkpoint,
                    req.checkpoint,
                )
                offline = False
            else:
                offline = offline or (found is not None and found.offline)
                job = await current_backup(conn, req.vm_name)
                if job is not None:
                    job_left = True
                    await end_backup(conn, job, host=host)
                else:
                    await _remove_scratch(conn, host, req.vm_name, scratch_dir)
                if not offline:
                    await ownership.untag(conn, req.vm_name)
        if not theirs and not job_left:
            stopped = await _stopped(conn, req, found)
        # Without ``req.checkpoint`` (its caller died before it learnt the name), the
        # checkpoint of the job this ended is the one its tag names.
        made = req.checkpoint or (found.checkpoint if found is not None and not theirs else None)
        if not req.success and made:
            with contextlib.suppress(VirtNotFound):
                await discard_checkpoint(conn, req.vm_name, made, host=host)
    finally:
        if offline:
            await _shut_off_again(conn, req, found)
    return stopped


async def _stopped(
    conn: Connection, req: BackupEndRequest, found: ownership.BackupTag | None
) -> bool:
    """Whether the domain stopped during the backup (see :func:`end`; no job is left)."""
    if req.domain_id is None:
        return found is None
    try:
        now = await get_domain(conn, req.vm_name)
    except VirtNotFound:
        return True  # a transient domain that stopped is gone
    return now.id != req.domain_id


async def _shut_off_again(
    conn: Connection, req: BackupEndRequest, found: ownership.BackupTag | None
) -> None:
    """Shut off the domain the offline backup started, if it is still paused; a domain
    whose tag is gone counts as that one only while it runs as the begin's process."""
    try:
        if found is None or not found.offline:
            if req.domain_id is None:
                return
            try:
                if (await get_domain(conn, req.vm_name)).id != req.domain_id:
                    return
            except VirtNotFound:
                return
        if await destroy_if_paused(conn, req.vm_name):
            log.info("vm %s: shut off again after its offline backup", req.vm_name)
        else:
            await ownership.untag(conn, req.vm_name)
    except VirtError as exc:
        # The inventory's reconcile (at start) and the action check try again.
        log.warning("vm %s: could not shut it off after its offline backup: %s", req.vm_name, exc)


async def check_offline_hold(
    server: HostServer, vm_name: str, jobs: KeyValue, installation: str, scratch_dir: str
) -> None:
    """Refuse (Conflict) a VM action while an offline backup holds the VM: it was shut off
    and is running paused only to be read, and is shut off again at the end. A VM left
    paused by an offline backup whose job has ended (its inventory died before the end)
    is first returned to shut off (see :func:`end`), so the action applies to the VM as
    its user left it. Raises VirtError when libvirt cannot be asked."""
    conn = await server.connection()
    found = await ownership.read_tag(conn, vm_name)
    if found is None or not found.offline:
        return
    state = await ownership.job_state(jobs, found.job_id) if found.job_id else None
    if found.installation != installation or found.job_id is None or state in ACTIVE_STATES:
        raise Conflict(
            f"vm {vm_name} is held by an offline backup (job {found.job_id or 'unknown'}): "
            "it was shut off and runs paused only to be read; it is shut off again when "
            "the backup ends, try again then"
        )
    await end(
        server,
        BackupEndRequest(
            server_id=server.id,
            vm_name=vm_name,
            checkpoint=found.checkpoint or None,
            success=state == "success",
        ),
        scratch_dir,
    )


async def _remove_scratch(conn: Connection, host: Host, vm_name: str, scratch_dir: str) -> None:
    """Remove the domain's scratch files and socket directories when no backup job holds
    them (a job that ended with its domain may leave them)."""
    with contextlib.suppress(VirtError):
        dom = await conn.lookup(vm_name)
        uuid = str(dom.UUIDString())
        files = await list_files(host, scratch_dir, scratch_pattern(uuid))
        await remove_files(host, files)
        await remove_socket_dirs(host, scratch_dir, uuid)


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
