"""Restore exports nobody will stop: found and ended when the inventory connects.

A restore (and a migration's target side) writes ``<path>.vbrestore-<job>`` through a
``qemu-nbd`` export (:mod:`.restores`) until the job's ``RESTORE_FINISH`` stops it and
moves or removes the image. When the whole system stops mid-job, that finish may never
come: the orchestrator that ends the job from its record can find no inventory to ask
(it starts first, or the inventory cannot reach the server yet), and ends the job
saying so; the ``qemu-nbd`` keeps running and holding the image, and the image (and any
UEFI/TPM state staged beside its final place) stays.

Each export has a private directory ``/tmp/vbrestore.XXXXXXXX`` on the server with an
``owner`` file (:class:`.restores.ExportOwner`: installation, server, job, temporary
image) written before the image is made. When the inventory connects to a server
(:func:`reconcile`, with the backup jobs and bitmap exports nobody will end), each such
directory of this installation and server whose job ``VB_JOBS`` does not list as queued
or running (ended, or unknown) is ended: its ``qemu-nbd`` stopped (only a process that
is a ``qemu-nbd``), its temporary image removed (only a name ending in
``.vbrestore-<job>``), the state the job staged in libvirt's own NVRAM and swtpm
directories removed, and the directory removed. Directories of another installation, of
another server, without an owner file (a remote agent's) or of a job still active are
left alone; those of active jobs are looked at again every :data:`RECHECK_SECONDS`
(:func:`follow`) until their jobs have ended: the orchestrator's own end of the job may
still fail to reach this inventory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import re

import msgspec
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.jobs import ACTIVE_STATES
from virtbackup.inventory import ownership, state_files
from virtbackup.inventory.hosts import HostServer
from virtbackup.inventory.restores import (
    EXPORT_OWNER,
    EXPORT_PID,
    ExportOwner,
    ExportsDidNotStop,
    stop_exports,
)
from virtbackup.runtime.errors import ServiceError
from virtbackup.virt.errors import VirtError
from virtbackup.virt.state import StateError

log = logging.getLogger(__name__)

#: The directories :func:`.restores.prepare` makes (``mktemp -d``); nothing else is touched.
EXPORT_DIR = re.compile(r"/tmp/vbrestore\.[A-Za-z0-9]{8}")  # noqa: S108
#: Seconds between two looks at the exports of jobs that were still active.
RECHECK_SECONDS = 10.0

#: Prints each export directory's path and its owner file, NUL-separated.
_LIST_DIRS = r"""
for d in /tmp/vbrestore.*; do
  [ -d "$d" ] || continue
  [ -f "$d/owner" ] || continue
  printf '%s\0' "$d"
  cat "$d/owner" 2>/dev/null
  printf '\0'
done
"""


def _image_of(owner: ExportOwner) -> str:
    """The temporary image the owner file names, when it is one a restore of its job
    makes (an absolute, normalised path ending in ``.vbrestore-<job>``), else ``""``."""
    image = owner.image
    if (
        not owner.job_id
        or not image.startswith("/")
        or posixpath.normpath(image) != image
        or not image.endswith(f".vbrestore-{owner.job_id}")
    ):
        return ""
    return image


async def reconcile(
    server: HostServer, jobs: KeyValue, installation: str
) -> tuple[list[str], set[str]]:
    """End the restore exports on ``server`` that nobody will end (see the module
    docstring). Returns what was done (one line per directory) and the ids of the
    active jobs whose exports were left. Raises Unavailable or VirtError when the
    server cannot be reached."""
    host = await server.host()
    listed = await host.run(["sh", "-c", _LIST_DIRS], timeout=30)
    fields = listed.stdout.split("\0") if listed.returncode == 0 else []
    done: list[str] = []
    pending: set[str] = set()
    ended: set[str] = set()
    for path, raw in zip(fields[0::2], fields[1::2], strict=False):
        if EXPORT_DIR.fullmatch(path) is None or not raw:
            continue
        try:
            owner = msgspec.json.decode(raw, type=ExportOwner)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if not installation or owner.installation != installation:
            continue
        if owner.server_id != server.id or not owner.job_id:
            continue
        state = await ownership.job_state(jobs, owner.job_id)
        if state in ACTIVE_STATES:
            pending.add(owner.job_id)
            continue
        pid = posixpath.join(path, EXPORT_PID)
        with contextlib.suppress(ExportsDidNotStop):
            await stop_exports(host, [pid])
        line = f"stopped the restore export {path} of job {owner.job_id} ({state or 'unknown'})"
        if image := _image_of(owner):
            removed = await host.run(["rm", "-f", "--", image], timeout=60)
            if removed.returncode == 0:
                line += f", removed {image}"
        await host.run(
            ["rm", "-rf", "--", pid, posixpath.join(path, EXPORT_OWNER), path], timeout=30
        )
        done.append(line)
        ended.add(owner.job_id)
    for job_id in sorted(ended):
        done.extend(await _discard_state(server, job_id))
    return done, pending


async def _discard_state(server: HostServer, job_id: str) -> list[str]:
    """Remove what job ``job_id`` staged in libvirt's NVRAM and swtpm directories."""
    with contextlib.suppress(ServiceError, VirtError, StateError):
        staged = await state_files.staged_for(server, job_id, "", [])
        if staged:
            await state_files.discard(await server.host(), staged)  # found by their names
            return [f"removed the state job {job_id} staged: {s.temp_path}" for s in staged]
    return []


async def follow(
    server: HostServer,
    jobs: KeyValue,
    installation: str,
    pending: set[str],
    every: float = RECHECK_SECONDS,
) -> list[str]:
    """Look again every ``every`` seconds while exports of the ``pending`` jobs (active
    at the last look) are left, ending those whose jobs have ended; returns what was
    done. A look that fails (the server unreachable) is logged and tried again."""
    done: list[str] = []
    while pending:
        await asyncio.sleep(every)
        try:
            lines, pending = await reconcile(server, jobs, installation)
        except (ServiceError, VirtError, OSError) as exc:
            log.warning("server %s: looking at restore exports failed: %s", server.id, exc)
            continue
        for line in lines:
            log.warning("server %s: %s", server.id, line)
        done.extend(lines)
    return done
