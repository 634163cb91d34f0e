"""Native API (``/api/v1/migrations``): warm migration of a running VM to another
server, and who may start one on either listener.

A migration stops the source VM at its cut-over and defines (and starts) a VM on the
target server, so besides the route's permission (``restore:run``) it takes
``vms:control``: ``POST /api/v1/migrations`` and a HyperSDK ``POST /jobs/submit`` whose
destination is ``{"type": "kvm"}`` are 403 without both. The job itself is the
job-orchestrator's (``job_orchestrator/migrate.py``): the body here becomes the
HyperSDK job definition it checks.
"""

from __future__ import annotations

import re
from typing import Any, Final

from litestar import Controller, Request, post
from litestar.exceptions import PermissionDeniedException

from virtbackup.contracts.subjects import JobCmd
from virtbackup.contracts.v1.common import ServerId, VmName
from virtbackup.contracts.v1.jobs import Job, JobGetRequest
from virtbackup.contracts.v1.schedules import JobDefinition, JobSubmitRequest, JobSubmitResult
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.controllers.jobs import job_view
from virtbackup.gateway.errors import responses
from virtbackup.gateway.identity_auth import PERMISSIONS_KEY
from virtbackup.gateway.identity_perms import allows
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import ServiceError

#: What starting a migration takes (besides the route's own permission).
MIGRATION_PERMISSIONS: Final = ("restore:run", "vms:control")
#: What a migration through a backup destination takes besides: it makes backups there.
VIA_PERMISSIONS: Final = ("backup:run",)


#: The fields of a migration as the orchestrator's checks name them (the HyperSDK
#: definition's) -> as ``POST /api/v1/migrations`` takes them.
NATIVE_FIELDS: Final = {
    "vm_path": "vmName",
    "source.server_id": "serverId",
    "destination.server_id": "targetServerId",
    "destination.libvirt_uri": "targetLibvirtUri",
    "destination.via_destination_id": "viaDestinationId",
    "options.vm_name": "targetVmName",
    "options.target_directory": "targetDirectory",
    "options.storage_pool": "storagePool",
    "options.max_downtime_seconds": "maxDowntimeSeconds",
    "options.max_passes": "maxPasses",
    "options.shutdown_timeout_seconds": "shutdownTimeoutSeconds",
    "options.force_shutdown": "forceShutdown",
    "options.start_on_target": "startOnTarget",
    "options.replace": "replace",
    "options.network_mapping": "networkMapping",
    "options.remove_source": "removeSource",
    "options.remove_source_disks": "removeSourceDisks",
}
_LEADING_FIELD: Final = re.compile(
    "^(" + "|".join(re.escape(f) for f in sorted(NATIVE_FIELDS, key=len, reverse=True)) + ")"
    r"((?:\.[^\s:]+)?)(?=[:\s]|$)"
)


def native_error(exc: ServiceError) -> ServiceError:
    """``exc`` (same class: same status) with the field its message starts with named as
    the native body names it, the orchestrator's name after it in parentheses:
    ``maxPasses (options.max_passes): must be 1 to 100``."""
    found = _LEADING_FIELD.match(exc.message)
    if found is None:
        return exc
    wire, below = found.group(1), found.group(2)
    rest = exc.message[found.end() :]
    return type(exc)(f"{NATIVE_FIELDS[wire]}{below} ({wire}{below}){rest}")


def check_may_migrate(request: Request[Any, Any, Any], *, via: bool = False) -> None:
    """``PermissionDeniedException`` (403) unless the caller holds every permission of
    :data:`MIGRATION_PERMISSIONS` (and, through a backup destination (``via``), of
    :data:`VIA_PERMISSIONS` too)."""
    held = request.scope.get(PERMISSIONS_KEY)
    if not isinstance(held, frozenset):
        held = frozenset()
    wanted = MIGRATION_PERMISSIONS + (VIA_PERMISSIONS if via else ())
    missing = [p for p in wanted if not allows(held, p)]
    if missing:
        raise PermissionDeniedException(
            f"a migration stops and defines VMs: it needs {', '.join(missing)}"
        )


