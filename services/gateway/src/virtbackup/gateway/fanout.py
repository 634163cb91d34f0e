"""Handing one message to many streams without holding the event loop.

A message offered to a stream's queue wakes that stream's task, and every task woken
runs in the event loop's next turn: 100 streams offered one message in one go made one
turn of about 100 sends (TLS, WebSocket framing), and every request waiting meanwhile
(``/health``) waited for all of them. :func:`offer_in_batches` offers to ``BATCH``
streams, then yields once, so a turn runs at most ``BATCH`` sends and other work comes
in between. Each stream still gets the messages in the order they were offered (the
caller awaits one message's fan-out before it offers the next).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

#: Streams offered a message between two yields to the event loop.
BATCH = 16

T = TypeVar("T", contravariant=True)
M = TypeVar("M")


class Offerable(Protocol[T]):
    def offer(self, item: T, /) -> None: ...


async def offer_in_batches(clients: Sequence[Offerable[T]], item: T, batch: int = BATCH) -> None:
    """``client.offer(item)`` for each of ``clients`` (a snapshot: clients may come and
    go meanwhile), yielding to the event loop after every ``batch`` of them. Never waits
    for a client: ``offer`` does not block."""
    for start in range(0, len(clients), batch):
        if start:
            await asyncio.sleep(0)
        for client in clients[start : start + batch]:
            client.offer(item)


class Outbox(Generic[M]):
    """One stream's bounded queue of outgoing messages (``size`` at most). ``full`` is
    set when an offer found it full; nothing is queued after that: the stream is too
    slow, and its owner ends it (``/events``, ``/ws``)."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[M] = asyncio.Queue(size)
        self.full = asyncio.Event()

    def offer(self, item: M) -> None:
        """Queue ``item`` without ever waiting; a full queue sets ``full``."""
        if self.full.is_set():
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.full.set()


async def stop_tasks(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (a hub's feeds, once its last
    client has left)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
