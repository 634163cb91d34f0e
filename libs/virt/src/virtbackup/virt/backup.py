"""Pull-mode backups: QEMU exports each disk over NBD while the guest keeps running.

``virDomainBackupBegin`` with ``<domainbackup mode='pull'>`` freezes a point-in-time view
of every chosen disk (copy-before-write into a per-disk *scratch* file) and serves it from
QEMU's NBD server, one export per disk named after its target (``vda``). For an
incremental backup the export also carries the dirty bitmap as the NBD meta context
``qemu:dirty-bitmap:backup-<target>``; a full backup offers ``base:allocation`` only.
The new checkpoint is created atomically with the job begin, so writes after the begin
belong to the next incremental.

The job lasts until :func:`end_backup` (``virDomainAbortJob``: for a pull backup that is
the normal end, the checkpoint stays). Readers must be done by then. libvirt removes the
scratch files it created when the job ends; :func:`end_backup` removes any that remain.
Scratch files are named ``vb-<domain uuid>-<target>.scratch`` in the caller's scratch
directory, so leftovers of a crashed run can be found per domain.

A server on a Unix socket (:class:`UnixServer`) is made in a directory of its own in the
scratch directory, ``vb-<domain uuid>-<random>.nbd`` (:func:`make_socket_dir`), that
only root and the user QEMU runs as may enter. libvirt labels nothing for a backup's
socket: QEMU itself creates it (mode 0775 under libvirt's umask), so the directory must
be QEMU's to write in (a root-owned 0700 one fails: ``nbd-server-start``: "Failed to
unlink socket ...: Permission denied"). QEMU removes the socket when the job ends;
:func:`end_backup` removes the directory, and :func:`remove_socket_dirs` what a job
that ended otherwise left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import libvirt

from virtbackup.virt import _xml
from virtbackup.virt.checkpoints import build_checkpoint_xml
from virtbackup.virt.connection import Connection
from virtbackup.virt.disks import Disk, list_disks
from virtbackup.virt.errors import Conflict, NotFound, VirtError, VirtTimeout
from virtbackup.virt.host import Host, remove_files


@dataclass(frozen=True, slots=True)
class TcpServer:
    """QEMU's NBD server on ``host:port`` of the hypervisor (must be reachable by the
    readers; ``tls`` needs libvirt's ``backup_tls_x509_cert_dir`` configured)."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True, slots=True)
class UnixServer:
    """QEMU's NBD server on a Unix socket of the hypervisor host."""

    socket: str


NbdServer = TcpServer | UnixServer


@dataclass(frozen=True, slots=True)
class BackupExport:
    """One disk served by a running backup job.

    ``bitmap`` is the export's dirty bitmap (``backup-vda``) for an incremental read, or
    ``None`` when the whole disk must be read (full backup, or a disk that cannot carry a
    bitmap). ``mode`` is libvirt's ``backupmode`` (``full`` or ``incremental``).
    """

    target: str
    export_name: str
    bitmap: str | None
    mode: str
    capacity: int | None
    scratch: str | None

    @property
    def meta_context(self) -> str | None:
        """The NBD meta context to query for dirty extents, e.g.
        ``qemu:dirty-bitmap:backup-vda``; ``None`` for a full read."""
        return f"qemu:dirty-bitmap:{self.bitmap}" if self.bitmap else None


