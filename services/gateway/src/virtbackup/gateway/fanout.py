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
from collections.abc import Sequence
from typing import Protocol, TypeVar

#: Streams offered a message between two yields to the event loop.
BATCH = 16

T = TypeVar("T", contravariant=True)


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
