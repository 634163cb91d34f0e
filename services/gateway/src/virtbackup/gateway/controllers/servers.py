"""Agent API: servers and their VMs, owned by the inventory service."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, get, post
from litestar.params import Parameter

from virtbackup.contracts.subjects import InventoryCmd, JobCmd
from virtbackup.contracts.v1.common import (
    NAME_MAX_LENGTH,
    SERVER_ID_PATTERN,
    VM_NAME_MAX_BYTES,
    VmName,
    shown,
    vm_name_fits,
)
from virtbackup.contracts.v1.config import host_key_fingerprint
from virtbackup.contracts.v1.inventory import (
    CleanupResult,
    Ok,
    ServerRef,
    ServerVms,
    VmAction,
    VmActionRequest,
    VmRef,
)
from virtbackup.contracts.v1.jobs import (
    ALSO_DESTINATIONS_MAX,
    AbsolutePath,
    BackupRequest,
    Job,
    PoolName,
    PrecheckRequest,
    PrecheckResult,
    RestoreRequest,
)
from virtbackup.gateway.agent_host import agent_host_domains
from virtbackup.gateway.bodies import Body, NoBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import BadRequest, NotFound

#: A server id in a path: what a configured server's id may be (else 400 naming it).
ServerIdParam = Annotated[
    str,
    Parameter(
        description="A configured server's id",
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        pattern=SERVER_ID_PATTERN,
    ),
]


async def destination_of_driver(gw: Gateway, driver_id: str | None) -> str | None:
    """The first destination of ``driver_id`` (the API's backward-compatible form)."""
    if not driver_id:
        return None
    cfg, _ = await gw.config.load()
    for dest in cfg.destinations:
        if dest.driver_id == driver_id:
            return dest.id
    raise NotFound(f"no destination with driverId {shown(driver_id)}")


class ActionBody(Body, kw_only=True):
    action: VmAction
    vm_name: VmName


class VmBody(Body, kw_only=True):
    vm_name: VmName


class BackupBody(Body, kw_only=True):
    vm_name: VmName
    destination_id: str | None = None
    fresh: bool = False
    #: Accepted for backward compatibility: a destination of this driver is used.
    driver_id: str | None = None
    driver_params: dict[str, Any] | None = None
    #: More destinations written from the same read (see ``BackupRequest``).
    also_destination_ids: Annotated[list[str], msgspec.Meta(max_length=ALSO_DESTINATIONS_MAX)] = (
        msgspec.field(default_factory=list)
    )


class PrecheckBody(Body, kw_only=True):
    """The agent API's fields, plus where and as what the restore would go (optional,
    checked as ``restore/start`` checks them): see ``PrecheckRequest``."""

    xml_path: str
    destination_id: str | None = None
    vm_name: VmName | None = None
    target_directory: AbsolutePath | None = None
    storage_pool: PoolName | None = None


class RestoreBody(Body, kw_only=True):
    """The agent API's fields, plus where and as what to restore (all optional): see
    ``RestoreRequest``."""

    xml_path: str
    decision: Literal["overwrite", "define"]
    destination_id: str | None = None
    driver_id: str | None = None
    vm_name: VmName | None = None
    target_directory: AbsolutePath | None = None
    storage_pool: PoolName | None = None
    start: bool = False


class ServersController(Controller):
    path = "/servers/{server_id:str}"

    @get("/vms", responses=responses(404))
    async def vms(self, gw: Gateway, server_id: ServerIdParam) -> list[dict[str, Any]]:
        """The server's VMs from the cache, with ``hasOverlay`` for backup leftovers."""
        result = await gw.bus.request(
            InventoryCmd.VMS,
            ServerRef(server_id=server_id),
            ServerVms,
            timeout=timeouts.INVENTORY_QUERY,
        )
        out = msgspec.to_builtins(result.vms)
        assert isinstance(out, list)
        return out

    @post("/refresh", status_code=200, responses=responses(404))
    async def refresh(
        self, gw: Gateway, server_id: ServerIdParam, data: NoBody | None = None
    ) -> dict[str, bool]:
        """Re-read the server's VMs now (no body, or ``{}``)."""
        await gw.bus.request(
            InventoryCmd.REFRESH,
            ServerRef(server_id=server_id),
            Ok,
            timeout=timeouts.INVENTORY_QUERY,
        )
        return {"success": True}

    @post("/test", status_code=200, responses=responses(404))
    async def test_ssh(
        self, gw: Gateway, server_id: ServerIdParam, data: NoBody | None = None
    ) -> dict[str, Any]:
        """Test the SSH connection (body ``{}`` or none): ``success`` false with the
        reason when it fails; ``hostKeyFingerprint`` is the pinned host key's SHA256
        fingerprint (empty while none is pinned)."""
        result = await gw.bus.request(
            InventoryCmd.TEST_SSH,
            ServerRef(server_id=server_id),
            Ok,
            timeout=timeouts.INVENTORY_QUERY,
        )
        body: dict[str, Any] = {"success": result.success}
        if result.message:
            body["message"] = result.message
        cfg, _ = await gw.config.load()
        server = next((s for s in cfg.servers if s.id == server_id), None)
        if server is not None and server.host:
            body["hostKeyFingerprint"] = (
                host_key_fingerprint(server.host_key) if server.host_key else ""
            )
        return body

    @post("/actions", status_code=200, responses=responses(404, 409))
    async def action(
        self, gw: Gateway, server_id: ServerIdParam, data: ActionBody
    ) -> dict[str, bool]:
        """start, reboot, shutdown, forceReset or forceOff a VM (409 if its state forbids)."""
        request = VmActionRequest(server_id=server_id, vm_name=data.vm_name, action=data.action)
        await gw.bus.request(InventoryCmd.ACTION, request, Ok, timeout=timeouts.INVENTORY_QUERY)
        return {"success": True}

    @post("/backup", status_code=200, responses=responses(404, 409))
    async def backup(
        self, gw: Gateway, server_id: ServerIdParam, data: BackupBody
    ) -> dict[str, str]:
        """Back up every disk of a VM (incremental when the checkpoint chain allows)."""
        destination_id = data.destination_id or await destination_of_driver(gw, data.driver_id)
        request = BackupRequest(
            server_id=server_id,
            vm_name=data.vm_name,
            destination_id=destination_id,
            fresh=data.fresh,
            also_destination_ids=data.also_destination_ids,
        )
        job = await gw.bus.request(JobCmd.BACKUP, request, Job, timeout=timeouts.JOB_COMMAND)
        return {"jobId": job.id}

    @post("/restore/precheck", status_code=200, responses=responses(404, 409))
    async def precheck(
        self, gw: Gateway, server_id: ServerIdParam, data: PrecheckBody
    ) -> dict[str, bool]:
        """Whether the VM exists, and whether defining alone would bring it back."""
        request = PrecheckRequest(
            server_id=server_id,
            xml_path=data.xml_path,
            destination_id=data.destination_id,
            vm_name=data.vm_name,
            target_directory=data.target_directory,
            storage_pool=data.storage_pool,
            host_domains=await agent_host_domains(gw, server_id),
        )
        result = await gw.bus.request(
            JobCmd.RESTORE_PRECHECK, request, PrecheckResult, timeout=timeouts.JOB_COMMAND
        )
        return {"vmExists": result.vm_exists, "canDefineOnly": result.can_define_only}

    @post("/restore/start", status_code=200, responses=responses(404, 409))
    async def restore(
        self, gw: Gateway, server_id: ServerIdParam, data: RestoreBody
    ) -> dict[str, str]:
        """Restore a point: ``overwrite`` writes new disks and defines, ``define`` defines;
        optionally as another VM, into a directory or pool, and started.

        A new ``vmName`` longer than libvirt can define (``VM_NAME_MAX_BYTES`` of
        UTF-8) is a 400 naming it."""
        if data.vm_name is not None and not vm_name_fits(data.vm_name):
            raise BadRequest(
                f"vmName: {len(data.vm_name.encode())} bytes of UTF-8; libvirt defines "
                f"domains of names up to {VM_NAME_MAX_BYTES} bytes"
            )
        destination_id = data.destination_id or await destination_of_driver(gw, data.driver_id)
        request = RestoreRequest(
            server_id=server_id,
            xml_path=data.xml_path,
            decision=data.decision,
            destination_id=destination_id,
            vm_name=data.vm_name,
            target_directory=data.target_directory,
            storage_pool=data.storage_pool,
            start=data.start,
            host_domains=await agent_host_domains(gw, server_id),
        )
        job = await gw.bus.request(JobCmd.RESTORE, request, Job, timeout=timeouts.JOB_COMMAND)
        return {"jobId": job.id}

    @post("/cleanup", status_code=200, responses=responses(404, 409))
    async def cleanup(self, gw: Gateway, server_id: ServerIdParam, data: VmBody) -> dict[str, Any]:
        """Abort a stale backup job, drop stale checkpoints and scratch files, commit overlays."""
        request = VmRef(server_id=server_id, vm_name=data.vm_name)
        result = await gw.bus.request(
            InventoryCmd.CLEANUP, request, CleanupResult, timeout=timeouts.INVENTORY_JOB_STEP
        )
        return {"success": result.success, "actions": result.actions}
