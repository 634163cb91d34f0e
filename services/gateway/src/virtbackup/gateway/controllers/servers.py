"""Agent API: servers and their VMs, owned by the inventory service."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, get, post

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import (
    CleanupResult,
    Ok,
    ServerRef,
    ServerVms,
    VmAction,
    VmActionRequest,
    VmRef,
)
from virtbackup.gateway.state import Gateway


class ActionBody(msgspec.Struct, kw_only=True, rename="camel"):
    action: VmAction
    vm_name: str


class VmBody(msgspec.Struct, kw_only=True, rename="camel"):
    vm_name: str


#: Inventory commands may open a connection (bounded by the server timeout) and then make
#: several libvirt calls.
INVENTORY_TIMEOUT = 30.0


class ServersController(Controller):
    path = "/servers/{server_id:str}"

    @get("/vms")
    async def vms(self, gw: Gateway, server_id: str) -> list[dict[str, Any]]:
        """The server's VMs from the cache, with ``hasOverlay`` for backup leftovers."""
        result = await gw.bus.request(
            InventoryCmd.VMS, ServerRef(server_id=server_id), ServerVms, timeout=INVENTORY_TIMEOUT
        )
        out = msgspec.to_builtins(result.vms)
        assert isinstance(out, list)
        return out

    @post("/refresh", status_code=200)
    async def refresh(self, gw: Gateway, server_id: str) -> dict[str, bool]:
        """Re-read the server's VMs now."""
        await gw.bus.request(
            InventoryCmd.REFRESH, ServerRef(server_id=server_id), Ok, timeout=INVENTORY_TIMEOUT
        )
        return {"success": True}

    @post("/test", status_code=200)
    async def test_ssh(self, gw: Gateway, server_id: str) -> dict[str, Any]:
        """Test the SSH connection: ``success`` false with the reason when it fails."""
        result = await gw.bus.request(
            InventoryCmd.TEST_SSH, ServerRef(server_id=server_id), Ok, timeout=INVENTORY_TIMEOUT
        )
        body: dict[str, Any] = {"success": result.success}
        if result.message:
            body["message"] = result.message
        return body

    @post("/actions", status_code=200)
    async def action(self, gw: Gateway, server_id: str, data: ActionBody) -> dict[str, bool]:
        """start, reboot, shutdown, forceReset or forceOff a VM (409 if its state forbids)."""
        request = VmActionRequest(server_id=server_id, vm_name=data.vm_name, action=data.action)
        await gw.bus.request(InventoryCmd.ACTION, request, Ok, timeout=60)
        return {"success": True}

    @post("/cleanup", status_code=200)
    async def cleanup(self, gw: Gateway, server_id: str, data: VmBody) -> dict[str, Any]:
        """Abort a stale backup job, drop stale checkpoints and scratch files, commit overlays."""
        request = VmRef(server_id=server_id, vm_name=data.vm_name)
        result = await gw.bus.request(InventoryCmd.CLEANUP, request, CleanupResult, timeout=120)
        return {"success": result.success, "actions": result.actions}
