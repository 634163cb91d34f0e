"""One leased restore, run on the agent's own host: what the inventory and the transfer
workers do for a restore onto a server the bus reaches, without NATS.

1. ``reading``: read the point (its record, sealed domain XML and manifests) and plan
   where each disk goes with the inventory's rules (:func:`plan`, using
   ``virt.placement``): a new ``vmName`` renames the disk files after it, a
   ``targetDirectory`` (inside the server's ``restoreDirectories``, symbolic links
   resolved) or ``storagePool`` (a started directory pool) holds every disk; a running
   VM is never overwritten, an existing VM is replaced only by ``overwrite``, nothing is
   ever written over another VM's disks or state files (NVRAM, TPM), and a disk that
   goes somewhere new replaces only a file of the VM it replaces.
2. ``writing``: each disk is created beside its final path as
   ``<path>.vbrestore-<job>`` (thin: ``qemu-img create`` of the point's format, 0600,
   root's: libvirt's dynamic ownership gives QEMU access when the domain starts), served
   by a ``qemu-nbd`` on a Unix socket in a private 0700 directory, and every stored chunk
   of its manifest is read (verified against its id by the repository) and written at
   its offset; zero chunks are left unwritten. The point's state files are built beside
   where the restored domain keeps them (owners and modes clamped,
   ``virt.placement.clamp``).
3. ``committing``: only when the gateway answers ``commit`` are the images moved over
   the final paths, the state moved into place and the domain defined (the saved XML
   with the new disk paths; a copy under a new name gets a new UUID and MAC addresses,
   as on the bus path: ``virt.rewrite.restored_domain``), then started if asked.

A cancel (or any failure) before the commit removes everything the restore created and
changes nothing else. ``define`` writes no disk: it defines the domain over disks that
are in place (block devices included), putting back only state that is missing. An
agent writes a block device's data only into a ``targetDirectory`` or ``storagePool``
(as an image file), never into the device in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

# The same pipeline depth, report interval and NBD timeout as a backup: chunks read and
# written at once (CHUNKS_IN_FLIGHT).
from virtbackup.cli.agent.backup import (
    CHUNKS_IN_FLIGHT,
    NBD_TIMEOUT,
    REPORT_EVERY,
    Cancelled,
    Report,
    debug_hold,
    send,
)
from virtbackup.cli.agent.inflight import InFlight
from virtbackup.contracts.v1.config import Destination
from virtbackup.nbd import NbdClient, NbdUri
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.records import DiskManifest, RestorePoint, StateFileRecord
from virtbackup.repository.repository import Repository
from virtbackup.virt import get_domain, open_connection, parse_disks
from virtbackup.virt.beside import beside
from virtbackup.virt.connection import Connection
from virtbackup.virt.domains import (
    DomainAction,
    PowerState,
    define_domain,
    domain_xml,
    perform_action,
    undefine_domain,
)
from virtbackup.virt.errors import CommandFailed, VirtError
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.host import Host, LocalHost
from virtbackup.virt.images import image_info
from virtbackup.virt.placement import (
    allowed_directories,
    clamp,
    create_image,
    disk_paths,
    entry_kind,
    file_type,
    host_account,
    inside,
    realpaths,
    resolve,
    used_elsewhere,
)
from virtbackup.virt.pools import DIRECTORY_POOL_TYPES, get_pool, refresh_pools_holding
from virtbackup.virt.rewrite import (
    DiskPlacement,
    device_file,
    domain_name,
    renamed_file,
    restored_domain,
)
from virtbackup.virt.state import (
    StateEntry,
    StateError,
    StateLocation,
    connection_kind,
    home_directory,
    locate_state,
    stage,
)
from virtbackup.virt.state import commit as commit_state
from virtbackup.virt.state import discard as discard_state

log = logging.getLogger(__name__)


class Refused(Exception):
    """The restore cannot be done on this host as asked (the reason names it); nothing
    was changed."""


@dataclass(frozen=True, slots=True)
class PlannedDisk:
    """Where disk ``target`` goes: a file, or (only to define over it) a block device."""

    target: str
    path: str
    format: str
    size: int
    kind: Literal["file", "block"] = "file"


@dataclass
class Plan:
    """Where each disk goes, and what the host holds of the VM being restored."""

    disks: list[PlannedDisk]
    exists: bool
    running: bool
    uuid: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Counters:
    bytes_read: int = 0
    bytes_written: int = 0
    total_bytes: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    last_report: float = field(default_factory=time.monotonic)

    def fields(self) -> dict[str, int]:
        return {
            "bytesRead": self.bytes_read,
            "bytesWritten": self.bytes_written,
            "totalBytes": self.total_bytes,
            "chunksDone": self.chunks_done,
            "chunksTotal": self.chunks_total,
        }


def temp_path(path: str, job_id: str) -> str:
    """Where restore ``job_id`` builds what goes to ``path`` (as the inventory names it)."""
    return beside(path, f".vbrestore-{job_id}", reserve=len(".pid"))


# -- planning --------------------------------------------------------------------------


async def _directory(
    conn: Connection, host: Host, params: dict[str, Any], restore_dirs: list[str] | None
) -> str | None:
    """The directory every disk goes into (``None``: each to its own place)."""
    pool_name, wanted = params.get("storagePool") or "", params.get("targetDirectory") or ""
    if pool_name and wanted:
        raise Refused("give targetDirectory or storagePool, not both")
    if pool_name:
        try:
            pool = await get_pool(conn, pool_name)
        except VirtNotFound:
            raise Refused(f"storagePool {pool_name!r}: this host has no such pool") from None
        if not pool.holds_files:
            kinds = ", ".join(sorted(DIRECTORY_POOL_TYPES))
            raise Refused(f"storagePool {pool_name!r} is a {pool.type!r} pool, not one of {kinds}")
        if not pool.active:
            raise Refused(f"storagePool {pool_name!r} is not active: start it first")
        return posixpath.normpath(pool.path)
    if not wanted:
        return None
    if not wanted.startswith("/") or ".." in wanted.split("/"):
        raise Refused(f"targetDirectory {wanted!r} must be an absolute path without '..'")
    wanted = posixpath.normpath(wanted)
    allowed = await allowed_directories(conn, restore_dirs)
    resolved = await realpaths(host, [wanted, *allowed])
    if not any(inside(resolved[0], a) for a in resolved[1:]):
        raise Refused(
            f"targetDirectory {wanted!r} is outside the directories restores may write to on "
            f"this host ({', '.join(allowed)}); add it to the server's restoreDirectories"
        )
    kind = await file_type(host, wanted)
    if kind not in ("absent", "directory"):
        raise Refused(f"targetDirectory {wanted!r} is a {kind}, not a directory")
    return wanted


async def plan(
    conn: Connection,
    host: Host,
    point: RestorePoint,
    xml: str,
    manifests: list[DiskManifest],
    params: dict[str, Any],
    restore_dirs: list[str] | None,
    job_id: str,
) -> Plan:
    """Where each disk of ``point`` goes and whether the restore may be done (see the
    module docstring); raises ``Refused`` naming why not. Changes nothing."""
    name = str(params.get("vmName") or point.vm_name)
    decision = str(params.get("decision") or "overwrite")
    try:
        dom = await get_domain(conn, name)
        exists, running, uuid = True, dom.power_state != PowerState.SHUTOFF, dom.uuid
    except VirtNotFound:
        exists, running, uuid = False, False, ""
    if params.get("vmName") and exists and decision != "overwrite":
        raise Refused(
            f"vm {name} already exists on this host: restore with decision overwrite to "
            "replace it (it must be shut off), or choose another vmName"
        )
    if decision == "overwrite" and running:
        raise Refused(f"vm {name} is running: shut it off before overwriting it")
    saved = {d.target: d for d in parse_disks(xml)}
    old_name = domain_name(xml)
    renamed = name != old_name
    directory = await _directory(conn, host, params, restore_dirs)
    by_target = {m.target: m for m in manifests}
    disks: list[PlannedDisk] = []
    for record in point.disks:
        declared = saved.get(record.target)
        manifest = by_target[record.target]
        if declared is None or declared.source != record.path:
            raise Refused(
                f"disk {record.target}: the restore point's record says {record.path}, its "
                "saved domain XML does not: the point is inconsistent; nothing restored"
            )
        if declared.type == "block":
            if directory is None and decision == "define":  # used as it is
                disks.append(
                    PlannedDisk(record.target, record.path, declared.format, manifest.size, "block")
                )
                continue
            if directory is None:
                raise Refused(
                    f"disk {record.target} is the block device {record.path}: a remote agent "
                    "restores it only as an image file (give targetDirectory or storagePool)"
                )
            base = device_file(name, record.target, declared.format)
        else:
            base = renamed_file(posixpath.basename(record.path), old_name, name)
        path = posixpath.join(directory or posixpath.dirname(record.path), base)
        if not path.startswith("/") or "/../" in path:
            raise Refused(f"disk {record.target}: {path!r} is not an absolute path")
        disks.append(PlannedDisk(record.target, path, declared.format, manifest.size))
    seen: dict[str, str] = {}
    for disk in disks:
        if disk.path in seen:
            raise Refused(f"disks {seen[disk.path]} and {disk.target} would both go to {disk.path}")
        seen[disk.path] = disk.target
    result = Plan(disks=disks, exists=exists, running=running, uuid=uuid)
    if decision == "define":
        for disk in disks:
            try:
                info = await image_info(host, disk.path)
            except (CommandFailed, VirtError):
                result.problems.append(f"{disk.target}: {disk.path} does not exist")
                continue
            # A device may be larger than the disk it holds.
            larger = disk.kind == "block" and info.virtual_size >= disk.size
            if info.virtual_size != disk.size and not larger:
                result.problems.append(
                    f"{disk.target}: {disk.path} is {info.virtual_size} bytes, expected {disk.size}"
                )
        if result.problems:
            raise Refused("cannot define only: " + "; ".join(result.problems))
        return result
    careful = renamed or directory is not None
    ours = await disk_paths(conn, name) if careful and exists else set()
    for disk in disks:
        kind = await file_type(host, disk.path)
        where = f"disk {disk.target}: {disk.path}"
        if kind not in ("absent", "file"):
            raise Refused(f"{where} is a {kind}; a restore never replaces it with a file")
        if kind == "file" and careful and disk.path not in ours:
            raise Refused(
                f"{where} exists and is not a disk of {name}; remove it, or restore under "
                "another vmName or into another targetDirectory"
            )
    elsewhere = await used_elsewhere(conn, host, name)
    resolved = await resolve(host, [d.path for d in disks])
    for disk in disks:
        user = elsewhere.get(resolved[disk.path])
        if user is not None:
            raise Refused(
                f"disk {disk.target}: {disk.path} is used by vm {user}; a restore never "
                "writes over another VM's disk or state"
            )
    await _check_state_places(conn, host, point, xml, name, job_id, uuid, elsewhere, renamed)
    return result


async def _locations(conn: Connection, host: Host, xml: str) -> list[StateLocation]:
    kind = connection_kind(str(await conn.call(conn.raw.getURI)))
    home = await home_directory(host) if kind == "session" else None
    try:
        return locate_state(xml, kind, home=home)
    except (ValueError, SyntaxError) as exc:
        raise Refused(f"domain XML: {exc}") from None


def _final_xml(xml: str, name: str, job_id: str, uuid: str, disks: list[PlannedDisk]) -> str:
    placements = [DiskPlacement(d.target, d.path, d.kind, d.format) for d in disks]
    return restored_domain(xml, name=name, job_id=job_id, disks=placements, uuid=uuid or None)


async def _check_state_places(
    conn: Connection,
    host: Host,
    point: RestorePoint,
    xml: str,
    name: str,
    job_id: str,
    uuid: str,
    elsewhere: dict[str, str],
    renamed: bool,
) -> None:
    roles = {f.role for f in point.files}
    if not roles:
        return
    final = restored_domain(xml, name=name, job_id=job_id, uuid=uuid or None)
    places = [loc for loc in await _locations(conn, host, final) if loc.role in roles]
    ours: set[str] | None = None
    if renamed:  # only state of the domain being replaced may be there
        try:
            current = await domain_xml(conn, name, inactive=True)
        except VirtNotFound:
            ours = set()
        else:
            ours = {loc.path for loc in await _locations(conn, host, current)}
    resolved = await resolve(host, [p.path for p in places])
    for place in places:
        kind = await entry_kind(host, place.path)
        where = f"{place.role} state {place.path}"
        if kind not in ("absent", place.kind):
            raise Refused(f"{where} is a {kind}; a restore never replaces a {kind}")
        user = elsewhere.get(resolved[place.path])
        if user is not None:
            raise Refused(
                f"{where} is used by vm {user}; a restore never writes over another VM's "
                "state (restore under another vmName, or change that VM)"
            )
        if ours is not None and kind != "absent" and place.path not in ours:
            raise Refused(f"{where} exists and is not state of {name}; remove it first")


# -- writing ---------------------------------------------------------------------------


@dataclass
class Created:
    """What this restore made so far (all removed unless it commits)."""

    images: list[str] = field(default_factory=list)
    staged: list[tuple[StateLocation, str, bool]] = field(default_factory=list)


async def _serve(
    disk: PlannedDisk, image: str, inflight: InFlight | None
) -> tuple[asyncio.subprocess.Process, str, str]:
    """A ``qemu-nbd`` writing ``image``, on a Unix socket in a new 0700 directory;
    returns the process, the directory and the export's URI."""
    private = await asyncio.to_thread(tempfile.mkdtemp, prefix="vbrestore.")
    socket = os.path.join(private, "nbd.sock")
    proc = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", "-e", str(CHUNKS_IN_FLIGHT + 1), "-f", disk.format,
        "--cache=writeback", "--discard=unmap", "-k", socket, "-x", disk.target, image,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    if inflight is not None:
        current = await inflight.read() or {}
        await inflight.record(
            pids=[*current.get("pids", []), proc.pid], dirs=[*current.get("dirs", []), private]
        )
    deadline = time.monotonic() + 15
    while not await asyncio.to_thread(os.path.exists, socket):
        if proc.returncode is not None or time.monotonic() > deadline:
            err = b""
            if proc.stderr is not None and proc.returncode is not None:
                err = await proc.stderr.read()
            await _stop(proc, private)
            raise RuntimeError(f"cannot serve {image} over NBD: {err.decode(errors='replace')}")
        await asyncio.sleep(0.05)
    return proc, private, str(NbdUri(export=disk.target, socket=socket))


