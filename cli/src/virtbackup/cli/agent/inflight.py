"""What the agent must clean up if it dies mid-job: one small file beside its key.

For a restore (``kind: restore``) it names the images and state trees the restore is
building (each named before it is made), the ``qemu-nbd`` processes serving them and
their private directories, and whether it committed: a restart stops those processes
and removes what was built unless it had committed, and reports the job's end.


From just before the agent begins a libvirt backup job until it has ended it,
``inflight.json`` (0600) names it: the job id, the VM, the checkpoint the begin makes
(written first, so a kill right after the begin leaves nothing unnamed), the libvirt
URI, whether the VM was started paused for an offline backup, and whether the restore
point was committed. An agent killed then (SIGKILL, a
crash, a reboot of the service) finds it when it starts again (:func:`recover`): it
ends any backup job of the VM, drops the checkpoint (if it exists) unless the point was
committed, and reports the job's end, so that the next backup of that VM neither finds
a job in its way nor misses a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from virtbackup.virt import end_backup, open_connection
from virtbackup.virt.checkpoints import discard_checkpoint
from virtbackup.virt.domains import destroy_if_paused
from virtbackup.virt.host import LocalHost

log = logging.getLogger(__name__)


class InFlight:
    """The record of the backup in progress, at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    async def record(self, **fields: Any) -> None:
        """Merge ``fields`` into the record (written atomically)."""
        current = await asyncio.to_thread(self._read) or {}
        await asyncio.to_thread(self._write, {**current, **fields})

    async def read(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._read)

    async def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path.unlink)


Report = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


async def recover(inflight: InFlight, report: Report) -> str | None:
    """End what a previous run of the agent left (see the module); the id of the job it
    concerned, or ``None`` when nothing was left. ``report(job_id, body)`` sends a
    status report."""
    record = await inflight.read()
    if not record:
        return None
    if record.get("kind") == "restore":
        return await _recover_restore(inflight, record, report)
    job_id, vm = str(record.get("jobId", "")), str(record.get("vm", ""))
    checkpoint, committed = record.get("checkpoint"), bool(record.get("committed"))
    conn = await open_connection(str(record.get("uri") or "qemu:///system"))
    try:
        with contextlib.suppress(Exception):
            await end_backup(conn, vm, host=LocalHost())
        if isinstance(checkpoint, str) and checkpoint and not committed:
            with contextlib.suppress(Exception):
                await discard_checkpoint(conn, vm, checkpoint, host=LocalHost())
        if record.get("offline"):  # started paused for an offline backup: off again
            with contextlib.suppress(Exception):
                await destroy_if_paused(conn, vm)
    finally:
        await conn.close()
    line = "the agent stopped during the backup: its libvirt job was ended when it started"
    done = f"backup committed; {line}"
    return await _report_end(inflight, report, job_id, line, done if committed else None)


async def _report_end(
    inflight: InFlight, report: Report, job_id: str, line: str, committed: str | None
) -> str:
    """Report the end of the job a previous run left (``completed`` with the message
    ``committed`` when it had committed, else ``failed`` with ``line``), then forget
    the record; returns ``job_id``."""
    body: dict[str, Any] = (
        {"status": "completed", "message": committed}
        if committed is not None
        else {"status": "failed", "errorMessage": line}
    )
    body["output"] = [{"level": "warn", "line": line if committed is None else committed}]
    try:
        await report(job_id, body)
    except Exception as exc:  # the job may have ended and gone meanwhile
        log.info("job %s: reporting its end after a restart failed: %s", job_id, exc)
    await inflight.clear()
    log.warning("job %s: %s", job_id, line)
    return job_id


async def _recover_restore(inflight: InFlight, record: dict[str, Any], report: Report) -> str:
    """End a restore a previous run left: stop its ``qemu-nbd`` exports, remove the
    images and state it built (unless it had committed) and its private directories,
    and report the job's end."""
    job_id, committed = str(record.get("jobId", "")), bool(record.get("committed"))
    host = LocalHost()
    pids = [p for p in record.get("pids") or [] if isinstance(p, int)]
    if pids:  # only a process that is a qemu-nbd still (a pid may have been reused)
        script = (
            'for p in "$@"; do grep -qa qemu-nbd "/proc/$p/cmdline" 2>/dev/null && '
            'kill "$p"; done; sleep 0.5'
        )
        with contextlib.suppress(Exception):
            await host.run(["sh", "-c", script, "stop", *map(str, pids)], timeout=30)
    suffix = f".vbrestore-{job_id}"
    left = [] if committed else [*(record.get("images") or []), *(record.get("staged") or [])]
    left = [p for p in left if isinstance(p, str) and p.startswith("/") and suffix in p]
    dirs = [d for d in record.get("dirs") or [] if isinstance(d, str) and "vbrestore." in d]
    if left or dirs:
        with contextlib.suppress(Exception):
            await host.run(["rm", "-rf", "--", *left, *dirs], timeout=60)
    line = "the agent stopped during the restore: what it had created was removed when it started"
    done = "restore committed before the agent stopped"
    return await _report_end(inflight, report, job_id, line, done if committed else None)
