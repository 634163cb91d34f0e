"""The transfer-worker's definition: it announces itself in ``VB_WORKERS`` while alive."""

from __future__ import annotations

import asyncio
import os

import msgspec

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.runtime import __version__
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.service import ServiceContext, ServiceSpec

HEARTBEAT_SECONDS = 10.0


class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    instance: str
    pid: int
    version: str
    started_at: str
    seen_at: str


async def _heartbeat(ctx: ServiceContext) -> None:
    kv = ctx.bucket(buckets.WORKERS)
    while not ctx.stopping.is_set():
        beat = WorkerHeartbeat(
            instance=ctx.settings.instance,
            pid=os.getpid(),
            version=__version__,
            started_at=ctx.started_at,
            seen_at=utcnow_iso(),
        )
        await kv.put(_key(ctx), msgspec.json.encode(beat))
        try:
            await asyncio.wait_for(ctx.stopping.wait(), HEARTBEAT_SECONDS)
        except TimeoutError:
            continue


def _key(ctx: ServiceContext) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in ctx.settings.instance)


async def start(ctx: ServiceContext) -> None:
    ctx.spawn(_heartbeat(ctx), "heartbeat")


async def stop(ctx: ServiceContext) -> None:
    await ctx.bucket(buckets.WORKERS).delete(_key(ctx))


SPEC = ServiceSpec(
    name=subjects.TRANSFER_WORKER,
    streams=(streams.EVENTS, streams.WORK),
    consumers=(streams.TRANSFER_CONSUMER,),
    buckets=(buckets.WORKERS,),
    start=start,
    stop=stop,
)