@dataclass(frozen=True, slots=True)
class BackupJob:
    """A running pull-mode backup, as :func:`begin_backup` started it."""

    domain: str
    uuid: str
    server: NbdServer
    checkpoint: str | None
    incremental: str | None
    exports: tuple[BackupExport, ...]
    quiesced: bool = False
    """Whether the guest file systems were frozen at the begin (application-consistent);
    otherwise the backup is crash-consistent."""
    quiesce_error: str | None = None
    """Why a requested freeze did not happen (e.g. no guest agent)."""

    def export(self, target: str) -> BackupExport:
        """The export for disk ``target``; KeyError if the disk is not in the backup."""
        for exp in self.exports:
            if exp.target == target:
                return exp
        raise KeyError(target)

    def uri(self, target: str) -> str:
        """An NBD URI for disk ``target`` (``nbd://host:port/vda`` or ``nbd+unix:///vda``)."""
        return nbd_uri(self.server, self.export(target).export_name)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """The domain's backup job (see :func:`job_info`): ``type`` ``unbounded`` (a pull
    backup has no end of its own), ``operation`` ``backup``."""

    type: str
    operation: str

    @property
    def is_backup(self) -> bool:
        """Whether the job is a backup job."""
        return self.operation == "backup"


def nbd_uri(server: NbdServer, export_name: str) -> str:
    """The NBD URI (libnbd syntax) of ``export_name`` on ``server``."""
    name = quote(export_name, safe="")
    if isinstance(server, UnixServer):
        return f"nbd+unix:///{name}?" + urlencode({"socket": server.socket}, safe="/")
    host = f"[{server.host}]" if ":" in server.host else server.host
    scheme = "nbds" if server.tls else "nbd"
    return f"{scheme}://{host}:{server.port}/{name}"


def scratch_path(scratch_dir: str, uuid: str, target: str) -> str:
    """Where the scratch file of disk ``target`` of domain ``uuid`` goes."""
    return os.path.join(scratch_dir, f"vb-{uuid}-{target}.scratch")


def scratch_pattern(uuid: str) -> str:
    """A glob matching every scratch file of domain ``uuid`` (see :func:`scratch_path`)."""
    return f"vb-{uuid}-*.scratch"


#: The socket's name in a directory made by :func:`make_socket_dir`.
SOCKET_NAME = "nbd.sock"
#: The longest path a Unix socket may have on Linux (``sun_path`` holds 108 bytes).
MAX_SOCKET_PATH = 107


def socket_dir_pattern(uuid: str) -> str:
    """A glob matching every socket directory of domain ``uuid`` (:func:`make_socket_dir`)."""
    return f"vb-{uuid}-*.nbd"


def socket_path_fits(scratch_dir: str, uuid: str) -> bool:
    """Whether a socket in a directory :func:`make_socket_dir` would make in
    ``scratch_dir`` has a path short enough for a Unix socket."""
    probe = os.path.join(scratch_dir, socket_dir_pattern(uuid).replace("*", "XXXXXX"))
    return len(os.path.join(probe, SOCKET_NAME).encode()) <= MAX_SOCKET_PATH


async def qemu_owner(conn: Connection, name: str) -> str | None:
    """``uid:gid`` of the running domain's QEMU process, from its live XML's DAC label
    (``<seclabel model='dac'><label>+64055:+64055</label>``; ``0:0`` for a QEMU that
    runs as root); ``None`` when the XML has no such label. Raises NotFound for an
    unknown domain."""
    dom = await conn.lookup(name)
    root = _xml.parse(str(await conn.call(dom.XMLDesc, 0)))
    for label in root.findall("./seclabel"):
        if label.get("model") != "dac":
            continue
        text = (label.findtext("label") or "").strip()
        if ":" in text:
            uid, gid = text.split(":", 1)
            return f"{uid.lstrip('+')}:{gid.lstrip('+')}"
    return None


async def make_socket_dir(host: Host, scratch_dir: str, uuid: str, owner: str) -> str:
    """A new directory ``<scratch_dir>/vb-<uuid>-<random>.nbd``, mode 0700, owned by
    ``owner`` (``uid:gid``, see :func:`qemu_owner`): only root and QEMU may enter, and
    QEMU may create its socket there. Returns its path. Raises CommandFailed when it
    cannot be made (a half-made one is removed)."""
    template = os.path.join(scratch_dir, socket_dir_pattern(uuid).replace("*", "XXXXXX"))
    made = await host.run(["mktemp", "-d", template], timeout=30)
    made.check()
    path = made.stdout.strip()
    owned = await host.run(["chown", owner, "--", path], timeout=30)
    if owned.returncode != 0:
        await host.run(["rmdir", "--", path], timeout=30)
        owned.check()
    return path


