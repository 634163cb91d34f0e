"""Restores on a hypervisor: planning, images exported over NBD, then define.

Planning (:func:`precheck` given the saved domain XML) decides where each disk goes and
as what: the format (``raw``, ``qcow2``) and kind (a file, or a block device) that the
XML declares; under a new VM name disk files are renamed after it; into a target
directory or a storage pool they become files there (a block device too, as an image
of its declared format). It changes nothing, and refuses what it would not write: a
directory outside the server's ``restoreDirectories``, an unknown or unusable pool, a
missing or too small block device, a device or directory where a file is due, and
(when the disks go somewhere new) a file that is not a disk of the VM being replaced.

File disks are written beside their final path (``<path>.vbrestore-<job>``) through a
``qemu-nbd`` export the workers write to, and moved over the final path only when every
chunk is written; a failed or cancelled restore removes them and leaves the original
disks and domain untouched. A block disk restored in place is written into the device
itself (a restore never replaces a device node with a file): the device is checked
again before, the domain must be shut off, and since a device is not a fresh image
every zero chunk is written as zeros (``RestoreTarget.fresh`` false). A failed restore
into a device leaves it partly written: there is nowhere else to put the data.

Who can write into an image being restored: nobody but the workers.

* A remote server's exports listen on TCP and require TLS and a client certificate
  signed by VirtBackup's CA (the server's certificate is the one backups use, see
  :mod:`.credentials`). On a session server (another user's ``qemu:///session`` over
  SSH) ``qemu-nbd`` runs as that user, the images and their pid files are the user's
  (0600), and directories made for them are 0700.
* A local server's exports (the inventory runs on the hypervisor; workers reach it on
  loopback) listen on a Unix socket in a directory that only the inventory's user can
  enter (``mktemp -d``, mode 0700), without TLS: the same principals as before (whoever
  can read the workers' client key, 0600, is that user or root), and no encryption of
  data that never leaves the host. TLS cost more CPU than everything else a restore
  does (writing 1.7 GB through qemu-nbd: 2.4 s of the worker's CPU and 2.0 s of
  qemu-nbd's with TLS, 0.3 s and 1.0 s over the socket), and qemu-nbd does all of its
  share on one thread.
"""

from __future__ import annotations

import contextlib
import posixpath
import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import msgspec

from virtbackup.contracts.v1.inventory import (
    DiskKind,
    RestoreDisk,
    RestoreFinishRequest,
    RestorePrecheckRequest,
    RestorePrecheckResult,
    RestorePrepared,
    RestorePrepareRequest,
    RestoreTarget,
)
from virtbackup.inventory import ownership, state_files
from virtbackup.inventory.backups import REMOTE_NBD_PORTS
from virtbackup.inventory.beside import beside
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.nbd import NbdUri
from virtbackup.runtime.errors import BadRequest, Conflict
from virtbackup.virt import get_domain, parse_disks
from virtbackup.virt.connection import Connection
from virtbackup.virt.domains import PowerState, define_domain, undefine_domain
from virtbackup.virt.errors import CommandFailed, VirtError
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.host import Host
from virtbackup.virt.images import image_info
from virtbackup.virt.placement import (
    SESSION_IMAGES_DIR,
    allowed_directories,
    create_image,
    resolve,
)
from virtbackup.virt.placement import disk_paths as _disk_paths
from virtbackup.virt.placement import file_type as _file_type
from virtbackup.virt.placement import inside as _inside
from virtbackup.virt.placement import realpaths as _realpaths
from virtbackup.virt.pools import (
    DIRECTORY_POOL_TYPES,
    get_pool,
    refresh_pools_holding,
)
from virtbackup.virt.rewrite import (
    DiskPlacement,
    device_file,
    domain_name,
    renamed_file,
    restored_domain,
)
from virtbackup.virt.state import StateError

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
#: glibc's allocator settings for the export (environment variables other C libraries
#: ignore; not ``GLIBC_TUNABLES``, whose second setting glibc 2.36 drops). qemu-nbd takes
#: a new buffer for every request's payload and frees it after the write; with glibc's
#: defaults each buffer of 2 MiB is a fresh mmap (or heap the next free gives back), so
#: every request paid page faults, zeroing and unmapping: half of qemu-nbd's CPU.
#: Buffers up to the largest request (32 MiB) from the heap, kept when freed, cost none
#: after the first: qemu-nbd's CPU per GB written fell from 0.6 s to 0.2-0.3 s on the
#: benchmark machine, and its throughput doubled. The heap then holds what the requests
#: in flight held at most (16 per connection), until the export stops.
EXPORT_MALLOC = ("MALLOC_MMAP_THRESHOLD_=33554432", "MALLOC_TRIM_THRESHOLD_=1073741824")
#: In an export's private directory: qemu-nbd's pid file, its socket (a local
#: server's), and who made it (:class:`ExportOwner`, JSON).
EXPORT_PID = "qemu-nbd.pid"
EXPORT_SOCKET = "nbd.sock"
EXPORT_OWNER = "owner"
#: The private directories of exports (``mktemp -d``; the server's /tmp, so that an
#: inventory finds them again whatever its environment: :mod:`.restore_leftovers`).
EXPORT_DIR_TEMPLATE = "/tmp/vbrestore.XXXXXXXX"  # noqa: S108 - mktemp -d: a new 0700 dir


