"""The inventory's command handlers: bus in, libvirt, bus out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1 import state as st
from virtbackup.contracts.v1.inventory import (
    BackupBeginRequest,
    BackupBegun,
    BackupEnded,
    BackupEndRequest,
    CdromRemoved,
    Checkpoint,
    CheckpointForgetRequest,
    CheckpointList,
    CleanupResult,
    DiskInfo,
    DiskList,
    DomainXml,
    Ok,
    RestoreFinishRequest,
    RestorePrecheckRequest,
    RestorePrecheckResult,
    RestorePrepared,
    RestorePrepareRequest,
    ServerList,
    ServerRef,
    ServerVms,
    VmActionRequest,
    VmDisks,
    VmInfo,
    VmRef,
    VmsDisks,
    VmsDisksRequest,
)
from virtbackup.inventory import backups, ownership, reconcile, restores, state_files
from virtbackup.inventory.inventory import Inventory, _power
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, ServiceError, Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.virt import (
    backup_running,
    check_chain,
    get_domain,
    list_checkpoints,
    list_disks,
)
from virtbackup.virt.checkpoints import discard_checkpoint
from virtbackup.virt.domains import DomainAction, domain_xml, eject_cdrom, perform_action
from virtbackup.virt.errors import Conflict as VirtConflict
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.errors import VirtError
from virtbackup.virt.leftovers import cleanup_leftovers

ACTIONS = {
    "start": DomainAction.START,
    "reboot": DomainAction.REBOOT,
    "shutdown": DomainAction.SHUTDOWN,
    "forceReset": DomainAction.FORCE_RESET,
    "forceOff": DomainAction.FORCE_OFF,
}


@contextlib.asynccontextmanager
async def libvirt_errors(server_id: str, vm_name: str | None = None) -> AsyncIterator[None]:
    """libvirt's errors as the bus's: unknown VM 404, forbidden by state 409 (naming the
    VM: e.g. a power-off of a VM that is not running is refused, never reported done),
    else 503."""
    try:
        yield
    except VirtNotFound as exc:
        what = f"vm {vm_name!r}" if vm_name else "object"
        raise NotFound(f"{what} not found on server {server_id}: {exc}") from None
    except VirtConflict as exc:
        if vm_name and vm_name not in str(exc):
            raise Conflict(f"vm {vm_name!r} on server {server_id}: {exc}") from None
        raise Conflict(str(exc)) from None
    except VirtError as exc:
        raise Unavailable(f"server {server_id}: {exc}") from None


def register(ctx: ServiceContext, inv: Inventory) -> None:
    bus = ctx.bus
    scratch = ctx.settings.scratch_dir

    @bus.handle(InventoryCmd.SERVERS, ServerRef)
    async def servers(_: ServerRef) -> ServerList:
        return ServerList(servers=inv.states())

    @bus.handle(InventoryCmd.VMS, ServerRef)
    async def vms(req: ServerRef) -> ServerVms:
        return await inv.vms(req.server_id)

    @bus.handle(InventoryCmd.REFRESH, ServerRef)
    async def refresh(req: ServerRef) -> Ok:
        await inv.refresh(req.server_id)
        return Ok()

    @bus.handle(InventoryCmd.TEST_SSH, ServerRef)
    async def test_ssh(req: ServerRef) -> Ok:
        entry = await inv.entry_fresh(req.server_id)
        try:
            return Ok(message=await entry.host.test_ssh())
        except Unavailable as exc:
            return Ok(success=False, message=exc.message)

    @bus.handle(InventoryCmd.ACTION, VmActionRequest)
    async def action(req: VmActionRequest) -> Ok:
        action = ACTIONS.get(req.action)
        if action is None:
            raise BadRequest(f"unknown action {req.action!r} (known: {', '.join(ACTIONS)})")
        entry = await inv.entry_fresh(req.server_id)
        conn = await entry.host.connection()
        jobs = ctx.bucket(buckets.JOBS)
        async with libvirt_errors(req.server_id, req.vm_name):
            await ownership.check_restore_hold(conn, req.vm_name, jobs)
            await backups.check_offline_hold(
                entry.host,
                req.vm_name,
                jobs,
                inv.installation,
                await entry.host.scratch_dir(scratch),
            )
            await perform_action(conn, req.vm_name, action)
        with contextlib.suppress(Unavailable, VirtError):
            await inv.refresh_vm(req.server_id, req.vm_name)
        return Ok()

    @bus.handle(InventoryCmd.CLEANUP, VmRef)
    async def cleanup(req: VmRef) -> CleanupResult:
        """Remove what interrupted backups left (backup job, checkpoints, scratch files,
        overlays). Conflict naming the job while a job of this installation holds the VM
        (a live or offline backup, a restore): cleanup is for leftovers. A VM an offline
        backup whose job has ended left paused is shut off again first."""
        entry = await inv.entry_fresh(req.server_id)
        conn = await entry.host.connection()
        async with (
            inv.vm_lock(req.server_id, req.vm_name),
            libvirt_errors(req.server_id, req.vm_name),
        ):
            await get_domain(conn, req.vm_name)
            jobs = ctx.bucket(buckets.JOBS)
            await backups.check_offline_hold(
                entry.host,
                req.vm_name,
                jobs,
                inv.installation,
                await entry.host.scratch_dir(scratch),
            )
            await reconcile.check_no_job_holds(
                entry.host, req.vm_name, jobs, ctx.bucket(buckets.LOCKS), inv.installation
            )
            report = await cleanup_leftovers(
                conn,
                req.vm_name,
                scratch_dir=await entry.host.scratch_dir(scratch),
                host=await entry.host.host(),
            )
            await ownership.untag(conn, req.vm_name)
        actions = []
        if report.aborted_job:
            actions.append("aborted the running backup job")
        actions += [f"deleted checkpoint {c}" for c in report.deleted_checkpoints]
        actions += [f"committed overlay {o.path}" for o in report.committed_overlays]
        actions += [f"removed {f}" for f in report.removed_files]
        with contextlib.suppress(Unavailable, VirtError):
            await inv.refresh_vm(req.server_id, req.vm_name)
        return CleanupResult(actions=actions)

    @bus.handle(InventoryCmd.DOMAIN_XML, VmRef)
    async def get_xml(req: VmRef) -> DomainXml:
        conn = await (await inv.entry_fresh(req.server_id)).host.connection()
        async with libvirt_errors(req.server_id, req.vm_name):
            return DomainXml(xml=await domain_xml(conn, req.vm_name, inactive=True, secure=True))

    async def disk_infos(req: VmRef) -> list[DiskInfo]:
        entry = await inv.entry_fresh(req.server_id)
        conn = await entry.host.connection()
        async with libvirt_errors(req.server_id, req.vm_name):
            # A simulated server's disks have no files: libvirt's sizes or none, no qemu-img.
            host = None if entry.host.is_simulated else await entry.host.host()
            disks = await list_disks(conn, req.vm_name, host=host)
        return [
            DiskInfo(
                target=d.target,
                path=d.source or "",
                format=d.format,
                capacity=d.capacity or 0,
                device=d.device,
            )
            for d in disks
        ]

    @bus.handle(InventoryCmd.DISKS, VmRef)
    async def disks(req: VmRef) -> DiskList:
        return DiskList(disks=[d for d in await disk_infos(req) if d.device == "disk"])

    @bus.handle(InventoryCmd.DISKS_MANY, VmsDisksRequest)
    async def disks_many(req: VmsDisksRequest) -> VmsDisks:
        """Each VM's disks as ``disks`` answers them; a VM that cannot be read has its
        fault instead (the others are still answered). One VM after the other: the calls
        go to one libvirt connection, whose pool of up to 4 threads each call in flight
        would fill (a preview of 1,000 servers asks many servers at once instead). A
        server that cannot be reached (``unavailable``) is tried once: the VMs after
        that one get its fault."""
        out: list[VmDisks] = []
        for index, name in enumerate(req.vm_names):
            try:
                found = await disk_infos(VmRef(server_id=req.server_id, vm_name=name))
            except Unavailable as exc:
                fault = exc.to_fault()
                out += [VmDisks(vm_name=n, fault=fault) for n in req.vm_names[index:]]
                break
            except ServiceError as exc:
                out.append(VmDisks(vm_name=name, fault=exc.to_fault()))
                continue
            out.append(VmDisks(vm_name=name, disks=[d for d in found if d.device == "disk"]))
        return VmsDisks(vms=out)

    @bus.handle(InventoryCmd.VM_INFO, VmRef)
    async def vm_info(req: VmRef) -> VmInfo:
        conn = await (await inv.entry_fresh(req.server_id)).host.connection()
        async with libvirt_errors(req.server_id, req.vm_name):
            dom = await get_domain(conn, req.vm_name)
            raw = await conn.lookup(req.vm_name)
            info = await conn.call(raw.info)
        every = await disk_infos(req)
        return VmInfo(
            name=dom.name,
            uuid=dom.uuid,
            power_state=_power(str(dom.power_state)),
            vcpus=int(info[3]),
            memory_mb=int(info[1]) // 1024,
            disks=[d for d in every if d.device == "disk"],
            cdroms=sum(1 for d in every if d.device == "cdrom"),
        )

    @bus.handle(InventoryCmd.REMOVE_CDROM, VmRef)
    async def remove_cdrom(req: VmRef) -> CdromRemoved:
        conn = await (await inv.entry_fresh(req.server_id)).host.connection()
        async with libvirt_errors(req.server_id, req.vm_name):
            ejected = await eject_cdrom(conn, req.vm_name)
        message = f"ejected {', '.join(ejected)}" if ejected else "no CD-ROM medium"
        return CdromRemoved(message=message, ejected=ejected)

    @bus.handle(InventoryCmd.CHECKPOINTS, VmRef)
    async def checkpoints(req: VmRef) -> CheckpointList:
        entry = await inv.entry_fresh(req.server_id)
        conn = await entry.host.connection()
        async with libvirt_errors(req.server_id, req.vm_name):
            found = await list_checkpoints(conn, req.vm_name)
            latest = max(found, key=lambda c: c.creation_time).name if found else None
            chain = await check_chain(conn, req.vm_name, latest, host=await entry.host.host())
        return CheckpointList(
            checkpoints=[
                Checkpoint(
                    name=c.name,
                    parent=c.parent,
                    created_at=c.creation_time,
                    disks=[d.target for d in c.disks],
                )
                for c in found
            ],
            chain_intact=latest is not None and chain.intact,
        )

    @bus.handle(InventoryCmd.CHECKPOINT_FORGET, CheckpointForgetRequest)
    async def checkpoint_forget(req: CheckpointForgetRequest) -> Ok:
        """Delete the checkpoint of a deleted restore point (its bitmaps: QEMU updates
        every one on every write). libvirt merges a running domain's bitmap into the
        parent's, so later incrementals stay whole; a stopped domain's bitmaps record
        every write since their checkpoint and are removed (``discard_checkpoint``). Left,
        with the reason, while a backup job runs on the VM or a job of this installation
        holds it; a VM or checkpoint that is gone already is success."""
        entry = await inv.entry_fresh(req.server_id)
        conn = await entry.host.connection()
        async with (
            inv.vm_lock(req.server_id, req.vm_name),
            libvirt_errors(req.server_id, req.vm_name),
        ):
            try:
                await get_domain(conn, req.vm_name)
            except VirtNotFound:
                return Ok(message=f"vm {req.vm_name} is not on server {req.server_id}")
            if await backup_running(conn, req.vm_name):
                return Ok(success=False, message="a backup job runs on the VM")
            jobs = ctx.bucket(buckets.JOBS)
            try:
                await backups.check_offline_hold(
                    entry.host,
                    req.vm_name,
                    jobs,
                    inv.installation,
                    await entry.host.scratch_dir(scratch),
                )
                await reconcile.check_no_job_holds(
                    entry.host, req.vm_name, jobs, ctx.bucket(buckets.LOCKS), inv.installation,
                    holder=req.job_id,
                )  # fmt: skip
            except Conflict as held:
                return Ok(success=False, message=held.message)
            try:
                await discard_checkpoint(
                    conn, req.vm_name, req.checkpoint, host=await entry.host.host()
                )
            except VirtNotFound:
                return Ok(message=f"checkpoint {req.checkpoint} is gone already")
        return Ok(message=f"deleted checkpoint {req.checkpoint} of vm {req.vm_name}")

    @bus.handle(InventoryCmd.BACKUP_BEGIN, BackupBeginRequest)
    async def backup_begin(req: BackupBeginRequest) -> BackupBegun:
        entry = await inv.entry_fresh(req.server_id)
        async with (
            inv.vm_lock(req.server_id, req.vm_name),
            libvirt_errors(req.server_id, req.vm_name),
        ):
            return await backups.begin(
                entry.host, req, await entry.host.scratch_dir(scratch), inv.creds, inv.installation
            )

    @bus.handle(InventoryCmd.RESTORE_PRECHECK, RestorePrecheckRequest)
    async def restore_precheck(req: RestorePrecheckRequest) -> RestorePrecheckResult:
        entry = await inv.entry_fresh(req.server_id)
        async with libvirt_errors(req.server_id, req.vm_name):
            return await restores.precheck(entry.host, req)

    @bus.handle(InventoryCmd.RESTORE_PREPARE, RestorePrepareRequest)
    async def restore_prepare(req: RestorePrepareRequest) -> RestorePrepared:
        entry = await inv.entry_fresh(req.server_id)
        async with libvirt_errors(req.server_id):
            return await restores.prepare(entry.host, req, inv.creds, inv.installation)

    @bus.handle(InventoryCmd.RESTORE_FINISH, RestoreFinishRequest)
    async def restore_finish(req: RestoreFinishRequest) -> Ok:
        entry = await inv.entry_fresh(req.server_id)
        async with libvirt_errors(req.server_id, req.vm_name):
            left = await restores.finish(entry.host, req)
        with contextlib.suppress(Unavailable, VirtError):
            await inv.refresh_vm(req.server_id, req.vm_name)
        # A failed restore's images that could not be removed: said, not an error.
        return Ok(message=f"could not remove {', '.join(left)}" if left else "")

    register_state(ctx, inv)

    @bus.handle(InventoryCmd.BACKUP_END, BackupEndRequest)
    async def backup_end(req: BackupEndRequest) -> BackupEnded:
        entry = await inv.entry_fresh(req.server_id)
        async with (
            inv.vm_lock(req.server_id, req.vm_name),
            libvirt_errors(req.server_id, req.vm_name),
        ):
            stopped = await backups.end(entry.host, req, await entry.host.scratch_dir(scratch))
        # What the end removed (scratch files of a VM that stopped meanwhile, which
        # libvirt leaves: VirtBackup made them) was seen as leftovers by the refresh
        # the VM's stop caused.
        with contextlib.suppress(Unavailable, VirtError):
            await inv.refresh_vm(req.server_id, req.vm_name)
        return BackupEnded(vm_stopped=stopped)


def register_state(ctx: ServiceContext, inv: Inventory) -> None:
    """The state-file commands (:mod:`.state_files`)."""
    bus = ctx.bus
    scratch = ctx.settings.scratch_dir

    @bus.handle(InventoryCmd.STATE_SNAPSHOT, st.StateSnapshotRequest)
    async def state_snapshot(req: st.StateSnapshotRequest) -> st.StateSnapshot:
        host = (await inv.entry_fresh(req.server_id)).host
        async with libvirt_errors(req.server_id, req.vm_name):
            return await state_files.take_snapshot(host, req, await host.scratch_dir(scratch))

    @bus.handle(InventoryCmd.STATE_READ, st.StateReadRequest)
    async def state_read(req: st.StateReadRequest) -> st.StatePiece:
        host = (await inv.entry_fresh(req.server_id)).host
        async with libvirt_errors(req.server_id):
            return await state_files.read(host, req, await host.scratch_dir(scratch))

    @bus.handle(InventoryCmd.STATE_RELEASE, st.StateReleaseRequest)
    async def state_release(req: st.StateReleaseRequest) -> Ok:
        host = (await inv.entry_fresh(req.server_id)).host
        async with libvirt_errors(req.server_id):
            await state_files.release(host, req, await host.scratch_dir(scratch))
        return Ok()

    @bus.handle(InventoryCmd.STATE_PREPARE, st.StatePrepareRequest)
    async def state_prepare(req: st.StatePrepareRequest) -> st.StatePrepared:
        async with libvirt_errors(req.server_id):
            return await state_files.prepare((await inv.entry_fresh(req.server_id)).host, req)

    @bus.handle(InventoryCmd.STATE_WRITE, st.StateWriteRequest)
    async def state_write(req: st.StateWriteRequest) -> Ok:
        async with libvirt_errors(req.server_id):
            await state_files.write((await inv.entry_fresh(req.server_id)).host, req)
        return Ok()
