"""The first message of ``WS /ws`` (``jobs``: every job), made once for the clients that
connect together, and in slices that let the event loop run.

Each client used to list every job and build the message itself: with the fleet's
10,000 jobs that is about 95 ms of the event loop's CPU per client (76 ms of it turning
the jobs into the document's view in one go), so 100 consoles connecting together held
the gateway for seconds and every request behind it waited. Now :class:`Snapshots`
coalesces: a client gets a message from a listing that began after it asked (so, as
before, no job event after its joining the hub is missing from both the message and the
events that follow), and the clients that ask while one listing is being made share the
next one. :func:`jobs_message` turns ``VIEW_SLICE`` jobs at a time, yielding in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from virtbackup.contracts.v1.hypersdk_jobs import job_view
from virtbackup.contracts.v1.jobs import Job

#: Jobs turned into their view between two yields to the event loop (about 4 ms).
VIEW_SLICE = 500


async def jobs_message(jobs: list[Job], encode: Callable[[str, dict[str, Any]], bytes]) -> bytes:
    """``encode("jobs", {"jobs": [job_view(job)...]})``, the views made ``VIEW_SLICE``
    at a time with a yield to the event loop after each slice."""
    views: list[dict[str, Any]] = []
    for start in range(0, len(jobs), VIEW_SLICE):
        if start:
            await asyncio.sleep(0)
        views.extend(job_view(job) for job in jobs[start : start + VIEW_SLICE])
    return encode("jobs", {"jobs": views})


class Snapshots:
    """Coalesced calls of ``build``: :meth:`get` returns what a call of ``build`` begun
    after :meth:`get` was called returned (or raises what it raised); callers that come
    while one call runs share the next. ``builds`` counts the calls of ``build``."""

    def __init__(self, build: Callable[[], Awaitable[bytes]]) -> None:
        self.build = build
        self.builds = 0
        self._pending: asyncio.Future[bytes] | None = None
        self._runner: asyncio.Task[None] | None = None

    async def get(self) -> bytes:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            # Nobody may be left waiting: its exception is taken even if none is.
            self._pending.add_done_callback(_taken)
        pending = self._pending
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="ws-jobs-snapshot")
        return await asyncio.shield(pending)

    async def _run(self) -> None:
        while self._pending is not None:
            # The callers so far share this build; those who come now wait for the next.
            pending, self._pending = self._pending, None
            self.builds += 1
            try:
                pending.set_result(await self.build())
            except asyncio.CancelledError:
                pending.cancel()
                raise
            except Exception as exc:
                pending.set_exception(exc)


def _taken(future: asyncio.Future[bytes]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()
