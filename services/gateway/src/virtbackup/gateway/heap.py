"""The gateway's heap after start-up: frozen out of the cyclic garbage collector.

Python's full collections (generation 2) walk every tracked object; the gateway's
modules, routes, schemas and clients made at start-up are a few hundred thousand of them,
all alive for the life of the process, so each full collection paused the event loop for
100-600 ms while 200 streams ran (measured with ``loop_watch``: the /health p99 tail of
``bench/load.py``). Once the listeners have started, :func:`freeze_when_started` collects
once and moves every object then alive to the permanent generation (``gc.freeze``): later
collections walk only what was made after, and a full one takes milliseconds.

Objects frozen are never collected, so only what exists at start-up is frozen, once;
everything made later (requests, streams, caches) is collected as before. The one full
collection before freezing holds the loop once, at start-up (80-560 ms measured on the
2-core machine, idle to busy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from virtbackup.runtime.heap import freeze_heap

#: The longest wait for the listeners to start before freezing anyway, in seconds.
START_TIMEOUT = 120.0


class _Started(Protocol):
    started: bool


async def freeze_when_started(
    servers: Sequence[_Started], *, timeout: float = START_TIMEOUT, poll: float = 0.05
) -> None:
    """Wait until every server of ``servers`` has ``started`` (at most ``timeout``
    seconds: then freeze what there is), then :func:`virtbackup.runtime.heap.freeze_heap`."""
    for _ in range(max(1, round(timeout / poll))):  # a bounded wait
        if all(s.started for s in servers):
            break
        await asyncio.sleep(poll)
    freeze_heap()