async def remove_socket_dirs(host: Host, scratch_dir: str, uuid: str) -> list[str]:
    """Remove the socket directories of domain ``uuid`` in ``scratch_dir`` (their socket,
    then themselves); returns the paths removed. Call it only while the domain has no
    backup job: a running job's socket goes with them. Idempotent."""
    found = await host.run(
        [
            "find", scratch_dir, "-mindepth", "1", "-maxdepth", "1", "-type", "d",
            "-name", socket_dir_pattern(uuid), "-print0",
        ],
        timeout=30,
    )  # fmt: skip
    paths = sorted(p for p in found.stdout.split("\0") if p) if found.returncode == 0 else []
    for path in paths:
        await _remove_socket_dir(host, path)
    return paths


async def _remove_socket_dir(host: Host, path: str) -> None:
    # QEMU may leave its socket (a symbolic link put there is removed, never followed).
    (await host.run(["rm", "-rf", "--", path], timeout=30)).check()


def _own_socket_dir(server: NbdServer, uuid: str) -> str | None:
    """The directory of ``server``'s socket when :func:`make_socket_dir` made it for
    domain ``uuid``, else ``None`` (a socket someone else chose is never removed)."""
    if not isinstance(server, UnixServer):
        return None
    directory = os.path.dirname(server.socket)
    prefix, suffix = socket_dir_pattern(uuid).split("*")
    name = os.path.basename(directory)
    if os.path.basename(server.socket) != SOCKET_NAME:
        return None
    return directory if name.startswith(prefix) and name.endswith(suffix) else None


def build_backup_xml(
    *,
    server: NbdServer,
    disks: Sequence[Disk],
    scratch_dir: str,
    uuid: str,
    incremental: str | None = None,
    exclude: Sequence[str] = (),
    full: Collection[str] = (),
) -> str:
    """``<domainbackup mode='pull'>`` XML exporting ``disks``.

    ``incremental`` names the checkpoint to read changes since; disks that cannot carry a
    bitmap (non-qcow2) and the targets in ``full`` (e.g. a disk added after that
    checkpoint) are then read in full (``backupmode='full'``). Targets in
    ``exclude`` are listed with ``backup='no'`` (libvirt would otherwise back up every
    writable disk).
    """
    root = ET.Element("domainbackup", mode="pull")
    if incremental:
        ET.SubElement(root, "incremental").text = incremental
    if isinstance(server, UnixServer):
        ET.SubElement(root, "server", transport="unix", socket=server.socket)
    else:
        attrs = {"transport": "tcp", "name": server.host, "port": str(server.port)}
        if server.tls:
            attrs["tls"] = "yes"
        ET.SubElement(root, "server", attrs)
    elements = ET.SubElement(root, "disks")
    for disk in disks:
        attrs = {"name": disk.target, "backup": "yes", "type": "file"}
        if incremental and (not disk.supports_bitmaps or disk.target in full):
            attrs["backupmode"] = "full"
        element = ET.SubElement(elements, "disk", attrs)
        ET.SubElement(element, "scratch", file=scratch_path(scratch_dir, uuid, disk.target))
        ET.SubElement(element, "driver", type="qcow2")
    for target in exclude:
        ET.SubElement(elements, "disk", name=target, backup="no")
    return _xml.dump(root)


