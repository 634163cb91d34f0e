"""``vb.cmd.inventory.checkpoint-size``: how much a VM's disks changed since a checkpoint.

A plan's dry-run preview says how many bytes an incremental would read without reading
any data: libvirt reports, for a running domain, each bitmap's dirty size since the
checkpoint (``virDomainCheckpointGetXMLDesc`` with ``VIR_DOMAIN_CHECKPOINT_XML_SIZE``,
QEMU's merged bitmaps from that checkpoint to now). A disk whose bitmap is missing or
broken has no size (the backup reads it in full).
"""

from __future__ import annotations

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.plans import CheckpointSize, CheckpointSizeRequest, DiskDirtySize
from virtbackup.inventory.handlers import libvirt_errors
from virtbackup.inventory.inventory import Inventory
from virtbackup.runtime.service import ServiceContext
from virtbackup.virt.checkpoints import get_checkpoint


def register_checkpoint_size(ctx: ServiceContext, inv: Inventory) -> None:
    @ctx.bus.handle(InventoryCmd.CHECKPOINT_SIZE, CheckpointSizeRequest)
    async def checkpoint_size(req: CheckpointSizeRequest) -> CheckpointSize:
        """404 for an unknown VM or checkpoint, 409 when the domain is not running."""
        conn = await (await inv.entry_fresh(req.server_id)).host.connection()
        async with (
            inv.vm_lock(req.server_id, req.vm_name),
            libvirt_errors(req.server_id, req.vm_name),
        ):
            found = await get_checkpoint(conn, req.vm_name, req.checkpoint, with_size=True)
        return CheckpointSize(
            checkpoint=found.name,
            disks=[
                DiskDirtySize(target=d.target, size=d.size if d.bitmap else None)
                for d in found.disks
            ],
        )