class MigrationBody(Body, kw_only=True):
    """``serverId``/``vmName``: the running VM; ``targetServerId``: another configured
    server, or ``targetLibvirtUri``: its libvirt URI (``qemu+ssh://user@host/system``,
    resolved to the configured server it names; both: they must name the same one).
    Optional: ``targetVmName`` (default: the same name), ``targetDirectory`` or
    ``storagePool`` (where the disks go on the target; default: beside the same paths),
    ``maxDowntimeSeconds`` (30), ``maxPasses`` (5), ``shutdownTimeoutSeconds`` (120, at most 3600),
    ``forceShutdown`` (true), ``startOnTarget`` (true), ``replace`` (false: a VM of the
    name on the target is a 409), ``networkMapping`` (source network -> target network),
    ``viaDestinationId`` (through that backup destination; it also takes ``backup:run``;
    an unknown one is a 404, a disabled or unwritable one a 400).
    ``removeSource`` (false: undefine the source once the VM runs on the target) and
    ``removeSourceDisks`` (false: with ``removeSource``, delete its disk images too).
    """

    server_id: ServerId
    vm_name: VmName
    target_server_id: ServerId | None = None
    target_libvirt_uri: str | None = None
    target_vm_name: VmName | None = None
    target_directory: str | None = None
    storage_pool: str | None = None
    max_downtime_seconds: float | None = None
    max_passes: int | None = None
    shutdown_timeout_seconds: float | None = None
    force_shutdown: bool | None = None
    start_on_target: bool | None = None
    replace: bool | None = None
    network_mapping: dict[str, str] | None = None
    #: Through this backup destination (back up, restore on the target): for hosts that
    #: cannot reach each other (job_orchestrator/migrate_via.py).
    via_destination_id: str | None = None
    remove_source: bool | None = None
    remove_source_disks: bool | None = None

    def definition(self) -> JobDefinition:
        options = {
            "vm_name": self.target_vm_name,
            "target_directory": self.target_directory,
            "storage_pool": self.storage_pool,
            "max_downtime_seconds": self.max_downtime_seconds,
            "max_passes": self.max_passes,
            "shutdown_timeout_seconds": self.shutdown_timeout_seconds,
            "force_shutdown": self.force_shutdown,
            "start_on_target": self.start_on_target,
            "replace": self.replace,
            "network_mapping": self.network_mapping,
            "remove_source": self.remove_source,
            "remove_source_disks": self.remove_source_disks,
        }
        target = {"server_id": self.target_server_id, "libvirt_uri": self.target_libvirt_uri}
        destination: dict[str, str] = {
            "type": "kvm",
            **{k: v for k, v in target.items() if v is not None},
        }
        if self.via_destination_id is not None:
            destination["via_destination_id"] = self.via_destination_id
        return JobDefinition(
            vm_path=f"{self.server_id}/{self.vm_name}",
            source={"type": "libvirt", "server_id": self.server_id},
            destination=destination,
            options={k: v for k, v in options.items() if v is not None},
        )


class MigrationsController(Controller):
    path = "/api/v1/migrations"

    @post("", status_code=202, responses=responses(403, 404, 409))
    async def start(
        self, gw: Gateway, request: Request[Any, Any, Any], data: MigrationBody
    ) -> dict[str, Any]:
        """Start a warm migration (a ``migration`` job); answers the job. A 4xx names the
        field as this body does (``maxPasses (options.max_passes): ...``)."""
        check_may_migrate(request, via=data.via_destination_id is not None)
        try:
            result = await gw.bus.request(
                JobCmd.SUBMIT,
                JobSubmitRequest(definition=data.definition()),
                JobSubmitResult,
                timeout=timeouts.JOB_COMMAND,
            )
        except ServiceError as exc:
            raise native_error(exc) from None
        job = await gw.bus.request(JobCmd.GET, JobGetRequest(id=result.job_ids[0]), Job)
        return job_view(job)