def parse_backup_xml(xml: str) -> tuple[NbdServer, str | None, list[BackupExport]]:
    """The server, incremental checkpoint and exports of a running job's XML
    (``virDomainBackupGetXMLDesc``); capacities are unknown (``None``)."""
    root = _xml.parse(xml)
    srv = root.find("server")
    if srv is None:
        raise VirtError("backup job XML has no <server>: not a pull-mode backup")
    server: NbdServer
    if srv.get("transport") == "unix":
        server = UnixServer(socket=srv.get("socket", ""))
    else:
        server = TcpServer(
            host=srv.get("name", ""), port=int(srv.get("port", "0")), tls=srv.get("tls") == "yes"
        )
    incremental = root.findtext("incremental") or None
    exports: list[BackupExport] = []
    for disk in root.findall("./disks/disk"):
        if disk.get("backup") != "yes":
            continue
        target = disk.get("name", "")
        scratch = disk.find("scratch")
        exports.append(
            BackupExport(
                target=target,
                export_name=disk.get("exportname") or target,
                bitmap=disk.get("exportbitmap") or None,
                mode=disk.get("backupmode") or ("incremental" if incremental else "full"),
                capacity=None,
                scratch=(scratch.get("file") or scratch.get("dev"))
                if scratch is not None
                else None,
            )
        )
    return server, incremental, exports


def _scratch_file(scratch: ET.Element | None) -> str | None:
    if scratch is None:
        return None
    return scratch.get("file") or scratch.get("dev")


async def begin_backup(
    conn: Connection,
    name: str,
    *,
    server: NbdServer,
    scratch_dir: str,
    checkpoint: str | None,
    incremental: str | None = None,
    disks: Sequence[Disk] | None = None,
    quiesce: bool = False,
    timeout: float = 60.0,
    full: Collection[str] = (),
) -> BackupJob:
    """Start a pull-mode backup of the running domain ``name``.

    ``checkpoint`` names the checkpoint created with the job (``None``: no change tracking
    from here). ``incremental`` names the checkpoint to read changes since (``None``: full);
    the targets in ``full`` are read in full even then (disks the checkpoint does not cover
    or whose bitmap is broken).
    ``disks`` defaults to every backed-up disk; other writable disks are excluded.
    ``scratch_dir`` must exist on the hypervisor host and be traversable by QEMU.
    ``quiesce`` freezes the guest file systems through the QEMU guest agent around the
    begin (``virDomainFSFreeze``, thawed in a ``finally``: the point in time is fixed at the
    begin, so the guest is frozen for milliseconds); without a working agent the backup
    proceeds crash-consistent and :attr:`BackupJob.quiesce_error` says why.

    Raises Conflict when the domain is not running or already has a job,
    CheckpointInconsistent when ``incremental``'s bitmaps are broken (take a full backup
    instead), NotFound for an unknown domain or ``incremental`` checkpoint.
    """
    dom = await conn.lookup(name)
    uuid = str(dom.UUIDString())
    if not bool(await conn.call(dom.isActive)):
        raise Conflict(f"domain {name} is not running: a pull-mode backup needs a running QEMU")
    # libvirt would wait 30 s for the job lock before failing; fail at once instead.
    if await backup_running(conn, name):
        raise Conflict(f"domain {name} already has a backup job")
    every = await list_disks(conn, name)
    chosen = list(disks) if disks is not None else every
    wanted = {d.target for d in chosen}
    backup_xml = build_backup_xml(
        server=server,
        disks=chosen,
        scratch_dir=scratch_dir,
        uuid=uuid,
        incremental=incremental,
        exclude=[d.target for d in every if d.target not in wanted],
        full=full,
    )
    checkpoint_xml = build_checkpoint_xml(checkpoint, chosen) if checkpoint else None
    quiesced = False
    quiesce_error: str | None = None
    if quiesce:
        try:
            quiesced = int(await conn.call(dom.fsFreeze, None, 0, timeout=timeout)) >= 0
        except VirtError as exc:
            quiesce_error = str(exc)
    flags = 0
    created: list[str] = []
    try:
        created = await _create_scratch(conn.host, chosen, scratch_dir, uuid)
        if created:
            flags |= libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
        await conn.call(dom.backupBegin, backup_xml, checkpoint_xml, flags, timeout=timeout)
    except BaseException:
        if created and conn.host is not None:
            with contextlib.suppress(VirtError):
                await remove_files(conn.host, created)
        raise
    finally:
        if quiesce:
            # Thaw even when the freeze call failed or timed out: the agent may still have
            # frozen the guest, and thawing an unfrozen guest is harmless.
            with contextlib.suppress(VirtError):
                await conn.call(dom.fsThaw, None, 0, timeout=timeout)
    try:
        desc = str(await conn.call(dom.backupGetXMLDesc, 0))
    except VirtError:
        with contextlib.suppress(VirtError):
            await conn.call(dom.abortJob)
        raise
    srv, inc, exports = parse_backup_xml(desc)
    capacities = {d.target: d.capacity for d in chosen}
    return BackupJob(
        domain=name,
        uuid=uuid,
        server=srv,
        checkpoint=checkpoint,
        incremental=inc,
        exports=tuple(_with_capacity(e, capacities.get(e.target)) for e in exports),
        quiesced=quiesced,
        quiesce_error=quiesce_error,
    )


