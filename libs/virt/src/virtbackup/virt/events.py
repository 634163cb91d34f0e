"""Domain lifecycle events delivered into asyncio, typed and server-agnostic.

libvirt calls event callbacks on its event-loop thread (see
:mod:`virtbackup.virt.eventloop`); they are converted to :class:`LifecycleEvent` there and
handed to the asyncio loop with ``loop.call_soon_threadsafe``. Nothing blocks that thread.

Two levels:

* :func:`subscribe_lifecycle` registers on one :class:`Connection` and puts
  :class:`LifecycleEvent` and, once, :class:`ConnectionLost` into a queue.
* :class:`LifecycleWatcher` owns connections made by an ``opener`` and survives their
  loss: on :class:`ConnectionLost` it reconnects with backoff and emits
  :class:`Reconnected`. Events that happened while disconnected are lost, so on
  :class:`Reconnected` the consumer must re-list the domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import libvirt

from virtbackup.virt.connection import Connection
from virtbackup.virt.errors import VirtError


class LifecycleKind(StrEnum):
    """libvirt's ``virDomainEventType`` as a word."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


_KINDS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: LifecycleKind.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: LifecycleKind.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: LifecycleKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: LifecycleKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: LifecycleKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: LifecycleKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: LifecycleKind.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: LifecycleKind.PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: LifecycleKind.CRASHED,
}

# The detail enums of libvirt 9.0, per event kind (index = detail number).
_DETAILS: dict[LifecycleKind, tuple[str, ...]] = {
    LifecycleKind.DEFINED: ("added", "updated", "renamed", "from_snapshot"),
    LifecycleKind.UNDEFINED: ("removed", "renamed"),
    LifecycleKind.STARTED: ("booted", "migrated", "restored", "from_snapshot", "wakeup"),
    LifecycleKind.SUSPENDED: (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from_snapshot",
        "api_error",
        "postcopy",
        "postcopy_failed",
    ),
    LifecycleKind.RESUMED: ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed"),
    LifecycleKind.STOPPED: (
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from_snapshot",
    ),
    LifecycleKind.SHUTDOWN: ("finished", "guest", "host"),
    LifecycleKind.PMSUSPENDED: ("memory", "disk"),
    LifecycleKind.CRASHED: ("panicked", "crashloaded"),
}


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A domain changed state; ``detail`` refines ``event`` (``stopped``/``destroyed``),
    ``timestamp`` is when it was received (Unix seconds)."""

    domain: str
    uuid: str
    event: LifecycleKind
    detail: str
    timestamp: float


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The connection the events came from closed (``reason``: error, eof, keepalive,
    client). No more events arrive from it."""

    reason: str
    timestamp: float


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A :class:`LifecycleWatcher` is receiving events again after a loss (re-list now)."""

    timestamp: float


WatchEvent = LifecycleEvent | ConnectionLost | Reconnected


def lifecycle_event(domain: str, uuid: str, event: int, detail: int) -> LifecycleEvent:
    """Decode libvirt's lifecycle numbers (unknown numbers keep their value as text)."""
    kind = _KINDS.get(event)
    if kind is None:
        return LifecycleEvent(domain, uuid, LifecycleKind.DEFINED, f"unknown({event})", time.time())
    names = _DETAILS[kind]
    text = names[detail] if 0 <= detail < len(names) else f"unknown({detail})"
    return LifecycleEvent(domain, uuid, kind, text, time.time())


@dataclass(slots=True)
class Subscription:
    """A live lifecycle registration on one connection; :meth:`cancel` to stop it."""

    connection: Connection
    callback_id: int
    _remove_listener: Callable[[], None]

    async def cancel(self) -> None:
        """Deregister; idempotent, and quiet if the connection is already gone."""
        self._remove_listener()
        if self.callback_id >= 0:
            callback_id, self.callback_id = self.callback_id, -1
            with contextlib.suppress(VirtError):
                await self.connection.call(
                    self.connection.raw.domainEventDeregisterAny, callback_id, timeout=5
                )


async def subscribe_lifecycle(
    conn: Connection,
    queue: asyncio.Queue[WatchEvent],
) -> Subscription:
    """Put every domain lifecycle event of ``conn`` into ``queue``, then one
    :class:`ConnectionLost` if the connection closes. The queue should be unbounded (a full
    queue drops events)."""
    loop = asyncio.get_running_loop()

    def deliver(item: WatchEvent) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(item)

    def on_event(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        try:
            item = lifecycle_event(str(dom.name()), str(dom.UUIDString()), event, detail)
            loop.call_soon_threadsafe(deliver, item)
        except Exception:  # noqa: S110 - never raise into libvirt's C event loop
            pass

    def on_close(reason: str) -> None:
        with contextlib.suppress(RuntimeError):  # the asyncio loop is closed
            loop.call_soon_threadsafe(deliver, ConnectionLost(reason, time.time()))

    callback_id = int(
        await conn.call(
            conn.raw.domainEventRegisterAny,
            None,
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            on_event,
            None,
        )
    )
    remove = conn.add_close_listener(on_close)
    return Subscription(conn, callback_id, remove)


class LifecycleWatcher:
    """Lifecycle events of one hypervisor across reconnects.

    ``opener`` opens a fresh connection (e.g. ``lambda: open_connection(uri)``, or a new
    ssh tunnel and :func:`~virtbackup.virt.connection.open_ssh_connection`). The watcher
    owns the connections it opens and closes them. Use as an async context manager and
    iterate :meth:`events`, or read :attr:`queue`.
    """

    def __init__(
        self,
        opener: Callable[[], Awaitable[Connection]],
        *,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self._opener = opener
        self._min_delay = min_delay
        self._max_delay = max_delay
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._inner: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._conn: Connection | None = None
        self._sub: Subscription | None = None
        self.connected = asyncio.Event()

    @property
    def connection(self) -> Connection | None:
        """The connection events currently come from (``None`` while reconnecting)."""
        return self._conn

    async def start(self) -> None:
        """Connect and subscribe (raises if the first connection fails), then keep
        watching in a background task."""
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="libvirt-lifecycle-watcher")

    async def _connect(self) -> None:
        conn = await self._opener()
        try:
            self._sub = await subscribe_lifecycle(conn, self._inner)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self.connected.set()

    async def _disconnect(self) -> None:
        self.connected.clear()
        sub, conn, self._sub, self._conn = self._sub, self._conn, None, None
        if sub is not None:
            await sub.cancel()
        if conn is not None:
            await conn.close()

    async def _run(self) -> None:
        while True:
            item = await self._inner.get()
            self.queue.put_nowait(item)
            if not isinstance(item, ConnectionLost):
                continue
            await self._disconnect()
            delay = self._min_delay
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except Exception:  # any failure to reconnect: back off and retry
                    delay = min(delay * 2, self._max_delay)
                    continue
                self.queue.put_nowait(Reconnected(time.time()))
                break

    async def events(self) -> AsyncIterator[WatchEvent]:
        """Every event, forever (until the watcher is closed and the task cancelled)."""
        while True:
            yield await self.queue.get()

    async def close(self) -> None:
        """Stop watching and close the current connection; idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._disconnect()

    async def __aenter__(self) -> LifecycleWatcher:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
