"""Command handlers as module-level functions, bound to their dependencies at start.

A service declares ``commands = Commands[Deps]()`` in its handlers module and writes::

    @commands.handler(JobCmd.GET, JobGetRequest)
    async def get_job(deps: Deps, req: JobGetRequest) -> Job: ...

Each handler stays a plain coroutine function that a test can call with its
dependencies; ``attach`` subscribes them all on the service's bus (see
``Bus.handle`` for the reply envelope and error mapping).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from virtbackup.runtime.bus import Bus

D = TypeVar("D")
Req = TypeVar("Req", bound=msgspec.Struct)
Res = TypeVar("Res")


@dataclass
class Commands(Generic[D]):
    entries: list[tuple[str, type[Any], Callable[[D, Any], Awaitable[Any]]]] = field(
        default_factory=list
    )

    def handler(
        self, subject: str, request_type: type[Req]
    ) -> Callable[[Callable[[D, Req], Awaitable[Res]]], Callable[[D, Req], Awaitable[Res]]]:
        """Declare ``fn(deps, request)`` as the handler of command ``subject``."""

        def register(
            fn: Callable[[D, Req], Awaitable[Res]],
        ) -> Callable[[D, Req], Awaitable[Res]]:
            self.entries.append((subject, request_type, fn))
            return fn

        return register

    def attach(self, bus: Bus, deps: D) -> None:
        """Subscribe every declared handler on ``bus``, called with ``deps``."""
        for subject, request_type, fn in self.entries:
            bus.handle(subject, request_type)(_bind(fn, deps))


def _bind(fn: Callable[[D, Any], Awaitable[Any]], deps: D) -> Callable[[Any], Awaitable[Any]]:
    async def bound(request: Any) -> Any:
        return await fn(deps, request)

    bound.__name__ = fn.__name__
    return bound
