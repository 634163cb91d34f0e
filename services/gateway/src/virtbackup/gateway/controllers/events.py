"""Agent API: the live event stream (SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from litestar import Controller, Request, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from virtbackup.contracts import subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.jobctl import LogLine
from virtbackup.gateway.identity_auth import RECHECK_SECONDS, still_allowed
from virtbackup.gateway.sse_hub import Listener, sse_hub_of
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.events import EventFeed, EventStart, StoredEvent
from virtbackup.runtime.joblog import LogFeed

KEEPALIVE_SECONDS = 15.0
#: The largest ``Last-Event-ID``: a stream sequence (JetStream's are unsigned 64-bit).
MAX_EVENT_ID = 2**63 - 1
_encoder = msgspec.json.Encoder()


async def merged(feed: EventFeed, logs: LogFeed) -> AsyncGenerator[ServerSentEventMessage, None]:
    """Events and log lines as they come, and a keep-alive comment after
    ``KEEPALIVE_SECONDS`` of silence."""
    event_next: asyncio.Task[StoredEvent | None] | None = None
    log_next: asyncio.Task[tuple[str, LogLine] | None] | None = None
    try:
        while True:
            if event_next is None:
                event_next = asyncio.ensure_future(feed.next(timeout=KEEPALIVE_SECONDS))
            if log_next is None:
                log_next = asyncio.ensure_future(logs.next(timeout=KEEPALIVE_SECONDS))
            done, _ = await asyncio.wait(
                {event_next, log_next}, return_when=asyncio.FIRST_COMPLETED
            )
            quiet = True
            if event_next in done:
                stored, event_next = event_next.result(), None
                if stored is not None:
                    quiet = False
                    event = stored.event
                    data = _encoder.encode({"type": event.type, "payload": event.payload})
                    yield ServerSentEventMessage(
                        event=event.type, data=data.decode(), id=stored.sequence
                    )
            if log_next in done:
                line, log_next = log_next.result(), None
                if line is not None:
                    quiet = False
                    job_id, entry = line
                    payload = {"jobId": job_id, "ts": entry.ts, "level": entry.level,
                               "line": entry.line}  # fmt: skip
                    data = _encoder.encode({"type": EventType.JOB_LOG, "payload": payload})
                    yield ServerSentEventMessage(event=EventType.JOB_LOG, data=data.decode())
            if quiet and event_next is None:
                yield ServerSentEventMessage(comment="keep-alive")
    finally:
        for task in (event_next, log_next):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def from_hub(listener: Listener) -> AsyncGenerator[ServerSentEventMessage, None]:
    """What the hub gives ``listener``, in order, and a keep-alive comment after
    ``KEEPALIVE_SECONDS`` of silence; ends as soon as ``listener.ended`` is set (its queue
    overflowed, or the hub's feeds failed), dropping what it had queued."""
    keep_alive = ServerSentEventMessage(comment="keep-alive")
    while not listener.ended.is_set():
        try:
            message = listener.queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    message = await listener.queue.get()
            except TimeoutError:
                message = keep_alive
        if listener.ended.is_set():
            return
        yield message


class EventsController(Controller):
    @get("/events")
    async def events(
        self,
        gw: Gateway,
        request: Request[Any, Any, Any],
        last_event_id: int | None = Parameter(
            header="Last-Event-ID",
            default=None,
            ge=0,
            le=MAX_EVENT_ID,
            description="Resume after this event (its stream sequence)",
        ),
    ) -> ServerSentEvent:
        """``ready``, then every event of ``VB_EVENTS`` as it happens.

        Each message's SSE id is its stream sequence: a client that reconnects with
        ``Last-Event-ID`` resumes after it, within the stream's retention. A
        ``Last-Event-ID`` that is not an integer from 0 to ``MAX_EVENT_ID`` is a 400.

        Lines of jobs' output logs (``VB_JOB_LOGS``) come as ``job.log`` events, data
        ``{"type": "job.log", "payload": {"jobId", "ts", "level", "line"}}``, without an
        id (they are not in ``VB_EVENTS``: a resumed stream does not replay them; the
        whole log is the job's ``output.log`` artifact).

        The stream ends once its credential no longer allows it (logged out, user
        disabled, token revoked, permission taken: ``identity_auth.still_allowed``,
        asked at most every ``RECHECK_SECONDS`` and at least at each keep-alive).

        A stream without ``Last-Event-ID`` reads the feeds shared by every such stream
        (``sse_hub``); one that falls ``sse_hub.QUEUE_SIZE`` messages behind ends at once,
        and its client resumes with ``Last-Event-ID`` (as ``EventSource`` does).
        """
        # Open the feeds before "ready" so that nothing published after "ready" is missed:
        # a stream that starts now joins the shared feeds (``sse_hub``), one that resumes
        # reads from its sequence on with feeds of its own.
        source: AsyncGenerator[ServerSentEventMessage, None]
        if last_event_id is None:
            hub, listener = sse_hub_of(gw.bus), Listener()
            await hub.join(listener)
            source = from_hub(listener)

            async def close() -> None:
                await hub.leave(listener)
        else:
            start: EventStart = last_event_id + 1
            feed = await EventFeed(gw.bus, subjects.EVENTS_ALL, start=start).open()
            logs = await LogFeed(gw.bus).open()
            source = merged(feed, logs)

            async def close() -> None:
                await feed.close()
                await logs.close()

        async def stream() -> AsyncGenerator[ServerSentEventMessage, None]:
            try:
                yield ServerSentEventMessage(event="ready", data="ok")
                checked = time.monotonic()
                async for message in source:
                    if time.monotonic() - checked >= RECHECK_SECONDS:
                        checked = time.monotonic()
                        if not await still_allowed(request.scope):
                            return
                    yield message
            finally:
                await source.aclose()
                await close()

        return ServerSentEvent(stream())