def temp_path(path: str, job_id: str) -> str:
    """``<path>.vbrestore-<job>``, shortened for a name too long for it (see ``beside``)."""
    return beside(path, f".vbrestore-{job_id}", reserve=len(".pid"))


def pid_file(path: str, job_id: str) -> str:
    return f"{temp_path(path, job_id)}.pid"


def _check_path(disk: RestoreDisk) -> None:
    if not disk.path.startswith("/") or "/../" in disk.path or disk.path.endswith("/.."):
        raise BadRequest(f"disk {disk.target}: path {disk.path!r} is not an absolute path")


# -- planning --------------------------------------------------------------------------


async def precheck(server: HostServer, req: RestorePrecheckRequest) -> RestorePrecheckResult:
    """Whether the VM exists and runs, whether defining alone would do, and (given the
    saved XML) the plan: see :class:`RestorePrecheckRequest` for what it raises. With
    ``job_id`` the existing domain is held for the job first (see
    :func:`.ownership.hold_for_restore`), so that nothing starts it unseen after this
    look at it."""
    conn = await server.connection()
    host = await server.host()
    if req.job_id:
        await ownership.hold_for_restore(conn, req.vm_name, req.job_id)
    try:
        dom = await get_domain(conn, req.vm_name)
        exists, running, uuid = True, dom.power_state != PowerState.SHUTOFF, dom.uuid
    except VirtNotFound:
        exists, running, uuid = False, False, ""
    plan = await _plan(server, conn, host, req, exists, uuid) if req.domain_xml else list(req.disks)
    problems = []
    for disk in plan:
        try:
            info = await image_info(host, disk.path)
        except (CommandFailed, VirtError):
            problems.append(f"{disk.target}: {disk.path} does not exist")
            continue
        # A device may be larger than the disk it holds.
        if info.virtual_size != disk.size and not (
            disk.kind == "block" and info.virtual_size >= disk.size
        ):
            problems.append(
                f"{disk.target}: {disk.path} is {info.virtual_size} bytes, expected {disk.size}"
            )
    return RestorePrecheckResult(
        vm_exists=exists,
        vm_running=running,
        can_define_only=not problems,
        problems=problems,
        disks=plan if req.domain_xml else [],
        vm_uuid=uuid,
    )


