"""The notifier's definition: webhooks and ntfy notifications from the bus's events.

See ``pipeline`` for how deliveries are made durable and ``delivery`` for what a webhook
receiver gets.
"""

from __future__ import annotations

import httpx

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.notifier.handlers import register_commands
from virtbackup.notifier.pipeline import Pipeline
from virtbackup.notifier.store import WebhookStore
from virtbackup.runtime.sealing import SecretBox
from virtbackup.runtime.service import ServiceContext, ServiceSpec

_pipelines: dict[int, Pipeline] = {}


async def register(ctx: ServiceContext) -> None:
    box = SecretBox.from_settings(ctx.settings)
    client = httpx.AsyncClient(follow_redirects=False, headers={"Accept": "*/*"})
    pipeline = Pipeline(
        ctx=ctx, store=WebhookStore(lambda: ctx.bucket(buckets.WEBHOOKS), box), client=client
    )
    _pipelines[id(ctx)] = pipeline
    register_commands(pipeline)


async def start(ctx: ServiceContext) -> None:
    ctx.spawn(_pipelines[id(ctx)].run(), "notifier-pipeline")


async def stop(ctx: ServiceContext) -> None:
    pipeline = _pipelines.pop(id(ctx))
    await pipeline.stop()
    await pipeline.client.aclose()


SPEC = ServiceSpec(
    name=subjects.NOTIFIER,
    streams=(streams.EVENTS, streams.NOTIFY),
    buckets=(buckets.WEBHOOKS,),
    register=register,
    start=start,
    stop=stop,
)