async def _stop(proc: asyncio.subprocess.Process, private: str) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    await asyncio.to_thread(shutil.rmtree, private, True)


async def _write_disk(
    repo: Repository,
    manifest: DiskManifest,
    disk: PlannedDisk,
    image: str,
    counters: Counters,
    report: Report,
    inflight: InFlight | None,
) -> None:
    """Write every stored chunk of ``manifest`` into ``image`` at its offset."""
    proc, private, uri = await _serve(disk, image, inflight)
    try:
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for index, chunk_id in enumerate(manifest.chunks):
            if chunk_id is not None:
                queue.put_nowait((index, chunk_id))
        async with await NbdClient.connect_uri(uri, timeout=NBD_TIMEOUT) as nbd:

            async def worker() -> None:
                while not queue.empty():
                    index, chunk_id = queue.get_nowait()
                    offset = index * manifest.chunk_size
                    length = min(manifest.chunk_size, manifest.size - offset)
                    data = await repo.load_chunk(chunk_id)  # verified against its id
                    if len(data) != length:
                        raise RuntimeError(
                            f"disk {disk.target}: chunk {index} holds {len(data)} bytes, "
                            f"not {length}"
                        )
                    counters.bytes_read += length
                    await nbd.write(offset, data)
                    counters.bytes_written += length
                    counters.chunks_done += 1
                    if time.monotonic() - counters.last_report >= REPORT_EVERY:
                        counters.last_report = time.monotonic()
                        await send(report, {"status": "writing", **counters.fields()})

            await asyncio.gather(*(worker() for _ in range(CHUNKS_IN_FLIGHT)))
            await nbd.flush()
    finally:
        await _stop(proc, private)


