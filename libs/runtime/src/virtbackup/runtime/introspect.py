"""What the bus knows about the running system: every replica's answer to a ping,
the state of a stream and its consumer, and the NATS server the process is connected to
(for ``/api/v1/runtime-state`` and ``/healthz``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

import msgspec
from nats.js.errors import NotFoundError

from virtbackup.runtime.bus import Bus

T = TypeVar("T")
_encoder = msgspec.json.Encoder()


async def request_all(
    bus: Bus, subject: str, message: msgspec.Struct, result_type: type[T], *, wait: float = 0.5
) -> list[T]:
    """Send ``message`` on ``subject`` once and gather every reply that arrives within
    ``wait`` seconds (each instance of a service answers its ping: its replicas).
    Replies that are faults or do not decode are left out."""
    decoder = msgspec.json.Decoder(dict[str, Any])
    inbox = bus.nc.new_inbox()
    replies: list[T] = []
    sub = await bus.nc.subscribe(inbox)
    try:
        await bus.nc.publish(subject, _encoder.encode(message), reply=inbox)
        deadline = asyncio.get_running_loop().time() + wait
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except Exception:  # nats' TimeoutError: no more replies
                break
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                body = decoder.decode(msg.data)
                if body.get("result") is not None:
                    replies.append(msgspec.convert(body["result"], result_type))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return replies


async def stream_state(bus: Bus, stream: str, durable: str | None = None) -> dict[str, Any]:
    """``messages``, ``bytes``, ``firstSeq``, ``lastSeq`` of ``stream``, and of its
    consumer ``durable``: ``pending`` (not yet delivered), ``ackPending`` (delivered, not
    acknowledged), ``redelivered``. ``{"exists": false}`` when the stream does not exist."""
    try:
        info = await bus.js.stream_info(stream)
    except NotFoundError:
        return {"stream": stream, "exists": False}
    out: dict[str, Any] = {
        "stream": stream,
        "exists": True,
        "messages": info.state.messages,
        "bytes": info.state.bytes,
        "firstSeq": info.state.first_seq,
        "lastSeq": info.state.last_seq,
    }
    if durable is not None:
        try:
            consumer = await bus.js.consumer_info(stream, durable)
        except NotFoundError:
            out["consumer"] = {"name": durable, "exists": False}
        else:
            out["consumer"] = {
                "name": durable,
                "exists": True,
                "pending": consumer.num_pending or 0,
                "ackPending": consumer.num_ack_pending or 0,
                "redelivered": consumer.num_redelivered or 0,
                "waiting": consumer.num_waiting or 0,
            }
    return out


def server_state(bus: Bus) -> dict[str, Any]:
    """The NATS server this process is connected to: ``connected``, ``url`` (without
    credentials), ``serverId``, ``serverName``, ``version``, ``jetstream``."""
    nc = bus.nc if bus.connected else None
    if nc is None:
        return {"connected": False}
    info: dict[str, Any] = dict(getattr(nc, "_server_info", {}) or {})
    url = nc.connected_url
    shown = f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else None
    return {
        "connected": True,
        "url": shown,
        "serverId": info.get("server_id"),
        "serverName": info.get("server_name"),
        "version": info.get("version"),
        "jetstream": bool(info.get("jetstream")),
        "maxPayload": info.get("max_payload"),
    }


async def account_state(bus: Bus) -> dict[str, Any]:
    """JetStream use of this account: ``memory``, ``storage`` (bytes), ``streams``,
    ``consumers``."""
    info = await bus.js.account_info()
    return {
        "memory": info.memory,
        "storage": info.storage,
        "streams": info.streams,
        "consumers": info.consumers,
    }