async def _create_scratch(
    host: Host | None, disks: Sequence[Disk], scratch_dir: str, uuid: str
) -> list[str]:
    """Create the scratch images of a begin ourselves (``qemu-img create``, 0600, the
    disks' exact virtual sizes) so that libvirt only attaches them
    (``VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL``); returns their paths, or ``[]`` when it
    cannot (no host to run commands on, a capacity unknown): libvirt then creates them.

    Why: when libvirt creates a scratch image it runs QEMU's ``blockdev-create`` job,
    which leaves the monitor free while a half-opened qcow2 node sits in the block graph.
    QEMU 7.2 aborts (``block/qcow2.c:5222: qcow2_get_specific_info: Assertion 'false'``)
    if any client asks for the block nodes meanwhile (``virDomainGetBlockInfo``, a
    checkpoint's size, block domstats: ``query-named-block-nodes``), and monitoring tools
    ask every few seconds. An attach (``blockdev-add``) opens the node within one monitor
    command, so no query can see it half open. libvirt neither labels differently nor
    removes reused images: :func:`end_backup` removes scratch files as before.
    Raises CommandFailed when ``qemu-img`` cannot create an image (none is left behind).
    """
    if host is None or any(not d.capacity for d in disks):
        return []
    made: list[str] = []
    try:
        for disk in disks:
            path = scratch_path(scratch_dir, uuid, disk.target)
            made.append(path)
            result = await host.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", path, str(disk.capacity)]
            )
            result.check()
            (await host.run(["chmod", "0600", path])).check()
    except BaseException:
        with contextlib.suppress(VirtError):
            await remove_files(host, made)
        raise
    return made


def _with_capacity(export: BackupExport, capacity: int | None) -> BackupExport:
    return BackupExport(
        target=export.target,
        export_name=export.export_name,
        bitmap=export.bitmap,
        mode=export.mode,
        capacity=capacity,
        scratch=export.scratch,
    )


async def job_info(conn: Connection, name: str) -> JobInfo | None:
    """The domain's backup job (``type`` ``unbounded``, ``operation`` ``backup``), or
    ``None`` when it has none (or is not running).

    Found with :func:`backup_running`; libvirt's job statistics (``virDomainGetJobStats``,
    ``virsh domjobinfo``) are never read: in libvirt 9.0 those of a backup query QEMU
    with the domain unlocked and then read the backup's definition, which a backup ending
    meanwhile has freed. libvirtd crashed that way (SIGSEGV in an RPC worker, in libc's
    string functions) several times a day on the test machine, whichever process asked:
    another inventory reconciling every domain of the host was enough. Other kinds of
    jobs (a migration) are not reported: libvirt refuses a backup during one by itself."""
    if await backup_running(conn, name):
        return JobInfo(type="unbounded", operation="backup")
    return None


