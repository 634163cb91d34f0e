"""Agent API: the configuration."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post

from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.config import config_to_builtins
from virtbackup.gateway.config_store import mask_secrets
from virtbackup.gateway.state import Gateway


class ConfigController(Controller):
    path = "/config"

    @get()
    async def get_config(self, gw: Gateway) -> dict[str, Any]:
        """The whole configuration; secrets read as ``********``."""
        cfg, _ = await gw.config.load()
        masked: dict[str, Any] = mask_secrets(config_to_builtins(cfg))
        return masked

    @post(status_code=200)
    async def post_config(self, gw: Gateway, request: Request[Any, Any, Any]) -> dict[str, bool]:
        """Replace the whole configuration (validated strictly; all or nothing)."""
        revision = await gw.config.replace(await request.body())
        await gw.bus.publish_event(EventType.CONFIG_CHANGED, {"revision": revision})
        return {"success": True}
