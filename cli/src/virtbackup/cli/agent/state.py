"""The VM's state files (UEFI NVRAM, writable loaders, TPM state) in an agent's backup.

As on the bus path (the job-orchestrator's ``state_files.capture``), right after the
libvirt backup began: the state the domain references (``virt.state.locate_state``) is
copied aside on this host (``virt.state.snapshot``: ``cp -a``, owners and modes kept)
into a 0700 folder of the scratch directory, each file is stored as repository chunks,
and the point's ``files`` list names them, so a restore (on any server, through the bus
path) puts the state back with the disks. The copies are removed when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shutil
from pathlib import Path

from virtbackup.repository.records import StateFileRecord
from virtbackup.repository.repository import Repository
from virtbackup.virt import Connection
from virtbackup.virt.domains import domain_xml
from virtbackup.virt.host import LocalHost
from virtbackup.virt.state import connection_kind, locate_state, snapshot


async def capture_state(
    conn: Connection, vm: str, repo: Repository, scratch_dir: str, job_id: str
) -> list[StateFileRecord]:
    """The state files of ``vm`` as they are now, stored in ``repo`` (empty for a VM
    without any). Raises ``RuntimeError`` naming what could not be copied or read (the
    backup then fails: a point must not silently lack the state), and the repository's
    errors."""
    uri = str(await conn.call(conn.raw.getURI))
    kind = connection_kind(uri)
    home = str(Path.home()) if kind == "session" else None
    try:
        found = locate_state(await domain_xml(conn, vm), kind, home=home)
    except (ValueError, SyntaxError) as exc:
        raise RuntimeError(f"vm {vm}: where its state files are cannot be told: {exc}") from None
    if not found:
        return []
    base = os.path.join(scratch_dir, f"vbstate-{job_id}")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base, mode=0o700)
    host = LocalHost()
    records: list[StateFileRecord] = []
    try:
        for index, location in enumerate(found):
            dest = posixpath.join(base, str(index))
            try:
                entries = await snapshot(host, location, dest)
            except Exception as exc:
                raise RuntimeError(f"vm {vm}: copying its {location.role} state: {exc}") from None
            for entry in entries:
                source = posixpath.join(dest, entry.relative) if entry.relative else dest
                data = b""
                if entry.kind == "file":
                    data = await asyncio.to_thread(Path(source).read_bytes)
                records.append(
                    StateFileRecord(
                        role=location.role,
                        path=(
                            posixpath.join(location.path, entry.relative)
                            if entry.relative
                            else location.path
                        ),
                        relative=entry.relative,
                        kind=entry.kind,
                        size=len(data),
                        mode=f"{entry.mode & 0o7777:04o}",
                        owner=entry.owner,
                        group=entry.group,
                        chunks=await repo.store_bytes(data) if entry.kind == "file" else [],
                    )
                )
        return records
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(shutil.rmtree, base)
