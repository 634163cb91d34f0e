"""``vb.cmd.inventory.networks``: the libvirt networks a server has (a migration checks
its ``network_mapping`` against the target's before anything starts)."""

from __future__ import annotations

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import NetworkList, ServerRef
from virtbackup.inventory.inventory import Inventory
from virtbackup.runtime.errors import Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.virt import VirtError


def register_networks(ctx: ServiceContext, inv: Inventory) -> None:
    @ctx.bus.handle(InventoryCmd.NETWORKS, ServerRef)
    async def networks(req: ServerRef) -> NetworkList:
        """The names of every network defined on the server (active or not), sorted;
        404 for an unknown server, 503 when it cannot be reached."""
        conn = await (await inv.entry_fresh(req.server_id)).host.connection()
        try:
            found = await conn.call(conn.raw.listAllNetworks)
        except VirtError as exc:
            raise Unavailable(f"server {req.server_id}: listing its networks: {exc}") from None
        return NetworkList(names=sorted(n.name() for n in found))
