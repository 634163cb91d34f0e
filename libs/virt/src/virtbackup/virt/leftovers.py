"""What an interrupted backup leaves on a domain (the agent API's ``hasOverlay``), and the
cleanup that removes it.

Detected (:func:`find_leftovers`):

* **backup job** - a libvirt backup job still running on the domain. It pins the scratch
  files and blocks new backups and block jobs. The inventory should not report the job
  of a backup it is running itself as a leftover.
* **scratch files** - ``vb-<uuid>-*.scratch`` files in the scratch directory
  (see :func:`virtbackup.virt.backup.scratch_path`).
* **stale checkpoints** - checkpoints whose bitmaps are missing or inconsistent: an
  incremental from them is impossible and libvirt can no longer delete them normally.
* **overlays** - disks whose active image is an external snapshot overlay left by a
  snapshot-based backup: the top image's file name matches one of ``overlay_patterns``
  (default ``*.overlay*``) and it has a backing file. A backing chain whose top does not
  match is taken as intended (e.g. a VM on a template image) and left alone.

:func:`cleanup_leftovers` then, in this order (each step is idempotent):

1. ends the backup job (``virDomainAbortJob``), which also releases the scratch files;
2. deletes stale checkpoints, children first, with ``metadata_only`` (the bitmaps are
   gone; bitmaps of the same checkpoint that survive on other disks stay in the image,
   harmless, since checkpoint names are never reused);
3. merges every overlay into its backing image and drops it from the chain: for a
   running domain an active block commit (``virDomainBlockCommit`` with ``ACTIVE |
   SHALLOW``), waits until it is ready, then pivots (``virDomainBlockJobAbort`` with
   ``PIVOT``); for a stopped one ``qemu-img commit`` on the host and a redefinition of
   the domain with the backing image as the disk source. libvirt snapshot metadata that
   points at the overlay is deleted (metadata only) and the overlay file removed;
4. removes the scratch files that remain, and the directories of backups' Unix sockets
   (``vb-<uuid>-*.nbd``, see :func:`virtbackup.virt.backup.make_socket_dir`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

from virtbackup.virt import _xml
from virtbackup.virt.backup import (
    JobInfo,
    end_backup,
    job_info,
    remove_socket_dirs,
    scratch_pattern,
)
from virtbackup.virt.checkpoints import bitmap_problems, delete_checkpoint, list_checkpoints
from virtbackup.virt.connection import Connection
from virtbackup.virt.disks import Disk, parse_disks
from virtbackup.virt.errors import CommandFailed, VirtError, VirtTimeout
from virtbackup.virt.host import Host, list_files, remove_files
from virtbackup.virt.images import image_info

DEFAULT_OVERLAY_PATTERNS: tuple[str, ...] = ("*.overlay*",)


@dataclass(frozen=True, slots=True)
class Overlay:
    """A leftover overlay on disk ``target``: ``path`` is to be committed into ``backing``
    (``None`` when it could not be determined; then it cannot be cleaned up)."""

    target: str
    path: str
    backing: str | None
    backing_format: str | None


@dataclass(frozen=True, slots=True)
class Leftovers:
    """Everything :func:`find_leftovers` found on one domain."""

    domain: str
    backup_job: JobInfo | None
    scratch_files: tuple[str, ...]
    stale_checkpoints: tuple[str, ...]
    overlays: tuple[Overlay, ...]

    @property
    def has_overlay(self) -> bool:
        """The agent API's ``hasOverlay``: whether a cleanup has anything to do."""
        return bool(
            self.backup_job or self.scratch_files or self.stale_checkpoints or self.overlays
        )


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What :func:`cleanup_leftovers` did."""

    aborted_job: bool
    deleted_checkpoints: tuple[str, ...]
    committed_overlays: tuple[Overlay, ...]
    removed_files: tuple[str, ...]


def _is_overlay(path: str, patterns: Sequence[str]) -> bool:
    base = os.path.basename(path)
    return any(fnmatch.fnmatchcase(base, p) for p in patterns)


async def _overlays(
    conn: Connection,
    name: str,
    disks: Sequence[Disk],
    patterns: Sequence[str],
    host: Host | None,
) -> list[Overlay]:
    found: list[Overlay] = []
    for disk in disks:
        if not disk.source or disk.type != "file" or not _is_overlay(disk.source, patterns):
            continue
        backing: str | None = disk.backing[0] if disk.backing else None
        backing_format: str | None = None
        if host is not None:
            try:
                info = await image_info(host, disk.source)
            except VirtError:
                info = None
            if info is not None:
                if info.backing_filename is None:
                    continue  # a flat image that merely has a matching name
                backing = info.backing_filename
                backing_format = info.backing_format
        elif not disk.backing:
            continue
        found.append(Overlay(disk.target, disk.source, backing, backing_format))
    return found


async def find_leftovers(
    conn: Connection,
    name: str,
    *,
    scratch_dir: str | None,
    overlay_patterns: Sequence[str] = DEFAULT_OVERLAY_PATTERNS,
    host: Host | None = None,
    check_bitmaps: bool = True,
) -> Leftovers:
    """Look for the leftovers listed in the module docstring; changes nothing.

    ``host`` (default: the connection's) lists scratch files and reads image headers; with
    no host, scratch files are not looked for and stopped domains' bitmaps not checked.
    ``check_bitmaps=False`` skips the stale-checkpoint check (``stale_checkpoints`` is
    then empty): for a running domain it asks libvirt for each checkpoint's size, and
    libvirt 9.0 reads a checkpoint freed meanwhile when another client deletes it while
    that query waits for the domain's job (libvirtd died with SIGSEGV in
    ``qemuCheckpointGetXMLDesc`` -> ``virDomainDiskByTarget``, core dump on the test
    machine). Routine polling must not ask it; an operator's check or a cleanup may.
    """
    runner = host if host is not None else conn.host
    dom = await conn.lookup(name)
    uuid = str(dom.UUIDString())
    job = await job_info(conn, name)
    backup_job = job if job is not None and job.is_backup else None
    scratch: list[str] = []
    if scratch_dir is not None and runner is not None:
        scratch = await list_files(runner, scratch_dir, scratch_pattern(uuid))
    xml = str(await conn.call(dom.XMLDesc, 0))
    disks = parse_disks(xml)
    stale: list[str] = []
    for cp in await list_checkpoints(conn, name) if check_bitmaps else []:
        if await bitmap_problems(conn, name, cp, disks, host=runner):
            stale.append(cp.name)
    overlays = await _overlays(conn, name, disks, overlay_patterns, runner)
    return Leftovers(
        domain=name,
        backup_job=backup_job,
        scratch_files=tuple(scratch),
        stale_checkpoints=tuple(stale),
        overlays=tuple(overlays),
    )


async def cleanup_leftovers(
    conn: Connection,
    name: str,
    *,
    scratch_dir: str | None,
    overlay_patterns: Sequence[str] = DEFAULT_OVERLAY_PATTERNS,
    host: Host | None = None,
    timeout: float = 300.0,
) -> CleanupReport:
    """Remove the domain's leftovers (steps in the module docstring); idempotent.

    ``timeout`` bounds each block commit. Raises VirtError when a step fails; the steps
    before it stay done, so calling again continues where it stopped.
    """
    runner = host if host is not None else conn.host
    found = await find_leftovers(
        conn, name, scratch_dir=scratch_dir, overlay_patterns=overlay_patterns, host=runner
    )
    aborted = False
    if found.backup_job is not None:
        await end_backup(conn, name, host=runner)
        aborted = True
    deleted: list[str] = []
    for cp_name in reversed(found.stale_checkpoints):
        await delete_checkpoint(conn, name, cp_name, metadata_only=True)
        deleted.append(cp_name)
    committed: list[Overlay] = []
    for overlay in found.overlays:
        if overlay.backing is None:
            raise VirtError(f"overlay {overlay.path} of {name}: backing image unknown")
        await _commit_overlay(conn, name, overlay, runner, timeout=timeout)
        committed.append(overlay)
    removed: list[str] = []
    if scratch_dir is not None and runner is not None:
        dom = await conn.lookup(name)
        uuid = str(dom.UUIDString())
        removed = await list_files(runner, scratch_dir, scratch_pattern(uuid))
        await remove_files(runner, removed)
        # The directories of backups' Unix sockets (no backup job runs any more).
        removed += await remove_socket_dirs(runner, scratch_dir, uuid)
    return CleanupReport(
        aborted_job=aborted,
        deleted_checkpoints=tuple(deleted),
        committed_overlays=tuple(committed),
        removed_files=tuple(sorted(set(removed) | set(found.scratch_files))),
    )


async def _commit_overlay(
    conn: Connection, name: str, overlay: Overlay, host: Host | None, *, timeout: float
) -> None:
    dom = await conn.lookup(name)
    if bool(await conn.call(dom.isActive)):
        await _active_commit(conn, dom, overlay, timeout=timeout)
    else:
        await _offline_commit(conn, dom, overlay, host, timeout=timeout)
    await _forget_snapshots_of(conn, dom, overlay.path)
    if host is not None:
        await remove_files(host, [overlay.path])


async def _active_commit(conn: Connection, dom: Any, overlay: Overlay, *, timeout: float) -> None:
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    await conn.call(dom.blockCommit, overlay.target, None, None, 0, flags)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await conn.call(dom.blockJobInfo, overlay.target, 0)
        if not info:
            raise VirtError(f"block commit of {overlay.path} ended without becoming ready")
        if int(info["end"]) > 0 and int(info["cur"]) == int(info["end"]):
            break
        if loop.time() >= deadline:
            await conn.call(dom.blockJobAbort, overlay.target, 0)
            raise VirtTimeout(f"block commit of {overlay.path} not ready after {timeout} s")
        await asyncio.sleep(0.1)
    await pivot_when_ready(conn, dom, overlay.target, deadline=deadline)


async def pivot_when_ready(conn: Connection, dom: Any, target: str, *, deadline: float) -> None:
    """Pivot the active block commit (or copy) of disk ``target`` once it is ready, and
    return when the job has gone. ``deadline``: the event loop's ``time()`` by which both
    must have happened, else :class:`VirtTimeout`.

    ``cur == end`` in ``blockJobInfo`` does not mean ready: libvirt allows the pivot only
    once QEMU's ``BLOCK_JOB_READY`` event has arrived, which can come later, and refuses
    it before with ``VIR_ERR_BLOCK_COPY_ACTIVE`` ("not ready for pivot yet"; seen in CI
    on a loaded machine). That refusal is retried until the deadline."""
    loop = asyncio.get_running_loop()
    pivot = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    while True:
        try:
            await conn.call(dom.blockJobAbort, target, pivot)
            break
        except VirtError as exc:
            if exc.code != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                raise
            if loop.time() >= deadline:
                raise VirtTimeout(f"block job on {target} not ready for pivot: {exc}") from exc
        await asyncio.sleep(0.1)
    while await conn.call(dom.blockJobInfo, target, 0):
        if loop.time() >= deadline:
            raise VirtTimeout(f"pivot of {target} not finished")
        await asyncio.sleep(0.1)


async def _offline_commit(
    conn: Connection, dom: Any, overlay: Overlay, host: Host | None, *, timeout: float
) -> None:
    if host is None:
        raise VirtError(f"committing {overlay.path} of a stopped domain needs host access")
    (await host.run(["qemu-img", "commit", "-q", overlay.path], timeout=timeout)).check()
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    root = _xml.parse(str(await conn.call(dom.XMLDesc, flags)))
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        if target is None or source is None or target.get("dev") != overlay.target:
            continue
        if source.get("file") != overlay.path:
            raise CommandFailed(f"disk {overlay.target} no longer uses {overlay.path}")
        source.set("file", overlay.backing or "")
        driver = disk.find("driver")
        if driver is not None and overlay.backing_format:
            driver.set("type", overlay.backing_format)
        for chain in disk.findall("backingStore"):
            disk.remove(chain)
    await conn.call(conn.raw.defineXML, _xml.dump(root))


async def _forget_snapshots_of(conn: Connection, dom: Any, path: str) -> None:
    snapshots = await conn.call(dom.listAllSnapshots, 0)
    for snap in snapshots:
        root = _xml.parse(str(await conn.call(snap.getXMLDesc, 0)))
        sources = {s.get("file") for s in root.findall("./disks/disk/source")}
        if path in sources:
            await conn.call(snap.delete, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
