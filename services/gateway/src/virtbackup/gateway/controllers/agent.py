"""Agent API: health and drivers."""

from __future__ import annotations

import importlib.util
from typing import Any

import msgspec
from litestar import Controller, Response, get

from virtbackup.gateway.state import Gateway
from virtbackup.storage.registry import available_drivers


class HealthController(Controller):
    @get("/health", sync_to_thread=False)
    def health(self, gw: Gateway) -> Response[dict[str, bool]]:
        """Liveness: ``ok`` is false (503) while the bus is disconnected."""
        ok = gw.bus.connected
        body = {"ok": ok, "nativeSftpAvailable": importlib.util.find_spec("asyncssh") is not None}
        return Response(body, status_code=200 if ok else 503)

    @get("/drivers", sync_to_thread=False)
    def drivers(self) -> list[dict[str, Any]]:
        """Every storage driver this build has, with its capabilities and params."""
        return [msgspec.to_builtins(d) for d in available_drivers()]