async def backup_running(conn: Connection, name: str) -> bool:
    """Whether the domain has a backup job (``virDomainBackupGetXMLDesc`` answers).

    Never libvirt's job statistics (see :func:`job_info`): the backup XML is read under
    the domain's lock alone, and libvirt clears it in the same locked step that ends the
    backup's job.
    """
    dom = await conn.lookup(name)
    try:
        await conn.call(dom.backupGetXMLDesc, 0)
    except NotFound:
        return False
    except VirtError as exc:
        if exc.code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN_BACKUP):
            return False
        raise
    return True


async def current_backup(conn: Connection, name: str) -> BackupJob | None:
    """Re-attach to the domain's running backup job (e.g. after a restart), or ``None``.

    The new checkpoint's name is not part of libvirt's job XML: ``checkpoint`` is ``None``.
    """
    dom = await conn.lookup(name)
    try:
        desc = str(await conn.call(dom.backupGetXMLDesc, 0))
    except NotFound:
        return None
    except VirtError as exc:
        if exc.code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN_BACKUP):
            return None
        raise
    server, incremental, exports = parse_backup_xml(desc)
    return BackupJob(
        domain=name,
        uuid=str(dom.UUIDString()),
        server=server,
        checkpoint=None,
        incremental=incremental,
        exports=tuple(exports),
    )


async def end_backup(
    conn: Connection,
    job: BackupJob | str,
    *,
    host: Host | None = None,
    timeout: float = 30.0,
) -> None:
    """End the domain's backup job (``virDomainAbortJob``) and remove its scratch files.

    Idempotent: with no backup job running only the scratch files are removed. Another
    kind of job (e.g. a migration) is left alone. The checkpoint created at the begin is
    kept. Scratch files, and the socket's directory when :func:`make_socket_dir` made it,
    are removed through ``host`` (default: the connection's host); with neither,
    libvirt's own removal is relied on. Raises VirtTimeout if the job is still there
    after ``timeout`` seconds, CommandFailed when the socket's directory cannot be
    removed.
    """
    name = job if isinstance(job, str) else job.domain
    running = await current_backup(conn, name) if isinstance(job, str) else job
    scratch = [e.scratch for e in running.exports if e.scratch] if running is not None else []
    sockets = _own_socket_dir(running.server, running.uuid) if running is not None else None
    dom = await conn.lookup(name)
    if await backup_running(conn, name):
        try:
            await conn.call(dom.abortJob)
        except VirtError as exc:
            if exc.code != libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active"
                raise
    await wait_job_gone(conn, name, timeout=timeout)
    runner = host if host is not None else conn.host
    if runner is not None and scratch:
        await remove_files(runner, scratch)
    if runner is not None and sockets is not None:
        await _remove_socket_dir(runner, sockets)


#: The first pause of :func:`wait_job_gone`'s polls, doubled after each up to
#: :data:`JOB_GONE_POLL_MAX`. An aborted pull-mode backup is gone 2-10 ms after
#: ``abortJob`` returns on the benchmark machine (libvirt 9.0, QEMU 7.2): a fixed 100 ms
#: pause was a third of a 0-byte incremental's 0.3 s (``bench/README.md``).
JOB_GONE_POLL_FIRST = 0.002
JOB_GONE_POLL_MAX = 0.1


async def wait_job_gone(conn: Connection, name: str, *, timeout: float = 30.0) -> None:
    """Wait until the domain has no backup job; VirtTimeout after ``timeout`` seconds.

    Polls :func:`backup_running` (never the job statistics: see there), first after
    :data:`JOB_GONE_POLL_FIRST` seconds, then twice as long each time up to
    :data:`JOB_GONE_POLL_MAX` (a job that takes long to go costs at most ~10 polls a
    second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = JOB_GONE_POLL_FIRST
    while True:
        if not await backup_running(conn, name):
            return
        if loop.time() >= deadline:
            raise VirtTimeout(f"backup job of {name} still running after {timeout} s")
        await asyncio.sleep(pause)
        pause = min(pause * 2, JOB_GONE_POLL_MAX)
