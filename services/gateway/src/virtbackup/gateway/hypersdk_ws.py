"""``WS /ws`` of the HyperSDK API: live jobs, status and schedule events.

Messages are JSON text frames ``{"type", "timestamp", "data"}``:

* ``jobs`` once, first: ``{"jobs": [<job>...]}`` (the job store's list, newest first);
* ``status`` every 2 s: ``/status``'s counts;
* ``job_update`` for each ``job.created``, ``job.updated``, ``job.progress`` and
  ``job.finished`` event of the bus: ``<job>``;
* ``schedule_event`` for each ``schedule.<event>`` event: ``{"schedule_id", "event",
  "name", "job_ids", "skipped", "message"}`` (``event`` is ``triggered``, ``completed``
  or ``failed``);
* ``pong`` in answer to a client's ``{"type": "ping"}`` (the server also sends WebSocket
  ping frames every 54 s, and closes a connection whose pong does not come).

A ``<job>`` is the job exactly as ``GET /jobs/{id}`` shows it
(``contracts.v1.hypersdk_jobs.job_view``: ``definition``, ``status``, ``progress``, times,
``error``).

Authentication: like every route, the API token; a browser cannot set headers on a
WebSocket, so the token may come as the subprotocol ``virtbackup.bearer.<token>``,
offered together with ``virtbackup.v1`` (``new WebSocket(url, ["virtbackup.v1",
"virtbackup.bearer." + token])``); the server selects ``virtbackup.v1``, never echoing
the token. Non-browser clients may send ``Authorization: Bearer`` instead. A token in the
URL is not accepted (URLs end up in logs). An upgrade without a valid token is refused
before it is accepted (HTTP 403). A connection whose credential stops allowing it (logged
out, user disabled, token revoked, permission taken) is closed with 4401 within
``identity_auth.RECHECK_SECONDS``.

Each client has a bounded queue (``QUEUE_SIZE`` messages); a client that falls that far
behind is closed with 1013 ("try again later") and never slows the others. The feeds on
the bus run only while at least one client is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from virtbackup.contracts.v1.hypersdk_jobs import job_view
from virtbackup.contracts.v1.jobs import Job
from virtbackup.gateway.auth import WS_SUBPROTOCOL
from virtbackup.gateway.fanout import Outbox, offer_in_batches, stop_tasks
from virtbackup.gateway.hypersdk_status import all_jobs, current_status
from virtbackup.gateway.identity_auth import RECHECK_SECONDS, still_allowed
from virtbackup.gateway.state import Gateway
from virtbackup.gateway.ws_snapshot import Snapshots, jobs_message
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import ServiceError
from virtbackup.runtime.events import EventFeed, StoredEvent

log = logging.getLogger(__name__)

SUBPROTOCOL = WS_SUBPROTOCOL
STATUS_SECONDS = 2.0
QUEUE_SIZE = 256
#: Job events that become a ``job_update`` (``job.canceled`` follows ``job.finished``).
JOB_EVENTS = frozenset({"job.created", "job.updated", "job.progress", "job.finished"})
JOB_SUBJECT = "vb.evt.job.>"
SCHEDULE_SUBJECT = "vb.evt.schedule.>"
#: Close code for a client that cannot keep up.
TOO_SLOW = 1013
#: The close code of a connection whose credential no longer allows it.
REVOKED = 4401

_encoder = msgspec.json.Encoder()


def message(kind: str, data: dict[str, Any]) -> bytes:
    return _encoder.encode({"type": kind, "timestamp": utcnow_iso(), "data": data})


def schedule_data(stored: StoredEvent) -> dict[str, Any]:
    """``schedule_event``'s data from a ``schedule.<event>`` event."""
    payload = stored.event.payload
    return {
        "schedule_id": payload.get("schedule_id", stored.key or ""),
        "event": stored.event.type.split(".", 1)[1],
        "name": payload.get("name", ""),
        "job_ids": payload.get("job_ids", []),
        "skipped": payload.get("skipped", False),
        "message": payload.get("message", ""),
    }


