"""The HyperSDK-style API (``hypersdk-api.md``), on its own listener.

Served here: health, status (``hypersdk_status``), ``/metrics`` (``hypersdk_metrics``),
``WS /ws`` (``hypersdk_ws``), VM discovery against the inventory's libvirt servers, and
jobs and schedules (``hypersdk_jobs``).
vSphere is not a source VirtBackup has: a request naming only ``vcenter_url`` is refused
with a clear 400. A libvirt VM is addressed by ``server_id`` and its name, or by
``vm_path`` written ``<server_id>/<vm name>``; a server id or VM name that no server
could have (a control character, a ``/`` in a name, too long) is a 400 naming the field.
Requests pass the same checks as the agent API's (``edge.check_request``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, Litestar, Response, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig, ResponseSpec

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.common import ServerId, VmName
from virtbackup.contracts.v1.inventory import CdromRemoved, Ok, ServerRef, ServerVms, VmInfo, VmRef
from virtbackup.gateway.audit_log import OperationLog
from virtbackup.gateway.bodies import SnakeBody
from virtbackup.gateway.edge import check_request
from virtbackup.gateway.errors import HANDLERS, SNAKE_CASE, readable, responses
from virtbackup.gateway.hypersdk_hooks import WebhooksController
from virtbackup.gateway.hypersdk_jobs import HyperSdkJobsController
from virtbackup.gateway.hypersdk_metrics import (
    DedicatedMetricsController,
    MetricsController,
    RequestMetrics,
)
from virtbackup.gateway.hypersdk_status import current_status
from virtbackup.gateway.hypersdk_ws import ws
from virtbackup.gateway.identity_auth import IdentityAuth, answer_refusal
from virtbackup.gateway.openapi import finish_document
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import __version__, timeouts
from virtbackup.runtime.errors import BadRequest

POWER = {"running": "poweredOn", "shutoff": "poweredOff", "paused": "suspended"}


class VmRequest(SnakeBody, kw_only=True):
    """The body of ``/vms/shutdown``, ``/vms/poweroff`` and ``/vms/remove-cdrom``: the
    document's fields (``vcenter_url``, ``username`` and ``password`` are accepted and
    unused: vSphere is no source here); any other field is a 400 naming it."""

    vm_path: str = ""
    server_id: str = ""
    vm_name: str = ""
    vcenter_url: str = ""
    username: str = ""
    password: str = ""


def _checked(value: str, kind: type[str], field: str) -> str:
    """``value`` if it is a valid ``kind`` (``ServerId``, ``VmName``), else a 400 naming
    ``field``."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(readable(f"invalid {field}: {exc}")) from None


def server_of(server_id: str, vcenter_url: str) -> str:
    """The libvirt server a request names; vSphere-only requests are refused."""
    if server_id:
        return _checked(server_id, ServerId, "server_id")
    if vcenter_url:
        raise BadRequest("vSphere sources are not supported: name a libvirt server_id")
    raise BadRequest("server_id is required")


def vm_ref(req: VmRequest) -> VmRef:
    """The libvirt VM a request names (``server_id`` + name, or ``vm_path``)."""
    server, name = req.server_id, req.vm_name
    server_field, name_field = "server_id", "vm_name"
    if req.vm_path:
        name_field = "vm_path"
        if "/" in req.vm_path and not server:
            server, name = req.vm_path.split("/", 1)
            server_field = "vm_path"
        else:
            name = req.vm_path
    if not server:
        if req.vcenter_url:
            raise BadRequest("vSphere sources are not supported: name a libvirt server_id")
        raise BadRequest("server_id is required (or vm_path as '<server_id>/<vm name>')")
    if not name:
        raise BadRequest("vm_path (or vm_name) is required")
    return VmRef(
        server_id=_checked(server, ServerId, server_field),
        vm_name=_checked(name, VmName, name_field),
    )


def vm_view(info: VmInfo, server_id: str) -> dict[str, Any]:
    return {
        "name": info.name,
        "path": f"{server_id}/{info.name}",
        "uuid": info.uuid,
        "power_state": POWER.get(info.power_state, info.power_state),
        "num_cpu": info.vcpus,
        "memory_mb": info.memory_mb,
        "storage": sum(d.capacity for d in info.disks),
    }


class HealthStatus(msgspec.Struct):
    status: str


