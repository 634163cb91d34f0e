"""The transfer-worker: pulls units from ``VB_WORK`` and announces itself in ``VB_WORKERS``.

It reads ``VB_JOBS`` (never writes it) to drop the units of jobs that ended or are being
cancelled. It also serves instant-access exports of restore points
(``vb.cmd.worker.serve-export``, records in ``VB_EXPORTS``; see ``instant``).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import msgspec

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.v1.work import TransferUnit
from virtbackup.runtime import __version__
from virtbackup.runtime.agent_config import read_agent_config
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.service import ServiceContext, ServiceSpec
from virtbackup.runtime.work import WorkConsumer, drop_work_consumer
from virtbackup.transfer_worker.allocator import keep_large_buffers
from virtbackup.transfer_worker.budget import ByteBudget
from virtbackup.transfer_worker.consumer import Worker, follow_job_ends
from virtbackup.transfer_worker.instant import InstantExports
from virtbackup.transfer_worker.instant import commands as instant_commands
from virtbackup.transfer_worker.units import UnitContext, chunk_budget

#: A worker's entry in ``VB_WORKERS`` outlives two missed heartbeats.
HEARTBEAT_SECONDS = buckets.WORKERS.ttl_seconds / 3


#: At most this often a unit starting or ending rewrites the heartbeat before it is due.
BUSY_UPDATE_SECONDS = 0.5


class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A worker's entry in ``VB_WORKERS``; ``busy_units`` is how many transfer units it
    is working on (``/status``'s ``active_workers`` counts workers with at least one)."""

    instance: str
    pid: int
    version: str
    started_at: str
    seen_at: str
    busy_units: int = 0


async def _heartbeat(ctx: ServiceContext, worker: Worker) -> None:
    kv = ctx.bucket(buckets.WORKERS)
    while not ctx.stopping.is_set():
        worker.changed.clear()
        beat = WorkerHeartbeat(
            instance=ctx.settings.instance,
            pid=os.getpid(),
            version=__version__,
            started_at=ctx.started_at,
            seen_at=utcnow_iso(),
            busy_units=worker.busy_units,
        )
        await kv.put(_key(ctx), msgspec.json.encode(beat))
        try:  # beat again when due, or soon after a unit starts or ends
            await asyncio.wait_for(worker.changed.wait(), HEARTBEAT_SECONDS)
            await asyncio.wait_for(ctx.stopping.wait(), BUSY_UPDATE_SECONDS)
        except TimeoutError:
            continue


def _key(ctx: ServiceContext) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in ctx.settings.instance)


_exports: dict[int, InstantExports] = {}


async def register(ctx: ServiceContext) -> None:
    ix = InstantExports(ctx, worker=_key(ctx))
    _exports[id(ctx)] = ix
    instant_commands.attach(ctx.bus, ix)


def transfer_consumer(ctx: ServiceContext) -> streams.ConsumerSpec:
    return msgspec.structs.replace(
        streams.TRANSFER_CONSUMER, ack_wait_seconds=ctx.settings.work_ack_wait
    )


def pinned_consumer(ctx: ServiceContext) -> streams.ConsumerSpec:
    return msgspec.structs.replace(
        streams.pinned_consumer(_key(ctx)), ack_wait_seconds=ctx.settings.work_ack_wait
    )


async def start(ctx: ServiceContext) -> None:
    keep_large_buffers()
    consumer = WorkConsumer(ctx.bus, transfer_consumer(ctx), TransferUnit)
    await consumer.ensure()
    # The units a plan run pins to this worker (``agent_id: worker:<key>``).
    pinned = WorkConsumer(ctx.bus, pinned_consumer(ctx), TransferUnit)
    await pinned.ensure()
    cfg, _ = await read_agent_config(ctx.bucket(buckets.CONFIG))
    threads = ctx.settings.worker_threads or os.cpu_count() or 2
    uctx = UnitContext(
        worker=ctx.settings.instance,
        executor=ThreadPoolExecutor(threads, thread_name_prefix="chunk"),
        budget=ByteBudget(chunk_budget(cfg.hashblocks_limit_buffer_mb << 20)),
    )
    worker = Worker(ctx, uctx, consumer, pinned)
    ix = _exports[id(ctx)]
    ix.executor = uctx.executor
    ctx.spawn(ix.follow(), "instant-exports")
    ctx.spawn(follow_job_ends(ctx, worker), "job-events")
    ctx.spawn(worker.run(), "work-loop")
    ctx.spawn(_heartbeat(ctx, worker), "heartbeat")


async def stop(ctx: ServiceContext) -> None:
    ix = _exports.pop(id(ctx), None)
    if ix is not None:
        await ix.close_all()
    await ctx.bucket(buckets.WORKERS).delete(_key(ctx))
    # Units still pinned here stay queued (and fail their job when it stalls): the
    # consumer goes, the stream keeps them.
    await drop_work_consumer(ctx.bus, streams.WORK, pinned_consumer(ctx).durable)


SPEC = ServiceSpec(
    name=subjects.TRANSFER_WORKER,
    streams=(streams.EVENTS, streams.WORK),
    buckets=(buckets.WORKERS, buckets.CONFIG, buckets.JOBS, buckets.EXPORTS),
    register=register,
    start=start,
    stop=stop,
)