class Client(Outbox[bytes]):
    """One connection's outgoing queue; ``too_slow`` is set when it overflowed."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        super().__init__(size)

    @property
    def too_slow(self) -> asyncio.Event:
        """Set once the client fell ``QUEUE_SIZE`` messages behind (it is closed)."""
        return self.full


class Hub:
    """Fans the bus's job and schedule events and the periodic status out to clients."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.clients: set[Client] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.lock = asyncio.Lock()
        #: The first message, ``jobs``, shared by the clients that connect together.
        self.snapshots = Snapshots(self._jobs_message)

    async def _jobs_message(self) -> bytes:
        return await jobs_message(await all_jobs(self.gw), message)

    async def join(self, client: Client) -> None:
        """Add ``client``; the first one starts the feeds (open when this returns, so no
        event stored after it is missed)."""
        async with self.lock:
            self.clients.add(client)
            if self.tasks:
                return
            feeds = [EventFeed(self.gw.bus, JOB_SUBJECT), EventFeed(self.gw.bus, SCHEDULE_SUBJECT)]
            try:
                for feed in feeds:
                    await feed.open()
            except BaseException:
                for feed in feeds:
                    await feed.close()
                raise
            self.tasks = [
                asyncio.create_task(self._pump(feeds[0]), name="ws-jobs"),
                asyncio.create_task(self._pump(feeds[1]), name="ws-schedules"),
                asyncio.create_task(self._status(), name="ws-status"),
            ]

    async def leave(self, client: Client) -> None:
        """Remove ``client``; the last one stops the feeds."""
        async with self.lock:
            self.clients.discard(client)
            if self.clients or not self.tasks:
                return
            tasks, self.tasks = self.tasks, []
        await stop_tasks(tasks)

    def broadcast(self, data: bytes) -> None:
        for client in list(self.clients):
            client.offer(data)

    async def fan_out(self, data: bytes) -> None:
        """``broadcast``, letting the event loop run between batches of clients (see
        ``fanout``)."""
        await offer_in_batches(list(self.clients), data)

    async def _pump(self, feed: EventFeed) -> None:
        try:
            while True:
                stored = await feed.next(timeout=30.0)
                if stored is None:
                    continue
                try:
                    data = self._translate(stored)
                except (msgspec.ValidationError, KeyError) as exc:
                    log.warning("event %s not sent on /ws: %s", stored.event.type, exc)
                    continue
                if data is not None:
                    await self.fan_out(data)
        finally:
            await feed.close()

    @staticmethod
    def _translate(stored: StoredEvent) -> bytes | None:
        kind = stored.event.type
        if kind in JOB_EVENTS:
            job = msgspec.convert(stored.event.payload, Job)
            return message("job_update", job_view(job))
        if kind.startswith("schedule."):
            return message("schedule_event", schedule_data(stored))
        return None

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_SECONDS)
            try:
                status = await current_status(self.gw)
            except ServiceError as exc:  # e.g. no orchestrator answers: skip this tick
                log.warning("/ws status: %s", exc)
                continue
            await self.fan_out(message("status", status))


_hubs: dict[int, Hub] = {}


def hub_of(gw: Gateway) -> Hub:
    hub = _hubs.get(id(gw))
    if hub is None:
        hub = _hubs[id(gw)] = Hub(gw)
    return hub


def offered_subprotocols(socket: WebSocket[Any, Any, Any]) -> list[str]:
    raw = socket.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


@websocket("/ws")
async def ws(socket: WebSocket[Any, Any, Any], gw: Gateway) -> None:
    """Live jobs, status and schedule events (see the module docstring)."""
    offered = offered_subprotocols(socket)
    await socket.accept(subprotocols=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    hub = hub_of(gw)
    client = Client()
    try:
        await hub.join(client)
        # Listed after joining: no job event is missing from both (``ws_snapshot``).
        await socket.send_text((await hub.snapshots.get()).decode())
        await _serve(socket, client)
    except (WebSocketDisconnect, ServiceError) as exc:
        log.debug("/ws client gone: %r", exc)
    finally:
        await hub.leave(client)


async def _serve(socket: WebSocket[Any, Any, Any], client: Client) -> None:
    async def send() -> None:
        while True:
            data = await client.queue.get()
            await socket.send_text(data.decode())

    async def receive() -> None:
        while True:
            text = await socket.receive_text()
            with contextlib.suppress(msgspec.DecodeError):
                if msgspec.json.decode(text) == {"type": "ping"}:
                    client.offer(message("pong", {}))

    async def revoked() -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            if not await still_allowed(socket.scope):
                return

    watch = asyncio.create_task(revoked())
    tasks = {
        asyncio.create_task(send()),
        asyncio.create_task(receive()),
        asyncio.create_task(client.too_slow.wait()),
        watch,
    }
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, Exception):
                await task
    if watch in done and not watch.cancelled() and watch.exception() is None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(socket.close(code=REVOKED, reason="credential revoked"), 1.0)
        return
    if client.too_slow.is_set():
        log.warning("/ws client too slow: dropped")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(socket.close(code=TOO_SLOW, reason="too slow"), 1.0)
        return
    for task in done:
        exc = task.exception()
        if exc is not None:
            raise exc