class HyperSdkController(Controller):
    @get(
        "/health",
        responses={
            503: ResponseSpec(HealthStatus, description="``degraded``: the bus is disconnected")
        },
    )
    async def health(self, gw: Gateway) -> Response[HealthStatus]:
        """200 ``ok`` while the bus is connected, else 503 ``degraded`` (so that a load
        balancer sends no traffic to a gateway that cannot reach the services)."""
        if gw.bus.connected:
            return Response(HealthStatus("ok"))
        return Response(HealthStatus("degraded"), status_code=503)

    @get("/status")
    async def status(self, gw: Gateway) -> dict[str, int]:
        """Job counts by state from the job store; ``worker_count``: live transfer
        workers, ``active_workers``: those working on a unit (``hypersdk_status``)."""
        return await current_status(gw)

    @get("/vms/list", responses=responses(404))
    async def list_vms(
        self, gw: Gateway, server_id: str = "", vcenter_url: str = ""
    ) -> dict[str, Any]:
        """Every VM of a libvirt server, with CPUs, memory and disk size."""
        server = server_of(server_id, vcenter_url)
        vms = await gw.bus.request(
            InventoryCmd.VMS,
            ServerRef(server_id=server),
            ServerVms,
            timeout=timeouts.INVENTORY_QUERY,
        )
        infos = await asyncio.gather(
            *(
                gw.bus.request(
                    InventoryCmd.VM_INFO,
                    VmRef(server_id=server, vm_name=v.vm.name),
                    VmInfo,
                    timeout=timeouts.INVENTORY_QUERY,
                )
                for v in vms.vms
            )
        )
        return {"vms": [vm_view(i, server) for i in infos], "total": len(infos)}

    @get("/vms/info", responses=responses(404))
    async def vm_info(
        self, gw: Gateway, vm_path: str = "", server_id: str = "", vcenter_url: str = ""
    ) -> dict[str, Any]:
        """One VM in detail, with its disks."""
        ref = vm_ref(VmRequest(vm_path=vm_path, server_id=server_id, vcenter_url=vcenter_url))
        info = await gw.bus.request(
            InventoryCmd.VM_INFO, ref, VmInfo, timeout=timeouts.INVENTORY_QUERY
        )
        view = vm_view(info, ref.server_id)
        return {
            "name": view["name"],
            "path": view["path"],
            "uuid": view["uuid"],
            "power_state": view["power_state"],
            "hardware": {
                "num_cpu": info.vcpus,
                "memory_mb": info.memory_mb,
                "num_virtual_disks": len(info.disks),
            },
            "disks": [
                {"label": d.target, "capacity_kb": d.capacity // 1024, "file_path": d.path}
                for d in info.disks
            ],
        }

    async def _action(self, gw: Gateway, data: VmRequest, action: str) -> None:
        from virtbackup.contracts.v1.inventory import VmActionRequest

        ref = vm_ref(data)
        request = VmActionRequest(
            server_id=ref.server_id,
            vm_name=ref.vm_name,
            action="shutdown" if action == "shutdown" else "forceOff",
        )
        await gw.bus.request(InventoryCmd.ACTION, request, Ok, timeout=timeouts.INVENTORY_QUERY)

    @post("/vms/shutdown", status_code=200, responses=responses(404, 409))
    async def shutdown(self, gw: Gateway, data: VmRequest) -> dict[str, str]:
        """Ask the guest to shut down (ACPI)."""
        await self._action(gw, data, "shutdown")
        return {"message": "VM shutdown initiated"}

    @post("/vms/poweroff", status_code=200, responses=responses(404, 409))
    async def poweroff(self, gw: Gateway, data: VmRequest) -> dict[str, str]:
        """Power the VM off at once."""
        await self._action(gw, data, "poweroff")
        return {"message": "VM powered off"}

    @post("/vms/remove-cdrom", status_code=200, responses=responses(404, 409))
    async def remove_cdrom(self, gw: Gateway, data: VmRequest) -> dict[str, Any]:
        """Eject the media of every CD-ROM drive. 200 either way (the document has no
        other status for it): ``removed`` says whether there was a medium to remove,
        ``ejected`` the drives that had one."""
        done = await gw.bus.request(
            InventoryCmd.REMOVE_CDROM, vm_ref(data), CdromRemoved, timeout=timeouts.INVENTORY_QUERY
        )
        if not done.ejected:
            return {
                "message": "no CD-ROM device to remove: the VM has no CD-ROM drive with a medium",
                "removed": False,
                "ejected": [],
            }
        return {"message": "CD-ROM devices removed", "removed": True, "ejected": done.ejected}


def create_hypersdk_asgi(gw: Gateway) -> RequestMetrics:
    """The HyperSDK-style API behind the same authentication and roles as the agent API
    (``identity_auth``)."""

    def provide_gateway() -> Gateway:
        return gw

    app = Litestar(
        route_handlers=[
            HyperSdkController,
            HyperSdkJobsController,
            WebhooksController,
            MetricsController,
            ws,
        ],
        dependencies={"gw": Provide(provide_gateway, sync_to_thread=False)},
        exception_handlers=HANDLERS,
        before_request=check_request,
        state=State({SNAKE_CASE: True}),
        openapi_config=OpenAPIConfig(title="VirtBackup (HyperSDK API)", version=__version__),
        request_max_body_size=gw.settings.max_body_bytes,
        logging_config=None,
    )
    finish_document(app, {})
    # The operation log sits inside authentication: it sees authenticated requests only.
    audited = OperationLog(app, lambda: gw.audit, listener="hypersdk", default_actor="token")  # type: ignore[arg-type]
    refused = OperationLog(
        answer_refusal, lambda: gw.audit, listener="hypersdk", default_actor="token"
    )
    return RequestMetrics(IdentityAuth(audited, gw.token, gw.identity, "hypersdk", refused=refused))


def create_metrics_asgi(gw: Gateway) -> RequestMetrics:
    """``/metrics`` alone, for the listener of ``metrics.port`` (same credentials;
    ``system:read``)."""

    def provide_gateway() -> Gateway:
        return gw

    app = Litestar(
        route_handlers=[DedicatedMetricsController],
        dependencies={"gw": Provide(provide_gateway, sync_to_thread=False)},
        exception_handlers=HANDLERS,
        openapi_config=None,
        logging_config=None,
    )
    return RequestMetrics(IdentityAuth(app, gw.token, gw.identity, "hypersdk"))  # type: ignore[arg-type]
