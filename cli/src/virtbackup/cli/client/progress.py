"""Following a job until it ends: a live rich progress bar (bytes, speed, ETA) fed by the
gateway's event stream (``/events``: the job's ``job.*`` events carry the job as
``GET /jobs/{id}`` shows it, ``job.log`` its output lines), with ``GET /jobs/{id}`` as
the source of truth when the stream is quiet or drops."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from virtbackup.cli.client.api import Api
from virtbackup.cli.client.output import printable

TERMINAL = frozenset({"success", "failure", "canceled"})
#: Seconds without a word on the stream after which the job is asked for directly.
POLL_EVERY = 2.0


def _reader(api: Api, out: queue.Queue[tuple[str, dict[str, Any]]], stop: threading.Event) -> None:
    """Put every event of ``/events`` into ``out`` until ``stop``; reconnect on errors.
    Owns ``api``: closes it on the way out (only this thread may close its sockets)."""
    try:
        while not stop.is_set():
            try:
                for event, data in api.events():
                    out.put((event, data))
                    if stop.is_set():
                        return
            except Exception:  # any end of the stream: reconnect, or stop when interrupted
                if stop.is_set():
                    return
            stop.wait(1.0)
    finally:
        with contextlib.suppress(Exception):
            api.close()


class _BytesColumn(DownloadColumn):
    """Bytes done of the total, left blank for a job that moves no bytes (prune, GC,
    verify: their ``totalBytes`` stays 0), which showed "0/? bytes" to the end."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("bytes", True) else Text("")


class _SpeedColumn(TransferSpeedColumn):
    """Bytes a second, left blank where no bytes move (it showed "?")."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("bytes", True) else Text("")


def _describe(job: dict[str, Any]) -> str:
    what = job.get("type", "job")
    vm = job.get("vmName")
    phase = job.get("phase") or job.get("state", "")
    text = f"{what} {vm} ({phase})" if vm else f"{what} ({phase})"
    return escape(text)  # shown as markup by the bar's column


def follow_job(
    api: Api, job_id: str, console: Console, *, timeout: float | None = None
) -> dict[str, Any]:
    """Show ``job_id``'s progress until it ends; the ended job (``GET /jobs/{id}``'s
    shape: ``state`` ``success``, ``failure`` or ``canceled``, ``message``).

    The bar counts ``bytesTransferred`` of ``totalBytes`` (bytes of the VM's disks),
    with rich's speed and remaining time; the job's output log lines are printed above
    it as they come. Raises ``ApiError`` if the job cannot be read, ``TimeoutError``
    after ``timeout`` seconds."""
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    stop = threading.Event()
    stream_api = api.clone()
    reader = threading.Thread(
        target=_reader, args=(stream_api, events, stop), name="virtbackup-events", daemon=True
    )
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        _BytesColumn(binary_units=True),
        _SpeedColumn(),
        TimeRemainingColumn(),
    )
    try:
        job: dict[str, Any] = api.get(f"/jobs/{job_id}")
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(_describe(job), total=None, bytes=False)
            while True:
                total = int(job.get("totalBytes") or 0) or None
                done = int(job.get("bytesTransferred") or 0)
                bar.update(
                    task,
                    description=_describe(job),
                    total=total,
                    completed=done,
                    bytes=bool(total or done),
                )
                if job.get("state") in TERMINAL:
                    if job["state"] == "success":  # a whole bar; 1 of 1 where no bytes
                        bar.update(task, total=total or done or 1, completed=total or done or 1)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not end within {timeout:.0f} s")
                try:
                    event, data = events.get(timeout=POLL_EVERY)
                except queue.Empty:
                    job = api.get(f"/jobs/{job_id}")
                    continue
                payload = data.get("payload")
                if not isinstance(payload, dict):
                    continue
                if event == "job.log" and payload.get("jobId") == job_id:
                    line = escape(printable(str(payload.get("line", ""))))
                    bar.console.print(f"[dim]{line}[/dim]", highlight=False, soft_wrap=True)
                elif event.startswith("job.") and payload.get("id") == job_id:
                    if (
                        event in {"job.finished", "job.canceled"}
                        or payload.get("state") in TERMINAL
                    ):
                        job = api.get(f"/jobs/{job_id}")
                    else:
                        job = {**job, **payload}
        return job
    finally:
        stop.set()
        stream_api.interrupt()  # ends the stream's read; the reader closes its client
        reader.join(timeout=5.0)  # a daemon: a reader stuck elsewhere does not hold the exit
