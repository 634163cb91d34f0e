"""The last delta of a shut-off VM read from its images' persistent bitmaps, without
starting QEMU (``BackupBeginRequest.offline_from_bitmaps``: a migration's cut-over).

A libvirt checkpoint is a persistent dirty bitmap of the checkpoint's name in each
qcow2 image; QEMU writes the bitmaps into the images when it stops. So once the VM is
shut off, the changes since checkpoint ``C`` are the bitmap ``C`` of each image, and
``qemu-nbd --read-only --bitmap=C`` exports the image with the meta context
``qemu:dirty-bitmap:C`` that the inventory's extent reads already know. Against the
offline backup of :mod:`.backups` (start the VM paused, begin a libvirt backup job,
read its maps, and stop QEMU again at the end) this saves QEMU's start and stop and the
backup job: 0.5-3.7 s of a migration's downtime (``bench/migrate.py``).

Used only when every disk the backup would read is a qcow2 file whose chain from ``C``
is usable (:func:`virtbackup.virt.check_chain`: the bitmap exists and is consistent);
otherwise (a raw disk, a volume, a bitmap QEMU could not store: a killed QEMU marks it
in use) :func:`begin` returns ``None`` and the caller takes the offline backup's path.
A ``qemu-nbd`` that cannot start or whose maps cannot be read also means ``None``,
after stopping what was started.

Who can read the exports: nobody but the workers, as for backup exports. The
``qemu-nbd`` processes run as the login user of the server (root on the system
daemon's hosts, the session user on a session host: the user who owns the images),
from a directory ``/tmp/vbdelta-<domain uuid>.<random>`` that ``mktemp -d`` makes
(0700, that user's) holding their pid files and, on a local server, their Unix
sockets (no TLS: only root may enter); on a remote server they listen on TCP with TLS
and require the client certificate of VirtBackup's CA (:mod:`.credentials`). The
read-only exports hold the images' shared locks, so the VM cannot be started while
they run. They are stopped, and the directory removed, by :func:`end`
(``BackupEndRequest.export_dir``), which the migration sends at every end (success,
failure, cancel; a migration whose orchestrator died is ended from its record). The
directory's ``owner`` file names the installation and the job: an inventory that
connects to the server stops the exports of its installation's jobs that are no longer
active (:func:`reconcile`, with the backup jobs nobody will end), should that end never
have come.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import random
import re

import msgspec
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.inventory import (
    BackupBeginRequest,
    BackupBegun,
    BackupEndRequest,
    DiskExport,
)
from virtbackup.contracts.v1.jobs import ACTIVE_STATES
from virtbackup.inventory import ownership
from virtbackup.inventory.backups import NBD_TIMEOUT, REMOTE_NBD_PORTS
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.extents import DiskMaps, fit, read_maps
from virtbackup.inventory.hosts import HostServer
from virtbackup.inventory.restores import EXPORT_MALLOC, IO_MODES, stop_exports
from virtbackup.nbd import NbdError, NbdUri
from virtbackup.runtime.errors import BadRequest
from virtbackup.virt import check_chain, get_domain
from virtbackup.virt.connection import Connection
from virtbackup.virt.disks import Disk, list_disks
from virtbackup.virt.domains import domain_xml
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host

log = logging.getLogger(__name__)

#: The directories :func:`begin` makes; :func:`end` stops and removes nothing else.
#: (In the server's /tmp, made by ``mktemp -d``: a new directory, 0700, the login user's.)
EXPORT_DIR = re.compile(r"/tmp/vbdelta-(?P<uuid>[0-9a-f-]{36})\.[A-Za-z0-9]{8}")  # noqa: S108
#: In an export directory: who made it (:class:`_Owner`, JSON).
OWNER_FILE = "owner"
#: Connections one export accepts (the workers read in parallel).
EXPORT_CONNECTIONS = 16


async def begin(
    server: HostServer,
    conn: Connection,
    host: Host,
    req: BackupBeginRequest,
    creds: ExportCredentials,
    installation: str,
) -> BackupBegun | None:
    """Export the disks of the shut-off VM ``req.vm_name`` from the bitmaps of checkpoint
    ``req.incremental_from`` (see the module docstring), or ``None`` when this path does
    not apply (the VM runs, a disk is not a qcow2 file, the chain is not usable, an
    export or its maps fail): the caller then reads the VM as before. The answer's
    ``checkpoint`` and ``parent_checkpoint`` are ``req.incremental_from`` (no checkpoint
    is made), ``export_dir`` names what :func:`end` stops. Raises what libvirt raises for
    an unknown VM (``VirtNotFound``)."""
    checkpoint = req.incremental_from
    if not req.offline_from_bitmaps or not checkpoint:
        return None
    dom = await get_domain(conn, req.vm_name)
    if dom.id is not None:
        return None
    disks = await list_disks(conn, req.vm_name, host=host)
    if not disks or any(d.format != "qcow2" or d.type != "file" or not d.source for d in disks):
        return None
    chain = await check_chain(conn, req.vm_name, checkpoint, host=host)
    if not chain.usable or chain.disk_problems:
        log.info(
            "vm %s: its last delta cannot be read from the bitmaps of %s (%s): started paused",
            req.vm_name, checkpoint, "; ".join([*chain.problems, *chain.disk_problems.values()]),
        )  # fmt: skip
        return None
    xml = await domain_xml(conn, req.vm_name, inactive=True, secure=True)
    template = f"/tmp/vbdelta-{dom.uuid}.XXXXXXXX"  # noqa: S108 - mktemp -d: a new 0700 dir
    made = await host.run(["mktemp", "-d", template], timeout=30)
    if made.returncode != 0:
        log.warning("vm %s: no directory for its bitmap exports: %s", req.vm_name, made.stderr)
        return None
    export_dir = made.stdout.strip()
    try:
        owner = msgspec.json.encode(_Owner(installation=installation, job_id=req.job_id or ""))
        wrote = await host.run(
            ["sh", "-c", 'umask 077 && printf %s "$1" > "$2"', "owner", owner.decode(),
             posixpath.join(export_dir, OWNER_FILE)],
            timeout=30,
        )  # fmt: skip
        wrote.check()
        tls_dir = "" if server.is_local else await creds.install(server)
        context = f"qemu:dirty-bitmap:{checkpoint}"
        read: list[tuple[Disk, str, DiskMaps]] = []
        for disk in disks:
            image = disk.source or ""
            url = await _serve(server, host, export_dir, disk.target, image, checkpoint, tls_dir)
            maps = await read_maps(
                url, context, timeout=NBD_TIMEOUT,
                tls=creds.client if NbdUri.parse(url).tls else None,
            )  # fmt: skip
            read.append((disk, url, maps))
        fit([m for _, _, maps in read for m in (maps.allocation, maps.dirty) if m is not None])
    except (NbdError, OSError, VirtError, _ServeError) as exc:
        log.warning(
            "vm %s: its last delta cannot be exported from the bitmaps of %s (%s): started "
            "paused instead", req.vm_name, checkpoint, exc,
        )  # fmt: skip
        await _stop(host, export_dir)
        return None
    except BaseException:
        await _stop(host, export_dir)
        raise
    return BackupBegun(
        server_id=server.id,
        vm_name=req.vm_name,
        checkpoint=checkpoint,
        parent_checkpoint=checkpoint,
        incremental=True,
        disks=[
            DiskExport(
                target=disk.target,
                path=disk.source or "",
                nbd_url=url,
                size=maps.size,
                format="qcow2",
                bitmap_context=context,
                allocation=maps.allocation.extents,
                dirty=maps.dirty.extents if maps.dirty is not None else None,
            )
            for disk, url, maps in read
        ],
        domain_xml=xml,
        export_dir=export_dir,
    )


class _Owner(msgspec.Struct, rename="camel"):
    installation: str
    job_id: str = ""


class _ServeError(Exception):
    """``qemu-nbd`` did not start (its message)."""


async def _serve(
    server: HostServer,
    host: Host,
    export_dir: str,
    target: str,
    image: str,
    bitmap: str,
    tls_dir: str,
) -> str:
    """Start a read-only ``qemu-nbd`` of ``image`` with ``bitmap``; its URL."""
    pid = posixpath.join(export_dir, f"{target}.pid")
    last = ""
    for attempt in range(5):
        if server.is_local:
            socket = posixpath.join(export_dir, f"{target}.sock")
            listen = ["-k", socket]
            url = str(NbdUri(export=target, socket=socket))
        else:
            port = random.choice(REMOTE_NBD_PORTS)  # noqa: S311
            listen = [
                "-b", server.nbd_host, "-p", str(port),
                "--object",
                f"tls-creds-x509,id=vbtls,dir={tls_dir.replace(',', ',,')},"
                "endpoint=server,verify-peer=on",
                "--tls-creds", "vbtls",
            ]  # fmt: skip
            url = str(NbdUri(export=target, host=server.nbd_host, port=port, tls=True))
        io_mode = IO_MODES[min(attempt, len(IO_MODES) - 1)]
        started = await host.run(
            [
                "env", *EXPORT_MALLOC,
                "qemu-nbd", "--fork", "--persistent", "--read-only", "-e", str(EXPORT_CONNECTIONS),
                "-f", "qcow2", *io_mode, f"--bitmap={bitmap}", *listen, "-x", target,
                "--pid-file", pid, image,
            ],
            timeout=60,
        )  # fmt: skip
        if started.returncode == 0:
            return url
        last = started.stderr.strip()
    raise _ServeError(f"cannot export {image} with bitmap {bitmap}: {last}")


async def end(server: HostServer, req: BackupEndRequest) -> None:
    """Stop the exports of ``req.export_dir`` (made by :func:`begin` for this VM) and
    remove the directory; the VM stays shut off and no checkpoint is dropped (none was
    made). Idempotent. Raises BadRequest for a directory :func:`begin` would not make
    for this VM (nothing is touched then)."""
    found = EXPORT_DIR.fullmatch(req.export_dir)
    if found is None:
        raise BadRequest(f"export_dir: {req.export_dir!r} is not a bitmap export's directory")
    conn = await server.connection()
    with contextlib.suppress(VirtError):
        dom = await get_domain(conn, req.vm_name)
        if dom.uuid != found["uuid"]:
            raise BadRequest(f"export_dir: {req.export_dir!r} is not vm {req.vm_name}'s")
    await _stop(await server.host(), req.export_dir)


async def _stop(host: Host, export_dir: str) -> None:
    """Stop the ``qemu-nbd`` processes whose pid files are in ``export_dir``, wait until
    they are gone (the images are then free), and remove the directory."""
    listed = await host.run(
        ["find", export_dir, "-maxdepth", "1", "-name", "*.pid", "-print0"], timeout=30
    )
    pids = [p for p in listed.stdout.split("\0") if p] if listed.returncode == 0 else []
    if pids:
        await stop_exports(host, pids)
    await host.run(["rm", "-rf", "--", export_dir], timeout=30)


#: Prints each export directory's path and its owner file, NUL-separated.
_LIST_DIRS = r"""
for d in /tmp/vbdelta-*; do
  [ -d "$d" ] || continue
  printf '%s\0' "$d"
  cat "$d/owner" 2>/dev/null
  printf '\0'
done
"""


async def reconcile(server: HostServer, jobs: KeyValue, installation: str) -> list[str]:
    """Stop the bitmap exports on ``server`` that nobody will stop: those whose owner
    file names this installation and a job that ``VB_JOBS`` does not list as queued or
    running (ended, or unknown). Others (another installation's, one being made without
    its owner file yet) are left alone. Returns what was done, one line per directory."""
    host = await server.host()
    listed = await host.run(["sh", "-c", _LIST_DIRS], timeout=30)
    fields = listed.stdout.split("\0") if listed.returncode == 0 else []
    done = []
    for path, raw in zip(fields[0::2], fields[1::2], strict=False):
        if EXPORT_DIR.fullmatch(path) is None or not raw:
            continue
        try:
            owner = msgspec.json.decode(raw, type=_Owner)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if owner.installation != installation:
            continue
        state = await ownership.job_state(jobs, owner.job_id) if owner.job_id else None
        if state in ACTIVE_STATES:
            continue
        await _stop(host, path)
        done.append(f"stopped the bitmap exports {path} of job {owner.job_id or 'unknown'}")
    return done
