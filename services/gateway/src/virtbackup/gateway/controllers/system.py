"""Native API (``/api/v1``): the system's own view of itself."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, get

from virtbackup.contracts import subjects
from virtbackup.contracts.v1.ping import Ping, Pong
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import ServiceError

PING_TIMEOUT = 2.0


class SystemController(Controller):
    path = "/api/v1"

    @get("/services")
    async def services(self, gw: Gateway) -> list[dict[str, Any]]:
        """Ping every service over the bus; each answers with its instance and trace id."""

        async def one(service: str) -> dict[str, Any]:
            try:
                pong = await gw.bus.request(
                    subjects.ping(service), Ping(), Pong, timeout=PING_TIMEOUT
                )
            except ServiceError as exc:
                return {"service": service, "ok": False, "error": exc.message}
            out = msgspec.to_builtins(pong)
            assert isinstance(out, dict)
            return {"ok": True, **out}

        return list(await asyncio.gather(*(one(s) for s in subjects.SERVICES)))