async def _plan(
    server: HostServer,
    conn: Connection,
    host: Host,
    req: RestorePrecheckRequest,
    exists: bool,
    uuid: str,
) -> list[RestoreDisk]:
    saved = {d.target: d for d in parse_disks(req.domain_xml)}
    old_name = domain_name(req.domain_xml)
    renamed = req.vm_name != old_name
    directory = await _target_directory(server, conn, host, req)
    plan: list[RestoreDisk] = []
    for disk in req.disks:
        _check_path(disk)
        declared = saved.get(disk.target)
        if declared is None or declared.source != disk.path:
            # Where a disk was comes from the saved XML (sealed with the repository's key
            # when it is encrypted), never from the plaintext record alone.
            said = "no such disk" if declared is None else f"{declared.source}"
            raise Conflict(
                f"disk {disk.target}: the restore point's record says {disk.path}, its saved "
                f"domain XML {said}: the point is inconsistent (its record was changed); "
                "nothing restored"
            )
        fmt = declared.format
        if declared is not None and declared.type == "block":
            if directory is None:
                if renamed:
                    raise BadRequest(
                        f"disk {disk.target} is the block device {disk.path}: restoring it "
                        f"under another name needs targetDirectory or storagePool (the "
                        f"device belongs to {old_name})"
                    )
                plan.append(_placed(disk, disk.path, fmt, "block"))
                continue
            base = device_file(req.vm_name, disk.target, fmt)
        else:
            base = renamed_file(posixpath.basename(disk.path), old_name, req.vm_name)
        path = posixpath.join(directory or posixpath.dirname(disk.path), base)
        plan.append(_placed(disk, path, fmt, "file"))
    seen: dict[str, str] = {}
    for disk in plan:
        if disk.path in seen:
            raise BadRequest(
                f"disks {seen[disk.path]} and {disk.target} would both be restored to {disk.path}"
            )
        seen[disk.path] = disk.target
    if req.directory_must_exist:
        if directory is None:
            await _check_own_directories(server, host, plan)
        await _check_media(server, host, req.domain_xml, plan)
    if req.decision == "overwrite":
        # Disks that go somewhere new may only replace files of the VM they replace. A
        # migration's always do, whatever the paths say: a file at the source's path on
        # the target is not the source's disk (unless the hosts share that storage, and
        # then it is the source's own image, which must not be replaced either).
        careful = renamed or directory is not None or req.directory_must_exist
        ours = await _disk_paths(conn, req.vm_name) if careful and exists else set()
        for disk in plan:
            await _check_writable(server, host, disk, req.vm_name, ours if careful else None)
        try:
            elsewhere = await state_files.used_elsewhere(server, conn, host, req.vm_name)
        except StateError as exc:
            raise Conflict(f"server {server.id}: {exc}") from None
        resolved = await resolve(host, [d.path for d in plan])
        for disk in plan:
            user = elsewhere.get(resolved[disk.path])
            if user is not None:
                raise Conflict(
                    f"disk {disk.target}: {disk.path} on server {server.id} is used by vm "
                    f"{user}; a restore never writes over another VM's disk or state"
                )
        await _check_state_places(server, conn, host, req, uuid, elsewhere, renamed, exists)
    return plan


async def _check_state_places(
    server: HostServer,
    conn: Connection,
    host: Host,
    req: RestorePrecheckRequest,
    uuid: str,
    elsewhere: dict[str, str],
    renamed: bool,
    exists: bool,
) -> None:
    """The places where the restored domain keeps the state roles the point holds, checked
    as disk paths are (:func:`.state_files.check_places`): under a new name, only state
    of the domain being replaced may be there."""
    if not req.state_roles:
        return
    nvram = await state_files.nvram_dir(server, conn)
    xml = state_files.restored_xml(req.domain_xml, req.vm_name, req.job_id, uuid or None, nvram)
    places = [
        loc for loc in await state_files.locations(server, conn, xml) if loc.role in req.state_roles
    ]
    ours = await state_files.own_places(server, conn, req.vm_name) if renamed else None
    await state_files.check_places(server, host, places, req.vm_name, elsewhere, ours)


def _placed(disk: RestoreDisk, path: str, fmt: str, kind: DiskKind) -> RestoreDisk:
    return RestoreDisk(target=disk.target, path=path, size=disk.size, format=fmt, kind=kind)


async def _target_directory(
    server: HostServer, conn: Connection, host: Host, req: RestorePrecheckRequest
) -> str | None:
    """The directory every disk goes into (``None``: each to its own place)."""
    if req.storage_pool and req.target_directory:
        raise BadRequest("give targetDirectory or storagePool, not both")
    if req.storage_pool:
        try:
            pool = await get_pool(conn, req.storage_pool)
        except VirtNotFound:
            raise BadRequest(
                f"storagePool {req.storage_pool!r}: server {server.id} has no storage pool "
                "of that name"
            ) from None
        if not pool.holds_files:
            kinds = ", ".join(sorted(DIRECTORY_POOL_TYPES))
            raise BadRequest(
                f"storagePool {req.storage_pool!r} is a {pool.type!r} pool; restores write "
                f"into pools whose volumes are files ({kinds})"
            )
        if not pool.active:
            raise BadRequest(f"storagePool {req.storage_pool!r} is not active: start it first")
        return posixpath.normpath(pool.path)
    if not req.target_directory:
        return None
    wanted = req.target_directory
    if not wanted.startswith("/") or ".." in wanted.split("/"):
        raise BadRequest(f"targetDirectory {wanted!r} must be an absolute path without '..'")
    wanted = posixpath.normpath(wanted)
    allowed = await _allowed_directories(server, conn)
    resolved = await _realpaths(host, [wanted, *allowed])
    if not any(_inside(resolved[0], a) for a in resolved[1:]):
        raise BadRequest(
            f"targetDirectory {wanted!r} is outside the directories restores may write to on "
            f"server {server.id} ({', '.join(allowed)}); add it to the server's "
            "restoreDirectories"
        )
    kind = await _file_type(host, wanted)
    if kind not in ("absent", "directory"):
        raise BadRequest(f"targetDirectory {wanted!r} is a {kind}, not a directory")
    if req.directory_must_exist:
        if kind == "absent":
            raise BadRequest(
                f"targetDirectory {wanted!r} does not exist on server {server.id}: make it "
                "first (a migration creates nothing on the target before it starts)"
            )
        if (await host.run(["test", "-w", wanted], timeout=30)).returncode != 0:
            raise BadRequest(
                f"targetDirectory {wanted!r} is not writable on server {server.id} by the "
                "user the server is reached as"
            )
    return wanted