async def _stage_state(
    conn: Connection,
    host: Host,
    repo: Repository,
    point: RestorePoint,
    final_xml: str,
    job_id: str,
    created: Created,
    inflight: InFlight | None,
    *,
    only_missing: bool,
) -> list[str]:
    """Build the point's state files beside where ``final_xml`` keeps them; the roles
    put back (in ``created.staged`` as soon as each exists)."""
    if not point.files:
        return []
    by_role = {loc.role: loc for loc in await _locations(conn, host, final_xml)}
    roles: dict[str, list[StateFileRecord]] = {}
    for record in point.files:
        roles.setdefault(record.role, []).append(record)
    account = await host_account(host)
    done = []
    for role, records in roles.items():
        location = by_role.get(role)
        if location is None:
            continue
        if only_missing and await entry_kind(host, location.path) != "absent":
            continue
        entries = [
            clamp(StateEntry(r.relative, r.kind, r.size, int(r.mode, 8), r.owner, r.group), account)
            for r in records
        ]
        temp = beside(location.path, f".vbrestore-{job_id}")
        created.staged.append((location, temp, not only_missing))
        if inflight is not None:
            await inflight.record(staged=[t for _, t, _ in created.staged])
        try:
            await stage(host, location, entries, temp)
        except ValueError as exc:
            raise Refused(f"{role} state: {exc}") from None
        for r in records:
            if r.kind != "file":
                continue
            data = await repo.load_bytes(r.chunks, r.size)
            target = posixpath.join(temp, r.relative) if r.relative else temp
            await asyncio.to_thread(_write_file, target, data)
        done.append(role)
    return done


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


