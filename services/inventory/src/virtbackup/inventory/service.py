"""The inventory service: hypervisor servers, VMs, actions, lifecycle events, backup jobs."""

from __future__ import annotations

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.inventory.checkpoint_size import register_checkpoint_size
from virtbackup.inventory.handlers import register as register_handlers
from virtbackup.inventory.inventory import Inventory
from virtbackup.inventory.networks import register_networks
from virtbackup.inventory.vm_remove import register_vm_remove
from virtbackup.runtime.service import ServiceContext, ServiceSpec

_state: dict[str, Inventory] = {}


async def register(ctx: ServiceContext) -> None:
    inv = Inventory(ctx)
    _state[ctx.name] = inv
    register_handlers(ctx, inv)
    register_checkpoint_size(ctx, inv)
    register_networks(ctx, inv)
    register_vm_remove(ctx, inv)


async def start(ctx: ServiceContext) -> None:
    inv = _state[ctx.name]
    await inv.load_installation()
    await inv.sync_config()
    ctx.spawn(inv.follow_config(), "follow-config")


async def stop(ctx: ServiceContext) -> None:
    await _state.pop(ctx.name).close()


SPEC = ServiceSpec(
    name=subjects.INVENTORY,
    streams=(streams.EVENTS,),
    # VB_JOBS and VB_LOCKS are read only: whether the job a running libvirt backup
    # belongs to is active, and whether a backup or restore holds a VM (cleanup).
    buckets=(buckets.INVENTORY, buckets.CONFIG, buckets.JOBS, buckets.LOCKS),
    register=register,
    start=start,
    stop=stop,
)