async def _check_own_directories(server: HostServer, host: Host, plan: list[RestoreDisk]) -> None:
    """``BadRequest`` unless the directory of each file disk of ``plan`` (no target
    directory given: the source's paths) exists and is writable on the server, as a given
    ``targetDirectory`` must be for a migration (nothing is made before it starts)."""
    for folder in sorted({posixpath.dirname(d.path) for d in plan if d.kind == "file"}):
        where = (
            f"targetDirectory: not given, so the disks go to {folder!r} on server "
            f"{server.id} (their path on the source)"
        )
        kind = await _file_type(host, folder)
        if kind != "directory":
            state = "does not exist" if kind == "absent" else f"is a {kind}"
            raise BadRequest(f"{where}, which {state} there: give targetDirectory")
        if (await host.run(["test", "-w", folder], timeout=30)).returncode != 0:
            raise BadRequest(
                f"{where}, which the user the server is reached as cannot write: give "
                "targetDirectory"
            )


async def _check_media(
    server: HostServer, host: Host, domain_xml: str, plan: list[RestoreDisk]
) -> None:
    """``BadRequest`` naming a disk of ``domain_xml`` that is not copied (a CD-ROM or
    floppy medium, a read-only disk: the domain keeps its path) whose file the server's
    user cannot read there: the domain would be defined on the server and fail to start,
    found only once the source was stopped (a migration)."""
    copied = {d.target for d in plan}
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML of the source VM
    for disk in root.findall("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        dev = target.get("dev", "") if target is not None else ""
        if dev in copied or source is None or disk.get("type", "file") not in ("file", "block"):
            continue
        path = source.get("file") or source.get("dev")
        if not path or (await host.run(["test", "-r", path], timeout=30)).returncode == 0:
            continue
        what = disk.get("device", "disk")
        raise BadRequest(
            f"disk {dev}: the {what} {path!r} (not copied: the vm keeps its path) cannot be "
            f"read on server {server.id} by the user it is reached as, so the vm could not "
            "start there: eject the medium on the source (POST /vms/remove-cdrom) or make "
            "the file available there first"
        )


async def _allowed_directories(server: HostServer, conn: Connection) -> list[str]:
    """The server's ``restoreDirectories``, or its file pools plus libvirt's default (for a
    session server, the one below its user's home)."""
    if server.is_session:
        home = (await server.session_daemon()).home
        default = posixpath.join(home, SESSION_IMAGES_DIR)
        return await allowed_directories(conn, server.config.restore_directories, default)
    return await allowed_directories(conn, server.config.restore_directories)


async def _device_size(host: Host, path: str) -> int:
    result = await host.run(["blockdev", "--getsize64", path], timeout=30)
    try:
        return int(result.stdout.strip()) if result.returncode == 0 else -1
    except ValueError:
        return -1


async def _check_writable(
    server: HostServer, host: Host, disk: RestoreDisk, vm_name: str, ours: set[str] | None
) -> None:
    """Conflict unless ``disk`` can be written at its path. ``ours``: the only existing
    files it may replace (``None``: any file)."""
    kind = await _file_type(host, disk.path)
    where = f"disk {disk.target}: {disk.path} on server {server.id}"
    if disk.kind == "block":
        if kind != "block":
            state = "does not exist" if kind == "absent" else f"is a {kind}"
            raise Conflict(f"{where} {state}; the saved XML declares a block device there")
        size = await _device_size(host, disk.path)
        if size < disk.size:
            raise Conflict(f"{where} holds {size} bytes; the disk needs {disk.size}")
        return
    if kind == "absent":
        return
    if kind != "file":
        raise Conflict(f"{where} is a {kind}; a restore never replaces it with a file")
    if ours is not None and disk.path not in ours:
        raise Conflict(
            f"{where} exists and is not a disk of {vm_name}; remove it, or restore under "
            "another vmName or into another targetDirectory"
        )


# -- writing ---------------------------------------------------------------------------


async def prepare(
    server: HostServer,
    req: RestorePrepareRequest,
    creds: ExportCredentials,
    installation: str = "",
) -> RestorePrepared:
    """Create each file disk's temporary image, open each block disk in place, and
    export each (``nbds://``, see the module docstring). Raises BadRequest (a path that
    is not absolute), Conflict (an image or export that cannot be made, a device that is
    missing or too small, or a server that cannot require client certificates); nothing
    is left behind on failure.

    Each export's private directory (``/tmp/vbrestore.XXXXXXXX``, 0700) holds an
    ``owner`` file naming ``installation``, the server, the job and the temporary image,
    written before the image is made: an inventory that connects to the server stops
    the exports of jobs that are no longer active and removes their images
    (:mod:`.restore_leftovers`), should the job's end never have come."""
    host = await server.host()
    tls_dir = await creds.install(server)
    if server.is_session:
        # The session user's images: directories it makes are its own alone (0700).
        parents = sorted({posixpath.dirname(d.path) for d in req.disks if d.kind == "file"})
        if parents:
            await _run_or_conflict(
                host,
                ["sh", "-c", 'umask 077 && mkdir -p -- "$@"', "mkdir", *parents],
                "cannot make the directories of the restored images",
            )
    targets: list[RestoreTarget] = []
    try:
        for disk in req.disks:
            _check_path(disk)
            targets.append(await _export(server, host, req.job_id, disk, tls_dir, installation))
    except BaseException:
        await _teardown(host, req.job_id, targets, remove=True)
        raise
    return RestorePrepared(disks=targets)


async def _export(
    server: HostServer, host: Host, job_id: str, disk: RestoreDisk, tls_dir: str, installation: str
) -> RestoreTarget:
    if disk.kind == "block":
        await _check_writable(server, host, disk, "", None)
        image, fresh = disk.path, False
    else:
        image, fresh = temp_path(disk.path, job_id), True
    # Every export has a private directory: its pid file, its owner file (who to ask
    # whether it is still wanted) and, on a local server, its socket (see the module
    # docstring); a block device has nothing beside it to hold them anyway.
    owner = ExportOwner(
        installation=installation, server_id=server.id, job_id=job_id,
        image=image if disk.kind == "file" else "",
    )  # fmt: skip
    pid = await _private_dir(host, disk, owner) + "/" + EXPORT_PID
    target = RestoreTarget(
        target=disk.target, path=disk.path, temp_path=image, nbd_url="",
        format=disk.format, kind=disk.kind, fresh=fresh, pid_file=pid,
    )  # fmt: skip
    try:
        if disk.kind == "file":
            try:
                await create_image(host, disk.path, disk.format, disk.size, image)
            except StateError as exc:
                raise Conflict(str(exc)) from None
        elif disk.format != "raw":
            # A new image on the device: it reads as zeros, like a new file.
            argv = ["qemu-img", "create", "-q", "-f", disk.format, image, str(disk.size)]
            await _run_or_conflict(host, argv, f"cannot format {image}")
            target = msgspec.structs.replace(target, fresh=True)
        url = await _serve(server, host, disk, image, pid, tls_dir)
    except BaseException:
        await _remove_temp(host, target)
        await _drop_pid_dir(host, target)
        raise
    return msgspec.structs.replace(target, nbd_url=url)


class ExportOwner(msgspec.Struct, rename="camel", omit_defaults=True):
    """An export directory's ``owner`` file: who made it, for which job, and the
    temporary image it serves (empty for a block device written in place)."""

    installation: str
    server_id: str = ""
    job_id: str = ""
    image: str = ""


#: Makes a new directory only the login user can enter (``mktemp -d``: mode 0700) with
#: the owner file ``$1`` in it (0600), and prints its path; nothing is left on failure.
_MAKE_PRIVATE_DIR = (
    'd=$(mktemp -d "$2") || exit 1; umask 077; '
    'printf %s "$1" > "$d/owner" || { rm -rf -- "$d"; exit 1; }; printf %s "$d"'
)


async def _private_dir(host: Host, disk: RestoreDisk, owner: ExportOwner) -> str:
    """A new private directory (:data:`EXPORT_DIR_TEMPLATE`) holding ``owner``."""
    made = await host.run(
        ["sh", "-c", _MAKE_PRIVATE_DIR, "private-dir", msgspec.json.encode(owner).decode(),
         EXPORT_DIR_TEMPLATE],
        timeout=30,
    )  # fmt: skip
    if made.returncode != 0:
        raise Conflict(f"cannot make a directory for the export of {disk.path}: {made.stderr}")
    return made.stdout.strip()


async def _run_or_conflict(host: Host, argv: list[str], what: str) -> None:
    result = await host.run(argv, timeout=60)
    if result.returncode != 0:
        raise Conflict(f"{what}: {result.stderr.strip()}")


async def _serve(
    server: HostServer, host: Host, disk: RestoreDisk, image: str, pid: str, tls_dir: str
) -> str:
    """Start ``qemu-nbd`` on ``image`` and return the export's URL: a Unix socket beside
    ``pid`` for a local server, else TCP with TLS (see the module docstring)."""
    last = ""
    for attempt in range(5):
        if server.is_local:
            socket = posixpath.join(posixpath.dirname(pid), EXPORT_SOCKET)
            listen = ["-k", socket]
            url = str(NbdUri(export=disk.target, socket=socket))
        else:
            port = random.choice(REMOTE_NBD_PORTS)  # noqa: S311
            listen = [
                "-b", server.nbd_host, "-p", str(port),
                "--object",
                f"tls-creds-x509,id=vbtls,dir={tls_dir.replace(',', ',,')},"
                "endpoint=server,verify-peer=on",
                "--tls-creds", "vbtls",
            ]  # fmt: skip
            url = str(NbdUri(export=disk.target, host=server.nbd_host, port=port, tls=True))
        # A failure most likely means the host refused this I/O mode (a busy port is
        # rare): the next attempt uses the next one; the last one works everywhere.
        io_mode = IO_MODES[min(attempt, len(IO_MODES) - 1)]
        started = await host.run(
            [
                "env", *EXPORT_MALLOC,
                "qemu-nbd", "--fork", "--persistent", "-e", str(EXPORT_CONNECTIONS),
                "-f", disk.format, *io_mode, "--discard=unmap", *listen, "-x", disk.target,
                "--pid-file", pid, image,
            ],
            timeout=60,
        )  # fmt: skip
        if started.returncode == 0:
            return url
        last = started.stderr.strip()
    raise Conflict(f"cannot export {image} over NBD: {last}")


async def _remove_temp(host: Host, target: RestoreTarget) -> None:
    """Remove a file disk's temporary image; never a device, never the final path."""
    if target.kind != "file" or target.temp_path in ("", target.path):
        return
    with contextlib.suppress(CommandFailed, VirtError, OSError):
        await host.run(["rm", "-f", "--", target.temp_path], timeout=30)


async def _drop_pid_dir(host: Host, target: RestoreTarget) -> None:
    """Remove an export's private directory (its pid file and socket, then itself)."""
    if target.pid_file:
        with contextlib.suppress(CommandFailed, VirtError, OSError):
            pid = target.pid_file
            private = posixpath.dirname(pid)
            files = [pid, *(posixpath.join(private, n) for n in (EXPORT_SOCKET, EXPORT_OWNER))]
            await host.run(["rm", "-f", "--", *files], timeout=30)
            await host.run(["rmdir", "--", private], timeout=30)


#: Stops the exports whose pid files are the arguments and waits until each process has
#: gone: no process, or a zombie with no thread left. A zombie counts (it has closed the
#: image and released its locks; when its parent is an init that reaps late, ``kill -0``
#: would keep seeing it: 1.2 s per restore on the benchmark machine), but only once its
#: last thread has gone too: the main thread of a qemu-nbd turns zombie while a thread of
#: its pool can still be in an ``fdatasync`` of the image, holding the file and its lock
#: (a VM started then failed with "Failed to get write lock" on a loaded CI machine). A
#: process still there after ``STOP_TERM_SECONDS`` gets SIGKILL (its writes were flushed
#: by the workers' NBD flush before the job finished), and the pids still there after
#: ``STOP_KILL_SECONDS`` more are printed and the script exits 1. A pid whose process is
#: not a qemu-nbd (reused after the export died) is left alone.
_STOP_EXPORTS = r"""
pids=""
for f in "$@"; do
  test -f "$f" || continue
  p=$(cat "$f")
  case "$p" in ''|*[!0-9]*) continue;; esac
  # A zombie main thread has no command line left: its threads' have it.
  if cat "/proc/$p/cmdline" "/proc/$p/task"/*/cmdline 2>/dev/null | grep -qa qemu-nbd; then
    kill "$p" && pids="$pids $p"
  fi
done
alive() {
  left=""
  for p in $pids; do
    s=$(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null) || continue
    [ -n "$s" ] || continue
    if [ "$s" = Z ]; then
      set -- "/proc/$p/task"/*
      [ "$#" -le 1 ] && continue
    fi
    left="$left $p"
  done
  pids=$left
}
wait_gone() {
  i=0
  while [ "$i" -lt "$1" ]; do
    alive
    [ -z "$pids" ] && return 0
    sleep 0.05
    i=$((i + 1))
  done
  alive
  [ -z "$pids" ]
}
wait_gone $((STOP_TERM_SECONDS * 20)) && exit 0
for p in $pids; do kill -9 "$p" 2>/dev/null; done
wait_gone $((STOP_KILL_SECONDS * 20)) && exit 0
echo "still running:$pids"
exit 1
"""

#: Seconds an export has to exit on SIGTERM (it flushes the image), then after SIGKILL.
STOP_TERM_SECONDS = 40
STOP_KILL_SECONDS = 15


class ExportsDidNotStop(Conflict):
    """A ``qemu-nbd`` export survived SIGTERM and SIGKILL (a process stuck in the kernel,
    say): its image may still be locked."""


async def stop_exports(host: Host, pid_files: Sequence[str]) -> None:
    """Stop the ``qemu-nbd`` exports whose pid files are ``pid_files`` (see
    ``_STOP_EXPORTS``) and return once none of them holds its image any more.

    Raises :class:`ExportsDidNotStop` naming the pids still running after
    ``STOP_TERM_SECONDS + STOP_KILL_SECONDS``; ``CommandFailed``/``VirtError``/``OSError``
    when the host cannot run the script."""
    if not pid_files:
        return
    env = f"STOP_TERM_SECONDS={STOP_TERM_SECONDS} STOP_KILL_SECONDS={STOP_KILL_SECONDS}"
    result = await host.run(
        ["sh", "-c", f"{env}\n{_STOP_EXPORTS}", "stop-exports", *pid_files],
        timeout=STOP_TERM_SECONDS + STOP_KILL_SECONDS + 30,
    )
    if result.returncode != 0:
        raise ExportsDidNotStop(
            f"the NBD exports {' '.join(pid_files)} did not stop: "
            f"{(result.stdout + result.stderr).strip()}"
        )


async def _teardown(host: Host, job_id: str, targets: list[RestoreTarget], *, remove: bool) -> None:
    """Stop the exports (all at once) and wait until their processes have gone, so that
    the images are free for QEMU; with ``remove``, remove the temporary images."""
    exported = [t for t in targets if t.nbd_url]
    if exported:
        pids = [t.pid_file or pid_file(t.path, job_id) for t in exported]
        try:
            await stop_exports(host, pids)
        except (CommandFailed, VirtError, OSError):
            pass
        except ExportsDidNotStop:
            if not remove:
                raise  # a committed image still held would keep its VM from starting
        with contextlib.suppress(CommandFailed, VirtError, OSError):
            await host.run(["rm", "-f", "--", *pids], timeout=30)
    if remove:
        # Before the directories: their owner files name the images, should this stop
        # half way (an inventory that connects later removes what they name).
        for target in targets:
            await _remove_temp(host, target)
    for target in exported:
        await _drop_pid_dir(host, target)


async def finish(server: HostServer, req: RestoreFinishRequest) -> list[str]:
    """Stop the exports; on success move the images into place and define the domain
    (the saved XML rewritten for ``vm_name`` and where the disks are, see
    :mod:`virtbackup.virt.rewrite`), then refresh the storage pools holding them.
    Returns the temporary images a failed restore's removal left (their directory
    could not be written, say): empty on success.

    Idempotent: an image already moved into place (its temporary file gone, its final
    path present) is left as it is, so a commit cut short can simply be repeated."""
    host = await server.host()
    # The exports stop and failed images go first, whatever the libvirt connection does.
    await _teardown(host, req.job_id, req.disks, remove=not req.success)
    kept = [] if req.success else await _left_behind(host, req.disks)
    conn = await server.connection()
    if not req.success:
        left = await state_files.staged_for(server, req.job_id, "", req.state)
        await state_files.discard(host, left, req.job_id)
        await ownership.release_restore_hold(conn, req.vm_name, req.job_id)
        return kept
    placements = [DiskPlacement(t.target, t.path, t.kind, t.format) for t in req.disks]
    uuid = await state_files.target_uuid(conn, req.vm_name, req.uuid)
    final = (
        restored_domain(
            req.domain_xml,
            name=req.vm_name,
            job_id=req.job_id,
            disks=placements,
            uuid=uuid,
            nvram_dir=await state_files.nvram_dir(server, conn),
        )
        if req.domain_xml
        else ""
    )
    state = await state_files.staged_for(server, req.job_id, final, req.state)
    if req.disks and all(not t.temp_path for t in req.disks):
        # Only defining (no disk written): state found on the host is never replaced.
        state = [msgspec.structs.replace(s, replace=False) for s in state]
    with contextlib.suppress(VirtNotFound):
        dom = await get_domain(conn, req.vm_name)
        if dom.power_state != PowerState.SHUTOFF:
            for target in req.disks:
                await _remove_temp(host, target)
            await state_files.discard(host, state, req.job_id)
            raise Conflict(f"vm {req.vm_name} was started during the restore; nothing replaced")
    for target in req.disks:
        await _move_into_place(host, target, req.job_id)
    await state_files.commit(host, req.job_id, state)
    if req.domain_xml:
        await define(server, req.vm_name, final)
    directories = {posixpath.dirname(t.path) for t in req.disks if t.kind == "file"}
    with contextlib.suppress(VirtError):
        await refresh_pools_holding(conn, directories)
    return []


async def _left_behind(host: Host, targets: list[RestoreTarget]) -> list[str]:
    """The temporary images of ``targets`` that are still there after their removal."""
    left = []
    for t in targets:
        if t.kind == "file" and t.temp_path not in ("", t.path):
            with contextlib.suppress(CommandFailed, VirtError, OSError):
                if (await host.run(["test", "-e", t.temp_path], timeout=30)).returncode == 0:
                    left.append(t.temp_path)
    return left


def retired_path(path: str, job_id: str) -> str:
    """Where the image a restore replaces is kept while it is moved aside."""
    return f"{temp_path(path, job_id)}.old"


#: Removes the file ``$1`` in the background, detached from the caller (and from an SSH
#: session: it finishes after the inventory has moved on, or has stopped).
_REMOVE_DETACHED = 'nohup rm -f -- "$1" </dev/null >/dev/null 2>&1 &'


async def _move_into_place(host: Host, target: RestoreTarget, job_id: str) -> None:
    """Rename the restored image over the disk's path. The image it replaces gets a
    second name first (a hard link), so the rename does not free its blocks on the way
    (on ext4, 0.4-0.6 s for the benchmark VM's image: as long as the rest of the
    commit); it is removed right after, in the background. Where no hard link can be
    made, the rename frees them itself."""
    if target.kind != "file" or target.temp_path in ("", target.path):
        return  # a device written in place, or a disk used as it is
    retired = retired_path(target.path, job_id)
    present = await host.run(["test", "-e", target.temp_path], timeout=30)
    if present.returncode != 0:
        # Already moved by an earlier finish of this job that was cut short (its
        # orchestrator died while committing): finishing again is idempotent.
        there = await host.run(["test", "-e", target.path], timeout=30)
        if there.returncode == 0:
            await host.run(["sh", "-c", _REMOVE_DETACHED, "retire", retired], timeout=30)
            return
    kind = await _file_type(host, target.path)
    if kind not in ("absent", "file"):
        await _remove_temp(host, target)
        raise Conflict(f"{target.path} is a {kind}; a restore never replaces it with a file")
    kept = False
    if kind == "file":
        # The restored image takes the owner and mode of the one it replaces.
        for tool in ("chown", "chmod"):
            with contextlib.suppress(CommandFailed, VirtError, OSError):
                await host.run([tool, f"--reference={target.path}", target.temp_path])
        linked = await host.run(["ln", "-f", "--", target.path, retired], timeout=30)
        kept = linked.returncode == 0
    moved = await host.run(["mv", "-f", "--", target.temp_path, target.path], timeout=60)
    if kept:
        # The old image's blocks are freed by this removal, off the commit's path.
        await host.run(["sh", "-c", _REMOVE_DETACHED, "retire", retired], timeout=30)
    if moved.returncode != 0:
        raise Conflict(f"cannot move {target.temp_path} to {target.path}: {moved.stderr}")


async def define(server: HostServer, vm_name: str, domain_xml: str) -> None:
    """Define the domain from ``domain_xml`` (which must name ``vm_name``), replacing a
    shut-off one of that name (its checkpoints go with it: they describe disks that
    were just replaced; its NVRAM and TPM state stay: a restore has just put them back,
    or has none to put back)."""
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
