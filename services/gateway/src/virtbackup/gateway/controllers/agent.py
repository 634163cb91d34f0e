"""Agent API: health and drivers."""

from __future__ import annotations

import importlib.util
from typing import Any

import msgspec
from litestar import Controller, Response, get
from litestar.openapi import ResponseSpec

from virtbackup.gateway.state import Gateway
from virtbackup.storage.registry import available_drivers


class Health(msgspec.Struct, kw_only=True, rename="camel"):
    ok: bool
    native_sftp_available: bool


class HealthController(Controller):
    @get(
        "/health",
        sync_to_thread=False,
        responses={503: ResponseSpec(Health, description="The bus is disconnected")},
    )
    def health(self, gw: Gateway) -> Response[Health]:
        """Liveness: ``ok`` is false (503) while the bus is disconnected."""
        ok = gw.bus.connected
        body = Health(ok=ok, native_sftp_available=importlib.util.find_spec("asyncssh") is not None)
        return Response(body, status_code=200 if ok else 503)

    @get("/drivers", sync_to_thread=False)
    def drivers(self) -> list[dict[str, Any]]:
        """Every storage driver this build has, with its capabilities and params."""
        return [msgspec.to_builtins(d) for d in available_drivers()]
