"""Native API (``/api/v1``, backend-api.md): the vault's connections.

* ``GET /api/v1/vault/connections``: every connection, secrets masked (``********``),
  with ``status`` (``ok``/``failing``, the last test's), ``message`` and ``usedBy`` (the
  servers and destinations that refer to it).
* ``POST /api/v1/vault/connections`` (``contracts.v1.vault.VaultConnectionBody``): tested
  before it is saved; a failing test is a 400 with the reason and saves nothing, unless
  ``saveOnFailure: true`` (then 201 with ``status: failing``). 201 with the connection.
* ``DELETE /api/v1/vault/connections/{id}``: 204; 409 naming the servers and destinations
  that refer to it; 404 when there is none.
* ``POST /api/v1/vault/connections/{id}/test``: ``{"success", "message"}``, recorded as
  the connection's ``status``.

The gateway is the vault's only holder (``vault_store``); the commands the services ask
it for credentials with are registered here too (:func:`register_vault_commands`).
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, delete, get, post
from litestar.params import Parameter

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import VaultCmd
from virtbackup.contracts.v1.vault import VaultConnectionBody, VaultCredentials, VaultOpenRequest
from virtbackup.gateway.bodies import NoBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.gateway.vault_store import VaultStore, references
from virtbackup.runtime.agent_config import read_agent_config
from virtbackup.runtime.errors import Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.vault import VaultCipher, service_box

ConnectionIdParam = Annotated[
    str,
    Parameter(
        description="A vault connection's id",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
    ),
]


def _vault(gw: Gateway) -> VaultStore:
    if gw.vault is None:
        raise Unavailable("the vault is not available on this gateway")
    return gw.vault


class VaultController(Controller):
    path = "/api/v1/vault/connections"

    @get()
    async def list_connections(self, gw: Gateway) -> list[dict[str, Any]]:
        """Every connection, secrets masked, with its last test and its users."""
        vault = _vault(gw)
        cfg, _ = await gw.config.load()
        used = references(cfg)
        return [vault.shown(r, used.get(r.id, [])) for r in await vault.records()]

    @post(status_code=201, responses=responses(409))
    async def create_connection(self, gw: Gateway, data: VaultConnectionBody) -> dict[str, Any]:
        """Test and save a connection (400 with the reason when the test fails, unless
        ``saveOnFailure``; 409 when the id is taken)."""
        record, _ = await _vault(gw).create(data)
        return VaultStore.shown(record, [])

    @delete("/{connection_id:str}", status_code=204, responses=responses(404, 409))
    async def delete_connection(self, gw: Gateway, connection_id: ConnectionIdParam) -> None:
        """Remove a connection (409 naming the servers and destinations using it)."""
        cfg, _ = await gw.config.load()
        await _vault(gw).delete(connection_id, cfg)

    @post("/{connection_id:str}/test", status_code=200, responses=responses(404))
    async def test_connection(
        self, gw: Gateway, connection_id: ConnectionIdParam, data: NoBody | None = None
    ) -> Response[dict[str, Any]]:
        """Log in with the stored credentials; the outcome becomes its ``status``."""
        record, ok = await _vault(gw).test(connection_id)
        return Response({"success": ok, "message": record.message, "status": record.status})


async def register_vault_commands(ctx: ServiceContext) -> None:
    """Answer the services' requests for credentials (``VaultCmd``): the inventory's for
    the SSH logins of configured servers, the job-orchestrator's and the transfer
    workers' for configured destinations (NATS permissions keep each to its subject)."""
    cipher = VaultCipher.from_settings(ctx.settings)

    def store() -> VaultStore:
        return VaultStore(ctx.bucket(buckets.VAULT), cipher, service_box(ctx))

    @ctx.bus.handle(VaultCmd.OPEN_SSH, VaultOpenRequest)
    async def open_ssh(req: VaultOpenRequest) -> VaultCredentials:
        cfg, _ = await read_agent_config(ctx.bucket(buckets.CONFIG))
        return await store().sealed_credentials(req.connection_id, cfg, servers=True)

    @ctx.bus.handle(VaultCmd.OPEN_DESTINATION, VaultOpenRequest)
    async def open_destination(req: VaultOpenRequest) -> VaultCredentials:
        cfg, _ = await read_agent_config(ctx.bucket(buckets.CONFIG))
        return await store().sealed_credentials(req.connection_id, cfg, servers=False)
