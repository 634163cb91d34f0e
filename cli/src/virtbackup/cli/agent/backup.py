"""One leased backup, run on the agent's own host: what the inventory and the transfer
workers do for a server, without NATS.

1. Find the VM's newest restore point (of this server) in the destination; begin a
   libvirt pull-mode backup with a new checkpoint, incremental from that point's
   checkpoint when libvirt's chain is intact (``virt.check_chain``), exported on a Unix
   socket in a directory only root and QEMU may enter (``virt.make_socket_dir``).
2. Per disk, read the extent maps over NBD and plan the chunks to read with the
   orchestrator's planner (``repository.planner``): allocated chunks for a full read,
   dirty ones for an incremental (the others come from the parent manifest).
3. Read, hash, compress, encrypt and store each chunk (``Repository``: content
   addressed, an existing chunk is not written again), reporting progress.
4. Ask to commit (``committing``): only when the gateway answers ``commit`` are the
   manifests, the domain XML and ``backup.json`` written; then the libvirt job ends and
   its checkpoint is kept. On a cancel or any failure the libvirt job ends and the new
   checkpoint is dropped, so the next incremental still covers every change.

A shut-off VM is backed up offline, as on the bus path: started paused for the read,
shut off again after it.

The VM's state files (UEFI NVRAM, TPM state) are saved with the point as on the bus
path (``agent.state``). Reading in part (a dirty chunk's ranges laid over its parent
chunk) is the bus path's only: an agent reads dirty chunks whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from virtbackup.cli.agent.inflight import InFlight
from virtbackup.cli.agent.state import capture_state
from virtbackup.contracts.v1.config import Destination
from virtbackup.nbd import BASE_ALLOCATION, NbdClient
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.format import manifest_key
from virtbackup.repository.planner import DiskPlan, build_manifest, plan_disk
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.storage.errors import NotFoundError
from virtbackup.virt import (
    BackupJob,
    Connection,
    UnixServer,
    VirtError,
    begin_backup,
    check_chain,
    end_backup,
    get_domain,
    list_disks,
    open_connection,
)
from virtbackup.virt.backup import SOCKET_NAME, make_socket_dir, qemu_owner
from virtbackup.virt.checkpoints import discard_checkpoint
from virtbackup.virt.domains import destroy_if_paused, domain_xml, start_paused
from virtbackup.virt.host import LocalHost

log = logging.getLogger(__name__)

#: Chunk reads (and stores) in flight at once.
CHUNKS_IN_FLIGHT: Final = 4
#: Seconds between two progress reports (each answer may ask to cancel).
REPORT_EVERY: Final = 1.0
NBD_TIMEOUT: Final = 30.0


class Cancelled(Exception):
    """The gateway answered ``cancel``: the job was cancelled or has ended."""


#: Sends one status report (``POST /api/v1/jobs/{id}/status``); returns the answer.
Report = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class Counters:
    bytes_read: int = 0
    bytes_written: int = 0
    total_bytes: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    stored: int = 0
    dedup: int = 0
    last_report: float = field(default_factory=time.monotonic)

    def fields(self) -> dict[str, int]:
        return {
            "bytesRead": self.bytes_read,
            "bytesWritten": self.bytes_written,
            "totalBytes": self.total_bytes,
            "chunksDone": self.chunks_done,
            "chunksTotal": self.chunks_total,
        }


async def send(report: Report, body: dict[str, Any]) -> dict[str, Any]:
    """Report, and raise ``Cancelled`` when the answer says to stop, or is a 409 (the job
    has ended: the gateway takes no more reports for it)."""
    try:
        answer = await report(body)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 409:
            raise Cancelled(str(exc)) from None
        raise
    if answer.get("cancel"):
        raise Cancelled(str(answer.get("state", "")))
    return answer


def debug_hold(where: str) -> float:
    """Seconds to wait at ``where`` (``VIRTBACKUP_AGENT_DEBUG_HOLDS``, a JSON object,
    honoured only with ``VIRTBACKUP_DEBUG``): tests aim a cancel at that moment."""
    if os.environ.get("VIRTBACKUP_DEBUG", "").lower() not in {"1", "true", "yes"}:
        return 0.0
    try:
        holds = json.loads(os.environ.get("VIRTBACKUP_AGENT_DEBUG_HOLDS", "{}"))
    except ValueError:
        return 0.0
    value = holds.get(where, 0.0) if isinstance(holds, dict) else 0.0
    return float(value) if isinstance(value, int | float) else 0.0


async def _debug_hold(where: str, report: Report, counters: Counters) -> None:
    """Wait :func:`debug_hold` seconds, reporting (so a cancel is seen) twice a second."""
    deadline = time.monotonic() + debug_hold(where)
    while time.monotonic() < deadline:
        await send(report, {"status": "uploading", **counters.fields()})
        await asyncio.sleep(0.5)


async def latest_point(repo: Repository, vm: str, server_id: str) -> RestorePoint | None:
    points = [p for p in await repo.restore_points(vm) if p.source_server_id == server_id]
    return points[-1] if points else None


def new_checkpoint_name() -> str:
    stamp = utcnow_iso().replace(":", "").replace("-", "").replace(".", "")
    return f"vb-{stamp}-{os.urandom(3).hex()}"


async def run_backup(
    job: dict[str, Any],
    destination: Destination,
    report: Report,
    *,
    scratch_dir: str,
    inflight: InFlight | None = None,
) -> str:
    """Run the leased backup ``job`` (the lease's ``job``) into ``destination``; returns
    the success message. Raises ``Cancelled`` when told to stop, anything else on failure
    (the libvirt job is ended and its checkpoint dropped either way). ``inflight`` names
    the running libvirt job meanwhile, for an agent started again after dying mid-job."""
    started = time.monotonic()
    vm = str(job["vmName"])
    server_id = str(job["serverId"])
    uri = str(job.get("libvirtUri") or "qemu:///system")
    repo = await open_repository(destination)
    conn = await open_connection(uri)
    checkpoint = new_checkpoint_name()
    try:
        parent = None if job.get("fresh") else await latest_point(repo, vm, server_id)
        if inflight is not None:
            # Written before the libvirt backup begins, with the checkpoint it will make:
            # an agent killed between the begin and a later write would leave a backup
            # job and a checkpoint that no restart knew of (every later backup of the VM
            # would then fail). A restart ends any backup job of the VM and drops that
            # checkpoint if it exists.
            await inflight.record(jobId=str(job["id"]), vm=vm, checkpoint=checkpoint, uri=uri)
        # The parent is recorded before anything builds on it: from now on deleting that
        # point is refused while this job runs (as for a backup on the bus).
        await send(
            report,
            {
                "status": "snapshotting",
                "message": "beginning the libvirt backup",
                "parentTimestamp": parent.timestamp if parent else "",
            },
        )
        offline = await _start_if_shut_off(conn, vm, inflight)
        try:
            bj, incremental_from = await _begin(conn, vm, parent, scratch_dir, checkpoint)
        except BaseException:
            if offline:
                with contextlib.suppress(Exception):
                    await destroy_if_paused(conn, vm)
            raise
        committed = False
        try:
            message = await _transfer(
                conn,
                repo,
                job,
                bj,
                parent if incremental_from else None,
                report,
                started,
                inflight,
                scratch_dir,
            )
            committed = True
            if offline:
                kind, _, rest = message.partition(" by agent")
                message = f"{kind} by agent (offline: the VM was shut off){rest}"
            return message
        finally:
            with contextlib.suppress(Exception):
                await end_backup(conn, bj, host=LocalHost())
            if offline:  # shut off again, unless someone resumed it meanwhile
                with contextlib.suppress(Exception):
                    await destroy_if_paused(conn, vm)
            if not committed and bj.checkpoint:
                with contextlib.suppress(Exception):
                    await discard_checkpoint(conn, vm, bj.checkpoint, host=LocalHost())
            if inflight is not None:
                await inflight.clear()
    except BaseException:
        # Failed or stopped before (or while) the libvirt backup began: nothing of ours
        # runs, but the checkpoint may have been made.
        with contextlib.suppress(Exception):
            await discard_checkpoint(conn, vm, checkpoint, host=LocalHost())
        if inflight is not None:
            await inflight.clear()
        raise
    finally:
        await conn.close()
        await repo.close()


async def _start_if_shut_off(conn: Connection, vm: str, inflight: InFlight | None) -> bool:
    """Start the VM paused if it is shut off, for an *offline* backup read by the same
    pull-mode backup as a running one (as the inventory does: the guest runs no
    instruction, and the checkpoints stay one chain whatever the VM's state at each
    backup); whether it did. The in-flight record says so first, so that an agent
    killed meanwhile shuts it off again when it starts (``inflight.recover``). Raises
    ``RuntimeError`` with libvirt's reason when it cannot be started paused."""
    dom = await get_domain(conn, vm)
    if dom.id is not None:
        return False
    if inflight is not None:
        await inflight.record(offline=True)
    try:
        await start_paused(conn, vm)
    except VirtError as exc:
        if (await get_domain(conn, vm)).id is not None:
            return False  # started by someone else meanwhile: an online backup
        raise RuntimeError(
            f"vm {vm} is shut off and could not be started paused for an offline backup: {exc}"
        ) from None
    log.info("vm %s was shut off: started paused for an offline backup", vm)
    return True


async def _begin(
    conn: Connection, vm: str, parent: RestorePoint | None, scratch_dir: str, checkpoint: str
) -> tuple[BackupJob, str | None]:
    dom = await get_domain(conn, vm)
    incremental: str | None = None
    full: list[str] = []
    if parent is not None and parent.checkpoint:
        chain = await check_chain(conn, vm, parent.checkpoint, host=LocalHost())
        if chain.usable:
            incremental = parent.checkpoint
            full = list(chain.disk_problems)
    host = LocalHost()
    os.makedirs(scratch_dir, mode=0o711, exist_ok=True)
    owner = await qemu_owner(conn, vm)
    if owner is None:
        raise RuntimeError(f"vm {vm}: its live XML names no user for QEMU (no DAC label)")
    socket_dir = await make_socket_dir(host, scratch_dir, dom.uuid, owner)
    try:
        bj = await begin_backup(
            conn,
            vm,
            server=UnixServer(socket=f"{socket_dir}/{SOCKET_NAME}"),
            scratch_dir=scratch_dir,
            checkpoint=checkpoint,
            incremental=incremental,
            full=full,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await host.run(["rm", "-rf", "--", socket_dir], timeout=30)
        raise
    return bj, incremental


async def _plan(
    conn: Connection, bj: BackupJob, repo: Repository, parent: RestorePoint | None
) -> list[DiskPlan]:
    disks = {d.target: d for d in await list_disks(conn, bj.domain)}
    plans = []
    for exp in bj.exports:
        contexts = [BASE_ALLOCATION] + ([exp.meta_context] if exp.meta_context else [])
        async with await NbdClient.connect_uri(
            bj.uri(exp.target), meta_contexts=contexts, timeout=NBD_TIMEOUT
        ) as nbd:
            allocation = await nbd.block_status(context=BASE_ALLOCATION)
            dirty = await nbd.block_status(context=exp.meta_context) if exp.meta_context else None
            size = nbd.size
        parent_manifest: DiskManifest | None = None
        if parent is not None and dirty is not None:
            with contextlib.suppress(NotFoundError):
                parent_manifest = await repo.manifest(parent, exp.target)
        disk = disks.get(exp.target)
        plans.append(
            plan_disk(
                target=exp.target,
                path=(disk.source or "") if disk else "",
                fmt=disk.format if disk else "raw",
                size=size,
                chunk_size=repo.chunk_size,
                nbd_url=bj.uri(exp.target),
                allocation=allocation,
                dirty=dirty,
                parent=parent_manifest,
            )
        )
    return plans


async def _read_disk(
    plan: DiskPlan, repo: Repository, counters: Counters, report: Report
) -> dict[int, str | None]:
    """Read and store every planned chunk of one disk; chunk ids by index (None: zero)."""
    refs: dict[int, str | None] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in plan.read:
        queue.put_nowait(index)
    async with await NbdClient.connect_uri(plan.nbd_url, timeout=NBD_TIMEOUT) as nbd:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                length = plan.chunk_length(index)
                data = await nbd.read(index * plan.chunk_size, length)
                counters.bytes_read += length
                refs[index] = await _store(repo, data, counters)
                counters.chunks_done += 1
                if time.monotonic() - counters.last_report >= REPORT_EVERY:
                    counters.last_report = time.monotonic()
                    await send(report, {"status": "uploading", **counters.fields()})

        await asyncio.gather(*(worker() for _ in range(CHUNKS_IN_FLIGHT)))
    return refs


async def _store(repo: Repository, data: bytes, counters: Counters) -> str | None:
    if data == bytes(len(data)):
        return None
    chunk_id = await asyncio.to_thread(repo.chunk_id, data)
    if await repo.has_chunk(chunk_id):
        counters.dedup += 1
        return chunk_id
    blob = await asyncio.to_thread(repo.encode_chunk, chunk_id, data)
    await repo.store_chunk(chunk_id, blob)
    counters.bytes_written += len(blob)
    counters.stored += 1
    return chunk_id


async def _transfer(
    conn: Connection,
    repo: Repository,
    job: dict[str, Any],
    bj: BackupJob,
    parent: RestorePoint | None,
    report: Report,
    started: float,
    inflight: InFlight | None,
    scratch_dir: str,
) -> str:
    vm, server_id = str(job["vmName"]), str(job["serverId"])
    xml = await domain_xml(conn, vm, inactive=True, secure=True)
    plans = await _plan(conn, bj, repo, parent)
    kind = "incremental" if parent is not None and any(p.incremental for p in plans) else "full"
    timestamp = await repo.new_timestamp(vm)
    counters = Counters(
        total_bytes=sum(p.read_bytes for p in plans),
        chunks_total=sum(len(p.read) for p in plans),
    )
    point_ids = {
        "timestamp": timestamp,
        "checkpoint": bj.checkpoint,
        "parentTimestamp": parent.timestamp if parent and kind == "incremental" else "",
    }
    await send(
        report,
        {
            "status": "reading",
            "message": f"{kind} backup: reading {counters.chunks_total} chunks",
            **point_ids,
            **counters.fields(),
            "output": [{"level": "info", "line": f"{kind} backup {timestamp} of {vm} begun"}],
        },
    )
    files = await capture_state(conn, vm, repo, scratch_dir, str(job["id"]))
    manifests = []
    for plan in plans:
        refs = await _read_disk(plan, repo, counters, report)
        manifests.append(build_manifest(plan, refs))
    point = RestorePoint(
        vm_name=vm,
        timestamp=timestamp,
        source_server_id=server_id,
        source_server_name=server_id,
        kind="incremental" if kind == "incremental" else "full",
        checkpoint=bj.checkpoint,
        parent_checkpoint=bj.incremental,
        parent_timestamp=point_ids["parentTimestamp"] or None,
        disks=[
            DiskRecord(
                target=p.target,
                basename=os.path.basename(p.path) or p.target,
                path=p.path,
                format=p.format,
                size=p.size,
                manifest=manifest_key(vm, timestamp, p.target),
                stored_chunks=sum(1 for c in m.chunks if c is not None),
                zero_chunks=sum(1 for c in m.chunks if c is None),
            )
            for p, m in zip(plans, manifests, strict=True)
        ],
        created_at=utcnow_iso(),
        duration_seconds=round(time.monotonic() - started, 3),
        bytes_read=counters.bytes_read,
        bytes_written=counters.bytes_written,
        job_id=str(job["id"]),
        files=files,
    )
    await _debug_hold("before:committing", report, counters)
    # The final counters go with it: a read shorter than REPORT_EVERY sent none before.
    answer = await send(
        report,
        {"status": "committing", "message": "committing the restore point", **counters.fields()},
    )
    if not answer.get("commit"):
        raise Cancelled("commit refused")
    await repo.commit(point, manifests, xml)
    if inflight is not None:
        await inflight.record(committed=True)
    return (
        f"{kind} backup {timestamp} by agent: {counters.chunks_total} chunks read, "
        f"{counters.stored} stored, {counters.dedup} deduplicated"
    )
