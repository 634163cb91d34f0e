"""Idempotent provisioning of streams, consumers and key-value buckets at start."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import BucketSpec
from virtbackup.contracts.streams import ConsumerSpec, StreamSpec

log = logging.getLogger(__name__)

_RETENTION = {
    "limits": RetentionPolicy.LIMITS,
    "workqueue": RetentionPolicy.WORK_QUEUE,
    "interest": RetentionPolicy.INTEREST,
}


def stream_config(spec: StreamSpec, *, replicas: int = 1) -> StreamConfig:
    """The JetStream configuration of ``spec``, stored on ``replicas`` servers (1 on a
    single server; 3 on a 3-node JetStream cluster: ``VIRTBACKUP_STREAM_REPLICAS``)."""
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=_RETENTION[spec.retention],
        storage=StorageType.FILE,
        max_age=spec.max_age_seconds or None,
        max_bytes=spec.max_bytes,
        duplicate_window=spec.duplicate_window_seconds,
        description=spec.description or None,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        num_replicas=replicas,
    )


async def ensure_stream(js: JetStreamContext, spec: StreamSpec, *, replicas: int = 1) -> None:
    """Create the stream, or bring an existing one to ``spec`` (and to ``replicas``)."""
    config = stream_config(spec, replicas=replicas)
    try:
        await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("stream created", extra={"stream": spec.name})
            return
        except BadRequestError:
            # Another instance created it between our look-up and our add.
            pass
    await js.update_stream(config)


async def ensure_consumer(
    js: JetStreamContext, spec: ConsumerSpec, *, keep_existing: bool = False, new_only: bool = False
) -> None:
    """Create (or update) the durable consumer ``spec``.

    ``keep_existing``: a consumer that exists is left exactly as it is (its position and
    settings). ``new_only``: a consumer created now starts at the next message stored in
    the stream rather than at its first."""
    if keep_existing:
        try:
            await js.consumer_info(spec.stream, spec.durable)
            return
        except NotFoundError:
            pass
    config = ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_seconds,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        deliver_policy=DeliverPolicy.NEW if new_only else DeliverPolicy.ALL,
        inactive_threshold=spec.inactive_threshold_seconds,
    )
    await js.add_consumer(spec.stream, config)


async def delete_consumer(js: JetStreamContext, stream: str, durable: str) -> None:
    """Delete the durable consumer; one that does not exist is not an error."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, durable)


async def ensure_bucket(js: JetStreamContext, spec: BucketSpec, *, replicas: int = 1) -> KeyValue:
    """Create the bucket if it does not exist (on ``replicas`` servers), and return it."""
    try:
        return await js.key_value(spec.name)
    except (NotFoundError, Exception) as exc:  # nats-py raises BucketNotFoundError
        if type(exc).__name__ not in {"BucketNotFoundError", "NotFoundError"}:
            raise
    config = KeyValueConfig(
        bucket=spec.name,
        history=spec.history,
        ttl=spec.ttl_seconds or None,
        description=spec.description or None,
        storage=StorageType.FILE,
        replicas=replicas,
    )
    try:
        return await js.create_key_value(config)
    except BadRequestError:
        return await js.key_value(spec.name)


async def provision(
    js: JetStreamContext,
    *,
    streams: Iterable[StreamSpec] = (),
    consumers: Iterable[ConsumerSpec] = (),
    buckets: Iterable[BucketSpec] = (),
    replicas: int = 1,
) -> dict[str, KeyValue]:
    """Provision everything a service owns; returns its buckets by name. Streams and
    buckets are created with ``replicas`` copies (JetStream refuses more replicas than
    it has servers: ``BadRequestError``)."""
    for stream in streams:
        await ensure_stream(js, stream, replicas=replicas)
    for consumer in consumers:
        await ensure_consumer(js, consumer)
    return {bucket.name: await ensure_bucket(js, bucket, replicas=replicas) for bucket in buckets}