async def _remove(host: Host, created: Created) -> None:
    """Remove what the restore created (it did not commit)."""
    if created.images:
        with contextlib.suppress(CommandFailed, VirtError, OSError):
            await host.run(["rm", "-f", "--", *created.images], timeout=30)
    for _, temp, _ in created.staged:
        with contextlib.suppress(CommandFailed, VirtError, OSError):
            await discard_state(host, temp)


async def _move_into_place(host: Host, temp: str, path: str) -> None:
    kind = await file_type(host, path)
    if kind not in ("absent", "file"):
        raise RuntimeError(f"{path} is a {kind}; a restore never replaces it with a file")
    if kind == "file":  # the restored image takes the owner and mode of the one it replaces
        for tool in ("chown", "chmod"):
            with contextlib.suppress(CommandFailed, VirtError, OSError):
                await host.run([tool, f"--reference={path}", temp], timeout=30)
    moved = await host.run(["mv", "-f", "--", temp, path], timeout=60)
    if moved.returncode != 0:
        raise RuntimeError(f"cannot move {temp} to {path}: {moved.stderr.strip()}")


async def _hold(where: str, report: Report, counters: Counters) -> None:
    deadline = time.monotonic() + debug_hold(where)
    while time.monotonic() < deadline:
        await send(report, {"status": "writing", **counters.fields()})
        await asyncio.sleep(0.5)


async def run_restore(
    job: dict[str, Any],
    destination: Destination,
    report: Report,
    *,
    inflight: InFlight | None = None,
) -> str:
    """Run the leased restore ``job`` (the lease's ``job``: ``params`` holds the
    restore's choices, ``restoreDirectories`` the server's) from ``destination``;
    returns the success message. Raises ``Cancelled`` when told to stop, ``Refused`` or
    anything else on failure; either way what it created is removed first."""
    params = dict(job.get("params") or {})
    job_id = str(job["id"])
    uri = str(job.get("libvirtUri") or "qemu:///system")
    restore_dirs = job.get("restoreDirectories")
    decision = str(params.get("decision") or "overwrite")
    host = LocalHost()
    repo = await open_repository(destination, create=False)
    conn = await open_connection(uri)
    created = Created()
    committed = False
    try:
        await send(report, {"status": "reading", "message": "reading the restore point"})
        point = await repo.restore_point(str(params["xmlPath"]))
        xml = await repo.domain_xml(point)
        manifests = [await repo.manifest(point, d.target) for d in point.disks]
        name = str(params.get("vmName") or point.vm_name)
        placed = await plan(conn, host, point, xml, manifests, params, restore_dirs, job_id)
        final = _final_xml(xml, name, job_id, placed.uuid, placed.disks)
        counters = Counters(
            total_bytes=sum(
                min(m.chunk_size, m.size - i * m.chunk_size)
                for m in manifests
                for i, c in enumerate(m.chunks)
                if c is not None
            ),
            chunks_total=sum(1 for m in manifests for c in m.chunks if c is not None),
        )
        if inflight is not None:
            await inflight.record(kind="restore", jobId=job_id, uri=uri, images=[], staged=[])
        temps: dict[str, str] = {}
        if decision != "define":
            lines = [f"disk {d.target}: {d.path}" for d in placed.disks]
            await send(
                report,
                {
                    "status": "writing",
                    "message": f"writing {counters.chunks_total} chunks",
                    **counters.fields(),
                    "output": [{"level": "info", "line": line} for line in lines],
                },
            )
            by_target = {m.target: m for m in manifests}
            for disk in placed.disks:
                temp = temp_path(disk.path, job_id)
                created.images.append(temp)
                if inflight is not None:
                    await inflight.record(images=list(created.images))
                try:
                    await create_image(host, disk.path, disk.format, disk.size, temp)
                except StateError as exc:
                    raise RuntimeError(str(exc)) from None
                temps[disk.target] = temp
            roles = await _stage_state(
                conn, host, repo, point, final, job_id, created, inflight, only_missing=False
            )
            for disk in placed.disks:
                await _write_disk(
                    repo, by_target[disk.target], disk, temps[disk.target], counters, report,
                    inflight,
                )  # fmt: skip
        else:
            roles = await _stage_state(
                conn, host, repo, point, final, job_id, created, inflight, only_missing=True
            )
        await _hold("restore:before:committing", report, counters)
        answer = await send(
            report,
            {"status": "committing", "message": "moving the restored disks into place",
             **counters.fields()},
        )  # fmt: skip
        if not answer.get("commit"):
            raise Cancelled("commit refused")
        with contextlib.suppress(VirtNotFound):
            if (await get_domain(conn, name)).power_state != PowerState.SHUTOFF:
                raise Refused(f"vm {name} was started during the restore; nothing replaced")
        for disk in placed.disks:
            if disk.target in temps:
                await _move_into_place(host, temps[disk.target], disk.path)
        created.images.clear()
        for location, temp, replace in created.staged:
            await commit_state(
                host, location, temp, f"{location.path}.vbold-{job_id}", replace=replace
            )
        created.staged.clear()
        if placed.exists:
            await undefine_domain(conn, name, keep_nvram=True, keep_tpm=True)
        await define_domain(conn, final)
        committed = True
        if inflight is not None:
            await inflight.record(committed=True)
        with contextlib.suppress(VirtError):
            await refresh_pools_holding(conn, {posixpath.dirname(d.path) for d in placed.disks})
        as_name = f" as {name}" if name != point.vm_name else ""
        how = "defined" if decision == "define" else "restored"
        message = f"{how} {point.vm_name}{as_name} from {point.timestamp} by agent: " + ", ".join(
            d.path for d in placed.disks
        )
        if roles:
            message += "; state put back: " + ", ".join(roles)
        if params.get("start"):
            try:
                await perform_action(conn, name, DomainAction.START)
            except VirtError as exc:
                raise RuntimeError(f"{message}; but {name} did not start: {exc}") from None
            message += f"; started {name}"
        return message
    except BaseException:
        if not committed:
            await _remove(host, created)
        raise
    finally:
        if inflight is not None:
            await inflight.clear()
        await conn.close()
        await repo.close()
